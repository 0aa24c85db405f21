"""The curation stages as library calls, shared by the ZenML pipelines, the CLI and the Python API.

ingest (bad rows quarantined) → validate (quality suites) → score (incremental, in
`ches_curate.scoring.incremental`) → select (a policy over the pairs that passed quality) →
export; and the ablation built from a pipeline config. Each function takes the `Store`
and returns plain, JSON-ready results; the pipelines in `pipelines/` only wrap them in
steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses
import json
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ches_curate.configs import TrainConfig
from ches_curate.errors import ChesCurateError
from ches_curate.export import ExportSummary, export_dataset
from ches_curate.ingest import read_pairs, read_table
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.pipeline_config import (
    AblationSpec, DatasetSpec, EvaluateSpec, PipelineConfig, PolicySpec, ScoringSpec,
)
from ches_curate.policies import get_policy, validate_params
from ches_curate.scoring.file_run import summarize_scores
from ches_curate.selection import load_selection
from ches_curate.store import DatasetVersion, Store

if TYPE_CHECKING:
    from ches_curate.scoring.incremental import ScoreRunSummary


def load_plugins(plugins: list[str]) -> None:
    """Load the config's plugin modules (`plugins.load_plugin_module`): in the CLI before the run, and again in
    each step that applies a policy, since a step may run in a process of its own."""
    from ches_curate.plugins import load_plugin_module

    for plugin in plugins:
        load_plugin_module(plugin)


def check_config(config: PipelineConfig, pipeline: str | None = None) -> None:
    """Fail before any work when a policy in `config` is unknown or has bad parameters (the training and
    generation settings were validated with the file), or, for the `refusal` pipeline, when the config cannot
    drive it or its `refusal` section cannot give the prompts. The config's plugins are loaded first."""
    load_plugins(config.plugins)
    for policy in [config.policy, *config.ablation.policies]:
        validate_params(get_policy(policy.name).obj, policy.params)
    if pipeline == "refusal":
        from ches_curate import onpolicy

        onpolicy.check_config(config)
        onpolicy.split_prompts(config.refusal)  # a missing prompt file, or too few prompts, fails here, not in a step


def ingest_source(store: Store, spec: DatasetSpec) -> DatasetVersion:
    """Read `spec.source` (the first `spec.limit` rows), quarantining bad rows; a new version only if it changed."""
    items = read_pairs(spec.source, format=spec.format, on_error="quarantine")
    return store.register_dataset(spec.name, spec.source, islice(items, spec.limit))


def ingest_table(store: Store, name: str, table: Any, format: str = "auto") -> DatasetVersion:
    """Store an in-memory table of pairs, a pandas `DataFrame` or a `datasets.Dataset` (`ingest.read_table`), as
    a version of `name`, bad rows quarantined; a new version only if its content changed."""
    return store.register_dataset(name, None, read_table(table, name=name, format=format, on_error="quarantine"))


def curated_dataset(store: Store, selection_id: int) -> Any:
    """The kept pairs of a selection as an in-memory `datasets.Dataset`: the records `export` writes (TRL's
    `prompt`/`chosen`/`rejected`, the scoring model key and tokenization version), ready for `DPOTrainer`."""
    import datasets
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="ches_curate_curated_") as folder:
        path = Path(folder) / "curated.parquet"
        export_dataset(store, path, selection_id=selection_id)
        return datasets.Dataset(pq.read_table(path))


def validate(store: Store, name: str, version: int, suite: str, quality: str | None = None,
             model_key: str | None = None, *, skip_if_passed: bool = False) -> dict[str, Any]:
    """Run one quality suite (`pairs` or `scores`) on a stored version: results recorded, error rows quarantined.

    Raises `QualityFailedError` when too many rows fail; returns `quality_metadata` of the report.
    `skip_if_passed` (refresh) skips a suite that already passed on this version and model, so
    unchanged content is checked once, while a new version, or one whose check failed, is checked.
    """
    from ches_curate.quality import QualityConfig, run_quality

    if skip_if_passed:
        passed = store.sql(
            "SELECT max(quality_run_id) AS quality_run_id FROM quality_runs WHERE suite = ? AND dataset_name = ? "
            "AND dataset_version = ? AND model_key IS NOT DISTINCT FROM ? AND success",
            params=[suite, name, version, model_key],
        ).quality_run_id.iloc[0]
        if pd.notna(passed):
            return {"skipped": f"suite {suite!r} already passed on {name} v{version} (quality run {int(passed)})"}
    config = QualityConfig.from_file(quality) if quality else None
    return quality_metadata(run_quality(store, name, version, model_key, suites=suite, config=config))


