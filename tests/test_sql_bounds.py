"""`ches-curate sql` is bounded: it never migrates the store it reads, never leaks a setting, stops at its
time and memory limits, stops at once on Ctrl-C or SIGTERM, and never writes its output over the store."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest

from ches_curate import query_guard
from ches_curate.store import Store, migrations
from tests.reliability_helpers import QUIET_ENV, REPO
from tests.test_exit_codes import wait_for
from tests.test_sql_sandbox import SECRET, assert_one_line_error, run_cli, sandbox, snapshot, template_store  # noqa: F401

ENDLESS = "SELECT count(*) FROM range(1000000000) a, range(1000) b WHERE a.range + b.range = -1"
"""A query that would run for hours: DuckDB checks for an interrupt between its chunks."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("query", [
    "SELECT current_setting('http_proxy') AS a, current_setting('http_proxy_username') AS b, "
    "current_setting('http_proxy_password') AS c",
    "SELECT name, value FROM duckdb_settings()",
    "SELECT current_setting('secret_directory') AS a, current_setting('extension_directory') AS b, "
    "current_setting('home_directory') AS c, current_setting('temp_directory') AS d",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM duckdb_secrets()",
])
def test_no_setting_function_or_error_shows_a_proxy_password_or_the_home_path(sandbox, run_cli, monkeypatch, query):
    proxy = f"http://user:{SECRET}@127.0.0.1:9"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    home = os.environ["HOME"]
    run = run_cli("sql", query, "--db", sandbox.db, "--format", "csv")
    assert SECRET not in run.stdout + run.stderr and home not in run.stdout + run.stderr, run
    assert "127.0.0.1" not in run.stdout + run.stderr


def test_the_sandbox_leaves_duckdb_no_temp_directory(sandbox, run_cli):
    run = run_cli("sql", "SELECT current_setting('temp_directory') AS t", "--db", sandbox.db, "--format", "csv")
    assert run.code == 0 and run.stdout == 't\n""\n', run


def test_a_query_past_its_memory_limit_fails_in_one_line_and_spills_nothing(sandbox, run_cli):
    before = snapshot(sandbox.root)
    run = run_cli("sql", "SELECT * FROM (SELECT random() AS r, repeat('x', 100) AS s FROM range(3000000)) ORDER BY r",
                  "--db", sandbox.db, "--format", "csv", "--memory-limit", "40MB")
    assert_one_line_error(run, "sql: the query needs more memory than its limit (40MB): Out of Memory Error")
    assert snapshot(sandbox.root) == before


def test_a_bad_memory_limit_is_one_line(sandbox, run_cli):
    assert_one_line_error(run_cli("sql", "SELECT 1", "--db", sandbox.db, "--memory-limit", "lots"),
                          "--memory-limit 'lots': Parser Error: Memory must have a number")


def test_a_query_past_its_time_limit_stops_in_one_line(sandbox, run_cli):
    started = time.monotonic()
    run = run_cli("sql", ENDLESS, "--db", sandbox.db, "--format", "csv", "--timeout", "0.5")
    assert_one_line_error(run, "sql: the query was stopped at its time limit of 0.5 s (raise it with --timeout")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("output", ["{db}", "{db}.wal", "{store_dir}/../store/s.duckdb", "link.csv"])
def test_output_onto_the_store_or_its_wal_is_refused_and_the_store_kept(sandbox, run_cli, output):
    (sandbox.files / "link.csv").symlink_to(sandbox.db)
    target = output.format(db=sandbox.db, store_dir=sandbox.db.parent)
    before = sha256(sandbox.db)
    run = run_cli("sql", "SELECT 1 AS a", "--db", sandbox.db, "--format", "csv", "-o", target)
    assert_one_line_error(run, "is the store")
    assert sha256(sandbox.db) == before and not Path(f"{sandbox.db}.wal").exists()


