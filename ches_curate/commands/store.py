"""Store commands: `ingest`, `datasets`, `sql`, `export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.atomic_files import write_output
from ches_curate.commands import options, tables
from ches_curate.errors import ChesCurateError
from ches_curate.query_guard import QueryLimits
from ches_curate.terminal import printable

console = Console()
err_console = Console(stderr=True)

SQL_FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS = 200
"""Rows shown by the table format; machine formats write every row."""


class _SqlCommand(typer.core.TyperCommand):
    """`sql`, whose query may begin with a `--` comment: click would take `-- count pairs\nSELECT ...` for an
    unknown option, so an argument that starts with `--` and then a space or holds a line break goes after a `--`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        queries = [arg for arg in args if arg.startswith("--") and (arg[2:3].isspace() or "\n" in arg)]
        if queries and "--" not in args:
            args = [arg for arg in args if arg not in queries] + ["--", *queries]
        return super().parse_args(ctx, args)


def _store(db: Path | None, create: bool = False):
    from ches_curate.store import Store

    return Store(db, create=create)


def register(app: typer.Typer) -> None:
    @app.command()
    def ingest(
        source: Annotated[str, typer.Argument(help="Preference file (JSONL, CSV, Parquet), saved HF dataset dir or hub id.")],
        dataset: options.Dataset,
        format: str = typer.Option("auto", "--format", help="auto, prompt_chosen_rejected, conversational or hh_rlhf."),
        on_error: str = typer.Option(
            "fail", "--on-error", help="fail: stop at the first bad row; quarantine: record it in the store and go on."
        ),
        db: options.Db = None,
    ) -> None:
        """Store a dataset; a new version is created only when its content changed."""
        from ches_curate.ingest import read_pairs

        store = _store(db, create=True)
        dv = store.register_dataset(dataset, str(source), read_pairs(source, format=format, on_error=on_error))
        counts = f"{dv.n_pairs:,} pairs, {dv.n_quarantined:,} quarantined"
        if dv.created:
            console.print(f"dataset [bold]{escape(printable(dv.name))}[/] v{dv.version}: {counts} (new version) in "
                          f"{escape(printable(store.path))}")
        else:
            console.print(f"dataset [bold]{escape(printable(dv.name))}[/] unchanged: same content as v{dv.version} ({counts})")

    @app.command("datasets")
    def list_datasets(db: options.Db = None) -> None:
        """List stored datasets and versions, with pair counts and how many models scored each."""
        frame = _store(db).datasets()
        if frame.empty:
            console.print("no datasets yet; add one with `ches-curate ingest FILE --dataset NAME`")
            return
        _print_table(frame.drop(columns="content_hash"), title=None)

    @app.command(cls=_SqlCommand)
    def sql(
        query: str = typer.Argument(..., help="SQL to run against the store (DuckDB dialect)."),
        db: options.Db = None,
        format: Optional[str] = typer.Option(
            None, "--format", "-f", help="table, csv, json or parquet (default: table on a terminal, csv in a pipe)."
        ),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result here instead of stdout."),
        write: bool = typer.Option(
            False, "--write", help="Open the store for writing, outside the sandbox (needed for INSERT, UPDATE, ...): "
            "the query is trusted and may also read or write any file, attach databases and load extensions."
        ),
        timeout: float = typer.Option(
            QueryLimits.time_limit_s, "--timeout", min=0, help="Stop the query after this many seconds (0: no limit)."
        ),
        memory_limit: str = typer.Option(
            QueryLimits.memory_limit, "--memory-limit", help="Memory the query may hold, e.g. 4GB or 25% (of RAM); "
            "past it a read-only query fails (it never spills to disk)."
        ),
    ) -> None:
        """Run SQL over the store; its tables and views are documented in docs/reference/schema.md.

        Without --write the query runs in DuckDB's read-only sandbox: it can read the store and
        nothing else (no other files or URLs, no temp files, no COPY, ATTACH, INSTALL/LOAD, SET or
        PRAGMA of settings), and the store must be at the current schema (it is never migrated).
        Ctrl-C or SIGTERM stops a running query (exit 130/143).
        """
        from ches_curate.store import Store

        fmt = _sql_format(format, output)
        store = Store(db, create=False, migrate=write)
        if output is not None:
            _refuse_store_output(output, store.path)
        limits = QueryLimits(time_limit_s=timeout or None, memory_limit=memory_limit)
        result = store.sql(query, write=write, arrow=fmt == "parquet", limits=limits)
        if fmt == "table":
            _print_table(result, title=None)
        elif output is None:
            _write_text(result, fmt, sys.stdout)
        else:
            write_output(output, lambda path: _write_file(result, fmt, path))
            err_console.print(f"wrote {len(result):,} rows to {escape(str(output))}")

    @app.command()
    def export(
        output: Path = typer.Option(..., "--output", "-o", help="Output: a .jsonl or .parquet file, or a directory "
                                    "with --format datasets."),
        dataset: options.OptionalDataset = None,
        version: options.Version = None,
        selection: Optional[int] = typer.Option(
            None, "--selection", "-s", help="Selection id from `ches-curate filter`: export only the pairs it kept "
            "(implies --dataset and --version)."
        ),
        format: Optional[str] = typer.Option(
            None, "--format", help="jsonl, parquet or datasets (a `save_to_disk` directory); default: from the suffix."
        ),
        chat_template: Optional[bool] = typer.Option(
            None, "--chat-template/--no-chat-template", help="Write plain prompts as conversations (TRL applies the "
            "chat template) or as text; default: as the pairs were scored (with the template when unscored)."
        ),
        model_key: options.ModelKey = None,
        extra_columns: bool = typer.Option(
            True, "--extra-columns/--no-extra-columns", help="Keep the input's other columns (e.g. score_chosen)."
        ),
        db: options.Db = None,
    ) -> None:
        """Write the kept pairs as TRL trains on them, tokenized as they were scored (prompt, chosen, rejected).

        Pairs scored through the chat template become conversational rows, pairs scored with
        --no-chat-template plain rows; every row records ches_model_key and ches_tokenization_version.
        """
        from ches_curate.export import export_dataset

        result = export_dataset(_store(db), output, dataset=dataset, version=version, selection_id=selection,
                                format=format, chat_template=chat_template, model_key=model_key,
                                extra_columns=extra_columns)
        style = "conversational" if result.conversational else "standard"
        what = f"selection {result.selection_id} of " if result.selection_id is not None else ""
        console.print(
            f"wrote {result.n_pairs:,} pairs ({style} TRL format, tokenization {result.tokenization_version}) from "
            f"{what}{escape(result.dataset_name)} v{result.dataset_version} to [bold]{escape(str(result.path))}[/]"
        )
        if result.unscored and (note := result.unscored.note()):
            console.print(f"[yellow]{escape(printable(note))}[/]", highlight=False)
        if result.left_out_columns:
            console.print(f"left out the columns {escape(', '.join(result.left_out_columns))}: TRL reads them, and "
                          "they would change the tokens it trains on")


