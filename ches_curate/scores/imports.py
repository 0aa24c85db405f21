"""`ches-curate scores import`: per-pair values computed elsewhere (reward margins, judge labels) into the store.

Each line (JSONL, CSV) or row (Parquet) holds a key and a value. The key is the pair's
`pair_id`, or its `row` in a dataset version (`--dataset`). Every problem is reported
with its line: a missing or unknown key, a key seen before (naming the earlier line), a
missing value, a value that is not a number, NaN or infinity. By default any problem
imports nothing; with `on_error="quarantine"` the good lines are imported, a bad line of
a known pair is stored as that pair's failure for this score, and the others go to the
`quarantine` table. The file's path, sha256, time and counts are recorded in `score_imports`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ches_curate import models
from ches_curate.errors import ChesCurateError, InputError
from ches_curate.ingest import _jsonl_rows
from ches_curate.scores.spec import COLUMN_SCORES, RESERVED_NAMES, available_scores, is_finite
from ches_curate.store import Store
from ches_curate.store.plugin_scores import INDEPENDENT, definition, write_plugin_scores

KEYS = ("pair_id", "row")
MAX_LISTED = 20
"""Problems listed in the error of a failed import (the count says how many more)."""
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass
class ImportResult:
    """What an import did: its id, the rows read, imported and rejected, and each problem as `file:line: reason`."""

    import_id: int | None
    score_name: str
    n_rows: int = 0
    n_imported: int = 0
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        rejected = f", {len(self.problems):,} rejected" if self.problems else ""
        return (f"import {self.import_id}: {self.n_imported:,} values of score '{self.score_name}' from "
                f"{self.n_rows:,} rows{rejected}")


def import_scores(store: Store, source: str | Path, name: str, *, key: str | None = None, column: str | None = None,
                  dataset: str | None = None, version: int | None = None, on_error: str = "fail") -> ImportResult:
    """Import the values of score `name` from `source` (see the module docstring); returns what was done."""
    check_import_name(name)
    path = Path(source)
    records = list(_records(path))
    if not records:
        raise InputError(str(path), None, None, "has no rows")
    key = key or next((k for k in KEYS if k in records[0][1]), None)
    if key not in KEYS:
        raise InputError(str(path), records[0][0], None, f"has no key column (expected one of {', '.join(KEYS)})",
                         "name it with --key")
    column = column or (name if name in records[0][1] else "value")
    dv = store.dataset_version(dataset, version) if dataset is not None else None
    if key == "row" and dv is None:
        raise ChesCurateError("keys by `row` need the dataset the rows belong to: pass --dataset NAME")
    known = _known_keys(store, key, dv)
    good, bad = _check(records, key, column, known)
    problems = [f"{path}:{line}: {reason}" for _, reason, line in bad]
    if problems and on_error == "fail":
        listed = "\n".join(problems[:MAX_LISTED]) + (f"\n... and {len(problems) - MAX_LISTED:,} more"
                                                     if len(problems) > MAX_LISTED else "")
        raise ChesCurateError(f"scores import of {path}: {len(problems):,} bad rows, nothing imported "
                              f"(use --on-error quarantine to import the good ones):\n{listed}")
    _store(result := ImportResult(None, name, len(records), len(good), problems), store, path, key, dv, good, bad)
    return result


def check_import_name(name: str) -> None:
    """An imported score's name must be a column name no registered score or `latest_scores` column has."""
    if not _NAME.match(name):
        raise ChesCurateError(f"--name {name!r}: use lower_snake_case (it becomes a SQL column), e.g. reward_margin")
    if name in RESERVED_NAMES or name in COLUMN_SCORES:
        raise ChesCurateError(f"--name {name!r} is a column of latest_scores already; choose another name")
    if name in available_scores():
        raise ChesCurateError(f"--name {name!r} is a registered score (plugin '{available_scores()[name].plugin}'), "
                              "computed by `ches-curate score`; choose another name for imported values")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line or row number, record or None, problem or None) for each record of a JSONL, CSV or Parquet file."""
    if not path.is_file():
        raise InputError(str(path), None, None, "does not exist", "check the path")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        for row in _jsonl_rows(path):
            yield row.number, row.record, row.problem.reason if row.problem else None
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for record in reader:
                yield reader.line_num, {k: _csv_value(v) for k, v in record.items()}, None
    elif suffix == ".parquet":
        for number, record in enumerate(pd.read_parquet(path).to_dict("records"), 1):
            yield number, record, None
    else:
        raise InputError(str(path), None, None, f"has an unsupported type '{suffix}'",
                         "expected .jsonl, .csv or .parquet")


def _csv_value(text: str | None) -> Any:
    """CSV cells are text: a number stays a number, an empty cell is missing, anything else stays text."""
    if text is None or not text.strip():
        return None
    try:
        return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else float(text)
    except ValueError:
        return text


def _known_keys(store: Store, key: str, dv) -> dict[Any, str]:
    """key value -> pair_id: the dataset version's rows or pair_ids, or every stored pair_id."""
    if dv is not None:
        frame = store.sql('SELECT "row", pair_id FROM dataset_pairs WHERE name = ? AND version = ?',
                          params=[dv.name, dv.version])
    else:
        frame = store.sql("SELECT DISTINCT pair_id FROM pairs")
    return dict(zip(frame[key], frame.pair_id))


