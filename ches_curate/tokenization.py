"""The tokenization contract: the token ids TRL's DPOTrainer trains on, shared by scoring, export and training.

CHES means something only for the tokens DPO trains on, so there is one tokenization,
TRL's (trl 1.16, `DPOTrainer._prepare_dataset` and `DataCollatorForPreference`), applied
to the example `export` writes for the pair (`trl_example`):

- **Conversational** (the default, for a tokenizer with a chat template): the prompt is
  a list of messages (a plain prompt is one `user` message), each response one
  `assistant` message. prompt = `apply_chat_template(prompt, add_generation_prompt=True)`,
  prompt + response = `apply_chat_template(prompt + [response])`: the response ends with
  the template's end-of-turn tokens (`<|im_end|>`, `\\n` for ChatML).
- **Standard** (`--no-chat-template`, or a tokenizer without a chat template): plain text.
  EOS is appended to each response text (unless it ends with it); prompt =
  `tokenizer(prompt)`, prompt + response = `tokenizer(prompt + response + eos)`, with the
  tokenizer's default special tokens. Only a plain prompt can be written this way: a
  conversation of several messages needs the chat template.

Either way the response starts where the tokenized prompt and prompt + response first
differ, taking the earlier point of the two responses (TRL's `common_prefix_length`):
tokens that merge across the boundary belong to the response, and the prompt is cut there.

Truncation is TRL's `max_length` with `truncation_mode="keep_start"` (its default): a pair
whose prompt alone has `max_length` tokens or more is dropped by TRL, so it cannot be
scored; otherwise the prompt is kept whole and each response keeps its first
`max_length - len(prompt)` tokens. TRL's `keep_end` is not supported: it cuts the prompt
of the chosen and the rejected sequence at different places, and CHES needs one prompt.

Scores record the contract they were computed under (`current_version`), so a change of
contract (or of `--no-chat-template`) re-scores rather than mixes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ches_curate.errors import ChesCurateError
from ches_curate.pairs import Message, PreferencePair, Prompt, plain_prompt, prompt_messages

logger = logging.getLogger(__name__)

CONTRACT_VERSION = "2"
"""Bumped whenever the ids of some pair change. Version 1 (before TRL's tokenization) had the response alone + EOS."""
RAW_SUFFIX = "-raw"
"""Marks scores made with `--no-chat-template` (plain prompts tokenized as text)."""

_CHAT_TEMPLATE: ContextVar[bool] = ContextVar("ches_curate_chat_template", default=True)
_WARNED_NO_TEMPLATE: set[int] = set()


class TruncationError(ChesCurateError):
    """A pair that cannot be scored as TRL trains on it (the scorer stops, or quarantines it with this reason)."""


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


@contextmanager
def use_chat_template(enabled: bool) -> Iterator[None]:
    """Within the block, plain prompts go through the chat template (True, the default) or are tokenized as text.

    This is what `--no-chat-template` sets: the scorer, the store's score bookkeeping and
    training read it when no explicit `chat_template` is passed.
    """
    token = _CHAT_TEMPLATE.set(enabled)
    try:
        yield
    finally:
        _CHAT_TEMPLATE.reset(token)


def chat_template_requested(chat_template: bool | None = None) -> bool:
    """`chat_template`, or when None the setting of the enclosing `use_chat_template` (default True)."""
    return _CHAT_TEMPLATE.get() if chat_template is None else chat_template


def current_version(chat_template: bool | None = None) -> str:
    """The `tokenization_version` scores are recorded under: `2`, or `2-raw` without the chat template."""
    return CONTRACT_VERSION + ("" if chat_template_requested(chat_template) else RAW_SUFFIX)


def recorded_version(tokenizer, chat_template: bool | None = None) -> str:
    """The `tokenization_version` of scores made with `tokenizer`: `2` when plain prompts go through its chat
    template, `2-raw` when they are tokenized as text (asked for, or the tokenizer has no chat template)."""
    return current_version(chat_template_requested(chat_template) and bool(getattr(tokenizer, "chat_template", None)))


def describe_tokenization(version: str) -> str:
    """`tokenization 2: chat template` or `tokenization 2-raw: plain text`, for summary lines."""
    return f"tokenization {version}: {'plain text' if is_raw(version) else 'chat template'}"


def is_raw(version: str) -> bool:
    """Whether scores of `version` were made without the chat template (exported as standard rows)."""
    return version.endswith(RAW_SUFFIX)


def renders_chat(tokenizer, chat_template: bool | None = None) -> bool:
    """Whether pairs are written conversationally for this tokenizer: requested, and it has a chat template."""
    if not chat_template_requested(chat_template):
        return False
    if getattr(tokenizer, "chat_template", None):
        return True
    if id(tokenizer) not in _WARNED_NO_TEMPLATE:
        _WARNED_NO_TEMPLATE.add(id(tokenizer))
        logger.warning("the tokenizer has no chat template: plain prompts are tokenized as text (TRL's standard "
                       f"format), recorded as tokenization {current_version(False)}; export writes text rows")
    return False


def trl_example(pair: PreferencePair, conversational: bool) -> dict:
    """The pair as a TRL preference example: conversational (message lists) or standard (strings).

    A standard example needs a plain prompt (a string or one user message).
    """
    if conversational:
        return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt_messages(pair.prompt)],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}]}
    text = plain_prompt(pair.prompt)
    if text is None:
        raise TruncationError(f"the prompt is a conversation of {len(pair.prompt)} messages, which TRL tokenizes only "
                              "through a chat template (use a model that has one, without --no-chat-template)")
    return {"prompt": text, "chosen": pair.chosen, "rejected": pair.rejected}


