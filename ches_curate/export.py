"""Export a curated selection (or a whole dataset version) as the dataset TRL trains on, as it was scored.

Each pair is written as the TRL example its scores were computed from
(`tokenization.trl_example`), so TRL's `DPOTrainer` tokenizes exactly the scored ids:
conversational rows (the prompt's messages, a plain prompt as one `user` message; one
`assistant` message each for chosen and rejected) when the pairs were scored through the
chat template, standard rows (three strings) when scored with `--no-chat-template`.
Which one comes from the scores of the selection's model (`tokenization_version`), or is
asked for; a mismatch is an error, never a silent re-tokenization. Extra input columns
are kept (except those TRL itself reads, such as `tools` or `messages`, which would change
what it trains on), and every row records `ches_model_key` and `ches_tokenization_version`.
Each pair is written once, at its first row, in dataset order; the output appears atomically.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ches_curate import tokenization
from ches_curate.atomic_files import replace_atomically
from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair
from ches_curate.selection import Unscored, unscored
from ches_curate.store import Store

FORMATS = ("jsonl", "parquet", "datasets")
SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}
RECORD_COLUMNS = ("ches_model_key", "ches_tokenization_version")
"""Columns every exported row gets: the model whose scores were used (or null) and the tokenization version."""
TRL_READS = ("prompt", "chosen", "rejected", "messages", "completion", "tools", "chat_template_kwargs", "image",
             "images", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
"""Extra columns left out: TRL's DPOTrainer reads them, so they would change what it trains on (an hh-rlhf file's
own `prompt` column, say, would replace the prompt the transcripts give)."""
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
    model_key: str | None
    tokenization_version: str
    format: str
    left_out_columns: tuple[str, ...]
    """Extra input columns not written because TRL reads them."""
    unscored: Unscored | None = None
    """The version's pairs without a score from `model_key` (None without a model key): not in any selection."""


def trl_record(pair: PreferencePair, conversational: bool) -> dict:
    """The TRL example of `pair` (`tokenization.trl_example`); a pair that has none is an error naming it."""
    try:
        return tokenization.trl_example(pair, conversational)
    except tokenization.TruncationError as err:
        raise ChesCurateError(f"row {pair.row} (pair {pair.pair_id[:12]}): {err}") from None


def export_dataset(
    store: Store,
    output: str | Path,
    dataset: str | None = None,
    version: int | None = None,
    selection_id: int | None = None,
    *,
    format: str | None = None,
    chat_template: bool | None = None,
    model_key: str | None = None,
    extra_columns: bool = True,
) -> ExportSummary:
    """Write the kept pairs of `selection_id` (or every pair of the dataset version) to `output`.

    `format` is `jsonl`, `parquet` or `datasets` (a `save_to_disk` directory); by default
    the suffix decides. The tokenization is that of the scores of `model_key` (default:
    the selection's model); `chat_template` (None: as scored, else with the template)
    must agree with it. `extra_columns=False` writes only the TRL columns and the record.
    """
    output = Path(output)
    kind = format or SUFFIXES.get(output.suffix.lower())
    if kind not in FORMATS:
        raise ChesCurateError(f"{output}: unknown export format {format or output.suffix!r}; use a .jsonl or .parquet "
                              "file name, or --format jsonl, parquet or datasets (a directory)")
    dataset, version, selection_model = _resolve(store, dataset, version, selection_id)
    model_key = model_key or selection_model
    version_name = _tokenization(store, dataset, version, selection_id, model_key, chat_template)
    conversational = not tokenization.is_raw(version_name)
    extras, left_out = _extra_columns(store, dataset, version, selection_id) if extra_columns else ({}, ())
    record = {"ches_model_key": model_key, "ches_tokenization_version": version_name}

    def records() -> Iterator[dict]:
        for pair in store.dataset_pairs(dataset, version, selection_id=selection_id, distinct=True):
            kept = {key: pair.metadata.get(key) for key in extras}
            yield trl_record(pair, conversational) | kept | record

    text = pa.string()
    core = [(name, _MESSAGES if conversational else text) for name in ("prompt", "chosen", "rejected")]
    schema = pa.schema([*core, *extras.items(), ("ches_model_key", text), ("ches_tokenization_version", text)])
    writer = {"jsonl": _write_jsonl, "parquet": _write_parquet, "datasets": _write_dataset}[kind]
    n_pairs = _atomically(output, kind == "datasets", lambda staging: writer(records(), staging, schema))
    missing = unscored(store, dataset, version, model_key, version_name) if model_key is not None else None
    return ExportSummary(output, dataset, version, selection_id, n_pairs, conversational, model_key, version_name,
                         kind, left_out, missing)


def _resolve(store: Store, dataset: str | None, version: int | None,
             selection_id: int | None) -> tuple[str, int, str | None]:
    """(dataset, version, the selection's model key) of what to export."""
    if selection_id is None:
        if dataset is None:
            raise ChesCurateError("export needs --dataset NAME, or --selection ID")
        return dataset, store.dataset_version(dataset, version).version, None
    first = store.selection(selection_id).iloc[0]
    name, selected_version = first.dataset_name, int(first.dataset_version)
    if (dataset is not None and dataset != name) or (version is not None and version != selected_version):
        raise ChesCurateError(
            f"selection {selection_id} was made on dataset {name!r} v{selected_version}, "
            f"not {dataset or name!r} v{version or selected_version}; drop --dataset/--version or fix them"
        )
    model_key = first.model_key if isinstance(first.model_key, str) else None
    return name, selected_version, model_key


