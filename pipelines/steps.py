"""Thin ZenML steps over the `ches_curate` library: unpack parameters, call the library, return named artifacts.

The DuckDB store is passed by path and opened in each step; artifacts are pandas
frames (stored as Parquet) and JSON-ready dicts, named for their dataset
(`scores_{dataset}`, filled in by the pipelines) and tagged with its version
(`ches_curate.pipelines.runs`). Each step logs its numbers as one metadata entry named for its
stage (`ingest`, `pairs_quality`, `scoring`, `scores_quality`, `selection`, `export`,
`report`) on itself, on the pipeline run and on the `ches_curate` model version.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import datasets
import pandas as pd
from zenml import ArtifactConfig, add_tags, get_step_context, step
from zenml.client import Client
from zenml.enums import MetadataResourceTypes
from zenml.models import RunMetadataResource
from zenml.types import HTMLString
from zenml.utils.string_utils import format_name_template

from ches_curate import curation, refresh
from ches_curate.report import write_report
from ches_curate.selection import select
from ches_curate.pipeline_config import AblationSpec, DatasetSpec, PolicySpec, ScoringSpec
from ches_curate.store import Store, default_path
from ches_curate.pipelines.materializers import DatasetMaterializer
from ches_curate.pipelines.runs import (
    DATASET_PLACEHOLDER, DEFAULT_DATASET, PROCESS, artifact_template, dataset_tags, process_identity,
)
from ches_curate.pipelines.sources import installed_source


def named(stem: str) -> ArtifactConfig:
    """An output artifact named for the run's dataset, `scores_{dataset}`: one version series per dataset."""
    return ArtifactConfig(name=artifact_template(stem))


dataset_step = step(substitutions={DATASET_PLACEHOLDER: DEFAULT_DATASET})
"""`@step` for steps whose artifacts are `named`: `scores_pairs` in a user's pipeline, `scores_<dataset>` where
the pipeline names the dataset (`for_dataset`)."""


def record(stage: str, metadata: dict[str, Any], dataset: str | None = None, version: int | None = None) -> None:
    """Log `{stage: metadata}` on the running step, its pipeline run and the run's model version, and tag the
    step's artifacts with the dataset version (`dataset_tags`) when there is one (the refusal pipeline's
    generation step runs before any).

    What `log_metadata` does, in one call: ZenML commits each key separately, so one
    key linked to three resources costs a third of three `log_metadata` calls.
    """
    context = get_step_context()
    for template in (context.step_run.config.outputs if version is not None else ()):
        context.add_output_tags(dataset_tags(dataset, version),
                                format_name_template(template, substitutions=context.step_run.config.substitutions))
    resources = [RunMetadataResource(id=context.step_run.id, type=MetadataResourceTypes.STEP_RUN),
                 RunMetadataResource(id=context.pipeline_run.id, type=MetadataResourceTypes.PIPELINE_RUN)]
    if context.model_version is not None:
        resources.append(RunMetadataResource(id=context.model_version.id, type=MetadataResourceTypes.MODEL_VERSION))
    Client().create_run_metadata(metadata={stage: metadata}, resources=resources, publisher_step_id=context.step_run.id)



@installed_source
def mark_process() -> None:
    """The pipelines' start hook (each step's): record on the run which process runs it (`process_identity`), so
    `ches-curate runs` can tell a run whose process was killed from one still running (`runs.run_status`)."""
    run = RunMetadataResource(id=get_step_context().pipeline_run.id, type=MetadataResourceTypes.PIPELINE_RUN)
    Client().create_run_metadata(metadata={PROCESS: process_identity()}, resources=[run])

@installed_source
@dataset_step
def ingest_dataset(store: str, dataset: DatasetSpec) -> Annotated[dict, named("dataset_version")]:
    """Read the source into the store (bad rows quarantined); a new version only if the content changed.

    The run is tagged with the dataset version, as the artifacts are."""
    version = dataclasses.asdict(curation.ingest_source(Store(store), dataset))
    record("ingest", {k: v for k, v in version.items() if k != "content_hash"}, version["name"], version["version"])
    add_tags(dataset_tags(version["name"], version["version"]), run=get_step_context().pipeline_run.id)
    return version


