"""Batched, exact CHES scoring of preference pairs.

Why it is fast:
- the base model runs without the LM head (no logits: CHES needs hidden states only);
- the prompt is run once per pair and its KV cache serves both responses
  (hh-rlhf prompts are long: this alone saves ~1.5x tokens);
- a response's last token (EOS) is never fed: only positions P-1 … P+|y|-2 predict
  response tokens, and position P-1 is the prompt's last;
- pairs read ahead are bucketed by length so padding stays small.

Why it is exact: explicit attention masks and position ids make padding invisible
(right or left), and hidden states are summed in float64, so results do not depend
on batch size, padding side or prompt sharing beyond float32 kernel rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import pandas as pd
import torch
from rapidfuzz.distance import Levenshtein

from ches_curate.ches import ches_scores, last_hidden_inner_product
from ches_curate.errors import ChesCurateError
from ches_curate.models import LoadedModel, load_model
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.tokenization import EncodedPair, TruncationError, encode_pair


@dataclass
class ScoringConfig:
    """How to score. Results do not depend on `batch_size`, `padding_side` or `share_prompt`."""

    batch_size: int = 8
    """Pairs per forward pass."""
    max_length: int | None = None
    """Cap on prompt + response tokens; longer pairs keep the prompt's end and the responses' start."""
    device: str = "auto"
    """cuda > mps > cpu when auto."""
    dtype: str = "float32"
    """Model weights and activations: float32, bfloat16 or float16 (sums are always float64)."""
    share_prompt: bool = True
    """Run each prompt once and reuse its KV cache for both responses."""
    padding_side: str = "right"
    """Where padding goes inside a batch; only for testing that it does not matter."""
    bucket_batches: int = 16
    """Read this many batches ahead and sort them by length to reduce padding."""
    on_error: str = "fail"
    """`fail` stops at the first pair that cannot be scored; `quarantine` records it in `Scorer.failures`."""
    trust_remote_code: bool = False


@dataclass
class _Encoded:
    pair: PreferencePair
    pair_id: str
    tokens: EncodedPair


class Scorer:
    """Scores pairs with one loaded model; `key` identifies the model, revision and dtype."""

    def __init__(self, model: str | LoadedModel = "default", config: ScoringConfig | None = None):
        self.config = config or ScoringConfig()
        if self.config.padding_side not in ("left", "right"):
            raise ChesCurateError(f"padding_side must be 'left' or 'right', not {self.config.padding_side!r}")
        if self.config.on_error not in ("fail", "quarantine"):
            raise ChesCurateError(f"on_error must be 'fail' or 'quarantine', not {self.config.on_error!r}")
        if isinstance(model, LoadedModel):
            self.loaded = model
        else:
            self.loaded = load_model(model, self.config.device, self.config.dtype, self.config.trust_remote_code)
        self.key = self.loaded.key
        self.base = self.loaded.model.base_model
        # transformers 5.x renamed `past_key_values` to `cache`; accept both.
        self._cache_arg = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        tokenizer = self.loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.failures: list[dict] = []
        """Pairs that could not be scored (with `on_error="quarantine"`): row, pair_id, field, reason."""
        self.context_length: int | None = getattr(self.loaded.model.config, "max_position_embeddings", None)
        """Positions the model has; a longer pair is refused, not run (its attention mask alone can need terabytes)."""

    def score_batches(self, pairs: Iterable[PreferencePair]) -> Iterator[pd.DataFrame]:
        """Yield one score frame (columns `SCORE_COLUMNS`) per forward batch, streaming the input."""
        size = self.config.batch_size * self.config.bucket_batches
        iterator = iter(pairs)
        while chunk := list(islice(iterator, size)):
            encoded = [e for e in map(self._encode, chunk) if e is not None]
            encoded.sort(key=lambda e: len(e.tokens.prompt_ids) + max(len(e.tokens.chosen_ids), len(e.tokens.rejected_ids)))
            for start in range(0, len(encoded), self.config.batch_size):
                frame = self._score_batch(encoded[start : start + self.config.batch_size])
                if len(frame):
                    yield frame

    def _fail(self, pair: PreferencePair, pair_id: str, field: str | None, reason: str) -> None:
        if self.config.on_error == "fail":
            raise ChesCurateError(f"row {pair.row} (pair {pair_id[:12]}): {reason} (use --on-error quarantine to keep going)")
        self.failures.append({"row": pair.row, "pair_id": pair_id, "field": field, "reason": reason})

    def _encode(self, pair: PreferencePair) -> _Encoded | None:
        pair_id = pair.pair_id
        try:
            tokens = encode_pair(self.loaded.tokenizer, pair, self.config.max_length)
        except TruncationError as err:
            self._fail(pair, pair_id, "prompt", str(err))
            return None
        longest = max(len(tokens.chosen_ids), len(tokens.rejected_ids))
        total = len(tokens.prompt_ids) + longest
        if self.context_length and total > self.context_length:
            field = "chosen" if len(tokens.chosen_ids) == longest else "rejected"
            self._fail(pair, pair_id, field, f"field '{field}' makes the pair {total:,} tokens, more than the model's "
                       f"context of {self.context_length:,} (pass --max-length {self.context_length} to truncate)")
            return None
        return _Encoded(pair, pair_id, tokens)

    @torch.inference_mode()
    def _score_batch(self, batch: list[_Encoded]) -> pd.DataFrame:
        tokens = [e.tokens for e in batch]
        if self.config.share_prompt:
            sums, lasts = self._hidden_sums_shared(tokens)
        else:
            sums, lasts = self._hidden_sums_unshared(tokens)
        chosen_len = torch.tensor([len(t.chosen_ids) for t in tokens], dtype=torch.float64)
        rejected_len = torch.tensor([len(t.rejected_ids) for t in tokens], dtype=torch.float64)
        chosen_sum, rejected_sum = sums[0::2].cpu(), sums[1::2].cpu()
        ches, ln_ches = ches_scores(chosen_sum, rejected_sum, chosen_len, rejected_len)
        last_ip = last_hidden_inner_product(lasts[0::2].cpu().double(), lasts[1::2].cpu().double())
        rows = []
        for i, e in enumerate(batch):
            values = (ches[i].item(), ln_ches[i].item(), last_ip[i].item())
            if not all(map(_finite, values)):
                self._fail(e.pair, e.pair_id, None, "the model produced non-finite hidden states")
                continue
            rows.append(
                (e.pair.row, e.pair_id, *values[:2], len(e.tokens.chosen_ids), len(e.tokens.rejected_ids),
                 values[2], normalized_edit_distance(e.tokens.chosen_ids, e.tokens.rejected_ids), e.tokens.truncated)
            )
        frame = pd.DataFrame(rows, columns=["row", "pair_id", "ches", "ln_ches", "chosen_tokens", "rejected_tokens",
                                            "last_hidden_ip", "edit_distance", "truncated"])
        return frame[list(SCORE_COLUMNS)]

    def _pad(self, sequences: list[list[int]], prefix_mask: torch.Tensor | None = None):
        """Pad to a (rows, longest) id tensor and its 0/1 mask, on the configured side."""
        device = self.loaded.device
        longest = max(map(len, sequences))
        ids = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        left = self.config.padding_side == "left" and prefix_mask is None
        for row, seq in enumerate(sequences):
            span = slice(longest - len(seq), longest) if left else slice(0, len(seq))
            ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
        return ids.to(device), mask.to(device)

    def _hidden_sums_shared(self, tokens: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 2i / 2i+1 = chosen / rejected of pair i: float64 sums and the last predicting state."""
        device = self.loaded.device
        prompt_ids, prompt_mask = self._pad([t.prompt_ids for t in tokens])
        prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
        prompt_lens = prompt_mask.sum(-1)
        last_prompt = prompt_pos.shape[1] - 1 if self.config.padding_side == "left" else prompt_lens - 1
        rows = torch.arange(len(tokens), device=device)
        prompt_last = out.last_hidden_state[rows, last_prompt].repeat_interleave(2, dim=0)
        sums = prompt_last.double()
        lasts = prompt_last.clone()
        # Feed each response without its last token: only y_<k predicts, and y_|y| predicts nothing we need.
        responses = [ids[:-1] for t in tokens for ids in (t.chosen_ids, t.rejected_ids)]
        if max(map(len, responses)) == 0:
            return sums, lasts
        cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        cache.batch_repeat_interleave(2)
        resp_ids, resp_mask = self._pad([r or [self.pad_id] for r in responses], prefix_mask=prompt_mask)
        resp_mask = resp_mask * torch.tensor([len(r) > 0 for r in responses], device=device).unsqueeze(1)
        resp_pos = prompt_lens.repeat_interleave(2).unsqueeze(1) + torch.arange(resp_ids.shape[1], device=device)
        full_mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), resp_mask], dim=1)
        hidden = self.base(
            input_ids=resp_ids, attention_mask=full_mask, position_ids=resp_pos, use_cache=True, **{self._cache_arg: cache}
        ).last_hidden_state
        sums = sums + (hidden.double() * resp_mask.unsqueeze(-1)).sum(dim=1)
        for row, response in enumerate(responses):
            if response:
                lasts[row] = hidden[row, len(response) - 1]
        return sums, lasts

    def _hidden_sums_unshared(self, tokens: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """The same sums from two full passes per pair (prompt + response), for checking prompt sharing."""
        sequences, spans = [], []
        for t in tokens:
            for response in (t.chosen_ids, t.rejected_ids):
                sequences.append(t.prompt_ids + response[:-1])
                spans.append((len(t.prompt_ids) - 1, len(response)))
        ids, mask = self._pad(sequences)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        offset = (ids.shape[1] - mask.sum(-1)) if self.config.padding_side == "left" else torch.zeros_like(mask[:, 0])
        sums, lasts = [], []
        for row, (start, count) in enumerate(spans):
            first = int(offset[row]) + start
            window = hidden[row, first : first + count]
            sums.append(window.double().sum(dim=0))
            lasts.append(window[-1])
        return torch.stack(sums), torch.stack(lasts)


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def normalized_edit_distance(chosen_ids: list[int], rejected_ids: list[int]) -> float:
    """Token-level Levenshtein distance divided by the longer length (the paper's baseline)."""
    return Levenshtein.distance(chosen_ids, rejected_ids) / max(len(chosen_ids), len(rejected_ids))


def score_pairs(pairs: Iterable[PreferencePair], model: str | LoadedModel = "default", **config) -> pd.DataFrame:
    """Score pairs and return one row per pair, sorted by input `row` (columns `SCORE_COLUMNS`)."""
    scorer = Scorer(model, ScoringConfig(**config))
    frames = list(scorer.score_batches(pairs))
    if not frames:
        return pd.DataFrame(columns=list(SCORE_COLUMNS))
    return pd.concat(frames, ignore_index=True).sort_values("row", ignore_index=True)
