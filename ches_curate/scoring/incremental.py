"""Incremental, resumable scoring of a stored dataset version.

Only pairs without a score for the model key are scored, and every batch is committed
in its own short transaction. A run killed at any moment (even `kill -9`) loses at
most the batch in flight; rerunning scores exactly the rest, and the primary key
(pair_id, model_key) guarantees one score per pair and model. The plugin scores of each
batch are stored right after it; those a pair scored before lacks (a score added later, a
new score version, a batch killed between the two commits) are computed at the end of the
run, without CHES again (`plugin_scores`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import pandas as pd

from ches_curate.errors import Interrupted
from ches_curate.models import LoadedModel
from ches_curate.scoring.progress import track_frames
from ches_curate.scoring.config import ScoringConfig
from ches_curate.scoring.engine import Scorer
from ches_curate.scoring.plugin_scores import backfill_plugin_scores, write_batch_plugin_scores
from ches_curate.store import Store
from ches_curate.tokenization import describe_tokenization, recorded_version, use_chat_template

COMMIT_EVERY_S = 2.0
"""Scores are committed in one transaction per this many seconds of scoring (and at the end)."""


@dataclass(frozen=True)
class ScoreRunSummary:
    run_id: int
    dataset_name: str
    dataset_version: int
    model_key: str
    status: str
    n_pairs: int
    """Distinct pairs in the dataset version."""
    n_scored: int
    """Pairs scored and committed by this run."""
    n_skipped: int
    """Pairs that already had a score for this model key."""
    n_failed: int
    """Pairs the scorer could not score (quarantined with stage `scoring`)."""
    wall_time_s: float
    tokenization_version: str
    """What the scores are recorded under: `2` (through the chat template) or `2-raw` (plain text)."""
    n_backfilled: int = 0
    """Pairs scored before that got plugin scores (or score versions) they lacked, without CHES again."""

    def describe(self) -> str:
        """One line for the terminal, naming the tokenization the scores were made (and recorded) under."""
        failed = f", {self.n_failed:,} failed (quarantined)" if self.n_failed else ""
        backfilled = f", {self.n_backfilled:,} given missing plugin scores" if self.n_backfilled else ""
        return (
            f"run {self.run_id} {self.status}: {self.dataset_name} v{self.dataset_version} with {self.model_key} "
            f"({describe_tokenization(self.tokenization_version)}): {self.n_scored:,} scored, {self.n_skipped:,} "
            f"already scored{failed}{backfilled} of {self.n_pairs:,} pairs in {self.wall_time_s:.1f} s"
        )


def score_dataset(
    store: Store,
    dataset: str,
    model: str | LoadedModel | Scorer = "default",
    config: ScoringConfig | None = None,
    version: int | None = None,
    zenml_run_id: str | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> ScoreRunSummary:
    """Score the pairs of `dataset` (latest version by default) that `model` has not scored yet
    (at most `limit` of them, in row order, when given: a quick look before the whole run).

    Registers the model, opens a `score_runs` row, streams `store.unscored_pairs` through
    `Scorer.score_batches` and commits each batch with `store.write_scores`. The run ends
    `finished`, or `failed` / `interrupted` (then re-raises); its committed scores stay.
    """
    scorer = model if isinstance(model, Scorer) else Scorer(model, config or ScoringConfig())
    if scorer.config.chat_template is None:  # the enclosing `use_chat_template` (the CLI's flag) decides
        return _score_dataset(store, dataset, scorer, version, zenml_run_id, progress, limit)
    with use_chat_template(scorer.config.chat_template):  # the store records and reads this tokenization
        return _score_dataset(store, dataset, scorer, version, zenml_run_id, progress, limit)


def _score_dataset(store: Store, dataset: str, scorer: Scorer, version: int | None, zenml_run_id: str | None,
                   progress: bool, limit: int | None) -> ScoreRunSummary:
    started = time.perf_counter()
    config = scorer.config
    dv = store.dataset_version(dataset, version)
    store.verify()
    tokenization = recorded_version(scorer.loaded.tokenizer, config.chat_template)
    n_pairs, n_skipped = store.score_counts(dv.name, dv.version, scorer.key, tokenization)
    close_abandoned_runs(store, dv.name, dv.version, scorer.key)
    params = dataclasses.asdict(config) | {"pid": os.getpid(), "host": socket.gethostname()}
    run_id = store.start_score_run(dv.name, dv.version, scorer.key, params, zenml_run_id, n_skipped=n_skipped,
                                   model_info=scorer.loaded.info)
    failures_before = len(scorer.failures)
    n_scored, n_backfilled, status = 0, 0, "failed"
    try:
        to_score = n_pairs - n_skipped if limit is None else min(limit, n_pairs - n_skipped)
        unscored = store.unscored_pairs(dv.name, dv.version, scorer.key, tokenization)
        frames = scorer.score_batches(islice(unscored, to_score), total=to_score)
        if progress:
            frames = track_frames(frames, f"scoring {dv.name} v{dv.version}", total=to_score)
        for batch in _every(frames, COMMIT_EVERY_S):
            n_scored += store.write_scores(run_id, scorer.key, batch, tokenization)
            write_batch_plugin_scores(store, scorer, batch, tokenization, run_id)
        if limit is None:
            n_backfilled = backfill_plugin_scores(store, dv.name, dv.version, scorer, tokenization, run_id)
        status = "finished"
    except Interrupted as stop:
        status = "interrupted"
        committed = store.score_counts(dv.name, dv.version, scorer.key, tokenization)[1] - n_skipped  # the store's
        stop.kept = (f"score run {run_id} committed {committed:,} of the {n_pairs - n_skipped:,} pairs it had to "
                     f"score for '{dv.name}' v{dv.version}")
        stop.resume = "rerun the same command to score the rest (scored pairs are skipped)"
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        failures = scorer.failures[failures_before:]
        quarantine_scoring_failures(store, dv.name, dv.version, scorer.key, failures)
        store.finish_score_run(run_id, status, n_failed=len(failures))
    return ScoreRunSummary(
        run_id, dv.name, dv.version, scorer.key, status, n_pairs, n_scored, n_skipped, len(failures),
        time.perf_counter() - started, tokenization, n_backfilled,
    )


def _every(frames: Iterable[pd.DataFrame], seconds: float) -> Iterator[pd.DataFrame]:
    """The frames joined into one per `seconds` of scoring (and the rest at the end).

    A CPU pass holds one or two pairs and a commit costs ~40 ms, so committing every pass
    cost 4-7% of the run; a kill still loses at most `seconds` of work.
    """
    pending: list[pd.DataFrame] = []
    due = time.monotonic() + seconds
    for frame in frames:
        pending.append(frame)
        if time.monotonic() >= due:
            yield pd.concat(pending, ignore_index=True)
            pending, due = [], time.monotonic() + seconds
    if pending:
        yield pd.concat(pending, ignore_index=True)


def quarantine_scoring_failures(store: Store, name: str, version: int, model_key: str, failures: list[dict]) -> None:
    """Quarantine unscorable pairs (stage `scoring`), once per pair and reason even across reruns."""
    rows = [{"dataset_name": name, "dataset_version": version, "stage": "scoring", "pair_id": f["pair_id"],
             "field": f["field"], "reason": f"{f['reason']} (model {model_key}, row {f['row']})"} for f in failures]
    if not rows:
        return
    known = set(store.sql(
        "SELECT pair_id, reason FROM quarantine WHERE stage = 'scoring' AND dataset_name = ? AND dataset_version = ?",
        params=[name, version]).itertuples(index=False, name=None))
    store.add_quarantine(r for r in rows if (r["pair_id"], r["reason"]) not in known)


def close_abandoned_runs(store: Store, dataset_name: str, dataset_version: int, model_key: str) -> list[int]:
    """Mark `killed` the runs left `running` by a process of this host that no longer exists (e.g. `kill -9`).

    Their committed scores stay; `finished_at` is when the loss was noticed.
    """
    runs = store.sql(
        "SELECT run_id, params->>'pid' AS pid, params->>'host' AS host FROM score_runs WHERE status = 'running' "
        "AND dataset_name = ? AND dataset_version = ? AND model_key = ?",
        params=[dataset_name, dataset_version, model_key],
    )
    closed = []
    for run_id, pid, host in runs.itertuples(index=False):
        if host == socket.gethostname() and pid is not None and not _process_alive(int(pid)):
            store.finish_score_run(int(run_id), "killed")
            closed.append(int(run_id))
    return closed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