@installed_source
@dataset_step
def validate_pairs(store: str, dataset_version: dict, quality: str | None = None,
                   skip_if_passed: bool = False) -> Annotated[dict, named("pairs_quality")]:
    """The `pairs` quality suite (Great Expectations); error rows quarantined, too many fail the run."""
    summary = curation.validate(Store(store), dataset_version["name"], dataset_version["version"], "pairs", quality,
                                skip_if_passed=skip_if_passed)
    record("pairs_quality", summary, dataset_version["name"], dataset_version["version"])
    return summary


@installed_source
@dataset_step
def score_pairs(store: str, dataset_version: dict, scoring: ScoringSpec) -> tuple[
    Annotated[dict, named("score_run")], Annotated[pd.DataFrame, named("scores")]
]:
    """CHES-score the pairs with no score for this model yet (the model is not loaded if there are none); the
    `score_runs` row carries this ZenML run id."""
    db = Store(store)
    summary = curation.score_version(db, dataset_version["name"], dataset_version["version"], scoring,
                                     zenml_run_id=str(get_step_context().pipeline_run.id))
    scores = curation.score_table(db, summary.dataset_name, summary.dataset_version, summary.model_key)
    metadata = curation.score_metadata(summary, scores)
    record("scoring", metadata, summary.dataset_name, summary.dataset_version)
    return metadata, scores


@installed_source
@dataset_step
def validate_scores(store: str, score_run: dict, quality: str | None = None,
                    skip_if_passed: bool = False) -> Annotated[dict, named("scores_quality")]:
    """The `scores` quality suite, with drift against the previous version (warnings only)."""
    summary = curation.validate(Store(store), score_run["dataset_name"], score_run["dataset_version"], "scores",
                                quality, score_run["model_key"], skip_if_passed=skip_if_passed)
    record("scores_quality", summary, score_run["dataset_name"], score_run["dataset_version"])
    return summary


@installed_source
@dataset_step
def select_pairs(store: str, score_run: dict, policy: PolicySpec, plugins: list[str] | None = None) -> tuple[
    Annotated[pd.DataFrame, named("selection")], Annotated[dict, named("selection_summary")]
]:
    """Apply the policy plugin to the scored pairs that passed quality; recorded in `selections`."""
    curation.load_plugins(plugins or [])
    selection = select(Store(store), score_run["dataset_name"], score_run["dataset_version"],
                       score_run["model_key"], policy.name, policy.params, source="pipeline")
    record("selection", selection.metadata(), score_run["dataset_name"], score_run["dataset_version"])
    return selection.frame, selection.metadata()


@installed_source
@dataset_step
def reselect_pairs(store: str, score_run: dict, policy: PolicySpec, plugins: list[str] | None = None) -> tuple[
    Annotated[pd.DataFrame, named("selection")], Annotated[dict, named("selection_summary")],
    Annotated[pd.DataFrame, named("selection_diff")]
]:
    """Re-apply the policy to the new version (or reuse its selection) and diff it with the previous selection."""
    curation.load_plugins(plugins or [])
    selection, diff = refresh.reselect(Store(store), score_run["dataset_name"], score_run["dataset_version"],
                                       score_run["model_key"], policy)
    summary = {**selection.metadata(), **diff.metadata()}
    record("selection", summary, score_run["dataset_name"], score_run["dataset_version"])
    return selection.frame, summary, diff.changes


@installed_source
@dataset_step
def export_curated(store: str, selection_summary: dict, export: str, allow_unscored: bool = False) -> tuple[
    Annotated[pd.DataFrame, named("curated_pairs")], Annotated[str, named("curated_path")]
]:
    """Write the kept pairs in TRL's preference format; the same records become the `curated_pairs` artifact.

    A version with unscored pairs is refused unless `allow_unscored` (`allow_unscored_export` in the config)."""
    summary, frame = curation.export_selection(Store(store), selection_summary["selection_id"], export,
                                               allow_unscored)
    record("export", {"curated_path": str(summary.path.resolve()), "n_pairs": summary.n_pairs,
                      "conversational": summary.conversational},
           summary.dataset_name, summary.dataset_version)
    return frame, str(summary.path.resolve())