def quality_metadata(report: Any) -> dict[str, Any]:
    """A quality report as JSON-ready metadata: per suite, success, rows, failure rate, quarantined, failures."""
    summary: dict[str, Any] = {"success": report.success, "notes": list(report.notes)}
    for suite in report.suites:
        failed = [r for r in suite.results if not r.success]
        summary[suite.suite] = {
            "success": suite.success, "n_rows": suite.n_rows, "failure_rate": suite.failure_rate,
            "n_quarantined": len(suite.quarantine), "quality_run_id": suite.quality_run_id,
            "failed_errors": {r.name: r.unexpected_count for r in failed if r.severity == "error"},
            "failed_warnings": {r.name: r.unexpected_count for r in failed if r.severity == "warn"},
        }
    return summary


def score_version(store: Store, name: str, version: int, scoring: ScoringSpec,
                  zenml_run_id: str | None = None) -> ScoreRunSummary:
    """Score the pairs of a stored version that have no score for the model yet (`incremental.score_dataset`).

    When every pair has one (a refresh of unchanged data), the model is not loaded: its key
    comes from its files and tokenizer (`models.key_without_loading`), and the run is recorded
    as scoring 0 pairs and skipping all of them. Returns the `ScoreRunSummary`.
    """
    from ches_curate.scoring.incremental import ScoreRunSummary, score_dataset
    from ches_curate.models import key_without_loading
    from ches_curate.tokenization import recorded_version

    started = time.perf_counter()
    config = scoring.scoring_config()
    found = key_without_loading(scoring.model, scoring.dtype, config.trust_remote_code)
    if found is not None:
        model_key, tokenization = found[0], recorded_version(found[1], config.chat_template)
        n_pairs, n_scored = store.score_counts(name, version, model_key, tokenization)
        if n_scored == n_pairs:
            params = dataclasses.asdict(config) | {"model_loaded": False}
            run_id = store.start_score_run(name, version, model_key, params, zenml_run_id, n_skipped=n_pairs)
            store.finish_score_run(run_id, "finished", n_failed=0)
            return ScoreRunSummary(run_id, name, version, model_key, "finished", n_pairs, 0, n_pairs, 0,
                                   time.perf_counter() - started, tokenization)
    return score_dataset(store, name, scoring.model, config, version=version, zenml_run_id=zenml_run_id,
                         progress=False)


def score_table(store: Store, name: str, version: int, model_key: str) -> pd.DataFrame:
    """The scores of a dataset version for `model_key`: SCORE_COLUMNS only, in row order (no texts)."""
    return store.scores(name, version, model_key).loc[:, list(SCORE_COLUMNS)].reset_index(drop=True)


def score_metadata(summary: Any, scores: pd.DataFrame) -> dict[str, Any]:
    """A score run's counts and the version's ches / ln_ches mean and percentiles (p5, p50, p95), flat."""
    metadata = {k: v for k, v in dataclasses.asdict(summary).items() if k != "status"}
    metadata["score_run_status"] = summary.status
    stats = summarize_scores(scores)
    metadata["n_scores"] = stats["count"]
    for column in ("ches", "ln_ches"):
        for stat, value in stats.get(column, {}).items():
            metadata[f"{column}_{stat}"] = value
    return metadata


def export_path(template: str, name: str, version: int, selection_id: int, what: str = "export path") -> Path:
    """`template` with {dataset}, {version} and {selection_id} filled in; an error names it as `what`."""
    try:
        return Path(template.format(dataset=name, version=version, selection_id=selection_id))
    except (KeyError, IndexError) as err:
        raise ChesCurateError(f"{what} {template!r}: unknown placeholder {err}; use {{dataset}}, {{version}}, "
                              "{selection_id}") from err


def export_selection(store: Store, selection_id: int, template: str,
                     allow_unscored: bool = False) -> tuple[ExportSummary, pd.DataFrame]:
    """Write the kept pairs of a selection to the file `template` names; return the summary and the records.

    A selection of a version some of whose pairs have no score from its model (they were never
    decided on) is refused unless `allow_unscored` (the pipeline config's `allow_unscored_export`).
    """
    missing = load_selection(store, selection_id).unscored
    if missing is not None and (note := missing.note()) and not allow_unscored:
        raise ChesCurateError(f"selection {selection_id}: {note}; nothing was exported (or set "
                              "allow_unscored_export: true in the pipeline config to export the scored pairs only)")
    first = store.selection(selection_id).iloc[0]
    path = export_path(template, first.dataset_name, int(first.dataset_version), selection_id)
    summary = export_dataset(store, path, selection_id=selection_id)
    frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_json(path, lines=True)
    return summary, frame


