"""A sharded scoring job end to end: this process's shards (all, `--rank`s, or torchrun's), then the merge.

    ches-curate score pairs.jsonl -o scores.parquet --shards 4            # all 4 here, one after another
    torchrun --nproc-per-node 8 --no-python ches-curate score pairs.jsonl -o scores.parquet
    ches-curate score pairs.jsonl -o scores.parquet --shards 4 --rank 2   # only shard 2 (e.g. after a crash)

The merged table has the columns and order of `ches-curate score`. `run_sharded` is the
control flow `ches-curate score --shards` runs; what it has to say goes through `say`
(the CLI prints it, a pipeline step may log it).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ches_curate.errors import ChesCurateError
from ches_curate.scoring.config import ScoringConfig


@dataclass(frozen=True)
class ShardedJob:
    """What to score, and where its parts and results go."""

    input: str | None
    output: Path | None
    dataset: str | None
    version: int | None
    db: Path | None
    model: str
    format: str
    config: ScoringConfig
    n_shards: int | None
    ranks: list[int]
    work_dir: Path | None


@dataclass(frozen=True)
class ShardedOutcome:
    """What a sharded job left: the merged table's summary (None until every part exists, or on a torchrun
    rank other than 0) and the run id of the scores loaded into the store (None without `--dataset`)."""

    summary: dict | None = None
    title: str = ""
    run_id: int | None = None


def run_sharded(job: ShardedJob, say: Callable[[str], None] = print) -> ShardedOutcome:
    """Score this process's shards (torchrun rank, `--rank`s, or all), then merge when every part exists."""
    from ches_curate.scoring import distributed, sharded as sharding

    launch = distributed.launch_from_env()
    if launch and job.ranks:
        raise ChesCurateError("--rank picks shards by hand; under torchrun each rank takes its own shards, so drop it")
    n_shards = job.n_shards or (launch.world_size if launch else None)
    if n_shards is None:
        raise ChesCurateError("give --shards N (or launch with torchrun, where N defaults to the number of processes)")
    if bad := [r for r in job.ranks if not 0 <= r < n_shards]:
        raise ChesCurateError(
            f"--rank {bad[0]} is out of range: with --shards {n_shards}, ranks are 0 to {n_shards - 1}")
    source_factory, work_dir, label, store, dv = _resolve(job, n_shards)
    options = {"format": job.format, "source_label": label}
    rerun = _rerun_command(job, n_shards, work_dir, dv.version if dv else None)
    if launch:
        results = distributed.score_distributed(launch, source_factory, n_shards, work_dir, job.model, job.config,
                                                **options)
    else:
        shards = job.ranks or range(n_shards)
        results = sharding.score_shards(source_factory, shards, n_shards, work_dir, job.model, job.config, **options)
    for result in results:
        done = "already done" if result.skipped else f"{result.n_scored:,} pairs scored"
        say(f"shard {result.shard} of {n_shards}: {done} -> {result.path}")
    if launch and launch.rank != 0:
        return ShardedOutcome()
    missing = sharding.missing_shards(work_dir, n_shards)
    if missing and job.ranks:
        say(f"{n_shards - len(missing)} of {n_shards} parts done in {work_dir}; still to score: {rerun(missing)}")
        return ShardedOutcome()
    run_id = None
    if store is not None:
        params = {"model": job.model, **dataclasses.asdict(job.config)}
        run_id, added, failed = sharding.store_merged(store, work_dir, n_shards, dv.name, dv.version, params, rerun)
        failures = f", {failed:,} failed (quarantined)" if failed else ""
        say(f"run {run_id}: {added:,} scores added to {store.path} for {dv.name} v{dv.version}{failures}")
    if job.output is None:
        return ShardedOutcome(run_id=run_id)
    return ShardedOutcome(run_id=run_id, **_write_output(work_dir, n_shards, job.output, rerun, say))


def _resolve(job: ShardedJob, n_shards: int) -> tuple[Callable[[], Any], Path, str | None, Any, Any]:
    """(fresh pair source per shard, work dir, manifest label, store or None, dataset version or None)."""
    if job.dataset is None:
        if job.input is None or job.output is None:
            raise ChesCurateError("give INPUT and --output OUT.parquet, or --dataset NAME to score a stored dataset")
        if job.output.suffix != ".parquet":
            raise ChesCurateError(f"{job.output}: the score table is written as Parquet; name it *.parquet")
        from ches_curate.scoring.file_run import check_writable

        check_writable(job.output)
        work_dir = job.work_dir or job.output.with_name(job.output.name.removesuffix(".parquet") + ".shards")
        return (lambda: job.input), work_dir, None, None, None
    from ches_curate.store import Store

    store = Store(job.db, create=False)
    dv = store.dataset_version(job.dataset, job.version)
    work_dir = job.work_dir or store.path.with_name(f"{store.path.stem}.shards") / f"{dv.name}-v{dv.version}"
    label = f"dataset {dv.name} v{dv.version} in {store.path}"
    return (lambda: store.dataset_pairs(dv.name, dv.version, distinct=True)), work_dir, label, store, dv


def _rerun_command(job: ShardedJob, n_shards: int, work_dir: Path, version: int | None) -> Callable[[list[int]], str]:
    """The command that scores only the given shards of this job (the options that change results included)."""
    where = [job.input] if job.dataset is None else ["--dataset", job.dataset, "--version", str(version)]
    if job.dataset is not None and job.db is not None:
        where += ["--db", str(job.db)]
    args = ["ches-curate", "score", *where, "--model", job.model, "--shards", str(n_shards),
            "--work-dir", str(work_dir)]
    if job.output is not None:
        args += ["--output", str(job.output)]
    defaults = ScoringConfig()
    for flag, value, default in (("--format", job.format, "auto"), ("--dtype", job.config.dtype, defaults.dtype),
                                 ("--max-length", job.config.max_length, defaults.max_length),
                                 ("--on-error", job.config.on_error, defaults.on_error)):
        if value != default:
            args += [flag, str(value)]
    if job.config.trust_remote_code:
        args.append("--trust-remote-code")
    if job.config.chat_template is False:
        args.append("--no-chat-template")
    return lambda shards: shlex.join(args + [a for s in shards for a in ("--rank", str(s))])


def _write_output(work_dir: Path, n_shards: int, output: Path, rerun: Callable[[list[int]], str],
                  say: Callable[[str], None]) -> dict:
    from ches_curate.scoring.file_run import summarize_scores
    from ches_curate.scoring.sharded import read_manifest, write_merged
    from ches_curate.tokenization import describe_tokenization

    table, rejected = write_merged(work_dir, n_shards, output, rerun)
    say(f"wrote {output} from {n_shards} parts in {work_dir}")
    if rejected:
        say(f"rows rejected, with reasons, in {rejected}")
    manifest = read_manifest(work_dir)
    tokenization = manifest.get("tokenization_version")  # absent in the manifests of parts scored before it was kept
    how = f" ({describe_tokenization(tokenization)})" if tokenization else ""
    return {"summary": summarize_scores(table), "title": f"{len(table)} pairs scored with {manifest['model_key']}{how}"}
