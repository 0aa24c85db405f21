"""Batched, exact CHES scoring of preference pairs.

Why it is fast:
- the base model runs without the LM head (no logits: CHES needs hidden states only); the
  log-prob scores, when asked for, apply it only at the positions that predict response
  tokens (`score_pass`), and every other registered score reads the same pass;
- each pair is one row `[prompt | chosen[:-1] | rejected[:-1]]` under a block attention
  mask: the prompt is causal, each response sees the prompt and its own earlier tokens
  (never the other response), and both responses' position ids start at P. The prompt
  is fed once, with no KV cache to copy; a response's last token (EOS) predicts nothing
  CHES uses, so it is never fed;
- batches are cut by a token budget (padding included) from length-sorted read-ahead,
  so short pairs share a pass and long ones do not drag padding along.
Models that take no custom 4D mask (sliding-window or chunked layers, flash attention,
ALiBi) reuse the prompt's KV cache for both responses instead; `prompt_sharing="block"`
is refused for them, with the reason.

Why it is exact: masks and position ids make padding and the other response invisible,
and hidden states are summed in float64, so results do not depend on batching, padding
side or prompt sharing beyond float32 kernel rounding. The cache path always pads prompts
on the left: each row's tokens are then contiguous, so a token's distance in the tensor is
its distance in positions, which sliding-window masks, windowed caches (they keep the last
W-1 columns) and index-based ALiBi go by.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pandas as pd
import torch
from rapidfuzz.distance import Levenshtein

from ches_curate.errors import ChesCurateError
from ches_curate.models import LoadedModel, load_model
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.scores.compute import ScoreFailure
from ches_curate.scores.spec import COLUMN_SCORES, get_score, selected_scores
from ches_curate.scoring.config import DEFAULT_BATCH_TOKENS, ScoringConfig
from ches_curate.scoring.progress import SCORING_LOGGER, Throughput
from ches_curate.scoring.score_pass import (
    Forward, batch_inputs, check_logprobs_supported, response_logprobs, score_frame,
)
from ches_curate.tokenization import EncodedPair, TruncationError, encode_pair

logger = logging.getLogger(SCORING_LOGGER)

# Tokens per forward pass, padding included. On CPU a pass is already at the matmul rate
# with ~200 tokens, so a small budget only groups short pairs; a GPU needs large passes.
@dataclass
class _Encoded:
    pair: PreferencePair
    pair_id: str
    tokens: EncodedPair

    @property
    def fed(self) -> int:
        """Tokens a shared-prompt pass feeds: P + |y+| - 1 + |y-| - 1."""
        t = self.tokens
        return len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) - 2


class Scorer:
    """Scores pairs with one loaded model; `key` identifies the model, revision and dtype."""

    def __init__(self, model: str | LoadedModel = "default", config: ScoringConfig | None = None):
        self.config = config or ScoringConfig()
        self.column_scores = [get_score(name) for name in COLUMN_SCORES]
        self.plugin_scores = selected_scores(self.config.scores, exclude=COLUMN_SCORES)
        """The registered scores computed beside the `scores` columns, from the same pass (`ScoringConfig.scores`);
        an unknown name is refused before the model loads."""
        self.score_failures: list[ScoreFailure] = []
        """Pairs a plugin score failed on (the pair is scored; that score's value is NaN)."""
        if isinstance(model, LoadedModel):
            self.loaded = model
        else:
            self.loaded = load_model(model, self.config.device, self.config.dtype, self.config.trust_remote_code)
        self.key = self.loaded.key
        self.base = self.loaded.model.base_model
        tokenizer = self.loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.failures: list[dict] = []
        """Pairs that could not be scored (with `on_error="quarantine"`): row, pair_id, field, reason."""
        self.context_length: int | None = getattr(self.loaded.model.config, "max_position_embeddings", None)
        """Positions the model has; a longer pair is refused, not run (its attention mask alone can need terabytes)."""
        device_type = torch.device(self.loaded.device).type
        self.max_batch_tokens = self.config.max_batch_tokens or DEFAULT_BATCH_TOKENS.get(device_type, 4096)
        self.mode = self._pick_mode()
        """`block`, `cache` or `unshared`: how prompts are fed (see the module docstring)."""
        if self.wants_logprobs:
            check_logprobs_supported(self.loaded.model, self.key)

    @property
    def wants_logprobs(self) -> bool:
        """Whether a score of this scorer needs the response log-probs (the LM head at the predicting positions)."""
        return any("logprobs" in entry.obj.needs for entry in self.plugin_scores)

    def score_batches(self, pairs: Iterable[PreferencePair], total: int | None = None) -> Iterator[pd.DataFrame]:
        """Yield one score frame (columns `SCORE_COLUMNS`, then one per plugin score) per forward batch, streaming
        the input.

        Each frame's `attrs["tokens"]` is the tokens fed for it (padding excluded). Every
        `progress_every_s` a line with pairs done, tokens/s and (given `total` pairs) the ETA
        goes to the `ches_curate.scoring` logger.
        """
        throughput = Throughput(total)
        next_report = time.monotonic() + self.config.progress_every_s
        for batch in self._batches(pairs):
            frame = self._score_batch(batch)
            throughput.add(len(frame), frame.attrs["tokens"])
            if time.monotonic() >= next_report:
                logger.info("scoring: %s", throughput.describe())
                next_report = time.monotonic() + self.config.progress_every_s
            if len(frame):
                yield frame
        if throughput.pairs:
            logger.info("scored %s", throughput.describe())

    def _batches(self, pairs: Iterable[PreferencePair]) -> Iterator[list[_Encoded]]:
        """Read ahead `bucket_batches` batches' worth, sort by length, cut by token budget and `batch_size`."""
        cap = self.config.batch_size or float("inf")
        ahead_tokens = self.config.bucket_batches * self.max_batch_tokens
        ahead_pairs = self.config.bucket_batches * cap
        iterator = iter(pairs)
        while True:
            chunk, tokens = [], 0
            for pair in iterator:
                if (encoded := self._encode(pair)) is not None:
                    chunk.append(encoded)
                    tokens += encoded.fed
                if tokens >= ahead_tokens or len(chunk) >= ahead_pairs:
                    break
            if not chunk:
                return
            chunk.sort(key=self._row_length)
            batch: list[_Encoded] = []
            for encoded in chunk:
                cost = (len(batch) + 1) * self._row_length(encoded) * (1 if self.mode == "block" else 2)
                if batch and (cost > self.max_batch_tokens or len(batch) >= cap):
                    yield batch
                    batch = []
                batch.append(encoded)
            yield batch

    def _row_length(self, encoded: _Encoded) -> int:
        t = encoded.tokens
        if self.mode == "block":
            return encoded.fed
        return len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) - 1

    def _fail(self, pair: PreferencePair, pair_id: str, field: str | None, reason: str) -> None:
        if self.config.on_error == "fail":
            raise ChesCurateError(f"row {pair.row} (pair {pair_id[:12]}): {reason} (use --on-error quarantine to keep going)")
        self.failures.append({"row": pair.row, "pair_id": pair_id, "field": field, "reason": reason})

    def _encode(self, pair: PreferencePair) -> _Encoded | None:
        pair_id = pair.pair_id
        try:
            tokens = encode_pair(self.loaded.tokenizer, pair, self.config.max_length, self.config.chat_template)
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
        forward = {"block": self._hidden_sums_block, "cache": self._hidden_sums_cached,
                   "unshared": self._hidden_sums_unshared}[self.mode](tokens)
        logprobs = response_logprobs(self.loaded.model, tokens, forward) if self.wants_logprobs else None
        inputs = batch_inputs(batch, forward, logprobs, self.key, self.loaded.device)
        frame, unscorable, failures = score_frame(inputs, self.column_scores, self.plugin_scores)
        for i, reason in unscorable.items():
            self._fail(batch[i].pair, batch[i].pair_id, None, reason)
        self.score_failures += failures
        fed = sum(e.fed for e in batch)
        frame.attrs["tokens"] = fed if self.mode != "unshared" else fed + sum(len(t.prompt_ids) for t in tokens)
        return frame

    def _pick_mode(self) -> str:
        if not self.config.share_prompt:
            return "unshared"
        if self.config.prompt_sharing == "cache":
            return "cache"
        forced = self.config.prompt_sharing == "block"
        refusal = _block_mask_refusal(self.loaded.model) or self._block_mask_probe()
        if refusal and forced:
            raise ChesCurateError(f"prompt_sharing=block: {self.key} {refusal}; use prompt_sharing auto or cache")
        if refusal:
            logger.info("%s %s; reusing the prompt's KV cache instead", self.key, refusal)
        return "cache" if refusal else "block"

    def _block_mask_probe(self) -> str | None:
        """Check the block mask on one short pair against two plain passes: a model may accept and misread it.

        Compared: the rejected response's last state, which a misread mask lets see the chosen
        tokens (then it is off by 35-110% on SmolLM2 and random Llamas; 16-bit kernels differ by 1-2%).
        """
        vocab = self.loaded.model.config.vocab_size
        ids = [v % vocab for v in (5, 6, 7, 8, 9, 10, 11, 13, 17, 19, 31, 37, 41, 43, 23, 29, 47, 53)]
        probe = EncodedPair(ids[:7], ids[7:14], ids[14:], truncated=False)
        with torch.inference_mode():
            try:
                block = self._hidden_sums_block([probe])[1][1].double()
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                return f"fails on a block attention mask ({type(err).__name__}: {err})"
            plain = self._hidden_sums_unshared([probe])[1][1].double()
        tolerance = 1e-3 if self.loaded.model.dtype in (torch.float32, torch.float64) else 0.1
        if (block - plain).norm() <= tolerance * plain.norm():
            return None
        return "misreads a block attention mask (a one-pair probe differs from two plain passes)"

    def _pad(self, sequences: list[list[int]], fill: int, left: bool | None = None) -> torch.Tensor:
        """A (rows, longest) tensor of `sequences`, padded with `fill` on the configured side."""
        left = self.config.padding_side == "left" if left is None else left
        longest = max(map(len, sequences))
        out = torch.full((len(sequences), longest), fill, dtype=torch.long)
        for row, seq in enumerate(sequences):
            out[row, slice(longest - len(seq), longest) if left else slice(0, len(seq))] = torch.tensor(seq, dtype=torch.long)
        return out

    def _hidden_sums_block(self, tokens: list[EncodedPair]) -> Forward:
        """Rows 2i / 2i+1 = chosen / rejected of pair i: float64 sums and the last predicting state.

        Pair i is row i, `[prompt | chosen[:-1] | rejected[:-1]]`, with branch 0 / 1 / 2 for
        the three parts. Token q sees token k iff k <= q and k is in the prompt or in q's own
        response; a padding token (branch -1) sees only padding, so its state stays finite.
        """
        device = self.loaded.device
        ids, positions, branches, predicting, owners, lasts = [], [], [], [], [], []
        for t in tokens:
            p, c, r = len(t.prompt_ids), len(t.chosen_ids) - 1, len(t.rejected_ids) - 1
            ids.append(t.prompt_ids + t.chosen_ids[:-1] + t.rejected_ids[:-1])
            positions.append([*range(p), *range(p, p + c), *range(p, p + r)])
            branches.append([0] * p + [1] * c + [2] * r)
        ids_t = self._pad(ids, self.pad_id)
        width = ids_t.shape[1]
        for row, t in enumerate(tokens):
            p, c, r = len(t.prompt_ids), len(t.chosen_ids) - 1, len(t.rejected_ids) - 1
            # Position p-1 (the prompt's last token) predicts the first token of both responses.
            start = row * width + (width - p - c - r if self.config.padding_side == "left" else 0) + p - 1
            chosen = [start, *range(start + 1, start + 1 + c)]
            rejected = [start, *range(start + 1 + c, start + 1 + c + r)]
            predicting += chosen + rejected
            owners += [2 * row] * len(chosen) + [2 * row + 1] * len(rejected)
            lasts += [chosen[-1], rejected[-1]]
        branch = self._pad(branches, -1).to(device)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        seen = (branch.unsqueeze(1) == 0) & (branch.unsqueeze(2) != -1) | (branch.unsqueeze(1) == branch.unsqueeze(2))
        dtype = self.loaded.model.dtype
        mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~(seen & causal), torch.finfo(dtype).min)
        hidden = self.base(input_ids=ids_t.to(device), position_ids=self._pad(positions, 0).to(device),
                           attention_mask=mask.unsqueeze(1), use_cache=False).last_hidden_state
        return _gather_sums(hidden, predicting, owners, lasts, 2 * len(tokens))

    def _hidden_sums_cached(self, tokens: list[EncodedPair]) -> Forward:
        """The same sums with the prompt run once and its KV cache repeated for both responses."""
        device = self.loaded.device
        # Left-padded, so that every row's responses follow its prompt directly (see the module docstring).
        prompt_ids = self._pad([t.prompt_ids for t in tokens], self.pad_id, left=True)
        prompt_mask = self._pad([[1] * len(t.prompt_ids) for t in tokens], 0, left=True)
        prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.base(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                        position_ids=prompt_pos.to(device), use_cache=True)
        prompt_lens = prompt_mask.sum(-1)
        prompt_last = out.last_hidden_state[:, -1].repeat_interleave(2, dim=0)
        sums, lasts = prompt_last.double(), prompt_last.clone()
        responses = [ids[:-1] for t in tokens for ids in (t.chosen_ids, t.rejected_ids)]
        owners = torch.arange(len(responses), device=device).repeat_interleave(
            torch.tensor([len(r) + 1 for r in responses], device=device))
        if max(map(len, responses)) == 0:
            return Forward(sums, lasts, prompt_last, owners)
        # transformers 5.x renamed `past_key_values` to `cache`; accept both.
        cache_arg = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        cache = out.cache if cache_arg == "cache" else out.past_key_values
        cache.batch_repeat_interleave(2)
        resp_ids = self._pad([r or [self.pad_id] for r in responses], self.pad_id, left=False)
        resp_mask = self._pad([[1] * len(r) for r in responses], 0, left=False)
        resp_pos = prompt_lens.repeat_interleave(2).unsqueeze(1) + torch.arange(resp_ids.shape[1])
        full_mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), resp_mask], dim=1)
        hidden = self.base(input_ids=resp_ids.to(device), attention_mask=full_mask.to(device),
                           position_ids=resp_pos.to(device), use_cache=True, **{cache_arg: cache}).last_hidden_state
        sums = sums + (hidden.double() * resp_mask.to(device).unsqueeze(-1)).sum(dim=1)
        for row, response in enumerate(responses):
            if response:
                lasts[row] = hidden[row, len(response) - 1]
        # The prompt's last state predicts each response's first token, its own states the rest.
        states = torch.cat([part for row, response in enumerate(responses)
                            for part in (prompt_last[row:row + 1], hidden[row, :len(response)])])
        return Forward(sums, lasts, states, owners)

    def _hidden_sums_unshared(self, tokens: list[EncodedPair]) -> Forward:
        """The same sums from two plain causal passes per pair (prompt + response), for checking prompt sharing."""
        device = self.loaded.device
        sequences = [t.prompt_ids + response[:-1] for t in tokens for response in (t.chosen_ids, t.rejected_ids)]
        ids = self._pad(sequences, self.pad_id)
        mask = self._pad([[1] * len(s) for s in sequences], 0)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.base(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=pos.to(device), use_cache=False).last_hidden_state
        width = ids.shape[1]
        predicting, owners, lasts = [], [], []
        for row, t in enumerate(tokens):
            for owner, response in ((2 * row, t.chosen_ids), (2 * row + 1, t.rejected_ids)):
                length = len(t.prompt_ids) + len(response) - 1
                start = owner * width + (width - length if self.config.padding_side == "left" else 0)
                window = range(start + len(t.prompt_ids) - 1, start + length)
                predicting += window
                owners += [owner] * len(window)
                lasts.append(window[-1])
        return _gather_sums(hidden, predicting, owners, lasts, 2 * len(tokens))


