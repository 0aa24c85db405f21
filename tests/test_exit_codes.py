"""Exit status that scripts and schedulers can rely on, for every command.

0 success, 1 a user error, 2 a usage error (or bad input data), 130 / 143 when SIGINT /
SIGTERM stopped the command after it said what was kept. `score && filter && export` must
never go on after a partial score.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ches_curate import plugins
from ches_curate.cli import app
from ches_curate.store import Store
from tests.reliability_helpers import QUIET_ENV, REPO, run_cli
from tests.test_incremental import N_PAIRS, toy_pairs
from tests.test_policy_safety import PLUGIN

COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


def test_every_command_is_covered():
    assert set(COMMANDS) == {"ablate", "check-ches", "datasets", "export", "filter", "ingest", "policies", "probe",
                             "quality", "report", "run", "runs", "schedule", "score", "selections", "sql", "train"}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_is_a_usage_error(command):
    run = run_cli(command, "--bogus")
    assert run.code == 2
    assert f"Usage: ches-curate {command}" in run.stderr and "No such option: --bogus" in run.stderr


@pytest.mark.parametrize("args", [
    ("ingest", "tests/data/pairs.jsonl"),  # --dataset missing
    ("score", "tests/data/pairs.jsonl", "--batch-size", "abc"),
    ("filter",),  # --dataset missing
    ("schedule",),  # --cron missing
    ("no-such-command",),
])
def test_missing_and_malformed_arguments_are_usage_errors(args):
    run = run_cli(*args)
    assert run.code == 2 and "Usage: ches-curate" in run.stderr, run.output


def test_no_arguments_shows_the_help_as_a_usage_error():
    run = run_cli()
    assert run.code == 2 and "Commands" in run.output


@pytest.mark.parametrize("args", [("--help",), ("sql", "--help"), ("score", "-h")])
def test_help_succeeds(args):
    assert run_cli(*args).code == 0


@pytest.fixture(autouse=True)
def fresh_plugins():
    """Plugins loaded with --plugin stay registered in this process; each test starts without them."""
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def store_path(tmp_path) -> Path:
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, toy_pairs(6))
    return store.path


@pytest.mark.parametrize(("args", "code"), [
    (("datasets",), 0),
    (("sql", "SELECT count(*) AS n FROM pairs"), 0),
    (("policies",), 0),
    (("datasets", "--db", "{tmp}/missing.duckdb"), 1),
    (("filter", "--dataset", "nope", "--policy", "top-k"), 1),
    (("export", "--dataset", "toy", "-o", "{tmp}/out.csv"), 1),
    (("sql", "SELECT * FROM no_such_table"), 1),
    (("ingest", "{tmp}/missing.jsonl", "--dataset", "x"), 2),  # bad input: 2, like a bad row
    (("filter", "--dataset", "toy", "--policy", "top-k"), 1),  # not scored yet
])
def test_success_and_user_errors(store_path, tmp_path, args, code):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--db" not in args and args[0] != "policies":
        args += ["--db", str(store_path)]
    run = run_cli(*args)
    assert run.code == code, run.output
    if code:
        assert run.error  # exactly one `error:` line, last on stderr


def test_schedule_that_only_prints_the_entry_exits_1(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = run_cli("schedule", "--cron", "0 3 * * *", "--db", str(tmp_path / "s.duckdb"))
    assert run.code == 1 and "run again with --local" in run.output




def scored_store(tmp_path: Path) -> Path:
    """A store whose toy dataset has (fake) scores, so `filter` reaches the policy."""
    import pandas as pd

    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, toy_pairs(6))
    run_id = store.start_score_run("toy", 1, "m", {})
    ids = [p.pair_id for p in toy_pairs(6)]
    store.write_scores(run_id, "m", pd.DataFrame({
        "row": range(6), "pair_id": ids, "ches": [float(i) for i in range(6)], "ln_ches": [0.1 * i for i in range(6)],
        "chosen_tokens": [3] * 6, "rejected_tokens": [4] * 6, "last_hidden_ip": [1.0] * 6,
        "edit_distance": [0.5] * 6, "truncated": [False] * 6}))
    store.finish_score_run(run_id, "finished")
    return store.path


def plugin_file(tmp_path: Path, body: str) -> Path:
    """A plugin file registering policy 'sly' whose `select` runs `body` (not loaded: the command loads it)."""
    path = tmp_path / "sly_policy.py"
    path.write_text(PLUGIN.format(description="misbehaves", body=textwrap.indent(body, " " * 8)))
    return path


@pytest.mark.parametrize(("body", "says"), [
    ("raise SystemExit(0)", "called sys.exit(0)"),
    ("import sys; sys.exit(3)", "called sys.exit(3)"),
])
def test_a_plugin_that_exits_fails_the_command(tmp_path, body, says):
    db = scored_store(tmp_path)
    plugin = plugin_file(tmp_path, body)
    run = run_cli("filter", "--plugin", str(plugin), "--policy", "sly", "--dataset", "toy",
                  "--db", str(db))
    assert run.code == 1 and says in run.error and "'sly'" in run.error
    assert Store(db).sql("SELECT count(*) AS n FROM selections").n.iloc[0] == 0


def test_a_plugin_raising_keyboardinterrupt_exits_130_with_a_line(tmp_path):
    db = scored_store(tmp_path)
    plugin = plugin_file(tmp_path, "raise KeyboardInterrupt")
    run = run_cli("filter", "--plugin", str(plugin), "--policy", "sly", "--dataset", "toy", "--db", str(db))
    assert run.code == 130 and run.stderr.startswith("interrupted (KeyboardInterrupt): everything committed")


def cli_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ches_curate.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command never got there"
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_a_command_exits_128_plus_its_number_and_stores_nothing(tmp_path, signum, code):
    db = scored_store(tmp_path)
    started = tmp_path / "started"
    plugin = plugin_file(tmp_path, f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(60)")
    process = cli_process("filter", "--plugin", str(plugin), "--policy", "sly", "--dataset", "toy", "--db", str(db))
    wait_for(started, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    name = signal.Signals(signum).name
    assert stderr.strip().splitlines() == [
        f"interrupted ({name}): everything committed before it is kept; rerun the same command to continue"]
    assert Store(db).sql("SELECT count(*) AS n FROM selections").n.iloc[0] == 0


SLOW_SCORING = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ches_curate import cli
    from ches_curate.scoring import incremental
    from ches_curate.store import database as store

    incremental.COMMIT_EVERY_S = 0  # commit every pass, so the signal lands after some commits

    write_scores, committed = store.Store.write_scores, Path(sys.argv[1])

    def slowly(self, *args, **kwargs):  # one committed batch, then time for the signal to land
        n = write_scores(self, *args, **kwargs)
        committed.touch()
        time.sleep(0.5)
        return n

    store.Store.write_scores = slowly
    sys.argv = ["ches-curate", *sys.argv[2:]]
    cli.main()
""")


