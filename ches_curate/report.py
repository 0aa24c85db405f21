"""The curation report: one self-contained HTML page on a dataset's scores, selections, quality and ablations.

`build_report` reads everything with SQL over the store's tables (`scores`, `pairs`,
`selections`, `quality_runs`/`quality_results`, `quarantine`, `ablations`,
`pair_likelihoods`), draws the plots (`report_plots`: PNGs inlined as `data:` URIs) and
renders `templates/report.html.j2` with Jinja2 autoescaping, so every prompt, response
and name is HTML-escaped. The page loads nothing else: its Content-Security-Policy
allows no script and no request beyond its own inline images and styles. The CLI
(`ches-curate report`) writes it to a file; the curation pipeline returns the same
string as a ZenML HTML visualization. A section without data says so.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ches_curate import __version__, report_ablation, report_plots, report_probe, report_quality
from ches_curate.atomic_files import write_output
from ches_curate.errors import ChesCurateError
from ches_curate.store import DatasetVersion, Store
from ches_curate.selection import unscored

from ches_curate.report_ablation import Query
from ches_curate.report_values import clip as _clip, excerpt as _excerpt, floats as _floats, fmt as _fmt, pct as _pct
from ches_curate.report_values import records as _records

SCORE_STATS_COLUMNS = ("ches", "ln_ches", "edit_distance")
@dataclass(frozen=True)
class ReportConfig:
    """What the report shows beyond the fixed sections."""

    top_pairs: int = 20
    """How many of the highest-CHES pairs to show with their prompt and both responses."""
    text_chars: int = 4000
    """Characters kept of each prompt and response in that table (the rest is counted, not shown)."""
    removed_pairs: int = 50
    """How many of the selection's removed pairs (first by rank) to list with their texts."""
    diff_pairs: int = 50
    """How many changed pairs of the refresh diff to list."""


@dataclass(frozen=True)
class Cut:
    """A selection's threshold on one score: kept scores lie on one side of `value`, removed on the other."""

    column: str
    value: float
    kept_edge: float
    """The kept score nearest the removed ones (the highest kept, or the lowest for a negated score_column)."""
    removed_edge: float
    """The removed score nearest the kept ones (the lowest removed, or the highest for a negated score_column)."""


def build_report(
    store: Store, dataset: str, version: int | None = None, model_key: str | None = None,
    selection_id: int | None = None, config: ReportConfig | None = None,
) -> str:
    """The HTML report of dataset `dataset` (default: its latest version, or the version `selection_id` filtered).

    `model_key` picks the scores (default: the selection's model, else the only model that
    scored the version); `selection_id` the selection whose cut is drawn (default: the
    latest selection of this dataset version and model).
    """
    config = config or ReportConfig()
    dv, model_key, selection = _resolve(store, dataset, version, model_key, selection_id)
    selection_id = (selection or {}).get("selection_id")
    with store.connect(read_only=True) as con:
        def query(sql: str, params: list) -> pd.DataFrame:
            return con.execute(sql, params).df()

        scores = _scores(query, dv, model_key, selection_id)
        top_pairs = _top_pairs(query, dv, model_key, selection_id, config)
        removed_pairs = _removed_pairs(query, dv, model_key, selection_id, config)
        selections = _selections(query, dv, model_key)
        plugin_stats = _plugin_score_stats(query, dv, model_key)
        quality = report_quality.quality_section(query, dv, model_key)
        quarantine = report_quality.quarantine_section(query, dv)
        arms, per_pair = report_ablation.ablation_rows(query, dv, model_key)
        slices = report_ablation.slice_rows(query, dv)
        probes = report_probe.probe_section(query, model_key)
    score_plots = _score_plots(scores, selection)
    return _template().render(
        dataset=dv, model_key=model_key, selection=selection, n_scored=len(scores),
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), package_version=__version__,
        score_stats=_score_stats(scores) + plugin_stats, score_plots=score_plots,
        guide=reading_guide(selection, score_plots["cuts"]),
        top_pairs=top_pairs,
        top_n=config.top_pairs, selections=selections, quality=quality, quarantine=quarantine,
        ablation=report_ablation.ablation_section(arms, per_pair, slices), removed_pairs=removed_pairs,
        refresh_diff=_refresh_diff(store, selection, config), probes=probes,
        unscored=unscored(store, dv.name, dv.version, model_key) if model_key is not None else None,
    )


