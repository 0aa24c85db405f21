"""The curation pipeline: ingest → validate pairs → score → validate scores → filter → export."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from zenml import Model, pipeline

from ches_curate.pipeline_config import DatasetSpec, PipelineConfig, ScoringSpec
from ches_curate.pipelines.caching import cache_options
from ches_curate.pipelines.runner import MODEL_NAME, run_pipeline
from ches_curate.pipelines.runs import DATASET_PLACEHOLDER, step_output
from ches_curate.pipelines.sources import installed_source
from ches_curate.pipelines.steps import (
    curation_report, export_curated, ingest_dataset, mark_process, score_pairs, select_pairs, validate_pairs,
    validate_scores,
)

SAMPLE = Path(str(resources.files("ches_curate") / "data" / "hh_rlhf_harmless_sample.jsonl"))
"""300 real hh-rlhf pairs shipped with the package (one with mismatched transcripts, quarantined at ingest)."""

CHES_MODEL = Model(
    name=MODEL_NAME,
    description="CHES-curated DPO preference data: each version links a curation, refresh or ablation run.",
    license="MIT",
    tags=["dpo", "data-curation", "ches"],
)


def for_dataset(config: PipelineConfig, *steps: Any) -> list[Any]:
    """`steps` naming their artifacts for the config's dataset (`scores_{dataset}` -> `scores_hh_rlhf_harmless`),
    with their cache policies (`caching`: keyed on the store and the files they read).

    Set on each step, inside the pipeline function, so that a pipeline called directly names them too.
    """
    return [s.with_options(substitutions={DATASET_PLACEHOLDER: config.dataset.name}, **cache_options(config, s.name))
            for s in steps]


def validated_scores(config: PipelineConfig, skip_if_passed: bool, after: Any = None) -> tuple[Any, Any]:
    """The steps every pipeline starts with: ingest → validate pairs → score → validate scores.

    Called inside a pipeline function; returns the `score_run` and `scores_quality` outputs.
    `after`: a step output ingest waits for (the refusal pipeline's generated pairs).
    """
    ingest, check_pairs, score, check_scores = for_dataset(config, ingest_dataset, validate_pairs, score_pairs,
                                                           validate_scores)
    version = ingest(config.store, config.dataset, after=after)
    pairs_quality = check_pairs(config.store, version, config.quality, skip_if_passed=skip_if_passed)
    score_run, _ = score(config.store, version, config.scoring, after=pairs_quality)
    return score_run, check_scores(config.store, score_run, config.quality, skip_if_passed=skip_if_passed)


@installed_source
@pipeline(model=CHES_MODEL, on_start=mark_process)
def curation_pipeline(config: PipelineConfig) -> None:
    """Curate a preference dataset by CHES score; every stage writes to the DuckDB store at `config.store`.

    A re-run on unchanged data is served from ZenML's cache (`ches_curate.pipelines.caching`).
    """
    score_run, scores_quality = validated_scores(config, skip_if_passed=False)
    select, export, report = for_dataset(config, select_pairs, export_curated, curation_report)
    _, selection = select(config.store, score_run, config.policy, config.plugins, after=scores_quality)
    _, curated_path = export(config.store, selection, config.export, config.allow_unscored_export)
    report(config.store, score_run, selection, curated_path)


def demo_config(store: str | Path = "ches_curate.duckdb", limit: int | None = 120, model: str = "default",
                export: str = "out/{dataset}_v{version}_curated.parquet") -> PipelineConfig:
    """The demo: the first `limit` pairs of the shipped hh-rlhf sample, the default model, the 90th-percentile cut."""
    return PipelineConfig(
        store=str(store), export=export,
        dataset=DatasetSpec(name="hh_rlhf_harmless_sample", source=str(SAMPLE), format="hh_rlhf", limit=limit),
        scoring=ScoringSpec(model=model),
    ).resolved()


def run_demo(store: str | Path = "ches_curate.duckdb", limit: int | None = 120, model: str = "default") -> Any:
    """Run the curation pipeline on the shipped sample; returns the finished ZenML run (see `curation_outcome`)."""
    return run_pipeline("curation", demo_config(store, limit, model))


def curation_outcome(run: Any) -> dict[str, Any]:
    """What a finished curation or refresh run produced: its id, store, dataset version, score run, selection,
    curated file, (curation) report file, and the steps served from ZenML's cache (their outputs are those of
    the run that computed them)."""
    def output(step: str, stem: str) -> Any:
        return step_output(run, step, stem).load()

    config = run.config.parameters["config"]
    select_step = "reselect_pairs" if "reselect_pairs" in run.steps else "select_pairs"
    return {
        "run_id": str(run.id), "run_name": run.name, "status": str(run.status.value),
        "store": config["store"] if isinstance(config, dict) else config.store,
        "dataset_version": output("ingest_dataset", "dataset_version"),
        "score_run": output("score_pairs", "score_run"),
        "selection": output(select_step, "selection_summary"),
        "curated_path": output("export_curated", "curated_path"),
        "report_path": run.run_metadata.get("report", {}).get("report_path"),
        "model_version": run.model_version.name if run.model_version else None,
        "cached_steps": [name for name, step in run.steps.items() if str(step.status.value) == "cached"],
    }
