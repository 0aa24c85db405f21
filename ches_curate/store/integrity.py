"""Is this DuckDB file a sound ches_curate store? Checked before anything is written into it.

DuckDB checksums each block when it reads it, so damage shows only when a damaged block
is read, and a write can succeed beside it (a store truncated to half its size accepted an
ingest and was unreadable afterwards). So: opening checks the file holds every block its
header counts (cheap, every open), writing commands read every block first
(`verify_blocks`, ~20 ms per 1,000 pairs), and DuckDB's own corruption errors become one
line that says what to do (`damaged_error`).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from ches_curate.errors import ChesCurateError

HEADER_BYTES = 3 * 4096
"""DuckDB's file starts with a main header and two database headers of 4 KiB each, then the blocks."""
DAMAGE_MARKERS = ("Corrupt database file", "Could not read enough bytes", "does not match stored checksum",
                  "database file is corrupted")
"""DuckDB's words for a damaged file; specific enough that a query naming a column `checksum` is not one."""
STORE_TABLES = frozenset({"datasets", "pairs", "dataset_pairs", "models", "score_runs", "scores", "quarantine"})
"""Tables every ches_curate store has (migration 1): their presence without `schema_version` means damage."""


class DamagedStoreError(ChesCurateError):
    """The store file is damaged; nothing was written into it."""


def damaged_error(path: Path, detail: str) -> DamagedStoreError:
    return DamagedStoreError(
        f"{path} is damaged ({detail.splitlines()[0] if detail else 'unreadable'}); nothing was written to it. "
        "Restore it from a backup, or re-create it with `ches-curate ingest` into a new --db"
    )


def is_damage(err: BaseException) -> bool:
    """Whether a DuckDB error reports a damaged file (as opposed to a bad query, a lock or a full disk)."""
    message = str(err)
    return isinstance(err, duckdb.Error) and any(marker in message for marker in DAMAGE_MARKERS)


def check_file_size(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Refuse a file too short to hold the blocks in use (a truncated copy or a partial download).

    Free blocks at the end may legitimately be cut off by DuckDB, so only used blocks
    count. Skipped while a write-ahead log is pending, whose blocks may not be in the file yet.
    """
    if Path(f"{path}.wal").exists():
        return
    block_size, used_blocks = con.execute("SELECT block_size, used_blocks FROM pragma_database_size()").fetchone()
    expected = HEADER_BYTES + block_size * used_blocks
    actual = path.stat().st_size
    if actual < expected:
        raise damaged_error(path, f"the file has {actual:,} bytes but {used_blocks} blocks of {block_size:,} bytes "
                                  f"in use ({expected:,} bytes): it was truncated")


def verify_blocks(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Read every block of every table, so DuckDB checks each block's checksum before we write."""
    tables = [row[0] for row in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND NOT temporary"
    ).fetchall()]
    try:
        for table in tables:
            con.execute(f'SELECT sum(hash(t)) FROM "{table}" AS t').fetchall()
    except duckdb.Error as err:
        if is_damage(err):
            raise damaged_error(path, str(err)) from err
        raise


def foreign_database_error(path: Path, tables: list[str]) -> ChesCurateError:
    """A DuckDB file without our `schema_version`: someone else's database, or a store that lost it."""
    if STORE_TABLES & set(tables):
        return damaged_error(path, "its schema_version table is missing although the store's tables are there")
    shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
    return ChesCurateError(
        f"{path} is a DuckDB database but not a ches_curate store (it has tables {shown} and no schema_version); "
        "ches-curate will not add its tables to it: pass --db with a new file name"
    )
