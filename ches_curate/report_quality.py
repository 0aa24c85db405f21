"""The report's data-quality section: the quality runs of a dataset version, the findings of each suite's
latest run with the bound each expectation checked, and the quarantine's most frequent reasons."""

from __future__ import annotations

import json
from typing import Any

from ches_curate.report_ablation import Query
from ches_curate.report_values import clip, excerpt, fmt, records
from ches_curate.store import DatasetVersion


def quality_section(query: Query, dv: DatasetVersion, model_key: str | None) -> dict[str, Any]:
    """Every quality run of the version, and the findings of the latest run of each suite, failures first."""
    runs_of_version = ("FROM quality_runs WHERE dataset_name = ? AND dataset_version = ? "
                       "AND (model_key IS NULL OR model_key = ?)")
    params = [dv.name, dv.version, model_key]
    runs = query(f"SELECT quality_run_id, suite, model_key, started_at, success, n_rows, failure_rate "
                 f"{runs_of_version} ORDER BY quality_run_id", params)
    findings = records(query(
        f"""WITH latest AS (SELECT suite, max(quality_run_id) AS quality_run_id {runs_of_version} GROUP BY suite)
            SELECT latest.suite, r.quality_run_id, r.expectation, r.severity, r.success, r.unexpected_count,
                   r.unexpected_pair_ids, r.details
            FROM quality_results r JOIN latest USING (quality_run_id)
            ORDER BY r.success NULLS FIRST, CASE r.severity WHEN 'error' THEN 0 WHEN 'warn' THEN 1 ELSE 2 END,
                     latest.suite, r.expectation""", params,
    ))
    for finding in findings:
        ids = json.loads(finding["unexpected_pair_ids"] or "[]")
        details = json.loads(finding["details"] or "{}")
        finding["sample_pair_ids"] = [str(i)[:12] for i in ids[:3]]
        finding["description"] = details.get("description") or details.get("type") or ""
        finding["example"] = _finding_example(details)
        finding["bound"] = finding_bound(details.get("kwargs") or {})
        finding["details"] = clip(json.dumps(details, indent=1, ensure_ascii=False), 4000)
    return {"runs": records(runs), "findings": findings}


def _finding_example(details: dict[str, Any]) -> str:
    """One short example of what an expectation found: its first unexpected value, else the observed value
    (a drift check's percentiles as `p10 1.2, p90 3.4`)."""
    sample = details.get("unexpected_sample") or []
    value = sample[0] if sample else details.get("observed_value", details.get("exception"))
    if value is None:
        return ""
    if isinstance(value, dict) and {"quantiles", "values"} <= value.keys():
        return ", ".join(f"p{fmt(100 * q, 3)} {fmt(v)}" for q, v in zip(value["quantiles"], value["values"]))
    return excerpt(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str))


def finding_bound(kwargs: dict[str, Any]) -> str:
    """The bound an expectation checked, from its kwargs: `min_value`/`max_value` (a drift check's band around
    the previous version's mean, a length bound) or a drift check's `quantile_ranges`; "" when it has none."""
    ranges = kwargs.get("quantile_ranges")
    if ranges:
        return "; ".join(f"p{fmt(100 * q, 3)} in {_interval(*bounds)}"
                         for q, bounds in zip(ranges.get("quantiles", []), ranges.get("value_ranges", [])))
    if kwargs.get("min_value") is None and kwargs.get("max_value") is None:
        return ""
    return _interval(kwargs.get("min_value"), kwargs.get("max_value"))


def _interval(low: Any, high: Any) -> str:
    return f"[{'−∞' if low is None else fmt(low)}, {'∞' if high is None else fmt(high)}]"


def quarantine_section(query: Query, dv: DatasetVersion) -> dict[str, Any]:
    """How many rows of the version were quarantined, and the 20 most frequent (stage, reason)."""
    reasons = query(
        "SELECT stage, reason, count(*) AS n FROM quarantine WHERE dataset_name = ? AND dataset_version = ? "
        "GROUP BY stage, reason ORDER BY n DESC, stage, reason", [dv.name, dv.version],
    )
    return {"total": int(reasons.n.sum()) if not reasons.empty else 0, "reasons": records(reasons.head(20))}
