"""`ches-curate sql` without --write runs in DuckDB's read-only sandbox: no statement escapes the store.

Each hostile statement runs through the real entry point (`cli.main`, in this process)
against a small store in tmp_path, beside canaries: a victim file that must keep its bytes
and mtime, target paths that must not appear, and secret files (plus an environment
variable) whose content must never be printed. DuckDB's home directory (extensions,
secrets) is pointed into tmp_path, and the whole tree is compared before and after.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ches_curate import cli
from ches_curate.store import connections
from ches_curate.errors import ChesCurateError, StoreLockedError
from ches_curate.ingest import read_pairs
from ches_curate.store import Store

PAIRS = Path(__file__).parent / "data" / "pairs.jsonl"
SECRET = "s3cr3t-7f41c9d2e8"
CHES = [0.5, 1.5, 4.0]
"""Scores written for the three pairs of pairs.jsonl, in row order."""
SANDBOX = "sql: refused by the read-only sandbox: "
READ_ONLY = "(the store is opened read-only; add --write to modify it)"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@dataclass
class Sandbox:
    root: Path
    db: Path
    files: Path

    def paths(self) -> dict[str, Path]:
        """Placeholders of the hostile statements."""
        f = self.files
        return {"victim": f / "victim.csv", "target": self.root / "target", "files": f, "other_db": f / "other.duckdb",
                "exported": f / "exported", "secret_txt": f / "secret.txt", "secret_csv": f / "secret.csv",
                "secret_json": f / "secret.json", "secret_parquet": f / "secret.parquet",
                "extension": f / "evil.duckdb_extension", "store": self.db,
                "store_tmp": self.db.with_name(self.db.name + ".tmp")}


@pytest.fixture(scope="module")
def template_store(tmp_path_factory) -> Path:
    """pairs.jsonl ingested and scored by one model, so the views have rows."""
    store = Store(tmp_path_factory.mktemp("template") / "s.duckdb")
    pairs = list(read_pairs(str(PAIRS)))
    store.register_dataset("toy", str(PAIRS), pairs)
    run = store.start_score_run("toy", 1, "m", model_info={"name": "m"})
    store.write_scores(run, "m", pd.DataFrame({
        "row": [p.row for p in pairs], "pair_id": [p.pair_id for p in pairs], "ches": CHES, "ln_ches": CHES,
        "chosen_tokens": 3, "rejected_tokens": 4, "last_hidden_ip": 0.0, "edit_distance": 0.5, "truncated": False,
    }))
    store.finish_score_run(run, "finished")
    return store.path


@pytest.fixture
def sandbox(tmp_path, template_store, monkeypatch) -> Sandbox:
    db = tmp_path / "store" / "s.duckdb"
    db.parent.mkdir()
    db.write_bytes(template_store.read_bytes())
    files = tmp_path / "files"
    files.mkdir()
    (files / "victim.csv").write_text("precious,data\n1,2\n")
    (files / "secret.txt").write_text(SECRET + "\n")
    (files / "secret.csv").write_text(f"token\n{SECRET}\n")
    (files / "secret.json").write_text(json.dumps({"token": SECRET}) + "\n")
    (files / "evil.duckdb_extension").write_bytes(b"\x7fELF not really")
    pd.DataFrame({"token": [SECRET]}).to_parquet(files / "secret.parquet")
    with duckdb.connect(str(files / "other.duckdb")) as other:
        other.execute("CREATE TABLE t AS SELECT ? AS token", [SECRET])
        other.execute(f"EXPORT DATABASE '{files / 'exported'}'")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHES_SECRET", SECRET)
    monkeypatch.delenv("CHES_CURATE_DEBUG", raising=False)
    monkeypatch.chdir(files)
    return Sandbox(tmp_path, db, files)


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `ches-curate ARGS` through the real entry point; exit code, stdout and stderr as a user sees them."""
    def run(*args) -> Run:
        monkeypatch.setattr(sys, "argv", ["ches-curate", *map(str, args)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as done:
            code = done.code or 0
        out, err = capsys.readouterr()
        return Run(code, out, err)
    return run


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: files by sha256 and mtime (any write shows), directories by name."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_file():
            found[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        else:
            found[key] = ("directory",)
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(run: Run, expected: str) -> None:
    assert run.code == 1, run
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr
    assert expected in lines[0], lines[0]


HOSTILE = {
    # writes through wrappers the old statement-type blocklist did not see
    "explain-analyze-copy-over-victim": "EXPLAIN ANALYZE COPY (SELECT 'x') TO '{victim}' (FORMAT csv)",
    "explain-analyze-copy-new-file": "EXPLAIN ANALYZE COPY (SELECT 'x') TO '{target}' (FORMAT csv)",
    "prepare-execute-copy": "PREPARE p AS COPY (SELECT 1) TO '{target}'; EXECUTE p",
    "profiling-output-over-victim": "SET enable_profiling='json'; SET profiling_output='{victim}'; SELECT 1",
    "pragma-profiling-output": "PRAGMA enable_profiling='json'; PRAGMA profiling_output='{victim}'; SELECT 1",
    "pragma-enable-profiling": "PRAGMA enable_profiling",
    "log-query-path": "SET log_query_path='{victim}'; SELECT 1",
    "enable-logging": "CALL enable_logging()",
    # COPY, EXPORT, IMPORT
    "copy-query-to": "COPY (SELECT * FROM pairs) TO '{target}' (FORMAT parquet)",
    "copy-table-over-victim": "COPY pairs TO '{victim}'",
    "copy-to-relative-path": "COPY (SELECT 1) TO 'target.csv'",
    "copy-from": "COPY datasets FROM '{secret_csv}'",
    "export-database": "EXPORT DATABASE '{target}'",
    "import-database": "IMPORT DATABASE '{exported}'",
    "select-then-copy": "SELECT 1; COPY (SELECT 2) TO '{target}'",
    "copy-then-select": "COPY (SELECT 2) TO '{victim}'; SELECT 1",
    "temp-table-then-copy": "CREATE TEMP TABLE t AS SELECT 1 AS x; COPY t TO '{target}'",
    # the store's temp directory, which external access alone leaves writable, and the store itself
    "export-into-store-temp": "EXPORT DATABASE '{store_tmp}'",
    "copy-into-store-temp": "COPY (SELECT i, repeat('x', 100) FROM range(500000) t(i)) TO '{store_tmp}/fill.csv'",
    "attach-in-store-temp": "ATTACH '{store_tmp}/new.duckdb' AS n; CREATE TABLE n.t AS SELECT 1",
    "read-back-from-store-temp": "SELECT * FROM read_parquet('{store_tmp}/*.parquet')",
    "copy-over-the-store": "COPY (SELECT 1) TO '{store}'",
    "copy-over-the-wal": "COPY (SELECT 1) TO '{store}.wal'",
    # ATTACH
    "attach-memory": "ATTACH ':memory:' AS m; CREATE TABLE m.t AS SELECT 1",
    "attach-other-file": "ATTACH '{other_db}' AS o; SELECT * FROM o.t",
    "attach-other-file-read-only": "ATTACH '{other_db}' AS o (READ_ONLY); SELECT * FROM o.t",
    "attach-new-file": "ATTACH '{target}' AS n",
    "attach-sqlite": "ATTACH '{other_db}' AS o (TYPE sqlite)",
    "attach-then-copy-database": "ATTACH '{target}' AS n; COPY FROM DATABASE s TO n",
    # reading files
    "read-text": "SELECT content FROM read_text('{secret_txt}')",
    "read-blob": "SELECT content FROM read_blob('{secret_txt}')",
    "read-csv": "SELECT * FROM read_csv('{secret_csv}')",
    "read-csv-auto": "SELECT * FROM read_csv_auto('{secret_csv}')",
    "read-json": "SELECT * FROM read_json('{secret_json}')",
    "read-json-auto": "SELECT * FROM read_json_auto('{secret_json}')",
    "read-ndjson-objects": "SELECT * FROM read_ndjson_objects('{secret_json}')",
    "read-parquet": "SELECT * FROM read_parquet('{secret_parquet}')",
    "parquet-metadata": "SELECT * FROM parquet_metadata('{secret_parquet}')",
    "parquet-schema": "SELECT * FROM parquet_schema('{secret_parquet}')",
    "glob": "SELECT * FROM glob('{files}/*')",
    "sniff-csv": "SELECT * FROM sniff_csv('{secret_csv}')",
    "replacement-scan-absolute": "SELECT * FROM '{secret_csv}'",
    "replacement-scan-relative": "FROM 'secret.csv'",
    "replacement-scan-parquet": "FROM 'secret.parquet'",
    "query-table-on-a-path": "SELECT * FROM query_table('{secret_csv}')",
    "proc-environ": "SELECT content FROM read_text('/proc/self/environ')",
    "etc-passwd": "SELECT content FROM read_text('/etc/passwd')",
    "getenv": "SELECT getenv('CHES_SECRET')",
    "temp-view-over-file": "CREATE TEMP VIEW v AS SELECT content FROM read_text('{secret_txt}'); SELECT * FROM v",
    "temp-macro-over-file": "CREATE TEMP MACRO leak() AS TABLE SELECT content FROM read_text('{secret_txt}'); "
                            "SELECT * FROM leak()",
    "explain-analyze-read": "EXPLAIN ANALYZE SELECT content FROM read_text('{secret_txt}')",
    "prepare-execute-read": "PREPARE q AS SELECT content FROM read_text(?); EXECUTE q('{secret_txt}')",
    # URLs: refused before any download or extension install (no network needed)
    "http-parquet": "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')",
    "https-replacement-scan": "FROM 'https://127.0.0.1:9/x.csv'",
    "s3-csv": "SELECT * FROM read_csv('s3://bucket/x.csv')",
    "hf-dataset": "SELECT * FROM 'hf://datasets/org/name/x.parquet'",
    # extensions and secrets
    "install": "INSTALL httpfs",
    "force-install": "FORCE INSTALL httpfs",
    "install-from-repository": "INSTALL httpfs FROM 'http://127.0.0.1:9'",
    "load-known": "LOAD httpfs",
    "load-file": "LOAD '{extension}'",
    "update-extensions": "UPDATE EXTENSIONS",
    "create-secret": "CREATE SECRET s (TYPE http)",
    "create-persistent-secret": "CREATE PERSISTENT SECRET s (TYPE http)",
    # settings: every one is locked, so none of the above can be switched back on
    "enable-external-access": "SET enable_external_access=true",
    "global-enable-external-access": "SET GLOBAL enable_external_access=true",
    "reset-external-access": "RESET enable_external_access",
    "unlock-configuration": "SET lock_configuration=false",
    "reset-lock-configuration": "RESET lock_configuration",
    "allowed-directories": "SET allowed_directories=['/']",
    "allowed-paths": "SET allowed_paths=['{secret_txt}']",
    "allowed-configs": "SET allowed_configs=['enable_external_access']",
    "autoinstall": "SET autoinstall_known_extensions=true",
    "unsigned-extensions": "SET allow_unsigned_extensions=true",
    "custom-extension-repository": "SET custom_extension_repository='http://127.0.0.1:9'",
    "temp-directory": "SET temp_directory='{target}'",
    "secret-directory": "SET secret_directory='{target}'",
    "home-directory": "SET home_directory='{target}'",
    "python-replacements": "SET python_enable_replacements=true",
    "harmless-setting-too": "SET threads=1",
    "pragma-setting": "PRAGMA threads=1",
    "checkpoint-on-shutdown": "PRAGMA enable_checkpoint_on_shutdown",
}
EXPECTED = {
    "attach-memory": "Cannot launch in-memory database in read-only mode! " + READ_ONLY,
    "getenv": "Scalar Function with name getenv does not exist!",  # not in DuckDB's Python build
    "copy-over-the-store": "the file belongs to an attached database",
    "copy-over-the-wal": "the file belongs to an attached database",
}
"""What refuses the few cases that DuckDB stops before the sandbox does; all others name the sandbox."""


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_statement_is_one_line_error_and_touches_nothing(sandbox, run_cli, case):
    query = HOSTILE[case].format(**sandbox.paths())
    store_sha, before = sha256(sandbox.db), snapshot(sandbox.root)
    run = run_cli("sql", query, "--db", sandbox.db, "--format", "csv")
    assert_one_line_error(run, EXPECTED.get(case, SANDBOX))
    assert SECRET not in run.stdout + run.stderr
    assert sha256(sandbox.db) == store_sha
    assert snapshot(sandbox.root) == before
    assert not (sandbox.root / "target").exists() and not (sandbox.files / "target.csv").exists()


@pytest.mark.parametrize("query, expected", [
    ("CREATE TEMP TABLE t AS SELECT count(*) AS n FROM pairs; SELECT n FROM t", "n\n3\n"),
    ("CREATE TEMP MACRO twice(x) AS x * 2; SELECT twice(21) AS y", "y\n42\n"),
    ("SET VARIABLE v = 41; SELECT getvariable('v') + 1 AS y", "y\n42\n"),
    ("CHECKPOINT; FORCE CHECKPOINT; SELECT 1 AS done", "done\n1\n"),
    ("VACUUM; SELECT 1 AS done", "done\n1\n"),
], ids=["temp-table", "temp-macro", "variable", "checkpoint", "vacuum"])
def test_connection_local_statements_run_and_still_touch_nothing(sandbox, run_cli, query, expected):
    """Temp tables, macros and variables live in this connection's memory and vanish with it
    (they cannot reach a file: the sandbox refuses that at any depth); CHECKPOINT and
    VACUUM of a read-only store are no-ops. So they are allowed, and the tree is unchanged."""
    before = snapshot(sandbox.root)
    run = run_cli("sql", query, "--db", sandbox.db, "--format", "csv")
    assert run.code == 0 and run.stdout == expected, run
    assert snapshot(sandbox.root) == before


def test_the_installed_command_refuses_explain_analyze_copy_in_one_line(sandbox):
    script = Path(sys.executable).parent / "ches-curate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ches_curate.cli"]
    victim = sandbox.files / "victim.csv"
    before = snapshot(sandbox.root)
    done = subprocess.run([*command, "sql", f"EXPLAIN ANALYZE COPY (SELECT 'x') TO '{victim}' (FORMAT csv)",
                           "--db", str(sandbox.db)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "500"})  # rich wraps at 80 columns otherwise
    assert_one_line_error(Run(done.returncode, done.stdout, done.stderr), SANDBOX + "Permission Error")
    assert victim.read_text() == "precious,data\n1,2\n" and snapshot(sandbox.root) == before


def test_library_sql_is_sandboxed_too_and_write_trusts_the_query(sandbox):
    store = Store(sandbox.db)
    secret = sandbox.files / "secret.txt"
    with pytest.raises(ChesCurateError, match="^sql: refused by the read-only sandbox: Permission Error"):
        store.sql(f"SELECT content FROM read_text('{secret}')")
    assert store.sql(f"SELECT content FROM read_text('{secret}')", write=True).content.tolist() == [SECRET + "\n"]


def test_sandboxed_connection_waits_for_a_writer_then_names_it(sandbox):
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(30)", str(sandbox.db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(StoreLockedError, match=f"locked by process {holder.pid} .*waited 0.3 s"):
            connections.connect_sandboxed(sandbox.db, timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()


SCORED = 'SELECT p.chosen, s.ches FROM latest_scores s JOIN pairs p USING (pair_id) ORDER BY s."row"'


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_selects_over_tables_and_views_work_in_every_format(sandbox, run_cli, fmt):
    expected = [{"chosen": json.loads(line)["chosen"], "ches": ches} for line, ches in zip(PAIRS.open(), CHES)]
    before = snapshot(sandbox.root)
    if fmt == "parquet":
        out = sandbox.root / "out.parquet"
        run = run_cli("sql", SCORED, "--db", sandbox.db, "--output", out)
        assert run.code == 0 and run.stderr.startswith("wrote 3 rows to "), run
        assert pq.read_table(out).to_pylist() == expected
        out.unlink()
    else:
        run = run_cli("sql", SCORED, "--db", sandbox.db, "--format", fmt)
        assert run.code == 0, run
        got = pd.read_csv(io.StringIO(run.stdout)).to_dict("records") if fmt == "csv" else json.loads(run.stdout)
        assert got == expected
    assert snapshot(sandbox.root) == before


def test_table_format_and_the_summary_view(sandbox, run_cli):
    run = run_cli("sql", "SELECT model_key, n_scored, ches_mean, ches_max FROM score_summary", "--db", sandbox.db,
                  "--format", "table")
    assert run.code == 0, run
    cells = [cell.strip() for cell in run.stdout.splitlines()[3].split("│")[1:-1]]
    assert cells == ["m", "3", f"{sum(CHES) / 3:.6g}", "4"]
    assert run.stderr == "1 rows\n"


def test_write_opens_the_store_for_writing_and_trusts_the_query(sandbox, run_cli):
    target = sandbox.root / "target.csv"
    run = run_cli("sql", f"CREATE TABLE notes AS SELECT 42 AS answer; COPY notes TO '{target}'", "--db", sandbox.db,
                  "--write")
    assert run.code == 0, run
    assert target.read_text() == "answer\n42\n"
    assert run_cli("sql", "SELECT answer FROM notes", "--db", sandbox.db, "--format", "csv").stdout == "answer\n42\n"


@pytest.mark.parametrize("query", ["", "   \n", "-- only a comment", "/* another */ ;"],
                         ids=["empty", "blank", "line-comment", "block-comment"])
def test_a_query_without_statements_is_a_one_line_user_error(sandbox, run_cli, query):
    run = run_cli("sql", "--db", sandbox.db, "--", query)
    assert_one_line_error(run, "error: sql: no statement to run (the query is empty or only comments)")


NESTED = ("SELECT [1, 2] AS ids, {'a': 1, 'b': [1, NULL]} AS info, [[1], [2, 3]] AS nested, [1.5, NULL] AS maybe, "
          "'x' AS s")


def test_csv_renders_list_and_struct_cells_as_json(sandbox, run_cli):
    run = run_cli("sql", NESTED, "--db", sandbox.db, "--format", "csv")
    assert run.code == 0, run
    assert list(csv.reader(io.StringIO(run.stdout))) == [
        ["ids", "info", "nested", "maybe", "s"],
        ["[1, 2]", '{"a": 1, "b": [1, null]}', "[[1], [2, 3]]", "[1.5, null]", "x"],
    ]


def test_json_keeps_nulls_inside_lists(sandbox, run_cli):
    run = run_cli("sql", NESTED, "--db", sandbox.db, "--format", "json")
    assert json.loads(run.stdout) == [
        {"ids": [1, 2], "info": {"a": 1, "b": [1, None]}, "nested": [[1], [2, 3]], "maybe": [1.5, None], "s": "x"}]


def test_parquet_keeps_duckdbs_nested_types_and_nulls(sandbox, run_cli):
    out = sandbox.root / "nested.parquet"
    assert run_cli("sql", NESTED + ", map([1], ['one']) AS m", "--db", sandbox.db, "-o", out).code == 0
    table = pq.read_table(out)
    assert str(table.schema.field("ids").type) == "list<element: int32>"
    assert table.to_pylist()[0]["info"] == {"a": 1, "b": [1, None]}
    assert table.to_pylist()[0]["m"] == [(1, "one")]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_output_file_mode_respects_the_umask(sandbox, run_cli, umask, mode, suffix):
    out = sandbox.root / f"out.{suffix}"
    previous = os.umask(umask)
    try:
        run = run_cli("sql", "SELECT 1 AS one", "--db", sandbox.db, "-o", out)
    finally:
        os.umask(previous)
    assert run.code == 0, run
    assert out.stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in sandbox.root.iterdir()) == ["files", "home", out.name, "store"]


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `path` for the duration (needs root and mount), or the test is skipped."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write into: chmod 555, or (root ignores modes) a read-only tmpfs."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() == 0:
        with tmpfs(path, "ro,size=1m"):
            yield path
        return
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


@pytest.mark.parametrize("suffix", ["csv", "json", "parquet"])
def test_output_into_a_read_only_directory_is_one_line_and_leaves_no_file(sandbox, run_cli, read_only_dir, suffix):
    out = read_only_dir / f"out.{suffix}"
    run = run_cli("sql", "SELECT 1 AS one", "--db", sandbox.db, "-o", out)
    assert_one_line_error(run, f"error: cannot write {out}: ")
    assert "nothing was written (choose an --output" in run.stderr
    assert list(read_only_dir.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB file system (root only); the injected ENOSPC below runs everywhere."""
    path = tmp_path / "tiny"
    path.mkdir()
    with tmpfs(path, "size=64k"):
        yield path


def test_a_full_disk_keeps_the_previous_output_and_leaves_no_partial_file(sandbox, run_cli, tiny_tmpfs):
    out = tiny_tmpfs / "out.csv"
    out.write_text("previous,result\n")
    run = run_cli("sql", "SELECT repeat('x', 1000) AS s FROM range(200)", "--db", sandbox.db, "-o", out)
    assert_one_line_error(run, f"error: cannot write {out}: No space left on device; nothing was written "
                               "(free some space or choose another --output and rerun)")
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["out.csv"] and out.read_text() == "previous,result\n"


def test_an_injected_enospc_mid_write_removes_the_partial_file(sandbox, run_cli, monkeypatch):
    def half_written(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", half_written)
    out = sandbox.root / "out.parquet"
    out.write_bytes(b"previous")
    before = snapshot(sandbox.root)
    run = run_cli("sql", "SELECT 1 AS one", "--db", sandbox.db, "-o", out)
    assert_one_line_error(run, f"cannot write {out}: No space left on device; nothing was written (free some space")
    assert snapshot(sandbox.root) == before
