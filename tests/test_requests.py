"""Edit requests: every validation error names its field; tokenizer-dependent checks; subject location."""

from __future__ import annotations

import pytest
from conftest import build_tokenizer

from deltaedit.requests import EditRequest, RequestError, check_tokenization, target_text
from deltaedit.tokens import encode, target_ids


def make(**changes) -> EditRequest:
    fields = {"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"}
    fields.update(changes)
    return EditRequest(**fields)


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"subject": ""}, "subject", "empty"),
        ({"subject": "   "}, "subject", "empty"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"target_new": ""}, "target_new", "empty"),
        ({"target_new": " \t"}, "target_new", "empty"),
        ({"target_true": 3}, "target_true", "string"),
        ({"target_new": "\u200b"}, "target_new", "no visible characters"),  # a zero-width space
        ({"subject": 123}, "subject", "must be text, not int"),
        ({"subject": "{}", "prompt": "The capital of {} is"}, "subject", "contains '{}'"),
        ({"prompt": "The capital of Italy is"}, "prompt", "does not contain the subject"),
        ({"prompt": "France, the capital of France, is"}, "prompt", "2 times"),
        ({"prompt": "{} and {} are"}, "prompt", "2 '{}' placeholders"),
        ({"paraphrase_prompts": ["ok {}", ""]}, "paraphrase_prompts", "non-empty"),
        ({"neighborhood_prompts": [None]}, "neighborhood_prompts", "non-empty"),
    ],
)
def test_structural_errors_name_the_field(changes, field, words):
    with pytest.raises(RequestError) as info:
        make(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)


def test_subject_written_in_once_becomes_a_template():
    request = make(prompt="The capital of France is")
    assert request.prompt == "The capital of {} is"
    assert request.text == "The capital of France is"


def test_template_and_lists_are_normalized():
    request = make(paraphrase_prompts="In {} the capital is", neighborhood_prompts=["a", "b"], case_id=7)
    assert request.paraphrase_prompts == ("In {} the capital is",)
    assert request.neighborhood_prompts == ("a", "b")
    assert request.case_id == "7"
    assert EditRequest.from_dict(request.to_dict()) == request


def test_from_dict_errors():
    with pytest.raises(RequestError) as info:
        EditRequest.from_dict({"prompt": "{} is", "subject": "x", "target_new": "y", "target": "z"})
    assert info.value.field == "target" and "known fields" in str(info.value)
    with pytest.raises(RequestError) as info:
        EditRequest.from_dict({"prompt": "{} is", "subject": "x"})
    assert info.value.field == "target_new" and "missing" in str(info.value)


def test_target_text_separator():
    assert target_text(make()) == " Rome"
    assert target_text(make(prompt="The capital of {} is ")) == "Rome"
    assert target_text(make(target_new=" Rome")) == " Rome"


# --- checks against a tokenizer ---------------------------------------------------------------------


def test_good_request_passes_tokenizer_checks(tokenizer):
    check_tokenization(make(), tokenizer, max_length=64)
    assert target_ids(tokenizer, make()) == [tokenizer.convert_tokens_to_ids("Rome")]


def test_target_that_tokenizes_to_nothing(tokenizer):
    request = make(target_new="\ufffd")  # visible, but the test tokenizer's normalizer drops it
    with pytest.raises(RequestError) as info:
        check_tokenization(request, tokenizer, max_length=64)
    assert info.value.field == "target_new" and "tokenizes to nothing" in str(info.value)


def test_target_the_tokenizer_cannot_represent(tokenizer):
    with pytest.raises(RequestError) as info:
        check_tokenization(make(target_new="Moskva \u0416"), tokenizer, max_length=64)
    assert info.value.field == "target_new" and "cannot represent" in str(info.value)


