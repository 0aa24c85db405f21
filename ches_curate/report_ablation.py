"""The report's ablation section: the arms of the latest ablation per training seed, and the quantile slices.

`ablation_rows` and `slice_rows` read the store through the report's read-only `Query`;
`ablation_section` turns them into the template's data and plots: the bars of each arm's
mean log-prob change and refusal rate with the spread over training seeds, each pair's CHES
against its change, and Razin et al.'s Figure 2 for a `quantile-slices` ablation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ches_curate import report_plots
from ches_curate.report_values import floats as _floats, plain as _plain, records as _records
from ches_curate.store import DatasetVersion

Query = Callable[[str, list], pd.DataFrame]
"""Runs one SQL query with parameters on the report's read-only connection."""

ABLATION_COLUMNS = (
    "train_seed", "n_train_pairs", "preferred_logp_change", "dispreferred_logp_change", "preferred_decrease_fraction",
    "ches_logp_corr", "ln_ches_logp_corr", "refusal_rate_before", "refusal_rate_after", "reward_accuracy",
    "train_loss", "wall_time_s",
)

SLICE_DESIGN = "quantile-slices"
"""The ablation design drawn as Razin et al.'s Figure 2 (`ches_curate.ablation`)."""
SCORE_LABELS = {
    "ches": "CHES", "ln_ches": "ln-CHES", "-edit_distance": "edit distance (negated: most similar high)",
    "last_hidden_ip": "last hidden-state inner product",
}
"""How the Figure 2 legend names a quantile slice's score column (others keep their column name)."""