def test_a_query_may_start_with_a_comment(sandbox, run_cli):
    run = run_cli("sql", "-- how many pairs\nSELECT count(*) AS n FROM pairs", "--db", sandbox.db, "--format", "csv")
    assert run.code == 0 and run.stdout == "n\n3\n", run


def test_read_only_sql_refuses_an_empty_duckdb_file_and_writes_nothing(tmp_path, run_cli):
    db = tmp_path / "empty.duckdb"
    duckdb.connect(str(db)).close()
    before = snapshot(tmp_path)
    run = run_cli("sql", "SELECT 1", "--db", db)
    assert_one_line_error(run, "is an empty DuckDB database, not a ches_curate store yet; nothing was written")
    assert f"ches-curate ingest FILE --dataset NAME --db {db}" in run.stderr
    assert snapshot(tmp_path) == before


def test_read_only_sql_never_migrates_an_older_store_and_names_the_upgrade(tmp_path, run_cli):
    db = tmp_path / "old.duckdb"
    with duckdb.connect(str(db)) as con:
        migrations.apply(con, up_to=migrations.LATEST_VERSION - 1)
    before = snapshot(tmp_path)
    run = run_cli("sql", "SELECT 1", "--db", db)
    assert_one_line_error(run, f"has schema version {migrations.LATEST_VERSION - 1}; this ches-curate reads version "
                               f"{migrations.LATEST_VERSION} and a read-only command does not migrate")
    assert snapshot(tmp_path) == before
    assert run_cli("datasets", "--db", db).code == 0  # the command the error names
    assert Store(db, migrate=False).schema_version() == migrations.LATEST_VERSION
    assert run_cli("sql", "SELECT 1 AS a", "--db", db, "--format", "csv").stdout == "a\n1\n"


ANNOUNCED = textwrap.dedent("""
    import contextlib, sys
    from pathlib import Path
    from ches_curate import cli, query_guard

    guarded, started = query_guard.guarded, Path(sys.argv[1])

    @contextlib.contextmanager
    def announced(con, limits):  # the query is about to run
        with guarded(con, limits) as guard:
            started.touch()
            yield guard

    query_guard.guarded = announced
    sys.argv = ["ches-curate", *sys.argv[2:]]
    cli.main()
""")


@pytest.mark.parametrize(("signum", "code", "write"), [
    (signal.SIGINT, 130, False), (signal.SIGTERM, 143, False), (signal.SIGINT, 130, True), (signal.SIGTERM, 143, True),
], ids=["sigint", "sigterm", "sigint-write", "sigterm-write"])
def test_a_signal_stops_a_long_query_at_once_with_128_plus_its_number(sandbox, signum, code, write):
    started = sandbox.root / "started"
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", ANNOUNCED, str(started), "sql", ENDLESS, "--db", str(sandbox.db), "--format", "csv",
         *(["--write"] if write else [])], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(started, process)
    time.sleep(0.5)  # into the query
    signalled = time.monotonic()
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    took = time.monotonic() - signalled
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [
        f"interrupted ({signal.Signals(signum).name}): the query was stopped and its statement in progress rolled "
        "back; rerun it to try again (a read-only query changes nothing)"]
    assert stdout == "" and took < query_guard.GRACE_S, took  # no progress bar either


DEAF_QUERY = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ches_curate import query_guard

    class Deaf:  # a query that ignores interrupts
        def interrupt(self):
            pass

    query_guard.GRACE_S = 0.5
    with query_guard.guarded(Deaf(), query_guard.QueryLimits(time_limit_s=None)):
        Path(sys.argv[1]).touch()
        time.sleep(60)
""")


def test_a_query_that_ignores_the_interrupt_is_abandoned_after_the_grace_time(tmp_path):
    started = tmp_path / "started"
    process = subprocess.Popen([sys.executable, "-c", DEAF_QUERY, str(started)], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    wait_for(started, process)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and time.monotonic() - signalled < 5
    assert stderr == ("interrupted (SIGTERM): the query did not stop within 0.5 s and was abandoned; nothing it had "
                      "not committed is kept\n")
