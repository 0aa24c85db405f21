"""Bounds on one running query: a time limit, and Ctrl-C/SIGTERM that stop it at once.

DuckDB checks for an interrupt between small units of work, and `connection.interrupt()`
may be called from any thread. A watchdog thread calls it when the time limit passes,
or as soon as SIGINT or SIGTERM arrives: the signal's number reaches the watchdog
through Python's wakeup fd, written by the C-level handler, so a main thread busy inside
DuckDB does not delay it. The query then raises `duckdb.InterruptException`, which
`QueryGuard.stopped_error` turns into `Interrupted` (exit 130/143) or a time-limit error.
A query that still runs `GRACE_S` after a signal is abandoned: the process exits
128 + the signal number at once, as after `kill -9` (nothing uncommitted is kept).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ches_curate.errors import ChesCurateError, Interrupted

if TYPE_CHECKING:  # duckdb loads in 0.1 s; the CLI imports this module for its defaults before any command runs
    import duckdb

GRACE_S = 3.0
"""Seconds a query has to stop after a signal before the process exits without it."""
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class QueryLimits:
    """How long a query may run and how much memory it may hold (`ches-curate sql --timeout/--memory-limit`)."""

    time_limit_s: float | None = 120.0
    """Seconds before the query is interrupted; None for no limit."""
    memory_limit: str | None = "25%"
    """DuckDB's memory limit for the query (`4GB`, `25%` of RAM; None: DuckDB's 80%); read-only queries fail
    past it, never spill."""
    stop_on_signals: bool = True
    """Interrupt the query on SIGINT/SIGTERM (only in the main thread, which alone receives signals)."""


UNBOUNDED = QueryLimits(time_limit_s=None, memory_limit=None, stop_on_signals=False)
"""No limits: the library's own reads."""


class QueryGuard:
    """What stopped the query, if anything: a signal number, or the time limit."""

    def __init__(self, limits: QueryLimits):
        self.limits = limits
        self.signum: int | None = None
        self.timed_out = False

    def raise_if_stopped(self, err: BaseException | None = None) -> None:
        """Raise `Interrupted` if a signal came, a time-limit error if the limit passed (`err` is DuckDB's)."""
        if self.signum is not None:
            stop = Interrupted(self.signum, signal.Signals(self.signum).name)
            stop.kept = "the query was stopped and its statement in progress rolled back"
            stop.resume = "rerun it to try again (a read-only query changes nothing)"
            raise stop from err
        if self.timed_out:
            raise ChesCurateError(
                f"sql: the query was stopped at its time limit of {self.limits.time_limit_s:g} s (raise it with "
                "--timeout SECONDS, or 0 for none)"
            ) from err


@contextmanager
def guarded(con: duckdb.DuckDBPyConnection, limits: QueryLimits) -> Iterator[QueryGuard]:
    """Run the body under `limits`: its query is interrupted at the time limit or on SIGINT/SIGTERM.

    The body catches DuckDB's error and calls `guard.raise_if_stopped(err)` first; a
    signal that lands after the query finished is raised on the way out.
    """
    guard = QueryGuard(limits)
    catch_signals = limits.stop_on_signals and threading.current_thread() is threading.main_thread()
    if not catch_signals and not limits.time_limit_s:
        yield guard
        return
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    finished = threading.Event()
    deadline = None if not limits.time_limit_s else time.monotonic() + limits.time_limit_s
    watchdog = threading.Thread(target=_watch, args=(con, guard, wake_read, deadline, finished),
                                name="ches-curate-query-watchdog", daemon=True)
    previous = _catch_signals(guard, con, wake_write) if catch_signals else None
    watchdog.start()
    try:
        yield guard
    finally:
        finished.set()
        os.write(wake_write, b"\0")
        watchdog.join()
        if previous is not None:
            _restore_signals(*previous)
        os.close(wake_read)
        os.close(wake_write)
    guard.raise_if_stopped()


def _catch_signals(guard: QueryGuard, con: duckdb.DuckDBPyConnection, wake_write: int) -> tuple:
    """Record SIGINT/SIGTERM instead of raising (a raise inside DuckDB becomes `RuntimeError: Query
    interrupted`); their numbers also go to `wake_write`, where the watchdog reads them."""

    def record(signum: int, frame: object) -> None:
        guard.signum = signum
        con.interrupt()

    handlers = {signum: signal.signal(signum, record) for signum in _STOP_SIGNALS}
    return handlers, signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)


def _restore_signals(handlers: dict, wakeup_fd: int) -> None:
    signal.set_wakeup_fd(wakeup_fd)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _watch(con: duckdb.DuckDBPyConnection, guard: QueryGuard, wake_read: int, deadline: float | None,
           finished: threading.Event) -> None:
    """The watchdog: interrupt at the deadline or on a signal; leave when the body is done (a 0 byte)."""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([wake_read], [], [], wait)
        if not ready:
            guard.timed_out = True
            con.interrupt()
            deadline = None
            continue
        for signum in os.read(wake_read, 64):
            if signum == 0 or finished.is_set():
                return
            if signum in _STOP_SIGNALS:
                guard.signum = signum
                con.interrupt()
                if not finished.wait(GRACE_S):
                    _abandon(signum)


def _abandon(signum: int) -> None:
    """The query ignored the interrupt for `GRACE_S`: exit as the CLI would, without waiting for it."""
    name = signal.Signals(signum).name
    sys.stderr.write(f"interrupted ({name}): the query did not stop within {GRACE_S:g} s and was abandoned; "
                     "nothing it had not committed is kept\n")
    sys.stderr.flush()
    os._exit(128 + signum)
