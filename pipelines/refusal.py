"""The refusal pipeline (Razin et al., Section 6): on-policy refusal pairs → ingest → score → keep-lowest ablation.

The scoring model samples two responses per harmful prompt (`refusal` section of the
config), the judge labels refusals, and the refusal-preferred pairs are written to
`dataset.source` (`ches_curate.onpolicy`); they are then ingested, validated and scored
as in every pipeline, and `ablation.design` (keep-lowest: full vs the lowest ln-CHES
fraction vs a random subset of the same size) is trained and judged on the held-out
prompts, one `ablations` row per arm and seed.
"""

from __future__ import annotations

from typing import Annotated, Any

import pandas as pd
from zenml import pipeline

from ches_curate import curation, onpolicy
from ches_curate.pipeline_config import AblationSpec, PipelineConfig, PolicySpec, ScoringSpec
from ches_curate.store import Store
from ches_curate.pipelines.curation import CHES_MODEL, for_dataset, validated_scores
from ches_curate.pipelines.runs import step_output
from ches_curate.pipelines.steps import dataset_step, mark_process, named, record
from ches_curate.pipelines.sources import installed_source


@installed_source
@dataset_step
def generate_refusal_pairs(config: PipelineConfig) -> tuple[
    Annotated[dict, named("refusal_pairs")], Annotated[list, named("eval_prompts")]
]:
    """Sample two responses per training prompt with the scoring model, judge them, write the pairs to
    `dataset.source`; the counts and the held-out prompts are the outputs."""
    onpolicy.check_config(config)
    curation.load_plugins(config.plugins)
    pairs = onpolicy.generate_pairs(config.refusal, config.scoring, config.dataset.source)
    record("generation", pairs.metadata())
    return pairs.metadata(), pairs.eval_prompts


@installed_source
@dataset_step
def ablate_on_held_out(store: str, score_run: dict, scoring: ScoringSpec, policies: list[PolicySpec],
                       ablation: AblationSpec, eval_prompts: list,
                       plugins: list[str] | None = None) -> Annotated[pd.DataFrame, named("ablation_rows")]:
    """DPO from the scoring model on each arm of `ablation.design`, refusal rates on the held-out prompts."""
    curation.load_plugins(plugins or [])
    rows = curation.ablate(Store(store), score_run["dataset_name"], score_run["dataset_version"], scoring, policies,
                           ablation, eval_prompts)
    record("ablation", curation.ablation_metadata(rows), score_run["dataset_name"], score_run["dataset_version"])
    return rows


@installed_source
@pipeline(model=CHES_MODEL, on_start=mark_process)
def refusal_pipeline(config: PipelineConfig) -> None:
    """Does keeping the lowest-ln-CHES refusal pairs avoid the loss of refusals that DPO on all of them causes?"""
    generate, ablate = for_dataset(config, generate_refusal_pairs, ablate_on_held_out)
    generation, eval_prompts = generate(config)
    score_run, scores_quality = validated_scores(config, skip_if_passed=False, after=generation)
    ablate(config.store, score_run, config.scoring, config.ablation_policies(), config.ablation, eval_prompts,
           config.plugins, after=scores_quality)


def refusal_outcome(run: Any) -> dict[str, Any]:
    """A finished refusal run: its id, store, generation counts and `ablations` rows (as dicts)."""
    config = run.config.parameters["config"]
    return {"run_id": str(run.id), "run_name": run.name, "status": str(run.status.value),
            "store": config["store"] if isinstance(config, dict) else config.store,
            "generation": step_output(run, "generate_refusal_pairs", "refusal_pairs").load(),
            "ablations": step_output(run, "ablate_on_held_out", "ablation_rows").load().to_dict("records")}