def encode_pair(tokenizer, pair: PreferencePair, max_length: int | None = None,
                chat_template: bool | None = None) -> EncodedPair:
    """The prompt, chosen and rejected ids TRL's DPOTrainer trains on for `pair` (see the module docstring).

    Raises `TruncationError` for a pair TRL would drop or that has no prompt token left
    (CHES needs the last prompt position).
    """
    example = trl_example(pair, renders_chat(tokenizer, chat_template))
    prompt_ids, (chosen_ids, rejected_ids) = _tokenize(tokenizer, example["prompt"],
                                                      [example["chosen"], example["rejected"]])
    return _truncate(prompt_ids, chosen_ids, rejected_ids, max_length)


def encode_response(tokenizer, prompt: Prompt, response: str, chat_template: bool | None = None) -> list[int]:
    """The ids of `response` as TRL trains on it after `prompt` (untruncated): what its first token is, say."""
    example = trl_example(PreferencePair(prompt, response, response), renders_chat(tokenizer, chat_template))
    return _tokenize(tokenizer, example["prompt"], [example["chosen"]])[1][0]


def encode_prompt(tokenizer, prompt: Prompt, chat_template: bool | None = None) -> list[int]:
    """The prompt's ids before any response, as TRL tokenizes it: the input for generating a response."""
    example = trl_example(PreferencePair(prompt, "", ""), renders_chat(tokenizer, chat_template))
    if isinstance(example["prompt"], list):
        return _chat_ids(tokenizer, example["prompt"], add_generation_prompt=True)
    return tokenizer(text=example["prompt"])["input_ids"]


def _tokenize(tokenizer, prompt: str | list[Message],
              responses: list[str] | list[list[Message]]) -> tuple[list[int], list[list[int]]]:
    """`DPOTrainer._prepare_dataset`'s `add_eos` and `tokenize_fn`, for one prompt and its responses."""
    if isinstance(prompt, list):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_chat_ids(tokenizer, prompt + response) for response in responses]
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise ChesCurateError("the tokenizer has no EOS token, which TRL appends to every response "
                                  "(set tokenizer.eos_token)")
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full = [tokenizer(text=prompt + (r if r.endswith(eos) else r + eos))["input_ids"] for r in responses]
    prompt_len = min(_common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:prompt_len], [ids[prompt_len:] for ids in full]


def _chat_ids(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
    # TRL renders with tools=None and tokenizes in the same call (no special tokens added twice).
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, tools=None,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


def _common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """`trl.data_utils.common_prefix_length`: leading tokens the two sequences share."""
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def _truncate(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
              max_length: int | None) -> EncodedPair:
    """TRL's `keep_start`: drop a pair whose prompt fills `max_length`, else cut each response to the room left."""
    if not prompt_ids:
        raise TruncationError("the prompt encodes to 0 tokens; CHES needs the last prompt position")
    if max_length is not None and len(prompt_ids) >= max_length:
        raise TruncationError(f"the prompt is {len(prompt_ids):,} tokens, so max_length={max_length} leaves no room "
                              "for a response (TRL drops such a pair; raise --max-length)")
    longest = max(len(chosen_ids), len(rejected_ids))
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return EncodedPair(prompt_ids, chosen_ids, rejected_ids, truncated=False)
    room = max_length - len(prompt_ids)
    return EncodedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated=True)
