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
