"""Score a preference file into a Parquet table: the `ches-curate score INPUT --output OUT` path.

The output is written to a temporary file beside OUT and renamed at the end, so a
crash never leaves a partial table under the requested name. Input rows rejected at
ingest or by the scorer (with `on_error="quarantine"`) go to `OUT.rejected.jsonl`.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ches_curate.atomic_files import replace_atomically
from ches_curate.errors import ChesCurateError, InputError
from ches_curate.ingest import RejectedRow, read_pairs
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.scoring.progress import track_frames
from ches_curate.scoring.config import ScoringConfig
from ches_curate.scoring.engine import Scorer
from ches_curate.tokenization import recorded_version


@dataclass
class ScoreFileSummary:
    output: Path
    model_key: str
    n_scored: int
    n_rejected: int
    rejected_path: Path | None
    seconds: float
    summary: dict = field(default_factory=dict)
    tokenization_version: str = ""
    """The tokenization the pairs were scored under: `2` (chat template) or `2-raw` (plain text)."""


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
    limit: int | None = None,
) -> ScoreFileSummary:
    """Read `source` (its first `limit` rows when given), score every pair, write `output` (.parquet) sorted by row."""
    import time

    config = config or ScoringConfig()
    output = Path(output)
    if output.suffix != ".parquet":
        raise ChesCurateError(f"{output}: the score table is written as Parquet; name it *.parquet")
    check_writable(output)
    started = time.perf_counter()
    rejected: list[RejectedRow] = []
    pairs = _split(islice(read_pairs(source, format=format, on_error=config.on_error, split=split), limit), rejected)
    scorer = Scorer(model, config)
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
    if table.empty and (rejected or scorer.failures):
        raise _nothing_scored(source, rejected, scorer.failures)
    rejected_path = _write_outputs(output, pa.Table.from_pandas(table, preserve_index=False), rejected,
                                   scorer.failures)
    return ScoreFileSummary(
        output=output,
        model_key=scorer.key,
        n_scored=len(table),
        n_rejected=len(rejected) + len(scorer.failures),
        rejected_path=rejected_path,
        seconds=time.perf_counter() - started,
        summary=summarize_scores(table),
        tokenization_version=recorded_version(scorer.loaded.tokenizer, config.chat_template),
    )


def check_writable(output: Path) -> None:
    """Fail now, naming `output`, if no file can be created there: before a model is loaded or a pair scored.

    A probe file is created and removed in `output`'s folder, or in its nearest existing
    ancestor when the folders are still to be made (writing creates them later).
    """
    folder = output.parent
    try:
        if output.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(output))
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{output.name}.", suffix=".probe"):
            pass
    except OSError as err:
        why = _why_unwritable(folder, err)
        raise ChesCurateError(f"cannot write {output}: {why} (pick another --output)") from None


def _why_unwritable(folder: Path, err: OSError) -> str:
    if err.errno == errno.EISDIR:
        return "it is a directory; give a file name"
    if err.errno == errno.ENOTDIR:
        return f"{folder} is a file, not a folder"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied in {folder}"
    if err.errno == errno.EROFS:
        return f"{folder} is on a read-only file system"
    return f"no file can be created in {folder} ({err.strerror})"


def _nothing_scored(source: str | Path, rejected: list[RejectedRow], failures: list[dict]) -> ChesCurateError:
    """Every row was rejected: no table of zero rows that a script would take for a result."""
    if rejected:
        first = rejected[0]
        where = f"line {first.line}: " if first.line is not None else ""
        what = f"field '{first.field}' {first.reason}" if first.field else first.reason
    else:
        where, what = f"row {failures[0]['row']}: ", failures[0]["reason"]
    count = len(rejected) + len(failures)
    which = "its only row was" if count == 1 else f"all {count:,} rows were"
    return ChesCurateError(f"{source}: no pairs to score: {which} rejected (first: {where}{what}); nothing was "
                           "written. Fix the file (or check --format) and rerun")


def _write_outputs(output: Path, table: pa.Table, rejected: list[RejectedRow], failures: list[dict]) -> Path | None:
    """The rejected rows, then the table, each complete or absent; a failed write names its file and
    leaves neither. Returns the rejected rows' path, if any were rejected."""
    rejected_path = None
    try:
        rejected_path = write_rejected(output, rejected, failures)
        write_parquet_atomic(table, output)
    except OSError as err:  # a full disk, a read-only folder: the user's to fix, not a bug
        failed = output if rejected_path or not (rejected or failures) else rejected_file(output)
        if rejected_path:
            rejected_path.unlink(missing_ok=True)
        raise ChesCurateError(f"cannot write {failed}: {err.strerror or err} (free some space or pick another "
                              "--output, then rerun)") from err
    return rejected_path


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to a hidden temporary name beside `path`, then rename: `path` is complete or as it was (also on error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda staging: pq.write_table(table, staging))


def rejected_file(output: Path) -> Path:
    """Where the rows rejected while scoring `output` go: `OUT.rejected.jsonl` beside it."""
    return output.with_name(output.name.removesuffix(".parquet") + ".rejected.jsonl")


def write_rejected(output: Path, rejected: list[RejectedRow], failures: list[dict]) -> Path | None:
    """`rejected_file(output)` written whole (none when nothing was rejected; an old one is removed)."""
    path = rejected_file(output)
    if not rejected and not failures:
        path.unlink(missing_ok=True)
        return None
    lines = [json.dumps({"stage": "ingest", **asdict(row)}, ensure_ascii=False) + "\n" for row in rejected]
    lines += [json.dumps({"stage": "scoring", **failure}, ensure_ascii=False) + "\n" for failure in failures]
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda staging: staging.write_text("".join(lines), encoding="utf-8"))
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
