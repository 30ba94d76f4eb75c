"""Edit requests and their validation.

A request is checked twice: once on its own (structure, in ``EditRequest.__post_init__``) and once
against a tokenizer (``check_tokenization``), because "the target tokenizes to nothing" or "the
prompt is longer than the model's context" only make sense for a given model. Both raise
``RequestError`` naming the offending field, before anything touches the model.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

PLACEHOLDER = "{}"
MAX_EDIT_TOKENS = 512  # prompt (behind its longest context prefix) plus target; facts are a sentence, not a page


class EditError(Exception):
    """An edit that was refused or failed; the model and the method's state are as they were before it.

    ``reason`` says what went wrong, ``request`` is the request (the raw item when it never became one, a
    tuple of requests when a whole batch failed, ``None`` when unknown) and ``field`` names the culprit: a
    request field for :class:`RequestError`, the failed quantity (``"target"``: the target vector,
    ``"update"``: a layer's solve or update) for :class:`EditFailure`.
    """

    def __init__(self, reason: str, request: Any = None, field: str | None = None):
        super().__init__(f"{field}: {reason}" if field is not None else reason)
        self.reason = reason
        self.request = request
        self.field = field


class RequestError(EditError, ValueError):
    """A request that cannot be applied; ``field`` names the culprit, the message says the fix."""

    def __init__(self, field_name: str, message: str, request: Any = None):
        super().__init__(message, request, field_name)


class EditFailure(EditError, FloatingPointError):
    """A numerical fault while computing an edit (the target vector or a layer update is not finite, or a
    solve is singular); the edit was rolled back. Not the request's fault in form, but this request cannot
    be written with these settings."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    ``prompt`` holds ``{}`` where ``subject`` goes ("The capital of {} is"). A prompt with the subject
    already written in is accepted when the subject occurs in it exactly once; it is turned into a
    template. ``target_new`` is the continuation the model should produce; ``target_true`` (optional)
    is the fact it replaces. Paraphrase and neighbourhood prompts are evaluation material only.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    case_id: str | None = None

    def __post_init__(self) -> None:
        examples = {"subject": "'France'", "prompt": "'The capital of {} is'", "target_new": "'Rome'"}
        for name, example in examples.items():
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RequestError(name, f"must be text, not {type(value).__name__} {value!r}; e.g. {example}")
            if not visible(value):
                raise RequestError(name, f"is empty or has no visible characters ({value!r}); give e.g. {example}")
        if PLACEHOLDER in self.subject:
            raise RequestError("subject", "contains '{}'; the subject is the text that fills the prompt's '{}'")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise RequestError("target_true", "must be a string or None")
        for name in ("prompt", "subject", "target_new", "target_true"):
            _check_encodable(name, getattr(self, name))
        object.__setattr__(self, "prompt", _to_template(self.prompt, self.subject))
        for name in ("paraphrase_prompts", "neighborhood_prompts"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            try:
                value = tuple(value)
            except TypeError:
                raise RequestError(name, "must be a list of non-empty strings") from None
            if not all(isinstance(p, str) and p.strip() for p in value):
                raise RequestError(name, "must be a list of non-empty strings")
            for text in value:
                _check_encodable(name, text)
            object.__setattr__(self, name, value)
        if self.case_id is not None:
            object.__setattr__(self, "case_id", str(self.case_id))

    @property
    def text(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.replace(PLACEHOLDER, self.subject)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paraphrase_prompts"] = list(self.paraphrase_prompts)
        data["neighborhood_prompts"] = list(self.neighborhood_prompts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise RequestError(sorted(unknown)[0], f"is not a request field; known fields: {sorted(known)}")
        for required in ("prompt", "subject", "target_new"):
            if required not in data:
                raise RequestError(required, "is missing")
        return cls(**data)


def visible(text: str) -> str:
    """``text`` without white space, control characters and invisible format characters (zero-width spaces,
    joiners, direction marks)."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc"))


def _check_encodable(name: str, text: str | None) -> None:
    """Tokenizers take UTF-8: a lone surrogate (from broken decoding upstream) would crash them later."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(name, f"is not valid Unicode text ({err.reason} at position {err.start})") from None


def _to_template(prompt: str, subject: str) -> str:
    count = prompt.count(PLACEHOLDER)
    if count == 1:
        return prompt
    if count > 1:
        raise RequestError("prompt", f"holds {count} '{{}}' placeholders; use exactly one for the subject")
    occurrences = prompt.count(subject)
    if occurrences == 1:
        return prompt.replace(subject, PLACEHOLDER)
    if occurrences == 0:
        raise RequestError(
            "prompt",
            f"has no '{{}}' placeholder and does not contain the subject {subject!r}; "
            "write the prompt as a template like 'The capital of {} is'",
        )
    raise RequestError(
        "prompt",
        f"contains the subject {subject!r} {occurrences} times; mark the one to edit with '{{}}'",
    )


def spaced(prompt: str, answer: str) -> str:
    """An answer as it follows its prompt: with a separating space unless the prompt ends in one or the answer
    starts with one. The one rule for how targets are trained and answers scored."""
    return answer if prompt.endswith((" ", "\n")) or answer.startswith(" ") else " " + answer


def target_text(request: EditRequest) -> str:
    """The new target as it follows the prompt."""
    return spaced(request.prompt, request.target_new)


def check_tokenization(
    request: EditRequest, tokenizer, max_length: int | None, prefixes: tuple[str, ...] = ("",)
) -> None:
    """Checks that need the model's tokenizer: a non-empty target and a prompt that fits the context.

    ``prefixes`` are the context texts an edit prepends; the longest of them must still fit.
    """
    target_ids = tokenizer(target_text(request), add_special_tokens=False)["input_ids"]
    if len(target_ids) == 0:
        raise RequestError("target_new", f"{request.target_new!r} tokenizes to nothing; use visible text")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids and tokenizer.unk_token not in request.target_new:
        raise RequestError("target_new", f"{request.target_new!r} contains characters the tokenizer cannot represent")
    # counted the way the model is fed: with special tokens, behind the longest context prefix
    total = max(len(tokenizer(prefix + request.text)["input_ids"]) for prefix in prefixes) + len(target_ids)
    if total > MAX_EDIT_TOKENS:
        raise RequestError(
            "prompt",
            f"prompt plus target is {total} tokens (with the longest context prefix); deltaedit edits facts of at "
            f"most {MAX_EDIT_TOKENS} tokens (an edit's cost grows with its length); shorten the prompt",
        )
    if max_length is not None and total > max_length:
        raise RequestError(
            "prompt",
            f"prompt plus target is {total} tokens (with the longest context prefix), longer than the "
            f"model's context of {max_length}; shorten the prompt",
        )


__all__ = [
    "EditError",
    "EditFailure",
    "EditRequest",
    "RequestError",
    "check_tokenization",
    "target_text",
    "PLACEHOLDER",
]