def _sql_format(format: str | None, output: Path | None) -> str:
    if format is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        format = suffix if suffix in SQL_FORMATS else ("table" if output is None and console.is_terminal else "csv")
    if format not in SQL_FORMATS:
        raise ChesCurateError(f"unknown --format {format!r}; choose one of {', '.join(SQL_FORMATS)}")
    if format == "parquet" and output is None:
        raise ChesCurateError("--format parquet needs --output FILE.parquet")
    if format == "table" and output is not None:
        raise ChesCurateError("--format table prints to the terminal; use csv, json or parquet with --output")
    return format


def _refuse_store_output(output: Path, store: Path) -> None:
    """`sql -o` must not replace the store it reads, its WAL or its temp folder (a 4-byte CSV is no store)."""
    target = output.resolve()
    kept = [store.resolve()] + [store.resolve().with_name(store.resolve().name + end) for end in (".wal", ".tmp")]
    if target in kept or (output.exists() and any(k.exists() and output.samefile(k) for k in kept)):
        raise ChesCurateError(f"--output {output} is the store {store} (or one of its files); writing there would "
                              "destroy it. Choose another --output")


def _write_file(result, fmt: str, path: Path) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(result, path)
    else:
        with path.open("w", encoding="utf-8", newline="") as file:
            _write_text(result, fmt, file)


def _write_text(frame, fmt: str, file) -> None:
    """CSV or JSON records; LIST and STRUCT cells as JSON (`[1, 2]`), never numpy's `[1 2]`."""
    if fmt == "csv":
        _plain_columns(frame, _json_text).to_csv(file, index=False)
    else:
        file.write(_plain_columns(frame, _plain).to_json(orient="records", date_format="iso", force_ascii=False,
                                                         default_handler=str) + "\n")


def _plain_columns(frame, render):
    """`frame` with each nested (LIST, STRUCT, MAP) cell passed through `render`; other cells unchanged."""
    nested = [i for i, dtype in enumerate(frame.dtypes) if dtype == object
              and frame.iloc[:, i].map(_is_nested).any()]
    if not nested:
        return frame
    frame = frame.copy()
    for i in nested:
        frame.isetitem(i, frame.iloc[:, i].map(lambda value: render(value) if _is_nested(value) else value))
    return frame


def _is_nested(value) -> bool:
    import numpy as np

    return isinstance(value, (list, tuple, dict, np.ndarray))


def _plain(value):
    """A cell as plain Python for JSON: arrays as lists, masked (NULL) elements and NaN as None."""
    import numpy as np
    import pandas as pd

    if isinstance(value, np.ma.MaskedArray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value):
        return None
    return value


def _json_text(value) -> str:
    return json.dumps(_plain(value), ensure_ascii=False, default=_json_default)


def _json_default(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _cell(value):
    """A sql result cell: nested values as JSON, NULL dimmed, floats to 6 significant digits."""
    import pandas as pd
    from rich.text import Text

    if _is_nested(value):
        return _json_text(value)
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value):
        return Text("NULL", style="dim")
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _print_table(frame, title: str | None) -> None:
    """Render a DataFrame (the first TABLE_ROWS rows) with the shared renderer: a table if it fits, else records."""
    columns, _ = tables.frame_rows(frame.head(0))
    rows = [[_cell(value) for value in values] for values in frame.head(TABLE_ROWS).itertuples(index=False)]
    tables.print_table(console, columns, rows, title=title)
    shown = min(len(frame), TABLE_ROWS)
    note = f"{len(frame):,} rows" if shown == len(frame) else f"showing {shown} of {len(frame):,} rows (use --format csv)"
    err_console.print(f"[dim]{note}[/]")
