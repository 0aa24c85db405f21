"""The real `ches-curate` CLI for tests/test_reliability.py: in this process, or in a child that faults on cue.

Run as `python -m tests.reliability_helpers ARGS...` it is `ches-curate ARGS...`, with faults taken from the
environment:

- `RELIABILITY_KILL_IN_TRANSACTION="SQL#N"`: SIGKILL itself inside the N-th store write transaction
  that executed a statement containing SQL, after its statements ran and before its commit;
- `RELIABILITY_KILL_AT_RECORD=N`: SIGKILL itself when export builds its N-th record;
- `RELIABILITY_KILL_AT_BATCH=N`: SIGKILL itself once the scorer has scored N batches;
- `RELIABILITY_INSERT_BATCH=N`: ingest writes pairs N at a time (so a few thousand pairs take several
  transactions).

A SIGKILL sent by the process to itself is `kill -9`: no handler, `finally` or atexit runs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
             "COLUMNS": "500"}


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def error(self) -> str:
        """The one `error: ...` line (asserting there is exactly one, and that it ends stderr)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], self.stderr
        return errors[0]

    def assert_clean(self) -> None:
        """No traceback and no internal error: every failure is a user-facing one-liner."""
        assert "Traceback" not in self.output and "internal error" not in self.output, self.output
        assert self.code in (0, 1, 2, 3, 130, 143), (self.code, self.output)


def run_cli(*args) -> CliRun:
    """`ches-curate ARGS` through `cli.main()` in this process, its output captured."""
    from ches_curate import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["ches-curate", *map(str, args)]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = argv
    run = CliRun(code, out.getvalue(), err.getvalue())
    run.assert_clean()
    return run