def _check(records: list, key: str, column: str, known: dict[Any, str]) -> tuple[list, list]:
    """Split the records into good (pair_id, value, line) and bad (pair_id or None, reason, line)."""
    good, bad, first_line = [], [], {}
    for line, record, problem in records:
        pair_id, reason = None, problem
        if reason is None:
            raw_key = record.get(key)
            pair_id = known.get(int(raw_key) if key == "row" and is_finite(raw_key) else raw_key)
            value = record.get(column)
            if raw_key is None:
                reason = f"field '{key}' is missing"
            elif pair_id is None:
                reason = f"field '{key}' {raw_key!r} is not a known {'row of the dataset' if key == 'row' else 'pair'}"
            elif pair_id in first_line:
                reason, pair_id = f"field '{key}' repeats the pair of line {first_line[pair_id]}", None
            elif value is None:
                reason = f"field '{column}' is missing"
            elif not is_finite(value):
                reason = f"field '{column}' is {json.dumps(value, default=str)}, not a finite number"
        if reason is None:
            good.append((pair_id, float(value), line))
        else:
            bad.append((pair_id, reason, line))
        if pair_id is not None:
            first_line.setdefault(pair_id, line)
    return good, bad


def _store(result: ImportResult, store: Store, path: Path, key: str, dv, good: list, bad: list) -> None:
    """Record the import, its values, the known pairs' failures and the other bad lines in one transaction;
    fills `result.import_id`."""
    name = result.score_name
    with store.transaction() as con:
        import_id = result.import_id = int(con.execute(
            "INSERT INTO score_imports (score_name, source, source_sha256, key_column, dataset_name, dataset_version, "
            "n_rows, n_imported, n_rejected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING import_id",
            [name, str(path.resolve()), models.file_sha256(path), key, dv.name if dv else None,
             dv.version if dv else None, result.n_rows, len(good), len(bad)],
        ).fetchall()[0][0])
        version = f"import-{import_id}"
        rows = [(pid, value, None) for pid, value, _ in good]
        rows += [(pid, None, f"scores import {import_id}, line {line}: {why}") for pid, why, line in bad if pid]
        frame = pd.DataFrame(rows, columns=["pair_id", "value", "failure"]).astype({"value": "float64"})
        frame = frame.assign(model_key=INDEPENDENT, tokenization_version=INDEPENDENT, score_name=name,
                             score_version=version)
        described = definition(name, version, "import", f"imported from {path.name} (import {import_id})",
                               ["import"], False)
        write_plugin_scores(store, frame, [described], import_id=import_id, con=con)
        store.append_quarantine(con, [{"stage": "ingest", "source": str(path), "line": line,
                                       "reason": f"scores import {import_id} ({name}): {why}"}
                                      for pid, why, line in bad if pid is None])
