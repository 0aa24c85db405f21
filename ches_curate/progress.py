"""Rich progress bars for long work, quiet when output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def pair_progress(console: Console | None = None) -> Progress:
    """A progress bar counting pairs; disabled automatically when stderr is not a terminal."""
    console = console or Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def track_frames(frames: Iterable[pd.DataFrame], description: str, total: int | None = None) -> Iterator[pd.DataFrame]:
    """Pass score frames through while advancing a pair counter by each frame's length."""
    with pair_progress() as progress:
        task = progress.add_task(description, total=total, rate="")
        for frame in frames:
            progress.advance(task, len(frame))
            elapsed = progress.tasks[task].elapsed or 0.0
            done = progress.tasks[task].completed
            progress.update(task, rate=f"{done / elapsed:.1f} pairs/s" if elapsed > 0 else "")
            yield frame

