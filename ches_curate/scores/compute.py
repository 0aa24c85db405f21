"""Running registered scores on a batch: one plugin's failure costs only that plugin's value for that pair.

A score's `compute` runs once per batch. If it raises, or returns something other than
one number per pair, it is run again pair by pair, so the pairs it fails on are found
and quarantined for that score (value NaN, a reason naming the score and its plugin),
while its values for the other pairs, and every other score, are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ches_curate import plugins
from ches_curate.scores.spec import ScoreBatch, is_finite


@dataclass(frozen=True)
class ScoreFailure:
    """A pair a score could not score: which pair, which score (and plugin), and why."""

    pair_id: str
    score: str
    plugin: str
    reason: str

    def describe(self) -> str:
        return f"score '{self.score}' (plugin '{self.plugin}') failed: {self.reason}"


@dataclass(frozen=True)
class ScoreValues:
    """One score's values for a batch (NaN where it failed) and its failures."""

    name: str
    version: str
    plugin: str
    values: np.ndarray
    failures: list[ScoreFailure]


def compute_score(entry: plugins.Registered, batch: ScoreBatch) -> ScoreValues:
    """Run one registered score on `batch`; pairs it fails on get NaN and a `ScoreFailure`."""
    score = entry.obj
    values, problem = _run(score, batch)
    if problem is None:
        reasons: dict[int, str] = {}
    elif len(batch) == 1:
        reasons = {0: problem}
    else:
        values = np.full(len(batch), np.nan)
        reasons = {}
        for i in range(len(batch)):
            one, problem = _run(score, batch.subset([i]))
            if problem is None:
                values[i] = one[0]
            else:
                reasons[i] = problem
    for i, value in enumerate(values):
        if i not in reasons and not is_finite(value):
            shown = repr(float(value)) if isinstance(value, (int, float, np.number)) else repr(value)
            reasons[i] = f"returned {shown}, not a finite number"
    values = np.array([np.nan if i in reasons else float(v) for i, v in enumerate(values)], dtype=np.float64)
    failures = [ScoreFailure(batch.pair_ids[i], score.name, entry.plugin, reason)
                for i, reason in sorted(reasons.items())]
    return ScoreValues(score.name, score.version, entry.plugin, values, failures)


def compute_scores(entries: Sequence[plugins.Registered], batch: ScoreBatch) -> list[ScoreValues]:
    """`compute_score` for each entry, in order."""
    return [compute_score(entry, batch) for entry in entries]


def _run(score, batch: ScoreBatch) -> tuple[list, str | None]:
    """The score's values for `batch`, or (partial, reason) when it raised or returned the wrong shape."""
    try:
        result = score.compute(batch)
        values = result.tolist() if hasattr(result, "tolist") else list(result)
    except (Exception, SystemExit) as err:  # a plugin's sys.exit() must not end the run
        return [np.nan] * len(batch), plugins.describe_failure(err)
    if len(values) != len(batch):
        return [np.nan] * len(batch), f"returned {len(values)} values for {len(batch)} pairs"
    return values, None
