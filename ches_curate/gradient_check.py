"""Does CHES rank pairs like the quantity it approximates? A check that needs no training run.

A DPO gradient step on one pair moves the parameters along g+ - g-, with
g± = d log pi(y±|x) / d theta (the summed log-likelihood of the response tokens). To
first order that changes log pi(y+|x) by eta * (||g+||^2 - <g+, g->), so

    gradient_ches = <g+, g-> - ||g+||^2

is large exactly when the step on that pair lowers the preferred response's likelihood
(likelihood displacement). CHES (Razin et al., ICLR 2025) is its approximation by hidden
embeddings; `rank_agreement` measures how well CHES, ln-CHES and the paper's baselines
order a sample of pairs by it. The cost is one forward and one backward pass per
response, about three forward passes' worth, so this runs on a sample, not a dataset.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import pandas as pd
import torch

from ches_curate.errors import ChesCurateError
from ches_curate.models import LoadedModel
from ches_curate.pairs import PreferencePair
from ches_curate.tokenization import encode_pair

SCORE_DIRECTIONS = {"ches": 1, "ln_ches": 1, "edit_distance": -1, "last_hidden_ip": 1}
"""Scores compared with gradient_ches, and their sign: edit distance is negated (more similar = higher)."""
TOP_FRACTION = 0.1
"""The top decile: precision is the share of the top 10% by gradient_ches that a score also puts in its top 10%."""


def gradient_ches(loaded: LoadedModel, pairs: Iterable[PreferencePair], max_length: int | None = None,
                  params: str | Sequence[str] = "all", chat_template: bool | None = None) -> pd.DataFrame:
    """Per pair: gradient_ches = <g+, g-> - ||g+||^2, grad_inner = <g+, g->, grad_plus_sq = ||g+||^2.

    g± is the gradient of the summed log-likelihood of the response ids of `encode_pair`
    (exactly TRL's ids, truncated to `max_length`) given the prompt, over every trainable
    parameter (`params="all"`), or only those whose names start with one of the prefixes in
    `params` (say `["lm_head", "model.norm"]` when the full gradients do not fit in memory).
    The model must be float32; it runs in eval mode (no dropout). Inner products are taken
    tensor by tensor (float32 dot products, no flattened copy of a gradient) and summed in
    float64, where the nearly cancelling difference is taken.
    """
    model = loaded.model
    chosen = _parameters(model, params)
    if any(p.dtype != torch.float32 for _, p in chosen):
        raise ChesCurateError("gradient_ches needs a float32 model (load it with dtype='float32')")
    weights = [p for _, p in chosen]
    model.eval()
    rows = []
    for pair in pairs:
        tokens = encode_pair(loaded.tokenizer, pair, max_length, chat_template)
        g_plus = _response_gradient(model, weights, tokens.prompt_ids, tokens.chosen_ids, loaded.device)
        g_minus = _response_gradient(model, weights, tokens.prompt_ids, tokens.rejected_ids, loaded.device)
        inner = sum(float(torch.dot(a.ravel(), b.ravel())) for a, b in zip(g_plus, g_minus))
        plus_sq = sum(float(torch.dot(a.ravel(), a.ravel())) for a in g_plus)
        rows.append((pair.pair_id, inner - plus_sq, inner, plus_sq))
    return pd.DataFrame(rows, columns=["pair_id", "gradient_ches", "grad_inner", "grad_plus_sq"])


def _parameters(model: torch.nn.Module, params: str | Sequence[str]) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if params != "all":
        prefixes = (params,) if isinstance(params, str) else tuple(params)
        named = [(name, p) for name, p in named if name.startswith(prefixes)]
    if not named:
        raise ChesCurateError(f"no trainable parameters match params={params!r}")
    return named


def _response_gradient(model: torch.nn.Module, weights: list[torch.Tensor], prompt_ids: list[int],
                       response_ids: list[int], device: str) -> list[torch.Tensor]:
    """d/dtheta of sum_k log pi(y_k | x, y_<k), one tensor per weight (zeros for a weight the output ignores)."""
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    start = len(prompt_ids) - 1  # the logits at position P-1 predict the first response token
    with torch.enable_grad():
        logits = model(input_ids=ids).logits[0, start:-1].float()
        target = ids[0, len(prompt_ids):]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum()
        grads = torch.autograd.grad(logp, weights, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


def rank_agreement(frame: pd.DataFrame, scores: Sequence[str] = tuple(SCORE_DIRECTIONS)) -> pd.DataFrame:
    """How well each score column orders the rows of `frame` by its `gradient_ches` column.

    One row per score: `spearman` (Pearson correlation of average ranks) and
    `top_decile_precision` (|top k by gradient_ches & top k by the score| / k, with
    k = ceil(n / 10)). A score in `SCORE_DIRECTIONS` with sign -1 (edit distance) is negated
    first. Rows missing either value are left out of that score's comparison.
    """
    rows = []
    for score in scores:
        both = frame[["gradient_ches", score]].dropna()
        value = both[score].astype(float) * SCORE_DIRECTIONS.get(score, 1)
        target = both["gradient_ches"].astype(float)
        spearman = float(target.rank().corr(value.rank())) if len(both) > 1 else float("nan")
        rows.append((score, SCORE_DIRECTIONS.get(score, 1), len(both), spearman, _top_precision(target, value)))
    return pd.DataFrame(rows, columns=["score", "direction", "n_pairs", "spearman", "top_decile_precision"])


def _top_precision(target: pd.Series, value: pd.Series) -> float:
    if target.empty:
        return float("nan")
    k = math.ceil(len(target) * TOP_FRACTION)
    top_target = set(target.sort_values(ascending=False, kind="stable").index[:k])
    top_value = set(value.sort_values(ascending=False, kind="stable").index[:k])
    return len(top_target & top_value) / k


def check_ches(loaded: LoadedModel, pairs: Iterable[PreferencePair], max_length: int | None = None,
               chat_template: bool | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score `pairs` with the engine and by gradient_ches: (one row per pair, `rank_agreement` of the scores).

    Pairs the engine cannot score (a prompt that leaves no room, say) are quarantined and left out.
    """
    from ches_curate.scoring import score_pairs

    pairs = list(pairs)
    scores = score_pairs(pairs, loaded, max_length=max_length, chat_template=chat_template, on_error="quarantine")
    scores = scores.drop_duplicates("pair_id")
    scored = set(scores["pair_id"])
    kept = {pair.pair_id: pair for pair in pairs if pair.pair_id in scored}
    gradient = gradient_ches(loaded, kept.values(), max_length=max_length, chat_template=chat_template)
    frame = scores.merge(gradient, on="pair_id")
    return frame, rank_agreement(frame)


def sample_pairs(pairs: Iterable[PreferencePair], n: int, seed: int = 0) -> list[PreferencePair]:
    """`n` of `pairs` (all of them if fewer) drawn without replacement by a seeded generator, in input order."""
    pairs = list(pairs)
    if len(pairs) <= n:
        return pairs
    chosen = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in chosen]


def verdict(agreement: pd.DataFrame) -> str:
    """One line saying whether CHES ranks pairs like gradient_ches, and which score ranks them best."""
    by_score = agreement.set_index("score")
    rho = float(by_score.loc["ches", "spearman"]) if "ches" in by_score.index else float("nan")
    best = by_score["spearman"].idxmax() if by_score["spearman"].notna().any() else None
    best_note = f"; best: {best} ({by_score.loc[best, 'spearman']:.2f})" if best and best != "ches" else ""
    if math.isnan(rho):
        return "too few pairs to rank"
    if rho >= 0.5:
        head = "CHES ranks pairs like the gradient quantity"
    elif rho >= 0.2:
        head = "CHES ranks pairs only loosely like the gradient quantity"
    else:
        head = "CHES does not rank pairs like the gradient quantity for this model"
    return f"{head}: Spearman {rho:.2f}{best_note}"