def write_report(
    store: Store, dataset: str, version: int | None = None, model_key: str | None = None,
    selection_id: int | None = None, *, output: str | Path, config: ReportConfig | None = None,
) -> Path:
    """Write `build_report(...)` to `output` (UTF-8, parent folders created); returns the path."""
    html = build_report(store, dataset, version, model_key, selection_id, config)
    path = Path(output)
    write_output(path, lambda staging: staging.write_text(html, encoding="utf-8"), parents=True)
    return path


def selection_cut(values: Any, kept: Any, score_column: str, column: str) -> Cut | None:
    """Where a selection cut `column`: midway between the kept and removed scores nearest each other.

    Policies remove the highest `score_column` scores (the lowest for a leading `-`). The
    cut exists only when the selection ranked by `column`, kept and removed some pairs, and
    no kept score lies beyond a removed one; a policy such as `random` has no cut.
    """
    if score_column.removeprefix("-") != column:
        return None
    sign = -1.0 if score_column.startswith("-") else 1.0
    values = sign * np.asarray(values, dtype=np.float64)
    kept = np.asarray(kept, dtype=bool)
    finite = np.isfinite(values)
    kept_values, removed_values = values[finite & kept], values[finite & ~kept]
    if not len(kept_values) or not len(removed_values) or kept_values.max() > removed_values.min():
        return None
    kept_edge, removed_edge = kept_values.max(), removed_values.min()
    return Cut(column, float(sign * (kept_edge + removed_edge) / 2), float(sign * kept_edge), float(sign * removed_edge))


# --- gathering ------------------------------------------------------------------------------------


def _resolve(
    store: Store, dataset: str, version: int | None, model_key: str | None, selection_id: int | None,
) -> tuple[DatasetVersion, str | None, dict[str, Any] | None]:
    """The dataset version, model and selection the report is about, with the defaults `build_report` documents."""
    selection = _selection(store, selection_id) if selection_id is not None else None
    if selection is not None and version is None and selection["dataset_name"] == dataset:
        version = selection["dataset_version"]
    dv = store.dataset_version(dataset, version)
    if selection is not None and (selection["dataset_name"], selection["dataset_version"]) != (dv.name, dv.version):
        raise ChesCurateError(
            f"selection {selection_id} filtered dataset {selection['dataset_name']!r} v{selection['dataset_version']}, "
            f"not {dv.name!r} v{dv.version}; pass --dataset {selection['dataset_name']} "
            f"--version {selection['dataset_version']}"
        )
    model_key = store.scoring_model(dv.name, dv.version, model_key or (selection or {}).get("model_key"), required=False)
    if selection is None and model_key is not None:
        selection = _latest_selection(store, dv, model_key)
    return dv, model_key, selection


def _selection(store: Store, selection_id: int) -> dict[str, Any]:
    frame = store.sql(
        """SELECT selection_id, any_value(policy) AS policy, any_value(params) AS params,
                  any_value(dataset_name) AS dataset_name, any_value(dataset_version) AS dataset_version,
                  any_value(model_key) AS model_key, any_value(score_column) AS score_column,
                  count(*) AS n_pairs, count(*) FILTER (WHERE kept) AS n_kept
           FROM selections WHERE selection_id = ? GROUP BY selection_id""", params=[selection_id],
    )
    if frame.empty:
        store.selection(selection_id)  # raises the store's "no selection N (known: ...)" error
    return _records(frame)[0]


