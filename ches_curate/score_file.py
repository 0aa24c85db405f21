"""Score a preference file into a Parquet table: the `ches-curate score INPUT --output OUT` path.

The output is written to a temporary file beside OUT and renamed at the end, so a
crash never leaves a partial table under the requested name. Input rows rejected at
ingest or by the scorer (with `on_error="quarantine"`) go to `OUT.rejected.jsonl`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from ches_curate.errors import ChesCurateError, InputError
from ches_curate.ingest import RejectedRow, read_pairs
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.progress import track_frames
from ches_curate.scoring import Scorer, ScoringConfig


@dataclass
class ScoreFileSummary:
    output: Path
    model_key: str
    n_scored: int
    n_rejected: int
    rejected_path: Path | None
    seconds: float
    summary: dict = field(default_factory=dict)


def _split(items, rejected: list[RejectedRow]):
    for item in items:
        if isinstance(item, PreferencePair):
            yield item
        else:
            rejected.append(item)


def score_file(
    source: str | Path,
    output: str | Path,
    model: str = "default",
    config: ScoringConfig | None = None,
    format: str = "auto",
    progress: bool = True,
    split: str | None = None,
) -> ScoreFileSummary:
    """Read `source`, score every pair, write `output` (.parquet) sorted by input row."""
    import time

    config = config or ScoringConfig()
    output = Path(output)
    if output.suffix != ".parquet":
        raise ChesCurateError(f"{output}: the score table is written as Parquet; name it *.parquet")
    started = time.perf_counter()
    scorer = Scorer(model, config)
    rejected: list[RejectedRow] = []
    pairs = _split(read_pairs(source, format=format, on_error=config.on_error, split=split), rejected)
    frames = scorer.score_batches(pairs)
    if progress:
        frames = track_frames(frames, "scoring")
    try:
        collected = list(frames)
    except InputError:
        raise
    except ChesCurateError as err:  # a pair the scorer refused: name the file it came from
        raise ChesCurateError(f"{source}: {err}") from err
    table = (
        pd.concat(collected, ignore_index=True).sort_values("row", ignore_index=True)
        if collected
        else pd.DataFrame(columns=list(SCORE_COLUMNS))
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        table.to_parquet(partial, index=False)
        os.replace(partial, output)
        rejected_path = write_rejected(output, rejected, scorer.failures)
    except OSError as err:  # a full disk, a read-only folder: the user's to fix, not a bug
        partial.unlink(missing_ok=True)
        raise ChesCurateError(f"cannot write {output}: {err.strerror or err} (free some space or pick another "
                              "--output, then rerun)") from err
    return ScoreFileSummary(
        output=output,
        model_key=scorer.key,
        n_scored=len(table),
        n_rejected=len(rejected) + len(scorer.failures),
        rejected_path=rejected_path,
        seconds=time.perf_counter() - started,
        summary=summarize_scores(table),
    )


def write_rejected(output: Path, rejected: list[RejectedRow], failures: list[dict]) -> Path | None:
    path = output.with_name(output.name.removesuffix(".parquet") + ".rejected.jsonl")
    if not rejected and not failures:
        if path.exists():
            path.unlink()
        return None
    with open(path, "w", encoding="utf-8") as handle:
        for row in rejected:
            handle.write(json.dumps({"stage": "ingest", **asdict(row)}, ensure_ascii=False) + "\n")
        for failure in failures:
            handle.write(json.dumps({"stage": "scoring", **failure}, ensure_ascii=False) + "\n")
    return path


def summarize_scores(table: pd.DataFrame) -> dict:
    """Count, mean and percentiles of ches and ln_ches (the numbers a summary line shows)."""
    if table.empty:
        return {"count": 0}
    summary: dict = {"count": int(len(table)), "truncated": int(table["truncated"].sum())}
    for column in ("ches", "ln_ches"):
        values = table[column].astype(float)
        summary[column] = {
            "mean": float(values.mean()),
            **{f"p{q}": float(values.quantile(q / 100)) for q in (5, 50, 95)},
            "max": float(values.max()),
        }
    return summary
