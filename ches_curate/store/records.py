"""How pairs, rejected rows and dataset versions map to rows of the store's tables.

Conversions (no connection): a `PreferencePair` to a `pairs` row and back, a
rejected input row to a `quarantine` row, the content hash that decides whether an
ingest is a new dataset version, and `ParquetSpill`, which keeps a version's rows on
disk until the transaction that stores them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ches_curate.pairs import PreferencePair

QUARANTINE_FIELDS = (
    "dataset_name", "dataset_version", "stage", "source", "line", "field", "reason", "expectation", "pair_id", "raw",
)
"""Columns of a `quarantine` row that callers fill (its id and `created_at` come from the store)."""


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: int
    n_pairs: int
    n_quarantined: int
    created: bool = False
    content_hash: str = ""
    source: str | None = None


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def pair_from_record(rec: dict) -> PreferencePair:
    """A `pairs` row (plus its `row`) back into the pair it was stored from."""
    prompt = json.loads(rec["prompt_messages"]) if rec["prompt_messages"] else rec["prompt"]
    metadata = json.loads(rec["metadata"]) if rec["metadata"] else {}
    return PreferencePair(prompt, rec["chosen"], rec["rejected"], int(rec["row"]), rec["format"], metadata)


def pairs_table(pairs: list[PreferencePair]) -> pa.Table:
    """Pairs as `pairs` rows: chat prompts as readable text plus their message list as JSON."""
    return pa.table({
        "pair_id": [p.pair_id for p in pairs], "prompt": [p.prompt_text for p in pairs],
        "prompt_messages": [None if isinstance(p.prompt, str) else to_json(p.prompt) for p in pairs],
        "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs],
        "format": [p.format for p in pairs], "metadata": [to_json(p.metadata) if p.metadata else None for p in pairs],
    })


QUARANTINE_SCHEMA = pa.schema(
    [(f, pa.int64() if f in ("dataset_version", "line") else pa.string()) for f in QUARANTINE_FIELDS]
)
LINK_SCHEMA = pa.schema([("row", pa.int64()), ("pair_id", pa.string())])
"""A `dataset_pairs` row before its version is known."""


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Quarantine dicts (keys from QUARANTINE_FIELDS) as an Arrow table; unknown keys are an error."""
    unknown = set().union(*rows) - set(QUARANTINE_FIELDS)
    if unknown:
        raise ValueError(f"unknown quarantine fields: {sorted(unknown)}")
    return pa.Table.from_pylist([{f: r.get(f) for f in QUARANTINE_FIELDS} for r in rows], schema=QUARANTINE_SCHEMA)


class ParquetSpill:
    """Arrow tables appended to a Parquet file, one row group each.

    A dataset version's links and rejected rows wait here, not in Python lists, until
    the one transaction that adds the version reads them back with `read_parquet`: the
    memory an ingest needs does not grow with the dataset.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema, self.num_rows = path, schema, 0
        self._writer: pq.ParquetWriter | None = None

    def append(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer = self._writer or pq.ParquetWriter(self.path, self.schema)
            self._writer.write_table(table)
            self.num_rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class ContentHash:
    """sha256 over what a dataset version holds, in input order.

    A pair contributes `row, pair_id`; a rejected row `line, field, reason, raw`. The
    source's path does not count: the same file ingested twice, from anywhere, hashes
    the same.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add_pairs(self, rows: list[int], pair_ids: list[str]) -> None:
        for row, pair_id in zip(rows, pair_ids):
            self._digest.update(f"{row}\t{pair_id}\n".encode())

    def add_rejected(self, item: Any) -> dict[str, Any]:
        """Hash an ingest `RejectedRow` and return it as a `quarantine` row of stage `ingest`."""
        raw = item.raw if isinstance(item.raw, str) else to_json(item.raw)
        self._digest.update(f"rejected\t{item.line}\t{item.field}\t{item.reason}\t{raw}\n".encode())
        return {"stage": "ingest", "source": item.source, "line": item.line, "field": item.field,
                "reason": item.reason, "raw": raw}

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