def _latest_selection(store: Store, dv: DatasetVersion, model_key: str) -> dict[str, Any] | None:
    """The newest selection of this version and model that a user made (ablation arms aside)."""
    latest = store.latest_user_selection(dv.name, dv.version, model_key)
    return None if latest is None else _selection(store, latest)


def _scores(query: Query, dv: DatasetVersion, model_key: str | None, selection_id: int | None) -> pd.DataFrame:
    """One row per dataset row with a score: the scores, and the selection's decision (`kept`, NULL if none)."""
    return query(
        """SELECT s.ches, s.ln_ches, s.edit_distance, s.chosen_tokens + s.rejected_tokens AS response_tokens, sel.kept
           FROM dataset_pairs dp JOIN scores s ON s.pair_id = dp.pair_id AND s.model_key = ?
           LEFT JOIN selections sel ON sel.selection_id = ? AND sel.pair_id = dp.pair_id
           WHERE dp.name = ? AND dp.version = ? ORDER BY dp."row"
        """,
        [model_key, selection_id, dv.name, dv.version],
    )


def _score_stats(scores: pd.DataFrame) -> list[dict[str, Any]]:
    stats = []
    for column in SCORE_STATS_COLUMNS:
        values = _floats(scores[column])
        values = values[np.isfinite(values)]
        if len(values):
            p5, p50, p95 = np.percentile(values, [5, 50, 95])
            stats.append({"column": column, "n": len(values), "mean": values.mean(), "min": values.min(),
                          "p5": p5, "p50": p50, "p95": p95, "max": values.max()})
    return stats


def _score_plots(scores: pd.DataFrame, selection: dict | None) -> dict[str, Any]:
    """The CHES and ln-CHES histograms (with the selection's cut) and the ln-CHES vs edit distance scatter."""
    plots: dict[str, Any] = {"cuts": [], "notes": {}}
    if scores.empty:
        return plots
    # A pair the selection did not decide on (NULL) was not removed, so it counts as kept.
    kept = None if selection is None else scores["kept"].fillna(True).to_numpy(dtype=bool)
    for column, label in (("ches", "CHES"), ("ln_ches", "ln-CHES")):
        values = _floats(scores[column])
        if not np.isfinite(values).any():
            continue
        cut = selection_cut(values, kept, selection["score_column"] or "", column) if kept is not None else None
        cut_label = f"cut of selection {selection['selection_id']} ({selection['policy']})" if cut else "cut"
        note = _no_cut_note(selection, column, label) if kept is not None and not cut and (~kept).any() else None
        plots[column] = report_plots.score_histogram(values, label, kept, cut and cut.value, cut_label, note)
        if cut:
            plots["cuts"].append(cut)
        if note:
            plots["notes"][column] = note
    edit, ln_ches = _floats(scores["edit_distance"]), _floats(scores["ln_ches"])
    if (np.isfinite(edit) & np.isfinite(ln_ches)).any():
        plots["edit_distance"] = report_plots.ln_ches_vs_edit_distance(edit, ln_ches, kept)
    length, ches = _floats(scores["response_tokens"]), _floats(scores["ches"])
    finite = np.isfinite(length) & np.isfinite(ches)
    if finite.any():
        plots["length"] = report_plots.ches_vs_response_length(length, ches, kept)
        plots["length_symlog"] = report_plots.symlog_threshold(ches[finite]) is not None
    return plots


def _no_cut_note(selection: dict[str, Any], column: str, label: str) -> str:
    """Why the `column` histogram colours removed pairs without a cut line: the selection ranked by another
    score, or its removed and kept scores overlap (a random control)."""
    ranked_by = selection["score_column"] or "no score"
    if ranked_by.removeprefix("-") != column:
        return f"removed pairs were chosen by {ranked_by} (selection #{selection['selection_id']}), not by a {label} cut"
    return f"removed and kept {label} overlap: selection #{selection['selection_id']} ({selection['policy']}) has no cut"


