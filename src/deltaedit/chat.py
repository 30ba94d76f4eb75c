"""Edits and evaluations through a tokenizer's chat template (instruct models are queried as chats).

``as_chat`` wraps every prompt of a request (the edit template with its ``{}``, paraphrases, neighbourhood
prompts) as the user's turn of a one-turn conversation, ending where the assistant's answer begins; the
subject stays inside, so keys are read at the same token, and the answer follows the template's own text.
"""

from __future__ import annotations

from dataclasses import replace

from .data.records import EditRecord
from .requests import PLACEHOLDER, EditRequest


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template, or its template drops the prompt's placeholder."""


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as a user turn, followed by what starts the assistant's turn (the template's generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("--chat: this tokenizer has no chat template; edit and evaluate raw prompts")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def as_chat(request: EditRequest, tokenizer) -> EditRequest:
    """The same request with every prompt in chat form (targets and subject unchanged)."""
    template = chat_prompt(tokenizer, request.prompt)
    if template.count(PLACEHOLDER) != 1:
        raise ChatTemplateError("--chat: the chat template changes the prompt's '{}'; it cannot mark the subject")
    return replace(
        request,
        prompt=template,
        paraphrase_prompts=tuple(chat_prompt(tokenizer, p) for p in request.paraphrase_prompts),
        neighborhood_prompts=tuple(chat_prompt(tokenizer, p) for p in request.neighborhood_prompts),
    )


def chat_records(records: list[EditRecord], tokenizer) -> list[EditRecord]:
    return [replace(record, request=as_chat(record.request, tokenizer)) for record in records]
