"""The refresh pipeline: re-read the source, score only new pairs, re-apply the policy, record what changed.

Cost follows the change: an unchanged source adds no dataset version, scores nothing,
re-checks nothing and reuses the selection (an empty diff); a changed one scores only
its new pairs and validates the new version once.
"""

from __future__ import annotations

from zenml import pipeline

from ches_curate.pipeline_config import PipelineConfig
from ches_curate.pipelines.curation import CHES_MODEL, for_dataset, validated_scores
from ches_curate.pipelines.steps import export_curated, mark_process, reselect_pairs
from ches_curate.pipelines.sources import installed_source


@installed_source
@pipeline(model=CHES_MODEL, on_start=mark_process)
def refresh_pipeline(config: PipelineConfig) -> None:
    """Bring the curated dataset up to date with its source; the `selection_diff` artifact lists the changes."""
    score_run, scores_quality = validated_scores(config, skip_if_passed=True)
    reselect, export = for_dataset(config, reselect_pairs, export_curated)
    _, selection, _ = reselect(config.store, score_run, config.policy, config.plugins, after=scores_quality)
    export(config.store, selection, config.export, config.allow_unscored_export)