def run_cli_process(*args, faults: dict[str, object] | None = None, timeout_s: float = 120,
                    executable: list[str] | None = None,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ches-curate ARGS` in a child process (this module, or `executable`), with `faults` (see the docstring)."""
    child_env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO), **(env or {})}
    child_env.update({f"RELIABILITY_{name.upper()}": str(value) for name, value in (faults or {}).items()})
    command = executable or [sys.executable, "-m", "tests.reliability_helpers"]
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=child_env, capture_output=True, text=True,
                          timeout=timeout_s)


def write_synthetic_pairs(path: Path, n: int, width: int = 60) -> Path:
    """`n` distinct prompt/chosen/rejected pairs, about 3 * `width` characters each."""
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            filler = f"{i:06d} " * (width // 7)
            out.write(json.dumps({"prompt": f"question {i}: {filler}", "chosen": f"answer {i} {filler}",
                                  "rejected": f"refusal {i} {filler}"}) + "\n")
    return path


def store_snapshot(db: Path) -> dict[str, list]:
    """What a dataset is, read back from the store: versions, row links, pair texts and quarantine."""
    queries = {
        "datasets": "SELECT name, version, n_pairs, n_quarantined, content_hash FROM datasets ORDER BY ALL",
        "dataset_pairs": 'SELECT name, version, "row", pair_id FROM dataset_pairs ORDER BY ALL',
        "pairs": "SELECT pair_id, prompt, chosen, rejected, format, metadata FROM pairs ORDER BY pair_id",
        "quarantine": "SELECT dataset_name, dataset_version, stage, line, field, reason FROM quarantine ORDER BY ALL",
        "scores": "SELECT pair_id, model_key, ches FROM scores ORDER BY ALL",
    }
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {name: con.execute(query).fetchall() for name, query in queries.items()}
    finally:
        con.close()


@dataclass
class Tally:
    """Inputs tried, faults injected and rows lost, as measured by the tests that ran."""

    inputs: dict[str, int] = field(default_factory=dict)
    """`command file mode` -> rows lost (input rows neither kept, quarantined nor refused with an error)."""
    faults: dict[str, int] = field(default_factory=dict)
    """fault -> rows lost or duplicated after the rerun."""

    def input(self, label: str, lost: int) -> None:
        self.inputs[label] = lost

    def fault(self, label: str, lost: int) -> None:
        self.faults[label] = lost

    @property
    def rows_lost(self) -> int:
        return sum(self.inputs.values()) + sum(self.faults.values())

    def report(self, n_files: int, referenced: list[str]) -> str:
        lines = [f"reliability tally: {n_files} bad input files, {len(self.inputs)} CLI runs on them; "
                 f"{len(self.faults) + len(referenced)} faults injected; rows lost: {self.rows_lost}"]
        lines += [f"  fault: {name} (rows lost {lost})" for name, lost in sorted(self.faults.items())]
        lines += [f"  fault: {name} (checked elsewhere, rows lost 0)" for name in referenced]
        return "\n".join(lines)


TALLY = Tally()


def ids(db: Path) -> list[str]:
    """The pair_id of every dataset row in the store, in (name, version, row) order."""
    return [pair_id for *_, pair_id in store_snapshot(db)["dataset_pairs"]]


def lost_or_duplicated(expected: list, got: list) -> int:
    """Rows of `expected` missing from `got`, plus rows `got` holds more often than `expected`."""
    want, have = Counter(expected), Counter(got)
    return sum(((want - have) + (have - want)).values())


class FullDiskConnection:
    """A connection whose `commit_at`-th commit fails the way DuckDB's does when the WAL cannot be written."""

    commits = 0

    def __init__(self, con, commit_at: int):
        self._con, self._commit_at = con, commit_at

    def commit(self):
        type(self).commits += 1
        if type(self).commits == self._commit_at:
            self._con.rollback()
            raise duckdb.TransactionException('Failed to commit: Could not write file "s.duckdb.wal": '
                                              "No space left on device")
        return self._con.commit()

    def __getattr__(self, name):
        return getattr(self._con, name)


def enospc(*_args, **_kwargs):
    """Fail like a write to a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# A plugin module that records its import in the file {marker} (format it first).
ROGUE_PLUGIN = """
import pathlib

pathlib.Path({marker!r}).write_text("imported")

from ches_curate import hookimpl
from ches_curate.policies import Policy, PolicyParams, SelectionResult


class Rogue(Policy):
    name = "rogue-policy"
    description = "Keeps everything."

    class Params(PolicyParams):
        pass

    def select(self, scores, params):
        return SelectionResult.from_kept(scores, [True] * len(scores), params.score_column)


@hookimpl
def register_filter_policies(register):
    register(Rogue())
"""

# Custom model and tokenizer code (auto_map) that records its execution in the file {marker}.
REMOTE_CODE = """
import pathlib

pathlib.Path({marker!r}).write_text("executed")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class RemoteConfig(LlamaConfig):
    model_type = "remote_llama"


class RemoteModel(LlamaForCausalLM):
    config_class = RemoteConfig


class RemoteTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _RecordingConnection:
    """A DuckDB connection that remembers the SQL it executed."""

    def __init__(self, con):
        self._con, self.statements = con, []

    def execute(self, query, *args, **kwargs):
        self.statements.append(query)
        return self._con.execute(query, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._con, name)


def _install_faults(env: dict[str, str]) -> None:
    from ches_curate import export
    from ches_curate.store import database as store
    from ches_curate.scoring import Scorer

    if "RELIABILITY_INSERT_BATCH" in env:
        store.INSERT_BATCH = int(env["RELIABILITY_INSERT_BATCH"])
    if "RELIABILITY_KILL_IN_TRANSACTION" in env:
        needle, _, nth = env["RELIABILITY_KILL_IN_TRANSACTION"].rpartition("#")
        seen = 0
        original = store.Store.transaction

        @contextmanager
        def transaction(self):
            nonlocal seen
            with original(self) as con:
                recording = _RecordingConnection(con)
                yield recording
                if any(needle in sql for sql in recording.statements):
                    seen += 1
                    if seen == int(nth):
                        _kill_self()

        store.Store.transaction = transaction
    if "RELIABILITY_KILL_AT_RECORD" in env:
        records, limit, trl_record = 0, int(env["RELIABILITY_KILL_AT_RECORD"]), export.trl_record

        def record(pair, conversational):
            nonlocal records
            records += 1
            if records == limit:
                _kill_self()
            return trl_record(pair, conversational)

        export.trl_record = record
    if "RELIABILITY_KILL_AT_BATCH" in env:
        batches, limit, score_batch = 0, int(env["RELIABILITY_KILL_AT_BATCH"]), Scorer._score_batch

        def scored(self, batch):
            nonlocal batches
            frame = score_batch(self, batch)
            batches += 1
            if batches == limit:
                _kill_self()
            return frame

        Scorer._score_batch = scored


def main() -> None:
    from ches_curate import cli

    _install_faults(dict(os.environ))
    sys.argv = ["ches-curate", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