def report_path(curated_path: str | Path, template: str | None, name: str, version: int,
                selection_id: int) -> Path:
    """Where a pipeline writes the curation report: `template` filled like the export path, or by default next
    to the curated file, named for it (`out/toy_v2.parquet` -> `out/toy_v2_report.html`)."""
    if template is not None:
        return export_path(template, name, version, selection_id, what="report path")
    curated = Path(curated_path)
    return curated.with_name(f"{curated.stem}_report.html")


def train_config(spec: AblationSpec) -> TrainConfig:
    """The `TrainConfig` of every ablation arm, checkpoints under `spec.output_dir`."""
    return dataclasses.replace(spec.train, output_dir=spec.output_dir)


def eval_prompts(spec: EvaluateSpec) -> list[str]:
    """The first `n_prompts` distinct first human turns of `spec.source` (none without a source)."""
    from ches_curate.evaluate import harmful_prompts

    if spec.source is None:
        return []
    pairs = (item for item in read_pairs(spec.source, format=spec.format, on_error="quarantine")
             if isinstance(item, PreferencePair))
    return harmful_prompts(pairs, spec.n_prompts)


def ablate(store: Store, name: str, version: int, scoring: ScoringSpec, policies: list[PolicySpec],
           spec: AblationSpec, prompts: Sequence[str] | None = None) -> pd.DataFrame:
    """Train DPO arms from the scoring model (the arms of `spec.design`), write one `ablations` row per arm and
    seed and return the rows (`ches_curate.ablation.run_ablation`). Refusal rates are measured on `prompts`, or
    by default on those of `spec.evaluate`."""
    from ches_curate.ablation import run_ablation
    from ches_curate.models import load_model

    loaded = load_model(scoring.model, scoring.device, scoring.dtype)
    prompts = eval_prompts(spec.evaluate) if prompts is None else list(prompts)
    return run_ablation(store, name, loaded, [(p.name, p.params) for p in policies], train_config(spec),
                        prompts, spec.seeds, version=version,
                        eval_config=spec.evaluate.generation, design=spec.design)


def record_train_run(store: Store, dv: DatasetVersion, selection_id: int | None, model_key: str, result: Any,
                     summary: Any, config: TrainConfig) -> int:
    """Store one `train` run (a `train_runs` row): its metrics, displacement summary and checkpoint; returns its id.

    `result` is `train.TrainResult`, `summary` its `displacement(...)`.
    """
    displacement = summary.as_dict()
    return store.add_train_run({
        "dataset_name": dv.name, "dataset_version": dv.version, "selection_id": selection_id, "model_key": model_key,
        "n_train_pairs": displacement["n_pairs"], "global_step": result.global_step,
        "train_loss": result.train_loss, "reward_accuracy": result.reward_accuracy,
        **{name: displacement[name] for name in ("preferred_logp_change", "dispreferred_logp_change",
                                                 "preferred_decrease_fraction", "ches_logp_corr", "ln_ches_logp_corr")},
        "wall_time_s": result.wall_time_s, "checkpoint_dir": result.checkpoint_dir,
        "config": json.dumps({**dataclasses.asdict(config), "tokenization_mismatches": result.tokenization_mismatches},
                             default=str),
    })


def ablation_metadata(rows: pd.DataFrame) -> dict[str, Any]:
    """An ablation's rows as JSON-ready metadata: its id and, per arm (and training seed), the headline metrics."""
    metrics = ("n_train_pairs", "preferred_logp_change", "preferred_decrease_fraction", "ches_logp_corr",
               "refusal_rate_before", "refusal_rate_after", "train_loss", "reward_accuracy")
    seeded = "train_seed" in rows.columns and rows.train_seed.nunique() > 1
    arms = {(f"{row['arm']} seed={row['train_seed']}" if seeded else row["arm"]):
            {m: (None if pd.isna(row[m]) else float(row[m])) for m in metrics} for row in rows.to_dict("records")}
    return {"ablation_id": int(rows.ablation_id.iloc[0]) if len(rows) else None, "arms": arms}