def ablation_rows(query: Query, dv: DatasetVersion, model_key: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The latest `ablations` row of each arm and training seed on this version (quantile slices aside: see
    `slice_rows`), and its per-pair preferred log-prob changes (`pair_likelihoods`) joined with the pairs' scores
    from `model_key`."""
    # IS DISTINCT FROM: a row inserted by hand may leave design or train_seed NULL (migration 8 fills old rows).
    latest = f"""SELECT * FROM ablations WHERE dataset_name = ? AND dataset_version = ?
                   AND design IS DISTINCT FROM '{SLICE_DESIGN}'
                 QUALIFY row_number() OVER (PARTITION BY arm, train_seed
                                            ORDER BY created_at DESC, ablation_id DESC) = 1"""
    arms = query(f"{latest} ORDER BY ablation_id, created_at, arm, train_seed", [dv.name, dv.version])
    per_pair = query(
        f"""WITH latest AS ({latest})
            SELECT pl.arm, pl.train_seed, pl.pair_id,
                   pl.preferred_logp_after - pl.preferred_logp_before AS preferred_logp_change, s.ches, s.ln_ches
            FROM pair_likelihoods pl
            JOIN latest ON latest.ablation_id = pl.ablation_id AND latest.arm = pl.arm
                       AND latest.train_seed IS NOT DISTINCT FROM pl.train_seed
            JOIN scores s ON s.pair_id = pl.pair_id AND s.model_key = ?
            ORDER BY pl.arm, pl.train_seed, pl.pair_id""", [dv.name, dv.version, model_key],
    )
    return arms, per_pair


def slice_rows(query: Query, dv: DatasetVersion) -> pd.DataFrame:
    """Every row (one per slice and training seed) of the latest `quantile-slices` ablation of this version."""
    return query(
        f"""SELECT * FROM ablations WHERE ablation_id = (
                SELECT ablation_id FROM ablations
                WHERE dataset_name = ? AND dataset_version = ? AND design = '{SLICE_DESIGN}'
                ORDER BY created_at DESC, ablation_id DESC LIMIT 1)
            ORDER BY created_at, score_column, percentile, train_seed""", [dv.name, dv.version],
    )


def seed_spread(rows: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    """`metric` of each group of `rows` by `keys` (in order of first appearance) over its training seeds.

    Columns: the keys, `mean`, `min`, `max` and `n_seeds` of the finite values (NaN and 0 when
    there is none), and `seeds`/`values`, the seeds with a finite value and that value.
    """
    records = []
    for key, group in rows.groupby(keys, sort=False, dropna=False):
        values = _floats(group[metric])
        finite = np.isfinite(values)
        kept = values[finite]
        mean, low, high = (kept.mean(), kept.min(), kept.max()) if len(kept) else (np.nan,) * 3
        records.append({**dict(zip(keys, key)), "mean": mean, "min": low, "max": high, "n_seeds": len(kept),
                        "seeds": group["train_seed"][finite].tolist(), "values": kept.tolist()})
    return pd.DataFrame(records, columns=[*keys, "mean", "min", "max", "n_seeds", "seeds", "values"])


def ablation_section(arms: pd.DataFrame, per_pair: pd.DataFrame, slices: pd.DataFrame) -> dict[str, Any]:
    """The arms table and plots (log-prob change and refusal rate per arm, the mean over training seeds with their
    spread; CHES vs preferred log-prob change), and the quantile slices (Figure 2)."""
    if arms.empty and slices.empty:
        return {}
    plots, several_seeds = {}, False
    if not arms.empty:
        bars = arms.assign(bar=[_bar(*row) for row in arms[["arm", "design", "policy"]].itertuples(index=False)])
        names = list(dict.fromkeys(bars.bar))
        several_seeds = bool(bars.groupby("bar").size().max() > 1)
        plots["logp_change"] = report_plots.grouped_bars(names, {
            "preferred": _spread(seed_spread(bars, ["bar"], "preferred_logp_change")),
            "dispreferred": _spread(seed_spread(bars, ["bar"], "dispreferred_logp_change")),
        }, "mean log-prob change")
        refusal = {"before": _spread(seed_spread(bars, ["bar"], "refusal_rate_before")),
                   "after": _spread(seed_spread(bars, ["bar"], "refusal_rate_after"))}
        if any(np.isfinite(series.mean).any() for series in refusal.values()):
            plots["refusal"] = report_plots.grouped_bars(names, refusal, "refusal rate")
    if not per_pair.empty:
        plots["per_pair"] = report_plots.score_vs_logp_change(
            per_pair.arm.astype(str).tolist(), _floats(per_pair.ches), _floats(per_pair.ln_ches),
            _floats(per_pair.preferred_logp_change),
        )
    return {"arms": _records(arms), "columns": ABLATION_COLUMNS, "plots": plots, "n_pair_likelihoods": len(per_pair),
            "several_seeds": several_seeds,
            "slices": _slices(slices)}


def _bar(arm: str, design: str | None, policy: str | None) -> str:
    """The bar an arm's row adds to. Each seed of keep-lowest draws its random control with that seed, so the
    arms `random(n=N,seed=S)` of all seeds are one control, drawn as one bar `random(n=N)`."""
    if design == "keep-lowest" and policy == "random":
        return re.sub(r",seed=-?\d+|\bseed=-?\d+,?", "", str(arm))
    return str(arm)


def _slices(slices: pd.DataFrame) -> dict[str, Any] | None:
    """Razin et al.'s Figure 2 of a quantile-slices ablation: the mean preferred log-prob change against the slice's
    percentile, one line per score column, and its table (mean, min and max over the training seeds)."""
    if slices.empty:
        return None
    spread = seed_spread(slices, ["score_column", "percentile"], "preferred_logp_change")
    percentiles = sorted(spread.percentile.dropna().unique().tolist())
    lines, table = {}, []
    for column, group in spread.groupby("score_column", sort=False, dropna=False):
        label = SCORE_LABELS.get(column, str(column))
        lines[label] = (group.percentile.to_numpy(dtype=np.float64), _spread(group))
        table.append({"label": label, "column": column, "cells": [_cell(group, p) for p in percentiles]})
    return {"ablation_id": int(slices.ablation_id.iloc[0]), "percentiles": percentiles, "rows": table,
            "seeds": sorted(slices.train_seed.dropna().unique().tolist()),
            "n_pairs": _plain(slices.n_train_pairs.max()), "plot": report_plots.quantile_slice_curves(lines, "mean change of the preferred log-prob")}


def _cell(line: pd.DataFrame, percentile: float) -> dict[str, Any] | None:
    """One score column's spread at one percentile, for the Figure 2 table (None when the slice was not trained)."""
    row = line[line.percentile == percentile]
    return None if row.empty else _records(row[["mean", "min", "max", "n_seeds"]])[0]


def _spread(frame: pd.DataFrame) -> report_plots.SeedSpread:
    """`seed_spread`'s rows as the plots take them."""
    return report_plots.SeedSpread(_floats(frame["mean"]), _floats(frame["min"]), _floats(frame["max"]),
                                   [tuple(v) for v in frame["values"]])
