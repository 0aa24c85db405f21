"""The tokenization contract shared by scoring, likelihood tracking and training.

- Prompt: a string prompt is wrapped as one user message and rendered with the
  tokenizer's chat template (`add_generation_prompt=True`) when the tokenizer has
  one, else tokenized with `tokenizer(prompt)` and its default special tokens.
  A conversational prompt (a list of messages) is rendered as is.
- Response: `tokenizer(response, add_special_tokens=False)` followed by EOS,
  tokenized apart from the prompt (what TRL's DPOTrainer trains on).
- Truncation to `max_length` (prompt + longer response) keeps the prompt's end and
  each response's start, and marks the pair `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair, Prompt


class TruncationError(ChesCurateError):
    """A pair cannot be represented within `max_length` tokens."""


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The rendered template already holds its special tokens (e.g. BOS): do not add them twice.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise ChesCurateError(
            "a conversational prompt needs a tokenizer with a chat template; this model has none "
            "(use a chat model or give the prompt as a string)"
        )
    return tokenizer(prompt)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ChesCurateError("the tokenizer has no EOS token; responses must end with one (set tokenizer.eos_token)")
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def truncate(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int | None) -> EncodedPair:
    """Fit prompt + each response into `max_length` tokens.

    The prompt keeps its last `max(max_length - longest_response, max_length // 2)`
    tokens (at least one: the last prompt position predicts the first response
    token); each response then keeps its first `max_length - prompt` tokens.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return EncodedPair(prompt_ids, chosen_ids, rejected_ids, truncated=False)
    if max_length < 2:
        raise TruncationError(f"max_length={max_length} leaves no room for a prompt and a response (use >= 2)")
    keep_prompt = max(1, min(len(prompt_ids), max(max_length - longest, max_length // 2)))
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
    room = max_length - keep_prompt
    return EncodedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated=True)


def encode_pair(tokenizer, pair: PreferencePair, max_length: int | None = None) -> EncodedPair:
    """Token ids of a pair under the contract above."""
    encoded = truncate(
        encode_prompt(tokenizer, pair.prompt),
        encode_response(tokenizer, pair.chosen),
        encode_response(tokenizer, pair.rejected),
        max_length,
    )
    if not encoded.prompt_ids:
        raise TruncationError(f"row {pair.row}: the prompt encodes to 0 tokens; CHES needs the last prompt position")
    return encoded
