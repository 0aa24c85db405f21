"""How pairs, rejected rows and dataset versions map to rows of the store's tables.

Pure conversions (no connection): a `PreferencePair` to a `pairs` row and back, a
rejected input row to a `quarantine` row, and the content hash that decides whether
an ingest is a new dataset version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

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


def quarantine_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Quarantine dicts (keys from QUARANTINE_FIELDS) as an Arrow table; unknown keys are an error."""
    unknown = set().union(*rows) - set(QUARANTINE_FIELDS)
    if unknown:
        raise ValueError(f"unknown quarantine fields: {sorted(unknown)}")
    schema = pa.schema([(f, pa.int64() if f in ("dataset_version", "line") else pa.string()) for f in QUARANTINE_FIELDS])
    return pa.Table.from_pylist([{f: r.get(f) for f in QUARANTINE_FIELDS} for r in rows], schema=schema)


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
