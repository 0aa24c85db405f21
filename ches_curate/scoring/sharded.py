"""Sharded scoring: split pairs by a hash of `pair_id`, score each shard into its own Parquet part, merge.

A pair's shard is `shard_of(pair_id, n_shards)`: the same in every process, run and
machine, so processes split the work without talking to each other. Shard k of n is
written to `part-{k:05d}-of-{n:05d}.parquet` in a work directory through a temporary
file and a rename, so a part on disk is always complete: a finished part is never
redone, and a process that crashes leaves no part, so running its shard again redoes
exactly that shard. `merge_parts` checks every part is there and sorts by `row`: the
table single-process `ches-curate score` writes. `manifest.json` in the work directory
pins the input, the model key and n, so parts of different runs are never mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ches_curate.errors import ChesCurateError
from ches_curate.scoring.incremental import quarantine_scoring_failures
from ches_curate.ingest import RejectedRow, read_pairs
from ches_curate.models import LoadedModel
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.scoring.file_run import write_parquet_atomic, write_rejected
from ches_curate.scoring.config import ScoringConfig
from ches_curate.scoring.engine import Scorer
from ches_curate.tokenization import recorded_version

MANIFEST = "manifest.json"
_RUN_KEYS = ("source", "source_fingerprint", "format", "n_shards", "model", "dtype", "model_key",
             "tokenization_version")
_COLUMN_TYPES = {"row": pa.int64(), "pair_id": pa.string(), "chosen_tokens": pa.int64(),
                 "rejected_tokens": pa.int64(), "truncated": pa.bool_()}
SCORE_SCHEMA = pa.schema([(column, _COLUMN_TYPES.get(column, pa.float64())) for column in SCORE_COLUMNS])
"""Column types of a part (and of the merged table), so an empty shard merges like any other."""

PairSource = str | os.PathLike | Iterable[PreferencePair | RejectedRow]


@dataclass(frozen=True)
class ShardResult:
    shard: int
    path: Path
    n_scored: int
    n_rejected: int
    """Input rows rejected at ingest (counted in shard 0 only) plus pairs the scorer could not score."""
    skipped: bool
    """True when the part was already there and nothing was scored."""


def shard_of(pair_id: str, n_shards: int) -> int:
    """The shard of a pair: the first 64 bits of its sha256 `pair_id` as an integer, modulo `n_shards`."""
    return int(pair_id[:16], 16) % n_shards


def part_path(work_dir: str | os.PathLike, shard: int, n_shards: int) -> Path:
    return Path(work_dir) / f"part-{shard:05d}-of-{n_shards:05d}.parquet"


def rejected_path(part: Path) -> Path:
    """Where a part's rejected rows go: the name `score_file` uses beside an output table."""
    return part.with_name(part.name.removesuffix(".parquet") + ".rejected.jsonl")


def missing_shards(work_dir: str | os.PathLike, n_shards: int, shards: Iterable[int] | None = None) -> list[int]:
    """The shards (default: all n) whose part is not in `work_dir` yet."""
    return [s for s in (range(n_shards) if shards is None else shards) if not part_path(work_dir, s, n_shards).exists()]