def reading_guide(selection: dict[str, Any] | None, cuts: list[Cut]) -> dict[str, Any] | None:
    """What the report's "how to read this" block says of the selection: its cut on the score it ranked by (if
    the kept and removed scores are separated by one), and on which side the removed pairs lie."""
    if selection is None:
        return None
    column = (selection["score_column"] or "").removeprefix("-")
    cut = next((c for c in cuts if c.column == column), None)
    side = "below" if (selection["score_column"] or "").startswith("-") else "above"
    return {"cut": cut, "side": side, "n_removed": selection["n_pairs"] - selection["n_kept"]}


def _top_pairs(query: Query, dv: DatasetVersion, model_key: str | None, selection_id: int | None,
               config: ReportConfig) -> list[dict[str, Any]]:
    """The `top_pairs` distinct pairs with the highest CHES, each at its first row, with texts clipped."""
    if model_key is None or config.top_pairs <= 0:
        return []
    return _pairs(query, [model_key, selection_id, dv.name, dv.version, config.top_pairs], config,
                  "AND s.ches IS NOT NULL AND NOT isnan(s.ches)", "s.ches DESC, s.pair_id")


def _removed_pairs(query: Query, dv: DatasetVersion, model_key: str | None, selection_id: int | None,
                   config: ReportConfig) -> list[dict[str, Any]]:
    """The first `removed_pairs` pairs the selection removed, by its rank (1 = removed first), texts clipped."""
    if model_key is None or selection_id is None or config.removed_pairs <= 0:
        return []
    return _pairs(query, [model_key, selection_id, dv.name, dv.version, config.removed_pairs], config,
                  "AND sel.kept = false", "sel.rank, s.pair_id")


def _pairs(query: Query, params: list, config: ReportConfig, where: str, order: str) -> list[dict[str, Any]]:
    """Distinct scored pairs of a version (each at its first row) matching `where`, in `order`, texts clipped.

    `params`: model_key, selection_id, dataset name, version, limit.
    """
    pairs = _records(query(
        f"""SELECT dp."row", s.pair_id, s.ches, s.ln_ches, s.edit_distance, s.chosen_tokens, s.rejected_tokens,
                  s.truncated, p.prompt, p.prompt_messages, p.chosen, p.rejected, sel.kept, sel.rank
           FROM dataset_pairs dp JOIN scores s ON s.pair_id = dp.pair_id AND s.model_key = ?
           JOIN pairs p ON p.pair_id = dp.pair_id
           LEFT JOIN selections sel ON sel.selection_id = ? AND sel.pair_id = dp.pair_id
           WHERE dp.name = ? AND dp.version = ? {where}
           QUALIFY row_number() OVER (PARTITION BY dp.pair_id ORDER BY dp."row") = 1
           ORDER BY {order} LIMIT ?""", params,
    ))
    for pair in pairs:
        messages = json.loads(pair.pop("prompt_messages") or "null")
        pair["messages"] = [{"role": str(m.get("role", "")), **_clip(m.get("content", ""), config.text_chars)}
                            for m in messages] if messages else None
        pair["excerpt"] = _excerpt(pair["prompt"])
        for field in ("prompt", "chosen", "rejected"):
            pair[field] = _clip(pair[field], config.text_chars)
    return pairs


def _refresh_diff(store: Store, selection: dict[str, Any] | None, config: ReportConfig) -> dict[str, Any] | None:
    """How the selection differs from the newest user selection of an earlier version with the same policy,
    params and model (what a refresh changed): counts and the first `diff_pairs` changed pairs."""
    from ches_curate.refresh import diff_selections

    if selection is None:
        return None
    earlier = store.selections(selection["dataset_name"], include_ablation=False)
    earlier = earlier[(earlier.dataset_version < selection["dataset_version"])
                      & (earlier.policy == selection["policy"]) & (earlier.params == selection["params"])
                      & (earlier.model_key == selection["model_key"])]
    if earlier.empty:
        return None
    previous = int(earlier.selection_id.iloc[0])
    diff = diff_selections(store, previous, selection["selection_id"])
    changes = _records(diff.changes.head(config.diff_pairs))
    texts = _pair_texts(store, [c["pair_id"] for c in changes])
    for change in changes:
        change.update(texts.get(change["pair_id"], {}))
    return {"previous": previous, "previous_version": int(earlier.dataset_version.iloc[0]), "counts": diff.counts(),
            "changes": changes, "n_changes": len(diff.changes)}


