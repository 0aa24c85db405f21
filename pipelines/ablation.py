"""The ablation pipeline: the curated selections vs the full set vs random controls, DPO, evaluation.

The arms (`full`, one per policy in `ablation.policies`, and per policy and seed a
random control removing as many pairs) are planned, trained from the same weights and
evaluated by `ches_curate.ablation.run_ablation`, which writes one `ablations` row per
arm. Ingest and scoring run first and are incremental: after a curation run on the
same config they only confirm that nothing is new.
"""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from ches_curate.pipeline_config import PipelineConfig
from ches_curate.pipelines.curation import CHES_MODEL, for_dataset, validated_scores
from ches_curate.pipelines.runs import step_output
from ches_curate.pipelines.steps import ablate, mark_process
from ches_curate.pipelines.sources import installed_source


@installed_source
@pipeline(model=CHES_MODEL, on_start=mark_process)
def ablation_pipeline(config: PipelineConfig) -> None:
    """Does removing high-CHES pairs reduce likelihood displacement? One `ablations` row per arm answers."""
    score_run, scores_quality = validated_scores(config, skip_if_passed=True)
    [ablate_arms] = for_dataset(config, ablate)
    ablate_arms(config.store, score_run, config.scoring, config.ablation_policies(), config.ablation, config.plugins,
                after=scores_quality)


def ablation_outcome(run: Any) -> dict[str, Any]:
    """A finished ablation run: its id, store and `ablations` rows (as dicts)."""
    rows = step_output(run, "ablate", "ablation_rows").load()
    config = run.config.parameters["config"]
    return {"run_id": str(run.id), "run_name": run.name, "status": str(run.status.value),
            "store": config["store"] if isinstance(config, dict) else config.store,
            "ablations": rows.to_dict("records")}