def test_ctrl_c_while_scoring_a_dataset_exits_130_keeps_the_committed_batches_and_resumes(tmp_path, tiny_llama_dir):
    store = Store(tmp_path / "s.duckdb", lock_timeout_s=30)
    store.register_dataset("toy", None, toy_pairs(N_PAIRS))
    committed = tmp_path / "committed"
    args = ["score", "--dataset", "toy", "--model", str(tiny_llama_dir), "--batch-size", "2", "--db", str(store.path)]
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", SLOW_SCORING, str(committed), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(committed, process, timeout_s=120)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    run = store.sql("SELECT status, n_scored FROM score_runs").iloc[0]
    n_kept = store.sql("SELECT count(*) AS n FROM scores").n.iloc[0]
    assert run.status == "interrupted" and 0 < n_kept == run.n_scored < N_PAIRS
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted (SIGINT): score run 1 committed {n_kept:,} of the {N_PAIRS} pairs it had to score for 'toy' "
        "v1; rerun the same command to score the rest (scored pairs are skipped)")

    resumed = run_cli(*args)
    assert resumed.code == 0
    assert store.sql("SELECT count(DISTINCT pair_id) AS d, count(*) AS n FROM scores").values.tolist() == [
        [N_PAIRS, N_PAIRS]]