@installed_source
@dataset_step
def curation_report(store: str, score_run: dict, selection_summary: dict, curated_path: str,
                    report: str | None = None) -> Annotated[HTMLString, named("curation_report")]:
    """The self-contained HTML report of this selection, written next to the curated file (or to `report`, a path
    with {dataset}, {version}, {selection_id}) and shown as the run's visualization."""
    name, version = score_run["dataset_name"], score_run["dataset_version"]
    selection_id = selection_summary["selection_id"]
    path = write_report(Store(store), name, version, score_run["model_key"], selection_id,
                        output=curation.report_path(curated_path, report, name, version, selection_id)).resolve()
    record("report", {"report_path": str(path), "selection_id": selection_id}, name, version)
    return HTMLString(path.read_text(encoding="utf-8"))


@installed_source
@dataset_step
def ablate(store: str, score_run: dict, scoring: ScoringSpec, policies: list[PolicySpec],
           ablation: AblationSpec, plugins: list[str] | None = None) -> Annotated[pd.DataFrame, named("ablation_rows")]:
    """DPO from the scoring model on the full set, each policy's selection and size-matched random controls."""
    curation.load_plugins(plugins or [])
    rows = curation.ablate(Store(store), score_run["dataset_name"], score_run["dataset_version"], scoring, policies,
                           ablation)
    record("ablation", curation.ablation_metadata(rows), score_run["dataset_name"], score_run["dataset_version"])
    return rows


@installed_source
@step
def score_table(pairs: Any, dataset: str = DEFAULT_DATASET, model: str = "default", format: str = "auto",
                scoring: ScoringSpec | None = None,
                store: str | None = None) -> Annotated[pd.DataFrame, ArtifactConfig(name="ches_scores")]:
    """CHES-score the pairs of an upstream artifact: a pandas `DataFrame` or a `datasets.Dataset` in any supported
    layout (`format`: auto, prompt_chosen_rejected, conversational, hh_rlhf).

    The pairs become a version of `dataset` in the store (bad rows quarantined; a new version only if the
    content changed), are scored with `model` (or `scoring`, a full `ScoringSpec`; pairs already scored by
    the model are skipped), and the output `ches_scores` is one row per pair, keyed by `pair_id`: the score
    columns, `dataset_name`, `dataset_version` and `model_key`. `store`: the DuckDB file (default
    `$CHES_CURATE_DB`, else `./ches_curate.duckdb`).
    """
    db = Store(store or default_path())
    version = curation.ingest_table(db, dataset, pairs, format)
    spec = scoring or ScoringSpec(model=model)
    summary = curation.score_version(db, version.name, version.version, spec,
                                     zenml_run_id=str(get_step_context().pipeline_run.id))
    scores = curation.score_table(db, summary.dataset_name, summary.dataset_version, summary.model_key)
    record("scoring", curation.score_metadata(summary, scores), version.name, version.version)
    return scores.assign(dataset_name=summary.dataset_name, dataset_version=summary.dataset_version,
                         model_key=summary.model_key)


@installed_source
@step(output_materializers=DatasetMaterializer)
def curate_table(scores: pd.DataFrame, policy: PolicySpec = PolicySpec(name="percentile", params={"p": 90}),
                 plugins: list[str] | None = None,
                 store: str | None = None) -> Annotated[datasets.Dataset, ArtifactConfig(name="curated_dataset")]:
    """Apply a filter policy to `score_table`'s `ches_scores` and hand back the kept pairs as a `datasets.Dataset`
    in TRL's preference format (`prompt`/`chosen`/`rejected`, as `export` writes them), ready for `DPOTrainer`.

    `policy`: any registered policy and its parameters (`ches-curate policies`), a `PolicySpec` or a dict
    such as `{"name": "top-k", "params": {"k": 100}}`; `plugins`: modules of plugin policies. The selection
    is recorded in the store's `selections` table (`source` = `pipeline`), like the CLI's `filter`; `store`
    as in `score_table` (the same file).
    """
    curation.load_plugins(plugins or [])
    [(name, version, model_key)] = scores[["dataset_name", "dataset_version", "model_key"]].drop_duplicates(
    ).itertuples(index=False)
    db = Store(store or default_path())
    selection = select(db, name, int(version), model_key, policy.name, policy.params, source="pipeline")
    record("selection", selection.metadata(), name, int(version))
    return curation.curated_dataset(db, selection.selection_id)
