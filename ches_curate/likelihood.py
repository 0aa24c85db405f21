"""Per-pair log-likelihoods log pi(y+|x), log pi(y-|x) and the likelihood-displacement summary.

Likelihood displacement (Razin et al., ICLR 2025) is DPO lowering log pi(y+|x), the
log-probability of the *preferred* response, even though it raises the margin over
y-. We measure it pair by pair: the tokens DPO trains on (`ches_curate.tokenization`)
are scored before and after training, and the changes are set against
each pair's CHES (the paper's Figure-2 relation: higher CHES, larger drop).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from ches_curate.pairs import PreferencePair
from ches_curate.tokenization import encode_pair

LOGP_COLUMNS = ("row", "pair_id", "preferred_logp", "dispreferred_logp", "chosen_tokens", "rejected_tokens", "truncated")
"""Columns of `pair_logps`: log-probabilities in nats, summed over the response tokens (EOS or end of turn included)."""

PAIR_LIKELIHOOD_COLUMNS = (
    "pair_id",
    "preferred_logp_before",
    "preferred_logp_after",
    "dispreferred_logp_before",
    "dispreferred_logp_after",
)


def pair_logps(
    model, tokenizer, pairs: Iterable[PreferencePair], *, batch_size: int = 8, max_length: int | None = None,
    chat_template: bool | None = None,
) -> pd.DataFrame:
    """log pi(y+|x) and log pi(y-|x) of each pair, one row per pair (columns `LOGP_COLUMNS`).

    log pi(y|x) = sum_t log softmax(logits at position P-1+t)[y_t], with P the prompt
    length: the position before each response token predicts it. Sequences are
    batched (`batch_size` pairs, i.e. 2x sequences, sorted by length to limit
    padding) and right-padded, so padding never shifts a position. The ids are `encode_pair`'s
    (with `chat_template` and `max_length`): what DPO trains on, end-of-turn tokens included.
    """
    pairs = list(pairs)
    encoded = [encode_pair(tokenizer, pair, max_length, chat_template) for pair in pairs]
    sequences = [(e.prompt_ids, e.chosen_ids) for e in encoded] + [(e.prompt_ids, e.rejected_ids) for e in encoded]
    logps = sequence_logps(model, sequences, batch_size=2 * batch_size, pad_token_id=_pad_id(tokenizer))
    n = len(pairs)
    return pd.DataFrame(
        {
            "row": [p.row for p in pairs],
            "pair_id": [p.pair_id for p in pairs],
            "preferred_logp": logps[:n],
            "dispreferred_logp": logps[n:],
            "chosen_tokens": [len(e.chosen_ids) for e in encoded],
            "rejected_tokens": [len(e.rejected_ids) for e in encoded],
            "truncated": [e.truncated for e in encoded],
        },
        columns=list(LOGP_COLUMNS),
    )


def sequence_logps(
    model, sequences: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16, pad_token_id: int = 0
) -> np.ndarray:
    """Summed log-probability (float64) of each `response_ids` given its `prompt_ids`."""
    out = np.zeros(len(sequences), dtype=np.float64)
    order = sorted(range(len(sequences)), key=lambda i: -(len(sequences[i][0]) + len(sequences[i][1])))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [sequences[i] for i in order[start : start + batch_size]]
                out[order[start : start + batch_size]] = _batch_logps(model, batch, pad_token_id, device)
    finally:
        model.train(was_training)
    return out


def _batch_logps(model, batch, pad_token_id: int, device) -> np.ndarray:
    lengths = [len(p) + len(r) for p, r in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(batch):
        input_ids[i, : lengths[i]] = torch.tensor(prompt + response)
        attention_mask[i, : lengths[i]] = 1
    # Only positions from the earliest "last prompt token" on predict response tokens: skip the prompt's logits.
    first = min(len(p) for p, _ in batch) - 1
    labels = torch.full((len(batch), width - first), -100, dtype=torch.long)
    for i, (prompt, response) in enumerate(batch):
        start = len(prompt) - 1 - first
        labels[i, start : start + len(response)] = torch.tensor(response)
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=width - first
    ).logits
    token_logps = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != -100
    picked = token_logps.gather(-1, labels.clamp(min=0).to(device).unsqueeze(-1)).squeeze(-1)
    return (picked.double() * mask.to(device)).sum(-1).cpu().numpy()


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


@dataclass(frozen=True)
class DisplacementSummary:
    """How training moved the pairs' log-likelihoods (means in nats over `n_pairs`).

    `preferred_decrease_fraction` is the share of pairs whose log pi(y+|x) went down;
    the `*_corr` fields are Pearson and the `*_spearman` fields Spearman correlations
    between a pair's CHES (or ln-CHES) and its preferred log-prob change; None when
    no scores were given or fewer than 3 pairs vary.
    """

    n_pairs: int
    preferred_logp_change: float
    dispreferred_logp_change: float
    preferred_decrease_fraction: float
    ches_logp_corr: float | None = None
    ln_ches_logp_corr: float | None = None
    ches_logp_spearman: float | None = None
    ln_ches_logp_spearman: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def pair_likelihoods(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Before/after log-probabilities side by side, one row per pair (columns `PAIR_LIKELIHOOD_COLUMNS`)."""
    merged = before[["pair_id", "preferred_logp", "dispreferred_logp"]].merge(
        after[["pair_id", "preferred_logp", "dispreferred_logp"]], on="pair_id", suffixes=("_before", "_after")
    )
    return merged[list(PAIR_LIKELIHOOD_COLUMNS)].drop_duplicates("pair_id").reset_index(drop=True)


def displacement_summary(
    before: pd.DataFrame, after: pd.DataFrame, scores: pd.DataFrame | None = None
) -> DisplacementSummary:
    """Summarise the change from `before` to `after` (`pair_logps` frames), optionally against CHES `scores`."""
    frame = pair_likelihoods(before, after)
    preferred_change = frame["preferred_logp_after"] - frame["preferred_logp_before"]
    dispreferred_change = frame["dispreferred_logp_after"] - frame["dispreferred_logp_before"]
    correlations: dict[str, float | None] = {}
    if scores is not None:
        change = pd.DataFrame({"pair_id": frame["pair_id"], "change": preferred_change})
        joined = change.merge(scores[["pair_id", "ches", "ln_ches"]].drop_duplicates("pair_id"), on="pair_id")
        for column in ("ches", "ln_ches"):
            correlations[f"{column}_logp_corr"] = _correlation(joined[column], joined["change"], "pearson")
            correlations[f"{column}_logp_spearman"] = _correlation(joined[column], joined["change"], "spearman")
    return DisplacementSummary(
        n_pairs=len(frame),
        preferred_logp_change=float(preferred_change.mean()),
        dispreferred_logp_change=float(dispreferred_change.mean()),
        preferred_decrease_fraction=float((preferred_change < 0).mean()),
        **correlations,
    )


def _correlation(x: pd.Series, y: pd.Series, method: str) -> float | None:
    keep = x.notna() & y.notna()
    if keep.sum() < 3 or x[keep].nunique() < 2 or y[keep].nunique() < 2:
        return None
    return float(x[keep].astype(float).corr(y[keep].astype(float), method=method))