def score_shard(
    source: PairSource,
    shard: int,
    n_shards: int,
    work_dir: str | os.PathLike,
    model: str | LoadedModel | Scorer = "default",
    config: ScoringConfig | None = None,
    *,
    format: str = "auto",
    source_label: str | None = None,
    model_spec: str | None = None,
) -> ShardResult:
    """Score the pairs of `source` that fall in `shard` of `n_shards` and write its part.

    `source` is anything `ingest.read_pairs` reads, or an iterable of pairs (then name
    it with `source_label` in the manifest). A part already in `work_dir` is kept as is,
    once the manifest shows it comes from the same input, n and model (`model_spec`
    names the model when `model` is already loaded). Rows rejected at ingest go to shard
    0's `.rejected.jsonl`; pairs the scorer cannot score (with `on_error="quarantine"`)
    to their own shard's.
    """
    if not 0 <= shard < n_shards:
        raise ChesCurateError(f"shard {shard} is out of range: with {n_shards} shards, use 0 to {n_shards - 1}")
    config = model.config if isinstance(model, Scorer) else config or ScoringConfig()
    identity = _run_identity(source, source_label, format, n_shards, model_spec or model, config)
    part = part_path(work_dir, shard, n_shards)
    if part.exists():
        check_manifest(work_dir, identity, create=False)
        return ShardResult(shard, part, pq.ParquetFile(part).metadata.num_rows, 0, skipped=True)
    scorer = model if isinstance(model, Scorer) else Scorer(model, config)
    info = {k: scorer.loaded.info.get(k) for k in ("name", "revision", "file_hash", "dtype", "tokenizer_hash",
                                                   "path")}
    tokenization = recorded_version(scorer.loaded.tokenizer, config.chat_template)
    check_manifest(work_dir, {**identity, "model_key": scorer.key, "tokenization_version": tokenization,
                              "model_info": info})
    rejected: list[RejectedRow] = []
    items = read_pairs(source, format=format, on_error=config.on_error) if _is_path(source) else source
    failures_before = len(scorer.failures)
    frames = list(scorer.score_batches(_shard_pairs(items, shard, n_shards, rejected)))
    failures = scorer.failures[failures_before:]
    table = pa.concat_tables([_arrow(f) for f in frames]) if frames else SCORE_SCHEMA.empty_table()
    # The rejected rows go first: the part's appearance (the rename) marks the shard done.
    write_rejected(part, rejected, failures)
    write_parquet_atomic(table.sort_by("row"), part)
    return ShardResult(shard, part, table.num_rows, len(rejected) + len(failures), skipped=False)


def _shard_pairs(items: Iterable, shard: int, n_shards: int, rejected: list[RejectedRow]):
    for item in items:
        if isinstance(item, PreferencePair):
            if shard_of(item.pair_id, n_shards) == shard:
                yield item
        elif shard == 0:
            rejected.append(item)


def _is_path(source: PairSource) -> bool:
    return isinstance(source, (str, os.PathLike))


def _arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame[list(SCORE_COLUMNS)], schema=SCORE_SCHEMA, preserve_index=False)


def _run_identity(source: PairSource, label: str | None, format: str, n_shards: int, model: Any,
                  config: ScoringConfig) -> dict[str, Any]:
    """What makes parts belong together, known before the model loads: the input as it is now, n, the model."""
    fingerprint = None
    if _is_path(source) and Path(source).is_file():
        stat = Path(source).stat()
        fingerprint = f"{stat.st_size} bytes, mtime_ns {stat.st_mtime_ns}"
    return {"source": label or (os.fspath(source) if _is_path(source) else None), "source_fingerprint": fingerprint,
            "format": format, "n_shards": n_shards, "model": model if isinstance(model, str) else None,
            "dtype": config.dtype}


def check_manifest(work_dir: str | os.PathLike, manifest: dict[str, Any], create: bool = True) -> None:
    """Write `work_dir/manifest.json` if absent (and `create`); otherwise refuse a run that differs from it.

    Keys compared: those of `_RUN_KEYS` that both sides know (not None).
    """
    path = Path(work_dir) / MANIFEST
    if not path.exists():
        if not create:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{MANIFEST}.{os.getpid()}.partial")
        partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(partial, path)
    recorded = read_manifest(work_dir)
    differs = [k for k in _RUN_KEYS if None not in (recorded.get(k), manifest.get(k)) and recorded[k] != manifest[k]]
    if differs:
        changes = "; ".join(f"{k}: {recorded.get(k)!r} there, {manifest.get(k)!r} now" for k in differs)
        raise ChesCurateError(
            f"{work_dir} holds the parts of another run ({changes}); delete {work_dir} to start over, "
            "or pass another --work-dir"
        )


