"""The report's probe section: the latest single-pair DPO probes of the report's model (`probe_runs`).

A probe (`ches-curate probe --db ...`) is Razin et al.'s Section 3 experiment on one
prompt; it belongs to no dataset, so the report lists the latest runs of the model
whose scores it shows, one row per run, with the first observed and predicted gainer.
"""

from __future__ import annotations

import json
from typing import Any

from ches_curate.report_ablation import Query
from ches_curate.report_values import records

PROBE_ROWS = 30
"""How many of the latest probe runs the report lists."""


def probe_section(query: Query, model_key: str | None, limit: int = PROBE_ROWS) -> dict[str, Any] | None:
    """The latest `limit` probe runs of `model_key` (every model's when None), newest first; None when there is none."""
    where, params = ("WHERE model_key = ?", [model_key]) if model_key else ("", [])
    rows = query(
        f"""SELECT probe_run_id, created_at, prompt, preferred, dispreferred, mode, leading_space, learning_rate, steps,
                   seed, p_plus_before, p_plus_after, p_plus_min, p_plus_min_step, loss_monotone, displaced,
                   single_token_ches, top_gainers, predicted_gainers, count(*) OVER () AS n_total
            FROM probe_runs {where} ORDER BY created_at DESC, probe_run_id DESC LIMIT {int(limit)}""", params)
    if rows.empty:
        return None
    runs = records(rows.drop(columns=["top_gainers", "predicted_gainers", "n_total"]))
    for run, top, predicted in zip(runs, rows.top_gainers, rows.predicted_gainers):
        run["top_gainer"], run["predicted_gainer"] = _first_token(top), _first_token(predicted)
    return {"runs": runs, "n_total": int(rows.n_total.iloc[0]),
            "n_displaced": sum(bool(run["displaced"]) for run in runs)}


def _first_token(gainers: Any) -> str | None:
    """The first token of a stored gainer list (JSON records with a `token`), as its repr; None when empty."""
    try:
        listed = json.loads(gainers) if isinstance(gainers, str) else None
    except ValueError:
        return None
    return repr(listed[0]["token"]) if listed and isinstance(listed[0], dict) and "token" in listed[0] else None
