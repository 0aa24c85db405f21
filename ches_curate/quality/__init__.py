"""Data quality with Great Expectations 1.x: the `pairs` and `scores` suites, and quarantine of what fails.

- `checks`: the suites (`validate_pairs`, `validate_scores`, `run_quality` on a stored dataset);
- `config`: `QualityConfig`, bounds, thresholds, severities and user expectations (YAML/JSON);
- `ge`: the Great Expectations engine, imported lazily (about 4 s);
- `results`: what a suite found, and its record in the store.
"""

from __future__ import annotations

from ches_curate.quality.checks import (
    hh_transcripts_frame, latest_quality_results, ln_ches_consistent, pairs_frame, run_quality,
    validate_hh_transcripts, validate_pairs, validate_scores,
)
from ches_curate.quality.config import QualityConfig
from ches_curate.quality.results import QualityFailedError, QualityReport

__all__ = [
    "QualityConfig", "QualityFailedError", "QualityReport", "hh_transcripts_frame", "latest_quality_results",
    "ln_ches_consistent", "pairs_frame", "run_quality", "validate_hh_transcripts", "validate_pairs",
    "validate_scores",
]