def read_manifest(work_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(work_dir) / MANIFEST
    if not path.exists():
        raise ChesCurateError(f"{work_dir} has no {MANIFEST}: no shard of this run has been scored yet")
    return json.loads(path.read_text())


def merge_parts(work_dir: str | os.PathLike, n_shards: int,
                rerun: Callable[[list[int]], str] | None = None) -> pd.DataFrame:
    """All parts of `work_dir` as one table sorted by `row` (columns `SCORE_COLUMNS`).

    Refuses to merge while a part is missing, naming the missing shards and the command
    that scores only them (`rerun(missing)`; by default the Python call).
    """
    return _merged(work_dir, n_shards, rerun).to_pandas()


def _merged(work_dir: str | os.PathLike, n_shards: int, rerun: Callable[[list[int]], str] | None) -> pa.Table:
    missing = missing_shards(work_dir, n_shards)
    if missing:
        command = rerun(missing) if rerun else (
            f"score_shard(source, shard, {n_shards}, {os.fspath(work_dir)!r}, model) for shard in {missing}")
        raise ChesCurateError(
            f"{work_dir}: {len(missing)} of {n_shards} parts missing (shard{'s' * (len(missing) > 1)} "
            f"{', '.join(map(str, missing))}), so nothing was merged. Score only those with: {command}"
        )
    parts = [pq.read_table(part_path(work_dir, s, n_shards), schema=SCORE_SCHEMA) for s in range(n_shards)]
    return pa.concat_tables(parts).sort_by("row")


def merge_rejected(work_dir: str | os.PathLike, n_shards: int) -> list[dict[str, Any]]:
    """The rejected rows of all parts: ingest rejections in input order, then scoring failures by row."""
    records = []
    for shard in range(n_shards):
        path = rejected_path(part_path(work_dir, shard, n_shards))
        if path.exists():
            records.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    return sorted(records, key=lambda r: (r["stage"] != "ingest", r.get("line") or r.get("row") or 0))


def write_merged(work_dir: str | os.PathLike, n_shards: int, output: str | os.PathLike,
                 rerun: Callable[[list[int]], str] | None = None) -> tuple[pd.DataFrame, Path | None]:
    """Merge the parts into `output` (.parquet, atomic) and their rejected rows into `OUT.rejected.jsonl`."""
    output = Path(output)
    merged = _merged(work_dir, n_shards, rerun)
    write_parquet_atomic(merged, output)
    table = merged.to_pandas()
    rejected = merge_rejected(work_dir, n_shards)
    path = rejected_path(output)
    if not rejected:
        path.unlink(missing_ok=True)
        return table, None
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected)
    return table, path


def store_merged(store, work_dir: str | os.PathLike, n_shards: int, dataset: str, version: int,
                 params: dict[str, Any] | None = None,
                 rerun: Callable[[list[int]], str] | None = None) -> tuple[int, int, int]:
    """Load the merged scores of a dataset version into the store; returns (run_id, added, failed).

    All scores go in with one `Store.write_scores` call, i.e. one transaction, with
    INSERT OR IGNORE semantics: a pair that already has a score for the model keeps it.
    The scorer's failures are quarantined with stage `scoring`, once per pair and reason across reruns.
    """
    manifest = read_manifest(work_dir)
    table = merge_parts(work_dir, n_shards, rerun)
    failures = [r for r in merge_rejected(work_dir, n_shards) if r["stage"] == "scoring"]
    key = manifest["model_key"]
    store.register_model(key, manifest["model_info"])
    run_params = {**(params or {}), "n_shards": n_shards, "work_dir": os.fspath(work_dir)}
    run_id = store.start_score_run(dataset, version, key, run_params)
    added = store.write_scores(run_id, key, table, manifest.get("tokenization_version"))
    quarantine_scoring_failures(store, dataset, version, key, failures)
    store.finish_score_run(run_id, "finished", n_failed=len(failures))
    return run_id, added, len(failures)


def score_shards(
    source_factory,
    shards: Sequence[int],
    n_shards: int,
    work_dir: str | os.PathLike,
    model: str | LoadedModel = "default",
    config: ScoringConfig | None = None,
    **shard_options: Any,
) -> list[ShardResult]:
    """Score several shards one after another in this process, loading the model once (and only if needed).

    `source_factory()` returns a fresh source for each shard (a path, or a new pair iterator).
    """
    needed = missing_shards(work_dir, n_shards, shards)
    scorer = Scorer(model, config or ScoringConfig()) if needed else model
    spec = model if isinstance(model, str) else None
    return [score_shard(source_factory(), s, n_shards, work_dir, scorer, config, model_spec=spec, **shard_options)
            for s in shards]
