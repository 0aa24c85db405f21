"""From one forward pass to every score: what the scores are given, and the score frame of a batch.

The engine's forward pass yields, per response, the float64 sum of the hidden states at
the positions that predict its tokens, the state at its last predicting position, and
(kept for the log-probs) those predicting states themselves with the response each
belongs to. `score_frame` hands them to the registered scores as a `ScoreBatch`: the four
built-in columns of `scores` first (a pair one of them fails on cannot be scored), then
the plugin scores on the pairs that passed (a failure there costs one value).
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch

from ches_curate import plugins
from ches_curate.errors import ChesCurateError
from ches_curate.pairs import SCORE_COLUMNS
from ches_curate.scores.compute import ScoreFailure, compute_scores
from ches_curate.scores.logprobs import summed_logprobs, token_logprobs
from ches_curate.scores.spec import HiddenStates, ResponseLogProbs, ScoreBatch
from ches_curate.tokenization import EncodedPair

_LOGIT_SCALES = ("logit_scale", "logits_scaling")
"""Config fields of models that scale their logits beyond the LM head (Cohere, Granite)."""


class Forward(NamedTuple):
    """One forward pass, rows 2i / 2i+1 = chosen / rejected of pair i."""

    sums: torch.Tensor
    """(2B, hidden) float64 sums of the predicting hidden states."""
    lasts: torch.Tensor
    """(2B, hidden) the state at each response's last predicting position."""
    states: torch.Tensor
    """(tokens, hidden) every predicting state, response by response, in token order."""
    owners: torch.Tensor
    """(tokens,) the row (2i or 2i+1) each predicting state belongs to."""


def check_logprobs_supported(model, key: str) -> None:
    """Refuse log-prob scores for a model whose logits are not `lm_head(h)` (soft-capping aside)."""
    for name in _LOGIT_SCALES:
        if getattr(model.config, name, 1) not in (None, 1, 1.0):
            raise ChesCurateError(f"{key} scales its logits ({name}={getattr(model.config, name)}); the log-prob "
                                  "scores do not support it yet: leave them out of --scores")
    if model.get_output_embeddings() is None:
        raise ChesCurateError(f"{key} has no LM head; the log-prob scores need one: leave them out of --scores")


def response_logprobs(model, tokens: list[EncodedPair], forward: Forward) -> ResponseLogProbs:
    """log pi(y|x) per response from the pass's predicting states: the LM head at those positions only."""
    targets = torch.tensor([i for t in tokens for ids in (t.chosen_ids, t.rejected_ids) for i in ids])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    logps = token_logprobs(model.get_output_embeddings(), forward.states, targets, softcap)
    sums = summed_logprobs(logps, forward.owners, 2 * len(tokens)).cpu()
    lengths = torch.tensor([[len(t.chosen_ids), len(t.rejected_ids)] for t in tokens])
    return ResponseLogProbs(sums[0::2], sums[1::2], lengths[:, 0], lengths[:, 1])


def batch_inputs(batch: list, forward: Forward, logprobs: ResponseLogProbs | None, key: str,
                 device: str) -> ScoreBatch:
    """The `ScoreBatch` of encoded pairs (`pair`, `pair_id`, `tokens`) and their forward pass."""
    sums, lasts = forward.sums, forward.lasts
    hidden = HiddenStates(sums[0::2], sums[1::2], lasts[0::2], lasts[1::2])
    return ScoreBatch([e.pair for e in batch], [e.pair_id for e in batch], [e.tokens for e in batch], hidden,
                      logprobs, key, device)


def score_frame(inputs: ScoreBatch, column_scores: list[plugins.Registered],
                plugin_scores: list[plugins.Registered]) -> tuple[pd.DataFrame, dict[int, str], list[ScoreFailure]]:
    """The batch's score frame (`SCORE_COLUMNS`, then one column per plugin score) for the pairs the built-in
    columns could score; the others by batch position with the reason; the plugin scores' failures."""
    columns = {values.name: values for values in compute_scores(column_scores, inputs)}
    reasons: dict[str, str] = {}
    for failure in (failure for values in columns.values() for failure in values.failures):
        reasons.setdefault(failure.pair_id, "the model produced non-finite hidden states"
                           if failure.reason.startswith("returned") else failure.describe())
    unscorable = {i: reasons[pair_id] for i, pair_id in enumerate(inputs.pair_ids) if pair_id in reasons}
    kept = [i for i in range(len(inputs)) if i not in unscorable]
    tokens = [inputs.tokens[i] for i in kept]
    frame = pd.DataFrame({
        "row": [inputs.pairs[i].row for i in kept], "pair_id": [inputs.pair_ids[i] for i in kept],
        **{name: values.values[kept] for name, values in columns.items()},
        "chosen_tokens": [len(t.chosen_ids) for t in tokens], "rejected_tokens": [len(t.rejected_ids) for t in tokens],
        "truncated": [t.truncated for t in tokens],
    })[list(SCORE_COLUMNS)]
    failures: list[ScoreFailure] = []
    if plugin_scores and kept:
        for values in compute_scores(plugin_scores, inputs.subset(kept)):
            frame[values.name] = values.values
            failures += values.failures
    return frame, unscorable, failures
