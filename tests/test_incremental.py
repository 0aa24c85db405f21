"""Incremental, resumable scoring: only missing pairs are scored; kill -9 loses at most one batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ches_curate.scoring.incremental import close_abandoned_runs, score_dataset
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import Scorer, ScoringConfig, score_pairs
from ches_curate.store import Store

N_PAIRS = 40
REPO = Path(__file__).resolve().parents[1]


def toy_pairs(n: int = N_PAIRS, start: int = 0) -> list[PreferencePair]:
    words = ["sure", "sorry", "never", "bread", "fox", "yes", "lock", "dog"]
    return [
        PreferencePair(
            f"Human: how do I bake {i}?" if i % 2 else [{"role": "user", "content": f"tell me about {words[i % 8]}"}],
            f"Here is how: {words[i % 8]} {words[(i * 3) % 8]} {i}",
            f"I'm sorry, {words[(i + 1) % 8]} no {i}",
            row=i - start,
        )
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, dict[str, float]]:
    """A clean, in-memory scoring of the toy pairs: pair_id -> ches, ln_ches.

    One pair per batch everywhere, so that scores are bitwise reproducible (other batch
    sizes agree only to float32 rounding, ~1e-7 relative).
    """
    frame = score_pairs(toy_pairs(N_PAIRS + 5), str(tiny_llama_dir), batch_size=1)
    return {r.pair_id: {"ches": r.ches, "ln_ches": r.ln_ches} for r in frame.itertuples()}


@pytest.fixture(scope="module")
def scorer(tiny_llama_dir) -> Scorer:
    return Scorer(str(tiny_llama_dir), ScoringConfig(batch_size=1))


def assert_matches_reference(store: Store, reference: dict, n: int) -> None:
    scores = store.sql("SELECT pair_id, ches, ln_ches FROM scores")
    assert len(scores) == scores.pair_id.nunique() == n
    for r in scores.itertuples():
        assert r.ches == pytest.approx(reference[r.pair_id]["ches"], abs=1e-9)
        assert r.ln_ches == pytest.approx(reference[r.pair_id]["ln_ches"], abs=1e-9)


def test_second_run_scores_only_new_pairs(tmp_path, scorer, reference):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, toy_pairs(N_PAIRS))
    first = score_dataset(store, "toy", scorer, progress=False)
    assert (first.status, first.n_pairs, first.n_scored, first.n_skipped, first.n_failed) == ("finished", 40, 40, 0, 0)

    store.register_dataset("toy", None, toy_pairs(N_PAIRS + 5))
    second = score_dataset(store, "toy", scorer, progress=False)
    assert (second.dataset_version, second.n_scored, second.n_skipped) == (2, 5, 40)
    assert "5 scored, 40 already scored" in second.describe()
    assert_matches_reference(store, reference, N_PAIRS + 5)
    runs = store.sql("SELECT run_id, status, n_scored, n_skipped, params->>'batch_size' AS bs FROM score_runs")
    assert runs.values.tolist() == [[1, "finished", 40, 0, "1"], [2, "finished", 5, 40, "1"]]
    assert store.sql("SELECT model_key FROM models").model_key.tolist() == [scorer.key]
    assert len(store.scores("toy", version=1)) == 40 and len(store.scores("toy")) == 45


def test_unscorable_pairs_are_quarantined_and_counted(tmp_path, tiny_gpt2_dir):
    store = Store(tmp_path / "s.duckdb")
    empty_prompt = PreferencePair("", "yes", "no", row=2)  # no chat template: encodes to 0 prompt tokens
    store.register_dataset("toy", None, [PreferencePair("a fox", "yes", "no"), PreferencePair("a dog", "no", "yes", row=1),
                                         empty_prompt])
    scorer = Scorer(str(tiny_gpt2_dir), ScoringConfig(batch_size=2, on_error="quarantine"))
    summary = score_dataset(store, "toy", scorer, progress=False)
    assert (summary.n_scored, summary.n_failed) == (2, 1)
    q = store.sql("SELECT dataset_name, stage, pair_id, reason FROM quarantine")
    assert q[["dataset_name", "stage", "pair_id"]].values.tolist() == [["toy", "scoring", empty_prompt.pair_id]]
    assert "0 tokens" in q.reason.iloc[0] and scorer.key in q.reason.iloc[0]
    assert [p.row for p in store.unscored_pairs("toy", 1, scorer.key, summary.tokenization_version)] == [2]
    again = score_dataset(store, "toy", scorer, progress=False)  # retried, fails again, quarantined once
    assert (again.n_scored, again.n_skipped, again.n_failed) == (0, 2, 1)
    assert store.sql("SELECT n_failed FROM score_runs ORDER BY run_id").n_failed.tolist() == [1, 1]
    assert store.sql("SELECT count(*) AS n FROM quarantine").n.iloc[0] == 1


def test_a_run_left_running_by_a_dead_process_is_marked_killed(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, toy_pairs(2))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = store.start_score_run("toy", 1, "m", {"pid": dead.pid, "host": os.uname().nodename})
    alive = store.start_score_run("toy", 1, "m", {"pid": os.getpid(), "host": os.uname().nodename})
    assert close_abandoned_runs(store, "toy", 1, "m") == [gone]
    assert store.sql("SELECT status FROM score_runs ORDER BY run_id").status.tolist() == ["killed", "running"]
    assert alive == gone + 1


# Scores the toy dataset one pair per batch; every write transaction sleeps before its
# commit, so a kill most likely lands inside a transaction that must then vanish whole.
WORKER = """
import sys, time
from contextlib import contextmanager
import torch
from ches_curate.scoring import incremental
from ches_curate.scoring.incremental import score_dataset
from ches_curate.scoring import ScoringConfig
from ches_curate.store import Store