def _gather_sums(hidden: torch.Tensor, predicting: list[int], owners: list[int], lasts: list[int], n_out: int
                 ) -> Forward:
    """float64 sums of the flattened `hidden` rows `predicting` into output rows `owners`, the rows `lasts`,
    and the predicting rows themselves."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    device = flat.device
    states = flat[torch.tensor(predicting, device=device)]
    owner_rows = torch.tensor(owners, device=device)
    sums = torch.zeros(n_out, flat.shape[-1], dtype=torch.float64, device=device)
    sums.index_add_(0, owner_rows, states.double())
    return Forward(sums, flat[torch.tensor(lasts, device=device)], states, owner_rows)


# Config fields that give some layers a local window: Mistral/Qwen2/Gemma `sliding_window`, GPT-Neo `window_size`
# (its "local" layers), Llama-4 `attention_chunk_size`. A window counts even if no row may reach it: the cache
# path is exact either way.
_WINDOW_FIELDS = ("sliding_window", "window_size", "attention_chunk_size")


def _block_mask_refusal(model) -> str | None:
    """Why `model` cannot apply a custom 4D block mask as given (None if it can), as words after the model's name.

    It needs SDPA or eager attention, position ids, and full attention on every layer: a
    window is a distance in positions, but in a block row the rejected tokens sit |y+| - 1
    columns further from the prompt than their positions say.
    """
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    if layer_types - {"full_attention"}:
        return f"has {', '.join(sorted(layer_types - {'full_attention'}))} layers, which a block mask cannot express"
    windows = {name: value for name in _WINDOW_FIELDS
               if isinstance(value := getattr(config, name, None), int) and not isinstance(value, bool)}
    if windows and not layer_types:
        return f"has windowed attention ({', '.join(f'{k}={v}' for k, v in windows.items())}), " \
               "which a block mask cannot express"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"uses {implementation} attention, which takes no custom 4D mask"
    if "position_ids" not in inspect.signature(model.base_model.forward).parameters:
        return "takes no position ids (ALiBi or positions counted from the mask)"
    return None


def normalized_edit_distance(chosen_ids: list[int], rejected_ids: list[int]) -> float:
    """Token-level Levenshtein distance divided by the longer length (the paper's baseline)."""
    return Levenshtein.distance(chosen_ids, rejected_ids) / max(len(chosen_ids), len(rejected_ids))


def score_pairs(pairs: Iterable[PreferencePair], model: str | LoadedModel = "default", **config) -> pd.DataFrame:
    """Score pairs and return one row per pair, sorted by input `row` (columns `SCORE_COLUMNS`)."""
    scorer = Scorer(model, ScoringConfig(**config))
    frames = list(scorer.score_batches(pairs))
    if not frames:
        return pd.DataFrame(columns=[*SCORE_COLUMNS, *(entry.obj.name for entry in scorer.plugin_scores)])
    return pd.concat(frames, ignore_index=True).sort_values("row", ignore_index=True)
