"""User-facing errors: each says where the problem is and what to do about it.

The CLI prints a `ChesCurateError` as one red line and exits non-zero; any other
exception is a bug and shows its traceback only with `--debug`.
"""

from __future__ import annotations


class ChesCurateError(Exception):
    """An error the user can act on; its message is shown as is, without a traceback."""

    exit_code = 1


class InputError(ChesCurateError):
    """Bad input data: names the file, the line (or row) and the field.

    `str(err)` reads like `pairs.jsonl:17: field 'rejected' is empty (use --on-error quarantine to keep going)`;
    with `unit="row"` (Parquet, datasets) like `pairs.parquet: row 3: field 'chosen' is null`.
    """

    exit_code = 2

    def __init__(
        self, source: str, line: int | None, field: str | None, reason: str, hint: str | None = None, unit: str = "line"
    ):
        self.source, self.line, self.field, self.reason, self.hint, self.unit = source, line, field, reason, hint, unit
        if line is None:
            where = source
        else:
            where = f"{source}:{line}" if unit == "line" else f"{source}: {unit} {line}"
        what = reason if field is None else f"field '{field}' {reason}"
        super().__init__(f"{where}: {what}" + (f" ({hint})" if hint else ""))


class StoreLockedError(ChesCurateError):
    """The DuckDB file is held by another process."""

    exit_code = 3


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised by the CLI's signal handlers): stop, keeping what is committed.

    A `BaseException`, like `KeyboardInterrupt`, so that `except Exception` does not swallow
    it; unlike `KeyboardInterrupt`, Typer does not turn it into a silent exit code. Code on
    the way out may fill `kept` (what stays committed) and `resume` (how to continue); the
    CLI prints them on one line and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, signame: str):
        super().__init__(signame)
        self.signum, self.signame = signum, signame
        self.exit_code = 128 + signum
        self.kept: str | None = None
        self.resume: str | None = None
