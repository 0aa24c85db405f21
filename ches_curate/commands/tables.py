"""The one table renderer of the CLI: a rich table when it fits the terminal, one record per block otherwise.

A rich table squeezed into 80 columns, or written into a pipe (where rich assumes 80,
or `$COLUMNS`), cuts cells to `0.1…`. So `print_table` measures the table first: when
the width holds every cell in full it draws the table; otherwise (a narrow terminal,
a wide table through `| cat` or into a cron log) it prints each row as a record, one
`column  value` line per cell, never cut:

    ablation 3 (table `ablations`)
    -[ 1 ]-------------------------
    arm                    full
    n train pairs          12

Cells are plain strings (shown literally: control codes escaped, no rich markup) or
rich `Text` (for a styled cell such as a red FAIL). `frame_rows` formats a DataFrame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ches_curate.terminal import printable

Cell = str | Text
CELL_PADDING = 3
"""Columns a rich table spends per column on padding and its border (and 1 more for the left edge)."""


WRAP_MIN_WIDTH = 30
"""Width a wrapping (prose) column needs at least for a table to be drawn."""


@dataclass(frozen=True)
class Column:
    """A column's header, whether its values are numbers (right-aligned in a table) and whether they are prose
    that may wrap onto several lines (descriptions); any other cell is shown on one line or not in a table."""

    header: str
    numeric: bool = False
    wrap: bool = False


def print_table(console: Console, columns: Sequence[Column | str], rows: Iterable[Sequence[Cell]],
                title: str | None = None) -> None:
    """Print `rows` under `columns` as a table if every cell fits `console`'s width, else as records."""
    columns = [c if isinstance(c, Column) else Column(c) for c in columns]
    cells = [[_text(value) for value in row] for row in rows]
    if table_width(columns, cells) <= console.width:
        console.print(_table(columns, cells, title))
    else:
        console.print(records(columns, cells, title), soft_wrap=True)


def table_width(columns: Sequence[Column], cells: Sequence[Sequence[Text]]) -> int:
    """Characters a rich table needs to show every header and cell in full (wrapping columns at their minimum)."""
    widths = [max([len(column.header), *(_cell_width(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    widths = [min(width, WRAP_MIN_WIDTH) if column.wrap else width for width, column in zip(widths, columns)]
    return sum(width + CELL_PADDING for width in widths) + 1


def records(columns: Sequence[Column], cells: Sequence[Sequence[Text]], title: str | None = None) -> Text:
    """The rows as blocks of `header  value` lines (multi-line values indented under their first line)."""
    width = max((len(c.header) for c in columns), default=0)
    out = Text()
    if title:
        out.append(printable(title) + "\n", style="bold")
    for number, row in enumerate(cells, start=1):
        rule = f"-[ {number} ]"
        out.append(rule + "-" * max(0, width + 12 - len(rule)) + "\n", style="dim")
        for column, value in zip(columns, row):
            out.append(column.header.ljust(width + 2))
            lines = value.split("\n")
            for i, line in enumerate(lines):
                if i:
                    out.append(" " * (width + 2))
                out.append_text(line)
                out.append("\n")
    if not cells:
        out.append("(no rows)\n", style="dim")
    out.rstrip()
    return out


def frame_rows(frame: Any, limit: int | None = None) -> tuple[list[Column], list[list[Cell]]]:
    """A DataFrame's columns (numeric ones flagged) and its first `limit` rows as cells."""
    import pandas as pd

    columns = [Column(str(name), pd.api.types.is_numeric_dtype(dtype)) for name, dtype in frame.dtypes.items()]
    shown = frame if limit is None else frame.head(limit)
    return columns, [[cell(value) for value in row] for row in shown.itertuples(index=False)]


def cell(value: Any, digits: int = 4) -> Cell:
    """A value as a cell: floats to `digits` significant digits, missing values as a dim `-`."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or _is_missing(value):
        return Text("-", style="dim")
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _is_missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value)) if not isinstance(value, (list, tuple, dict)) else False
    except (TypeError, ValueError):
        return False


def _text(value: Cell) -> Text:
    return value if isinstance(value, Text) else Text(printable(value))


def _cell_width(value: Text) -> int:
    return max((Text(line).cell_len for line in value.plain.split("\n")), default=0)


def _table(columns: Sequence[Column], cells: Sequence[Sequence[Text]], title: str | None) -> Table:
    table = Table(title=Text(printable(title)) if title else None, title_justify="left")
    for column in columns:
        table.add_column(column.header, justify="right" if column.numeric else "left", no_wrap=not column.wrap,
                         overflow="fold")
    for row in cells:
        table.add_row(*row)
    return table
