"""Export a curated selection (or a whole dataset version) as a training-ready file.

The output follows TRL's preference format: columns `prompt`, `chosen`, `rejected`.
If any prompt is a chat conversation, every record is written conversationally, as
TRL expects: `prompt` is a message list (a plain prompt becomes one user message) and
`chosen`/`rejected` are one-message assistant lists. Otherwise all three are strings.
Each pair is written once, at its first row, in dataset order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair
from ches_curate.store import Store

FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_BATCH = 10_000


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    dataset_name: str
    dataset_version: int
    selection_id: int | None
    n_pairs: int
    conversational: bool


def trl_record(pair: PreferencePair, conversational: bool) -> dict:
    """One pair in TRL's standard (strings) or conversational (message lists) preference format."""
    if not conversational:
        return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    prompt = [{"role": "user", "content": pair.prompt}] if isinstance(pair.prompt, str) else pair.prompt
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }


def export_dataset(
    store: Store,
    output: str | Path,
    dataset: str | None = None,
    version: int | None = None,
    selection_id: int | None = None,
) -> ExportSummary:
    """Write the kept pairs of `selection_id` (or every pair of the dataset version) to `output`.

    The format comes from the suffix (`.jsonl` or `.parquet`). The file appears
    atomically: a failed export leaves no partial file behind.
    """
    output = Path(output)
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise ChesCurateError(f"{output}: unknown export format; use a .jsonl or .parquet file name")
    dataset, version = _resolve(store, dataset, version, selection_id)
    kept = "AND sel.kept" if selection_id is not None else ""
    conversational = bool(store.sql(
        "SELECT coalesce(bool_or(p.prompt_messages IS NOT NULL), false) AS conv FROM dataset_pairs dp "
        "JOIN pairs p USING (pair_id) WHERE dp.name = ? AND dp.version = ? AND (? IS NULL OR EXISTS (SELECT 1 FROM "
        f"selections sel WHERE sel.selection_id = ? AND sel.pair_id = dp.pair_id {kept}))",
        params=[dataset, version, selection_id, selection_id],
    ).conv.iloc[0])
    records = (trl_record(p, conversational) for p in
               store.dataset_pairs(dataset, version, selection_id=selection_id, distinct=True))
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(handle)
    try:
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes it 0600; the export gets open()'s usual mode
        n_pairs = (_write_jsonl if kind == "jsonl" else _write_parquet)(records, Path(staging), conversational)
        os.replace(staging, output)
    except OSError as err:  # a full disk, a read-only folder: the user's to fix, not a bug
        raise ChesCurateError(f"cannot write {output}: {err.strerror or err} (nothing was exported; "
                              "a file already at that path is unchanged)") from err
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return ExportSummary(output, dataset, version, selection_id, n_pairs, conversational)


def _umask() -> int:
    """The process umask; reading it means setting it, so it is put straight back."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _resolve(store: Store, dataset: str | None, version: int | None, selection_id: int | None) -> tuple[str, int]:
    if selection_id is None:
        if dataset is None:
            raise ChesCurateError("export needs --dataset NAME, or --selection ID")
        return dataset, store.dataset_version(dataset, version).version
    first = store.selection(selection_id).iloc[0]
    name, selected_version = first.dataset_name, int(first.dataset_version)
    if (dataset is not None and dataset != name) or (version is not None and version != selected_version):
        raise ChesCurateError(
            f"selection {selection_id} was made on dataset {name!r} v{selected_version}, "
            f"not {dataset or name!r} v{version or selected_version}; drop --dataset/--version or fix them"
        )
    return name, selected_version


def _write_jsonl(records: Iterator[dict], path: Path, conversational: bool) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_parquet(records: Iterator[dict], path: Path, conversational: bool) -> int:
    kind = _MESSAGES if conversational else pa.string()
    schema = pa.schema([("prompt", kind), ("chosen", kind), ("rejected", kind)])
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        while batch := list(islice(records, _BATCH)):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count
