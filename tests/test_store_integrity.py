"""A store is written only when it is sound: not someone else's database, not truncated, no bad blocks.

Each case goes through the real CLI and checks the file is byte for byte what it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pytest

from ches_curate.store import Store
from tests.reliability_helpers import run_cli
from tests.test_incremental import toy_pairs

PAIRS = Path(__file__).parent / "data" / "pairs.jsonl"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store_path(tmp_path) -> Path:
    """A store with 300 pairs: several blocks, so damage in the middle hits data, not the header."""
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, toy_pairs(300))
    return store.path


def test_a_database_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "app.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE users (id INTEGER, name VARCHAR)")
        con.execute("INSERT INTO users VALUES (1, 'ada')")
    before = sha256(other)
    run = run_cli("ingest", PAIRS, "--dataset", "toy", "--db", other)
    assert run.code == 1
    assert run.error == (f"error: {other} is a DuckDB database but not a ches_curate store (it has tables users and no "
                         "schema_version); ches-curate will not add its tables to it: pass --db with a new file name")
    assert sha256(other) == before


def test_a_store_that_lost_its_schema_version_is_damaged_not_re_migrated(store_path):
    with duckdb.connect(str(store_path)) as con:
        con.execute("DROP TABLE schema_version")
    before = sha256(store_path)
    run = run_cli("ingest", PAIRS, "--dataset", "more", "--db", store_path)
    assert run.code == 1
    assert "is damaged (its schema_version table is missing" in run.error and "Sequence" not in run.error
    assert sha256(store_path) == before


@pytest.mark.parametrize("command", [("ingest", str(PAIRS), "--dataset", "more"), ("datasets",),
                                     ("sql", "SELECT count(*) FROM pairs")])
def test_a_truncated_store_is_refused_before_anything_reads_or_writes_it(store_path, command):
    size = store_path.stat().st_size
    with open(store_path, "r+b") as handle:
        handle.truncate(size // 2)
    before = sha256(store_path)
    run = run_cli(*command, "--db", store_path)
    assert run.code == 1
    assert run.error.startswith(f"error: {store_path} is damaged (the file has {size // 2:,} bytes")
    assert "it was truncated); nothing was written to it" in run.error
    assert sha256(store_path) == before and not Path(f"{store_path}.wal").exists()


def test_a_store_with_a_corrupt_block_refuses_an_ingest(store_path):
    with duckdb.connect(str(store_path), read_only=True) as con:  # the last used block holds table data
        block_size, used = con.execute("SELECT block_size, used_blocks FROM pragma_database_size()").fetchone()
    with open(store_path, "r+b") as handle:
        handle.seek(3 * 4096 + (used - 1) * block_size + 4096)
        handle.write(b"\0" * 4096)
    before = sha256(store_path)
    run = run_cli("ingest", PAIRS, "--dataset", "more", "--db", store_path)
    assert run.code == 1
    assert "is damaged (" in run.error and "nothing was written to it" in run.error
    assert sha256(store_path) == before


def test_a_sound_store_passes_verification_and_takes_the_ingest(store_path):
    Store(store_path).verify()
    run = run_cli("ingest", PAIRS, "--dataset", "more", "--db", store_path)
    assert run.code == 0 and "new version" in run.stdout


def test_a_file_without_one_valid_pair_makes_no_version(tmp_path, store_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "a", "chosen": "", "rejected": "b"},
        {"prompt": "c", "chosen": "d"},
        {"prompt": "e", "chosen": "f", "rejected": None},
    ]) + "\n")
    run = run_cli("ingest", bad, "--dataset", "bad", "--on-error", "quarantine", "--db", store_path)
    assert run.code == 1
    assert run.error == (f"error: {bad}: no valid pairs: all 3 rows failed (first: line 1: field 'chosen' is empty); "
                         "no version was stored. Fix the file (or check --format) and ingest again")
    store = Store(store_path)
    assert store.sql("SELECT count(*) AS n FROM datasets WHERE name = 'bad'").n.iloc[0] == 0
    assert run_cli("export", "--dataset", "bad", "-o", tmp_path / "out.jsonl", "--db", store_path).code == 1


def test_a_query_error_that_mentions_a_checksum_is_not_taken_for_damage(store_path):
    run = run_cli("sql", "SELECT checksum FROM pairs", "--db", store_path)
    assert run.code == 1 and "Referenced column \"checksum\" not found" in run.error and "damaged" not in run.error
