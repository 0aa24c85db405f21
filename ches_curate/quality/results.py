"""What a quality suite found: GE's result as `ExpectationResult`s, and its record in the store.

`run_suite` runs the checks through `ge.run_ge` and turns GE's result into
`ExpectationResult`s, the error-row fraction and the quarantine records; `save_suite`
writes them to `quality_runs`, `quality_results` and `quarantine` in one transaction.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ches_curate.errors import ChesCurateError
from ches_curate.quality.config import Severity
from ches_curate.quality.ge import run_ge

GE_SEVERITY = {"error": "critical", "warn": "warning"}
SAMPLE = 5
"""Unexpected values kept per expectation in `quality_results.details`."""
LIST_CAP = 20
"""Items kept of each list in stored JSON (`unexpected_pair_ids` is stored whole)."""
TEXT_CAP = 2048
"""Characters kept of each text in stored JSON."""
_SURROGATE = re.compile("[\ud800-\udfff]")


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One expectation of a suite: its name in results, severity, GE instance, the field it is about."""

    name: str
    severity: Severity
    expectation: Any
    field: str | None
    description: str


@dataclass
class ExpectationResult:
    """The outcome of one expectation; `rows` are positions in the validated frame (row-level checks only)."""

    suite: str
    name: str
    severity: Severity
    success: bool
    row_level: bool
    unexpected_count: int | None
    rows: list[int]
    unexpected_pair_ids: list[str | None]
    details: dict[str, Any]


@dataclass
class SuiteResult:
    """One suite run: results, the fraction of rows failing `error` checks, quarantine records, GE's JSON.

    `failure_rate` is 1.0 when an `error` expectation fails at table level (a missing
    column, a row count, an expectation that raised): no row of the table can be trusted.
    """

    suite: str
    n_rows: int
    results: list[ExpectationResult]
    failure_rate: float
    max_failure_rate: float
    quarantine: list[dict[str, Any]]
    ge_result: dict[str, Any]
    started_at: datetime.datetime
    finished_at: datetime.datetime
    quality_run_id: int | None = None

    @property
    def success(self) -> bool:
        return self.failure_rate <= self.max_failure_rate


@dataclass
class QualityReport:
    """The suites of one validation; `notes` say what was skipped and why."""

    suites: list[SuiteResult]
    notes: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(s.success for s in self.suites)

    @property
    def results(self) -> list[ExpectationResult]:
        return [r for s in self.suites for r in s.results]

    def suite(self, name: str) -> SuiteResult:
        return next(s for s in self.suites if s.suite == name)

    def result(self, name: str) -> ExpectationResult:
        return next(r for r in self.results if r.name == name)

    def failed(self, severity: Severity | None = None) -> dict[str, list[int]]:
        """Failing expectations (optionally of one severity) -> the row positions they flagged."""
        return {r.name: r.rows for r in self.results if not r.success and severity in (None, r.severity)}

    def to_frame(self) -> pd.DataFrame:
        """One row per expectation, the columns of `quality.latest_quality_results`."""
        return pd.DataFrame(
            [{"quality_run_id": s.quality_run_id, "suite": s.suite, "n_rows": s.n_rows,
              "failure_rate": s.failure_rate, "run_success": s.success, "expectation": r.name,
              "severity": r.severity, "success": r.success, "unexpected_count": r.unexpected_count}
             for s in self.suites for r in s.results]
        )

    def summary_table(self) -> str:
        """A plain-text table of the failing expectations, for error messages and logs."""
        lines = [f"{'suite':<7} {'expectation':<34} {'severity':<8} {'unexpected':>10}  sample pair_ids"]
        for r in self.results:
            if not r.success:
                count = "table" if r.unexpected_count is None else str(r.unexpected_count)
                sample = ", ".join(str(p)[:12] for p in r.unexpected_pair_ids[:3])
                lines.append(f"{r.suite:<7} {r.name:<34} {r.severity:<8} {count:>10}  {sample}")
        return "\n".join(lines)

    def raise_for_failure_rate(self) -> None:
        if not self.success:
            raise QualityFailedError(self)


