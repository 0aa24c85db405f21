"""Short-lived DuckDB connections that wait a bounded time for another process's lock.

DuckDB lets one process hold a database file for writing and refuses every other
process meanwhile, readers included, with an IOException like `Could not set lock on
file "x.duckdb": Conflicting lock is held in /usr/bin/python3 (PID 1234)`. Opening
retries with backoff up to a timeout, then raises `StoreLockedError` naming the holder.

`connect_sandboxed` opens the read-only connection that `ches-curate sql` runs users'
queries in: DuckDB itself refuses every file, URL, extension and setting change.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from ches_curate.errors import ChesCurateError, StoreLockedError

DEFAULT_LOCK_TIMEOUT_S = 5.0
DEFAULT_MEMORY_LIMIT = "256MB"
_DISK_FULL = os.strerror(errno.ENOSPC)
"""How DuckDB's errors say the disk is full: 'Could not write file "x.wal": No space left on device'."""
_LOCK_HOLDER = re.compile(r"held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")
SANDBOX_DIRECTORY = "/nonexistent/ches-curate-sandbox"
"""Where the sandbox points DuckDB's extension and secret directories: a path that says nothing
about this machine (DuckDB's defaults name the home directory, and its errors print them)."""
SANDBOX_SETTINGS = {
    "temp_directory": "",
    "http_proxy": "",
    "http_proxy_username": "",
    "http_proxy_password": "",
    "extension_directory": SANDBOX_DIRECTORY,
    "secret_directory": SANDBOX_DIRECTORY,
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "allow_extension_repositories": "forbidden",
    "python_enable_replacements": False,
    "lock_configuration": True,
}
"""DuckDB settings of the sandbox, applied in this order right after the store is opened.

`temp_directory=''` leaves DuckDB no directory at all: by default it is `<store>.tmp`,
which external access may always write (EXPORT DATABASE, COPY and ATTACH into it
worked), so a query that outgrows its memory limit fails instead of spilling. The proxy
settings are emptied because DuckDB fills them from `$HTTP_PROXY` (user and password
included) and `current_setting()` and `duckdb_settings()` print them; the extension and
secret directories are pointed nowhere so no setting or error shows the home path.
`enable_external_access=false` then refuses every path and URL but the store's own
files (COPY, EXPORT/IMPORT, ATTACH, read_* and glob, `FROM 'file.csv'`, INSTALL/LOAD,
the secret directory), whatever statement wraps them (EXPLAIN ANALYZE, PREPARE). The
extension settings close autoloading. No Python variable is scanned as a table.
`lock_configuration=true` comes last and refuses every SET, RESET and settings PRAGMA,
so profiling and logging (which write files) stay off and nothing above can be turned
back on. These are SET statements, not connect-time config: DuckDB applies config in
its own order and refuses `temp_directory` once external access is off.
"""


def lock_timeout() -> float:
    """Seconds to wait for a lock: `$CHES_CURATE_LOCK_TIMEOUT`, default 5."""
    return float(os.environ.get("CHES_CURATE_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))


def memory_limit() -> str:
    """DuckDB's memory limit for writing connections: `$CHES_CURATE_DUCKDB_MEMORY`, default 256MB.

    Without one DuckDB may take 80% of RAM before it evicts, so a long ingest grows with
    the store; with one, large sorts and joins spill to `<db>.tmp`. Read-only connections
    keep DuckDB's default: a query's materialised result counts against the limit, and a
    cap would turn a large read (`Store.scores` of a million pairs) into an out-of-memory error.
    """
    return os.environ.get("CHES_CURATE_DUCKDB_MEMORY") or DEFAULT_MEMORY_LIMIT


@contextmanager
def connect(path: Path, read_only: bool = False, timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open `path`, retrying while another process holds its lock; closed on exit."""
    con = open_connection(path, read_only, lock_timeout() if timeout_s is None else timeout_s)
    try:
        yield con
    except duckdb.Error as err:
        if _DISK_FULL in str(err):
            raise ChesCurateError(f"{path}: no space left on device; the write in progress was rolled back and the "
                                  "store keeps everything committed before it (free some space and rerun)") from err
        raise
    finally:
        con.close()


def connect_sandboxed(
    path: Path, timeout_s: float | None = None, query_memory: str | None = None
) -> duckdb.DuckDBPyConnection:
    """Open `path` read-only in DuckDB's sandbox (`SANDBOX_SETTINGS`); use it in a `with` to close it.

    A statement can read the store and nothing else: files, URLs, other databases,
    extensions and settings raise `duckdb.PermissionException` or a "configuration has
    been locked" `InvalidInputException`. A query holds at most `query_memory` (DuckDB's
    syntax: `4GB`, `25%`; default DuckDB's 80% of RAM) and never spills to disk. Waits
    for another process's lock like `connect`.
    """
    con = _open_retrying(path, True, lock_timeout() if timeout_s is None else timeout_s, {})
    try:
        if query_memory:
            set_memory_limit(con, query_memory)
        for name, value in SANDBOX_SETTINGS.items():
            _set(con, name, value)
    except BaseException:
        con.close()
        raise
    return con


def set_memory_limit(con: duckdb.DuckDBPyConnection, limit: str) -> None:
    """`SET memory_limit`, a bad value (`--memory-limit lots`) as one user error."""
    try:
        _set(con, "memory_limit", limit)
    except duckdb.Error as err:
        raise ChesCurateError(f"--memory-limit {limit!r}: {str(err).splitlines()[0]}") from err


def _set(con: duckdb.DuckDBPyConnection, name: str, value: bool | str) -> None:
    """`SET name = value`; DuckDB takes no parameters in SET, so the value is quoted here."""
    literal = str(value).lower() if isinstance(value, bool) else "'" + value.replace("'", "''") + "'"
    con.execute(f"SET {name} = {literal}")


def open_connection(path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    config = {} if read_only else {"memory_limit": memory_limit()}
    return _open_retrying(path, read_only, timeout_s, config)


def _open_retrying(path: Path, read_only: bool, timeout_s: float, config: dict) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=config)
            con.execute("SET enable_progress_bar = false")  # drawn on stdout past 2 s: it would land in `sql`'s CSV
            return con
        except duckdb.Error as err:
            if not (isinstance(err, duckdb.IOException) and "lock" in str(err).lower()):
                raise ChesCurateError(f"cannot open {path}: {err}") from err
            if time.monotonic() + delay > deadline:
                raise locked_error(path, err, timeout_s) from err
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def locked_error(path: Path, err: Exception, timeout_s: float) -> StoreLockedError:
    match = _LOCK_HOLDER.search(str(err))
    holder = f"process {match['pid']} ({match['exe']})" if match else "another process"
    return StoreLockedError(
        f"{path} is locked by {holder}; waited {timeout_s:g} s. DuckDB allows one process at a time: "
        "wait for it to finish (or stop it), or raise CHES_CURATE_LOCK_TIMEOUT to wait longer"
    )