def _pair_texts(store: Store, pair_ids: list[str]) -> dict[str, dict[str, str]]:
    """Prompt, chosen and rejected of each pair, each shortened to one line (`_excerpt`)."""
    if not pair_ids:
        return {}
    frame = store.sql("SELECT pair_id, prompt, chosen, rejected FROM pairs WHERE list_contains(?, pair_id)",
                      params=[pair_ids])
    return {row.pair_id: {field: _excerpt(getattr(row, field) or "") for field in ("prompt", "chosen", "rejected")}
            for row in frame.itertuples()}


def _selections(query: Query, dv: DatasetVersion, model_key: str | None) -> list[dict[str, Any]]:
    """Kept and removed counts of every selection of this dataset version and model, and the mean response tokens
    (|y+| + |y-|) of its kept and removed pairs: a cut on raw CHES removes mostly long pairs."""
    records = _records(query(
        """SELECT sel.selection_id, any_value(sel.policy) AS policy, any_value(sel.params) AS params,
                  any_value(sel.score_column) AS score_column, min(sel.created_at) AS created_at, count(*) AS n_pairs,
                  count(*) FILTER (WHERE sel.kept) AS n_kept, count(*) FILTER (WHERE NOT sel.kept) AS n_removed,
                  avg(s.chosen_tokens + s.rejected_tokens) FILTER (WHERE sel.kept) AS kept_tokens,
                  avg(s.chosen_tokens + s.rejected_tokens) FILTER (WHERE NOT sel.kept) AS removed_tokens
           FROM selections sel LEFT JOIN scores s ON s.pair_id = sel.pair_id AND s.model_key = sel.model_key
           WHERE sel.dataset_name = ? AND sel.dataset_version = ? AND (sel.model_key IS NULL OR sel.model_key = ?)
           GROUP BY sel.selection_id ORDER BY sel.selection_id""", [dv.name, dv.version, model_key],
    ))
    for record in records:
        record["steps"] = chain_steps(record["params"]) if record["policy"] == "chain" else None
    return records


def chain_steps(params: Any) -> str:
    """A chained selection's steps on one line: `percentile(p=90, score_column=ln_ches) → threshold(...)`."""
    steps = (json.loads(params) if isinstance(params, str) else params or {}).get("steps", [])
    return " → ".join(f"{step['policy']}({', '.join(f'{k}={v}' for k, v in step['params'].items())})" for step in steps)


def _plugin_score_stats(query: Query, dv: DatasetVersion, model_key: str | None) -> list[dict[str, Any]]:
    """`plugin_score_summary` rows of this version (the model's scores, and those independent of any model), in the
    shape of `_score_stats`; a score's failed pairs are named beside it."""
    frame = query(
        """SELECT score_name, score_version, n_scored, n_failed, value_mean, value_min, value_p05, value_p50,
                  value_p95, value_max FROM plugin_score_summary
           WHERE dataset_name = ? AND dataset_version = ? AND model_key IN (?, '') AND n_scored > 0
           ORDER BY score_name""", [dv.name, dv.version, model_key or ""],
    )
    return [{"column": f"{r.score_name} (v{r.score_version}" + (f", {r.n_failed:,} failed)" if r.n_failed else ")"),
             "n": r.n_scored, "mean": r.value_mean, "min": r.value_min, "p5": r.value_p05, "p50": r.value_p50,
             "p95": r.value_p95, "max": r.value_max} for r in frame.itertuples()]


# --- helpers ---------------------------------------------------------------------------------------


@functools.cache
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ches_curate", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.globals["pct"] = _pct
    return env.get_template("report.html.j2")