class QualityFailedError(ChesCurateError):
    """A suite's error-row fraction exceeds `max_failure_rate`; the message carries the summary table."""

    def __init__(self, report: QualityReport):
        self.report = report
        self.headline = "; ".join(
            f"quality suite {s.suite!r} failed: {s.failure_rate:.2%} of {s.n_rows} rows fail error expectations "
            f"(max_failure_rate {s.max_failure_rate:.2%}); see `ches-curate quality --show` and the quarantine table"
            for s in report.suites if not s.success
        )
        super().__init__(f"{self.headline}\n{report.summary_table()}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def run_suite(suite: str, frame: pd.DataFrame, checks: list[Check], max_failure_rate: float,
              raw_columns: list[str]) -> SuiteResult:
    """Validate `frame` with `checks` and interpret the result; `raw_columns` go into quarantine records."""
    started = _now()
    ge_result = run_ge(suite, ge_frame(frame), [c.expectation for c in checks])
    by_name = {c.name: c for c in checks}
    order = list(by_name)
    results = sorted(
        (_expectation_result(suite, by_name[o["expectation_config"]["meta"]["check"]], o, frame)
         for o in ge_result["results"]),
        key=lambda r: order.index(r.name),
    )
    errors = [r for r in results if r.severity == "error" and not r.success]
    error_rows = {row for r in errors for row in r.rows}
    whole_table = any(not r.row_level for r in errors)
    failure_rate = 1.0 if whole_table else (len(error_rows) / len(frame) if len(frame) else 0.0)
    quarantine = [_quarantine_record(suite, by_name[r.name], frame, row, raw_columns)
                  for r in errors for row in r.rows]
    stored = dict(jsonable({k: v for k, v in ge_result.items() if k != "results"}),
                  results=[jsonable(o) for o in ge_result["results"]])  # every expectation; lists inside capped
    return SuiteResult(suite, len(frame), results, failure_rate, max_failure_rate, quarantine, stored, started, _now())


def _expectation_result(suite: str, check: Check, outcome: dict[str, Any], frame: pd.DataFrame) -> ExpectationResult:
    result = outcome.get("result") or {}
    indices = result.get("unexpected_index_list")
    rows = [int(i) for i in indices or []]
    config = outcome["expectation_config"]
    details = {
        "type": config["type"],
        "description": check.description,
        "kwargs": {k: v for k, v in config["kwargs"].items() if k != "batch_id"},
        "observed_value": result.get("observed_value"),
        "unexpected_sample": (result.get("partial_unexpected_list") or [])[:SAMPLE] or None,
        "exception": _exception_message(outcome.get("exception_info")),
    }
    return ExpectationResult(
        suite=suite, name=check.name, severity=check.severity, success=bool(outcome["success"]),
        row_level=indices is not None, unexpected_count=result.get("unexpected_count") if indices is not None else None,
        rows=rows, unexpected_pair_ids=[_pair_id_at(frame, row) for row in rows],
        details=jsonable({k: v for k, v in details.items() if v is not None}),
    )


def _pair_id_at(frame: pd.DataFrame, row: int) -> str | None:
    value = frame["pair_id"].iat[row] if "pair_id" in frame else None
    return None if value is None or pd.isna(value) else str(value)