def _tokenization(store: Store, name: str, version: int, selection_id: int | None, model_key: str | None,
                  chat_template: bool | None) -> str:
    """The tokenization version to export: that of `model_key`'s scores of the pairs; `chat_template` must agree."""
    wanted = None if chat_template is None else tokenization.current_version(chat_template)
    if model_key is None:
        return wanted or tokenization.current_version(True)
    # A selection that kept nothing has the tokenization of the version's scores.
    found = (store.tokenization_versions(name, version, model_key, selection_id)
             or store.tokenization_versions(name, version, model_key))
    if not found:
        raise ChesCurateError(f"model {model_key!r} has no scores for the pairs of {name!r} v{version} to export; "
                              f"score them with `ches-curate score --dataset {name}` or drop --model-key")
    what = f"selection {selection_id}" if selection_id is not None else f"{name!r} v{version}"
    current = {tokenization.current_version(flag) for flag in (True, False)}
    if len(found) > 1 or not current.issuperset(found):
        counts = " and ".join(f"{n:,} pair{'s' * (n != 1)} under tokenization {v}"
                              for v, n in sorted(found.items(), key=lambda item: str(item[0])))
        raise ChesCurateError(f"{what}: model {model_key!r} scored {counts}; an export needs them all under one of "
                              f"{', '.join(sorted(current))} (what TRL trains on): re-score with `ches-curate score "
                              f"--dataset {name}` (add --no-chat-template for {tokenization.current_version(False)}), "
                              "then filter again")
    (scored,) = found
    if wanted is not None and wanted != scored:
        flag = "--no-chat-template" if tokenization.is_raw(scored) else "--chat-template"
        raise ChesCurateError(f"{what} was scored under tokenization {scored}, not {wanted}: export with {flag}, or "
                              f"re-score with the tokenization you want and filter again")
    return scored


def _extra_columns(store: Store, name: str, version: int,
                   selection_id: int | None) -> tuple[dict[str, pa.DataType], tuple[str, ...]]:
    """The extra input columns of the pairs to export with their Arrow types, and those left out (`TRL_READS`)."""
    types: dict[str, pa.DataType] = {}
    left_out: dict[str, None] = {}
    batches = _batched(p.metadata for p in store.dataset_pairs(name, version, selection_id=selection_id, distinct=True))
    for batch in batches:
        for key in dict.fromkeys(key for metadata in batch for key in metadata):
            if key in TRL_READS:
                left_out.setdefault(key)
            if key in TRL_READS or key in RECORD_COLUMNS:  # the record columns are rewritten
                continue
            try:
                found = pa.array([metadata.get(key) for metadata in batch]).type
                types[key] = found if key not in types else pa.unify_schemas(
                    [pa.schema([(key, types[key])]), pa.schema([(key, found)])], promote_options="permissive")[0].type
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ChesCurateError(f"extra column {key!r} holds values of different types ({err}); export with "
                                      "--no-extra-columns, or make its values one type") from None
            except OverflowError:
                raise ChesCurateError(f"extra column {key!r} holds an integer beyond 64 bits, which Arrow and Parquet "
                                      "cannot store; export with --no-extra-columns, or store it as a string") from None
    return types, tuple(left_out)


def _batched(items) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, _BATCH)):
        yield batch


def _atomically(output: Path, directory: bool, write: Callable[[Path], int]) -> int:
    """`write` into a staging path beside `output`, then rename it into place; a failure leaves `output` as it was."""
    if directory and output.exists() and not output.is_dir():
        raise ChesCurateError(f"{output} is a file; a datasets export is a directory: remove it or choose another "
                              "--output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return replace_atomically(output, write, directory=directory)
    except OSError as err:  # a full disk, a read-only folder: the user's to fix, not a bug
        raise ChesCurateError(f"cannot write {output}: {err.strerror or err} (nothing was exported; "
                              "a file already at that path is unchanged)") from err


def _write_jsonl(records: Iterator[dict], path: Path, schema: pa.Schema) -> int:
    """One JSON object per pair, every row with the columns of `schema`, in its order."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            row = {name: _finite(record.get(name)) for name in schema.names}
            out.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    return count


def _finite(value: Any) -> Any:
    """`value` with NaN and ±Infinity as null, at any depth: JSON has no such numbers (Python would write bare
    `NaN`, which JSON readers refuse), and a missing value is what a NaN in a table usually means."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _write_parquet(records: Iterator[dict], path: Path, schema: pa.Schema) -> int:
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batched(records):
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def _write_dataset(records: Iterator[dict], path: Path, schema: pa.Schema) -> int:
    """A `datasets` directory (`load_from_disk` reads it), built from a Parquet file written first."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="ches_curate_export_") as scratch:
        parquet = Path(scratch) / "export.parquet"
        count = _write_parquet(records, parquet, schema)
        loaded = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(Path(scratch) / "cache"))
        loaded.save_to_disk(str(path))
    return count