def test_prompt_longer_than_the_context(tokenizer):
    long = make(prompt="The capital of the old city in the large country of {} is")
    n_prompt = len(tokenizer(long.text)["input_ids"])  # 14 tokens, <s> included
    check_tokenization(long, tokenizer, max_length=n_prompt + 1)  # prompt + 1 target token fits exactly
    with pytest.raises(RequestError) as info:
        check_tokenization(long, tokenizer, max_length=n_prompt - 2)
    assert info.value.field == "prompt"
    assert "longer than the model's context of" in str(info.value)
    check_tokenization(long, tokenizer, max_length=None)  # unknown context: no limit


def test_context_check_counts_the_tokens_the_model_sees(tokenizer):
    long = make(prompt="The capital of the old city in the large country of {} is")
    n_fed = len(tokenizer(long.text)["input_ids"]) + len(target_ids(tokenizer, long))  # what the model runs on
    with pytest.raises(RequestError):
        check_tokenization(long, tokenizer, max_length=n_fed - 1)


def test_prompt_longer_than_a_models_context(tokenizer, make_model):
    from deltaedit import Editor

    model = make_model("gpt2", n_layers=2)  # n_positions = 64
    editor = Editor(model, tokenizer, method="alphaedit", config={"layers": [0]}, progress=False)
    long = make(prompt="The capital of {} is" + " old" * 70)
    with pytest.raises(RequestError) as info:
        editor.validate([make(), long])
    assert info.value.field == "prompt" and "context of 64" in str(info.value)


# --- locating the subject's last token -------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "subject", "prefix", "last_token"),
    [
        ("The capital of {} is", "France", "", "France"),
        ("The mother tongue of {} is", "Danielle Darrieux", "", "Darrieux"),
        ("{} works for", "Einstein", "", "Einstein"),
        ("The capital of {} is", "Zorbland", "", "##d"),  # unknown word: characters, the last one
        ("The capital of {} is", "France", "Because Paris. ", "France"),
    ],
)
def test_encode_finds_the_subjects_last_token(tokenizer, template, subject, prefix, last_token):
    encoded = encode(tokenizer, template, subject, prefix=prefix)
    tokens = tokenizer.convert_ids_to_tokens(encoded.ids)
    assert tokens[0] == "<s>"
    assert tokens[encoded.subject_index] == last_token
    assert encoded.ids == tokenizer(prefix + template.replace("{}", subject))["input_ids"]
    # the token right after the subject belongs to the template
    rest = template.split("{}")[1].split()
    if rest:
        assert tokens[encoded.subject_index + 1] == rest[0]


def test_encode_with_a_slow_style_tokenizer(tokenizer):
    """Without offsets the subject ends where the tokenized text up to it ends."""

    class Slow:
        is_fast = False

        def __call__(self, text, **kwargs):
            return tokenizer(text, **kwargs)

    fast = encode(tokenizer, "The mother tongue of {} is", "Danielle Darrieux")
    slow = encode(Slow(), "The mother tongue of {} is", "Danielle Darrieux")
    assert slow == fast


def test_a_prompt_longer_than_the_edit_bound_is_refused_whatever_the_model(tokenizer):
    long = make(prompt="The" + " old" * 600 + " capital of {} is")
    with pytest.raises(RequestError) as info:
        check_tokenization(long, tokenizer, max_length=None)
    assert info.value.field == "prompt" and "at most 512 tokens" in str(info.value)


def test_as_chat_wraps_every_prompt_and_keeps_the_subject_marked(tokenizer):
    from deltaedit.chat import ChatTemplateError, as_chat

    request = make(paraphrase_prompts=("France has a capital",), neighborhood_prompts=("The capital of Italy is",))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        as_chat(request, tokenizer)
    chatty = build_tokenizer()
    chatty.chat_template = "User: {{ messages[0]['content'] }}\n{% if add_generation_prompt %}Assistant:{% endif %}"
    wrapped = as_chat(request, chatty)
    assert wrapped.prompt == "User: The capital of {} is\nAssistant:" and wrapped.subject == "France"
    assert wrapped.text == "User: The capital of France is\nAssistant:" and wrapped.target_new == "Rome"
    assert wrapped.paraphrase_prompts == ("User: France has a capital\nAssistant:",)
    assert wrapped.neighborhood_prompts == ("User: The capital of Italy is\nAssistant:",)
