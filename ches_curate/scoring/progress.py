"""Progress of long scoring runs: a rich bar on a terminal, periodic log lines elsewhere.

The scorer logs a line (pairs, tokens/s, ETA) every 30 s on the `ches_curate.scoring`
logger, which ZenML step logs capture; `track_frames` draws the bar when stderr is a
terminal and otherwise lets those lines through to stderr.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd

SCORING_LOGGER = "ches_curate.scoring"


@dataclass
class Throughput:
    """Pairs and tokens done since `started`, with the rate and, given `total` pairs, the time left."""

    total: int | None = None
    pairs: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, pairs: int, tokens: int) -> None:
        self.pairs += pairs
        self.tokens += tokens

    def describe(self) -> str:
        """E.g. `640/1,500 pairs, 145,200 tokens in 4:10 (2.6 pairs/s, 581 tokens/s), ETA 5:31`."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = f"{self.pairs:,}/{self.total:,}" if self.total else f"{self.pairs:,}"
        line = (f"{done} pairs, {self.tokens:,} tokens in {_clock(elapsed)} "
                f"({self.pairs / elapsed:.1f} pairs/s, {self.tokens / elapsed:,.0f} tokens/s)")
        if self.total and self.pairs:
            line += f", ETA {_clock(max(self.total - self.pairs, 0) * elapsed / self.pairs)}"
        return line


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def pair_progress(console=None):
    """A rich progress bar counting pairs; disabled automatically when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = console or Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


@contextmanager
def _log_lines_to_stderr():
    """Show the scorer's INFO lines on stderr for the duration, unless logging is already set up to show them."""
    log = logging.getLogger(SCORING_LOGGER)
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def track_frames(frames: Iterable[pd.DataFrame], description: str, total: int | None = None) -> Iterator[pd.DataFrame]:
    """Pass score frames through while showing pairs, tokens/s and the ETA.

    On a terminal this is a rich bar; otherwise the scorer's periodic log lines go to
    stderr. A frame's tokens are its `attrs["tokens"]` (set by `Scorer.score_batches`).
    """
    with pair_progress() as progress:
        if progress.disable:
            with _log_lines_to_stderr():
                yield from frames
            return
        task = progress.add_task(description, total=total, rate="")
        throughput = Throughput(total)
        for frame in frames:
            throughput.add(len(frame), frame.attrs.get("tokens", 0))
            progress.advance(task, len(frame))
            elapsed = max(time.monotonic() - throughput.started, 1e-9)
            progress.update(task, rate=f"{throughput.pairs / elapsed:.1f} pairs/s {throughput.tokens / elapsed:,.0f} tok/s")
            yield frame