incremental.COMMIT_EVERY_S = 0  # a transaction per pass, so that the kill lands between or inside them

class SlowStore(Store):
    @contextmanager
    def transaction(self):
        with super().transaction() as con:
            yield con
            time.sleep(0.05)

torch.set_num_threads(1)
store = SlowStore(sys.argv[1], lock_timeout_s=30)
score_dataset(store, "toy", sys.argv[2], ScoringConfig(batch_size=1, bucket_batches=1), progress=False)
"""


def wait_for_scores(store: Store, proc: subprocess.Popen, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker ended before it could be killed"
        n = store.sql("SELECT count(*) AS n FROM scores").n.iloc[0]
        if n >= 3:
            return n
        time.sleep(0.1)
    raise AssertionError("no scores were committed in time")


def test_resume_after_kill_scores_each_pair_once(tmp_path, tiny_llama_dir, reference):
    path = tmp_path / "s.duckdb"
    store = Store(path, lock_timeout_s=30)
    store.register_dataset("toy", None, toy_pairs(N_PAIRS))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(tiny_llama_dir)], env=env, cwd=REPO)
    try:
        wait_for_scores(store, worker)
        time.sleep(0.07)  # land somewhere in a later batch, most likely inside its transaction
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()

    after_kill = store.sql("SELECT count(*) AS n FROM scores").n.iloc[0]
    killed_run = store.sql("SELECT run_id, status, n_scored FROM score_runs").iloc[0]
    assert 3 <= after_kill < N_PAIRS
    assert (killed_run.status, killed_run.n_scored) == ("running", after_kill)  # counter committed with its batch

    resumed = score_dataset(store, "toy", str(tiny_llama_dir), ScoringConfig(batch_size=1), progress=False)
    assert (resumed.n_skipped, resumed.n_scored, resumed.status) == (after_kill, N_PAIRS - after_kill, "finished")
    assert_matches_reference(store, reference, N_PAIRS)
    assert store.sql("SELECT status FROM score_runs ORDER BY run_id").status.tolist() == ["killed", "finished"]
    assert store.sql("SELECT sum(n_scored) AS n FROM score_runs").n.iloc[0] == N_PAIRS
    np.testing.assert_array_equal(
        store.sql("SELECT count(*) AS n FROM scores GROUP BY pair_id, model_key").n.unique(), [1]
    )


def test_frames_are_committed_together_per_interval_and_all_at_the_end(monkeypatch):
    from ches_curate.scoring import incremental

    clock = iter([0.0, 0.5, 1.0, 2.5, 3.0, 3.2, 9.0, 9.5])  # the first value starts the window
    monkeypatch.setattr(incremental.time, "monotonic", lambda: next(clock))
    frames = [pd.DataFrame({"row": [i]}) for i in range(5)]
    joined = [batch.row.tolist() for batch in incremental._every(frames, 2.0)]
    assert joined == [[0, 1, 2], [3, 4]]
