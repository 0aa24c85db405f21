"""Plain values for the report's template: rows as dicts, SQL NULL and NaN as None, columns as float arrays, and
text and numbers as people read them (clipped and one-line texts, formatted numbers)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

EXCERPT_CHARS = 100
"""Characters of a text shown on one line: a collapsed pair's prompt, a diff row's texts."""


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts of plain Python values, SQL NULL and NaN as None."""
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def floats(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def clip(text: Any, limit: int) -> dict[str, Any]:
    """`text` cut to `limit` characters, with how many were left out."""
    text = "" if text is None else str(text)
    return {"text": text[:limit], "omitted": max(len(text) - limit, 0)}


def excerpt(text: str) -> str:
    """`text` on one line, cut to EXCERPT_CHARS with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= EXCERPT_CHARS else line[: EXCERPT_CHARS - 1] + "…"


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for people: integers with thousands separators, floats to `digits` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}"
    return str(value)


def pct(part: Any, whole: Any) -> str:
    """`part` as a percentage of `whole`, one decimal; "—" when either is missing."""
    return f"{part / whole:.1%}" if part is not None and whole else "—"
