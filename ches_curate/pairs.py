"""The preference pair: the one record type every stage passes along.

A pair is normalised at ingest so that later stages never look at source formats:
the prompt is either a plain string or a list of chat messages, and each response
is the plain text of the assistant's answer. Its texts are normalised when it is made
(`normalize_text`: CRLF -> LF, Unicode NFC), so `pair_id`, the identical-response check,
tokenization, the store and export all see one text: two rows with one `pair_id` are
one pair and get one score.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, str]
Prompt = Union[str, list[Message]]

SCORE_COLUMNS = (
    "row",
    "pair_id",
    "ches",
    "ln_ches",
    "chosen_tokens",
    "rejected_tokens",
    "last_hidden_ip",
    "edit_distance",
    "truncated",
)
"""Columns of a score table, in order: the contract of `ches-curate score` and `score_pairs`."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: prompt x, preferred response y+ (`chosen`), dispreferred y- (`rejected`).

    `row` is the 0-based position in the input; `format` names the source format
    (`prompt_chosen_rejected`, `conversational` or `hh_rlhf`).
    """

    prompt: Prompt
    chosen: str
    rejected: str
    row: int = 0
    format: str = "prompt_chosen_rejected"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "rejected"):
            object.__setattr__(self, name, _normalize(getattr(self, name)))

    @property
    def pair_id(self) -> str:
        return pair_id(self.prompt, self.chosen, self.rejected)

    @property
    def prompt_text(self) -> str:
        """The prompt as one readable string (messages joined as `role: content`)."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.prompt)


def prompt_messages(prompt: Prompt) -> list[Message]:
    """The prompt as chat messages: a string prompt is one `user` message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def plain_prompt(prompt: Prompt) -> str | None:
    """The text of a prompt that is plain text (a string, or exactly one `user` message); None for a conversation."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return None


def normalize_text(text: str) -> str:
    """The one normalisation every comparison of texts uses: line endings unified (CRLF -> LF), Unicode NFC."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n"))


def _normalize(value: Prompt) -> Any:
    if isinstance(value, str):
        return normalize_text(value)
    return [{"role": m["role"], "content": normalize_text(m["content"])} for m in value]


def pair_id(prompt: Prompt, chosen: str, rejected: str) -> str:
    """Stable id: sha256 of the canonical JSON of the normalised conversation (prompt, chosen, rejected).

    The same pair in any layout gets one id: a prompt of one `user` message counts as
    its text (so the TRL conversational, UltraFeedback and prompt/chosen/rejected layouts
    of a single-turn pair agree, and plain pairs keep the ids of earlier releases); a
    longer conversation counts as its list of `{role, content}` messages. Line endings
    are unified (CRLF -> LF) and Unicode is NFC-normalised, so the same pair read from a
    CSV on Windows or a JSONL on Linux gets the same id.
    """
    text = plain_prompt(prompt)
    canonical = json.dumps(
        {"prompt": _normalize(prompt if text is None else text), "chosen": _normalize(chosen),
         "rejected": _normalize(rejected)},
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