def _exception_message(info: dict[str, Any] | None) -> str | None:
    """GE reports exceptions flat for some failures and keyed by metric for others."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(messages) or None


def _quarantine_record(suite: str, check: Check, frame: pd.DataFrame, row: int,
                       raw_columns: list[str]) -> dict[str, Any]:
    record = {c: frame[c].iat[row] for c in raw_columns}
    where = record.get("row", row)
    return {
        "stage": "quality", "source": f"quality:{suite}", "line": None, "field": check.field,
        "reason": f"row {where}: {check.description} ({check.name})", "expectation": check.name,
        "pair_id": _pair_id_at(frame, row),
        "raw": json.dumps(jsonable(record, keep_surrogates=True), ensure_ascii=True),
    }


def ge_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy GE can fingerprint: lone surrogates (judged by `*_valid_utf8` beforehand) become escapes."""
    safe = frame.copy()
    for column in safe.columns[safe.dtypes == object]:
        safe[column] = pd.Series([escape_surrogates(v) for v in safe[column]], dtype=object)
    return safe


def escape_surrogates(value: Any) -> Any:
    """A text with lone surrogates (which GE and DuckDB's JSON refuse) as readable `\\udXXX` escapes."""
    if isinstance(value, str) and _SURROGATE.search(value):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")
    return value


def jsonable(value: Any, keep_surrogates: bool = False) -> Any:
    """`value` as strict JSON data: numpy scalars unwrapped, NaN/inf as strings, lists and texts capped.

    Lone surrogates become readable escapes, since DuckDB's JSON type refuses them;
    `keep_surrogates` leaves them for `json.dumps` to write as `\\udXXX` (the VARCHAR `raw` column).
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, keep_surrogates) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [jsonable(v, keep_surrogates) for v in list(value)[:LIST_CAP]]
        return items + ([f"... {len(value) - LIST_CAP} more"] if len(value) > LIST_CAP else [])
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value[:TEXT_CAP] if keep_surrogates else escape_surrogates(value[:TEXT_CAP])
    return None if pd.isna(value) else str(value)


# --- the store -----------------------------------------------------------------------------------


def save_suite(store: Any, result: SuiteResult, dataset_name: str, dataset_version: int,
               model_key: str | None = None) -> int:
    """Record a suite run in `quality_runs`/`quality_results` and quarantine its error rows; the run id.

    A row already quarantined by an earlier quality run of the same dataset version
    for the same expectation is not quarantined twice.
    """
    errors = [r.name for r in result.results if not r.success and r.severity == "error"]
    summary = {"n_rows": result.n_rows, "failure_rate": result.failure_rate,
               "max_failure_rate": result.max_failure_rate, "n_quarantined": len(result.quarantine),
               "failed_errors": errors,
               "failed_warnings": [r.name for r in result.results if not r.success and r.severity == "warn"]}
    with store.transaction() as con:  # the run, its results and its quarantined rows: all or nothing
        run_id = con.execute(
            "INSERT INTO quality_runs (suite, dataset_name, dataset_version, model_key, started_at, finished_at, "
            "success, n_rows, failure_rate, summary, ge_result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "RETURNING quality_run_id",
            [result.suite, dataset_name, dataset_version, model_key, result.started_at, result.finished_at,
             result.success, result.n_rows, result.failure_rate, json.dumps(summary),
             json.dumps(result.ge_result, ensure_ascii=True)],
        ).fetchone()[0]
        con.executemany(
            "INSERT INTO quality_results (quality_run_id, expectation, severity, success, unexpected_count, "
            "unexpected_pair_ids, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [[run_id, r.name, r.severity, r.success, r.unexpected_count, json.dumps(r.unexpected_pair_ids),
              json.dumps(r.details, ensure_ascii=True)] for r in result.results],
        )
        known = set(con.execute(
            "SELECT expectation, pair_id, reason FROM quarantine WHERE stage = 'quality' AND dataset_name = ? "
            "AND dataset_version = ?", [dataset_name, dataset_version]).fetchall())
        store.append_quarantine(con, [dict(q, dataset_name=dataset_name, dataset_version=dataset_version)
                                      for q in result.quarantine
                                      if (q["expectation"], q["pair_id"], q["reason"]) not in known])
    result.quality_run_id = int(run_id)
    return result.quality_run_id
