"""The ZenML pipelines end to end on tiny data and a tiny model, the refresh diff, and scheduling.

ZenML runs against the temporary config and repository that conftest sets up
(`ZENML_CONFIG_PATH`, `ZENML_REPOSITORY_PATH`); the pipeline runs are session-scoped
fixtures, because a run costs seconds of ZenML bookkeeping alone.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from ches_curate import schedule
from ches_curate.commands import pipelines as pipeline_commands
from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair
from ches_curate.pipeline_config import PipelineConfig, PolicySpec, ScoringSpec
from ches_curate.curation import validate
from ches_curate.refresh import diff_selections, reselect
from ches_curate.store import Store
from ches_curate.pipelines.runs import step_output

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
"""ZenML 0.98's run listing reads pydantic's instance `model_fields`, which pydantic 2.11 deprecates."""

REPO = Path(__file__).resolve().parents[1]
WORDS = ["sure", "sorry", "never", "bread", "fox", "yes", "lock", "dog"]
N_FIRST = 12
P_CUT = 75


def toy_records(start: int, n: int) -> list[dict]:
    return [
        {"prompt": f"Human: how do I bake {WORDS[i % 8]} {i}?",
         "chosen": " ".join(WORDS[(i * k) % 8] for k in range(1, 2 + i % 5)) + f" {i}",
         "rejected": f"I'm sorry, {WORDS[(i + 1) % 8]} no {i}"}
        for i in range(start, start + n)
    ]


def pair_id(record: dict) -> str:
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"]).pair_id


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def cli() -> typer.Typer:
    app = typer.Typer()
    pipeline_commands.register(app)
    return app


@pytest.fixture(scope="session")
def zenml_repo() -> Iterator[Path]:
    """The temporary ZenML repository conftest points ZENML_REPOSITORY_PATH at, initialized once.

    The source root stays the project, as in a real checkout, so that ZenML resolves the
    steps as user code (not by scanning installed distributions, a second per module).
    """
    from zenml.client import Client
    from zenml.utils import source_utils

    root = Path(os.environ["ZENML_REPOSITORY_PATH"])
    assert REPO not in root.parents and root != REPO, "tests must not use the project's .zen"
    root.mkdir(parents=True, exist_ok=True)
    if not Client.is_repository_directory(root):
        Client.initialize(root=root)
    source_utils.set_custom_source_root(str(REPO))
    yield root
    source_utils.set_custom_source_root(None)


@pytest.fixture(scope="session")
def pipeline_dir(session_tmp, tiny_llama_dir) -> Path:
    """A source of 12 toy pairs plus one bad row, and a config file for the tiny model."""
    directory = session_tmp / "pipelines"
    directory.mkdir(exist_ok=True)
    write_jsonl(directory / "pairs.jsonl", toy_records(0, N_FIRST) + [{"prompt": "x", "chosen": "", "rejected": "y"}])
    config = {
        "store": str(directory / "store.duckdb"),
        "dataset": {"name": "toy", "source": str(directory / "pairs.jsonl")},
        "scoring": {"model": str(tiny_llama_dir), "batch_size": 4, "device": "cpu"},
        "policy": {"name": "percentile", "params": {"p": P_CUT}},
        "export": str(directory / "out" / "{dataset}_v{version}.parquet"),
        "zenml": {"enable_cache": False},  # every step runs: these tests check the store's own incrementality
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory


@contextmanager
def model_loads() -> Iterator[list[str]]:
    """The model specs `load_model` is called with meanwhile (it still loads them)."""
    from ches_curate import models
    from ches_curate.scoring import engine

    calls: list[str] = []
    load = models.load_model

    def counting(spec: str = "default", *args, **kwargs):
        calls.append(spec)
        return load(spec, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "load_model", counting)
        patch.setattr(engine, "load_model", counting)
        yield calls


@pytest.fixture(scope="session")
def curation_runs(zenml_repo, pipeline_dir):
    """The curation pipeline twice on unchanged data: first through the CLI, then through the Python API; and the
    models the second run loaded."""
    from zenml.client import Client

    from ches_curate.pipelines import run_pipeline

    result = CliRunner().invoke(cli(), ["run", "curation", "--config", str(pipeline_dir / "config.yaml")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    first = Client().get_pipeline("curation_pipeline").last_run
    with model_loads() as loaded:
        second = run_pipeline("curation", PipelineConfig.from_file(pipeline_dir / "config.yaml"))
    return first, second, result.output, loaded


def refresh_config(pipeline_dir: Path) -> PipelineConfig:
    config = PipelineConfig.from_file(pipeline_dir / "config.yaml")
    return config.model_copy(update={"dataset": config.dataset.model_copy(
        update={"source": str(pipeline_dir / "pairs_v2.jsonl")})})


@pytest.fixture(scope="session")
def refresh_run(curation_runs, pipeline_dir):
    """The refresh pipeline after the source lost its first pair and gained four."""
    from ches_curate.pipelines import run_pipeline

    records = toy_records(1, N_FIRST - 1 + 4)
    write_jsonl(pipeline_dir / "pairs_v2.jsonl", records)
    return run_pipeline("refresh", refresh_config(pipeline_dir))


@pytest.fixture(scope="session")
def unchanged_refresh_run(refresh_run, pipeline_dir):
    """The refresh pipeline again on the same source, and the models it loaded."""
    from ches_curate.pipelines import run_pipeline

    with model_loads() as loaded:
        run = run_pipeline("refresh", refresh_config(pipeline_dir))
    return run, loaded


@pytest.fixture(scope="session")
def ablation_run(refresh_run, pipeline_dir):
    """The ablation pipeline through the CLI on the refreshed source: one policy, one seed, one DPO step per arm."""
    from zenml.client import Client

    config = yaml.safe_load((pipeline_dir / "config.yaml").read_text())
    config["dataset"]["source"] = str(pipeline_dir / "pairs_v2.jsonl")
    config["ablation"] = {
        "policies": [{"name": "percentile", "params": {"p": P_CUT}}], "seeds": [0],
        "train": {"max_steps": 1, "batch_size": 4, "max_length": 64, "save_model": False},
        "output_dir": str(pipeline_dir / "runs"),
        "evaluate": {"source": str(pipeline_dir / "pairs_v2.jsonl"), "n_prompts": 2,
                     "generation": {"max_new_tokens": 2}},
    }
    (pipeline_dir / "ablation.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(cli(), ["run", "ablation", "--config", str(pipeline_dir / "ablation.yaml")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return Client().get_pipeline("ablation_pipeline").last_run, result.output


def output(run, step: str, stem: str):
    return step_output(run, step, stem).load()


@pytest.mark.slow
def test_curation_run_records_named_artifacts_metadata_and_model(curation_runs, pipeline_dir):
    first, second, printed, _ = curation_runs
    store = Store(pipeline_dir / "store.duckdb")
    version = output(first, "ingest_dataset", "dataset_version")
    assert (version["version"], version["n_pairs"], version["n_quarantined"]) == (1, N_FIRST, 1)

    scores = output(first, "score_pairs", "scores")
    assert len(scores) == N_FIRST and set(scores.pair_id) == {pair_id(r) for r in toy_records(0, N_FIRST)}
    kept_ids = set(scores.pair_id[scores.ln_ches <= np.percentile(scores.ln_ches, P_CUT)])  # the default score
    selection = output(first, "select_pairs", "selection")
    assert set(selection.pair_id[selection.kept]) == kept_ids
    assert len(kept_ids) == 9

    prompts = {pair_id(r): r["prompt"] for r in toy_records(0, N_FIRST)}
    curated = output(first, "export_curated", "curated_pairs")
    assert isinstance(curated, pd.DataFrame) and list(curated.columns) == [
        "prompt", "chosen", "rejected", "ches_model_key", "ches_tokenization_version"]
    assert {messages[0]["content"] for messages in curated.prompt} == {prompts[p] for p in kept_ids}  # conversational
    path = Path(output(first, "export_curated", "curated_path"))
    assert path == pipeline_dir / "out" / "toy_v1.parquet" and len(pd.read_parquet(path)) == 9
    report = output(first, "curation_report", "curation_report")
    assert report.startswith("<!DOCTYPE html>") and f"kept {len(kept_ids)}" in report
    report_path = pipeline_dir / "out" / "toy_v1_report.html"  # the second run on v1 wrote it again
    assert report_path.read_text(encoding="utf-8") == output(second, "curation_report", "curation_report")
    assert first.run_metadata["report"]["report_path"] == second.run_metadata["report"]["report_path"] == str(
        report_path)
    assert f"report: {report_path}" in printed

    metadata = first.run_metadata
    assert (metadata["ingest"]["n_pairs"], metadata["selection"]["n_kept"], metadata["scoring"]["n_scored"]) == (
        N_FIRST, 9, N_FIRST)
    assert metadata["selection"]["kept_fraction"] == pytest.approx(9 / N_FIRST)
    assert metadata["scoring"]["ches_p50"] == pytest.approx(float(np.percentile(scores.ches, 50)))
    assert first.model_version.run_metadata["export"]["n_pairs"] == 9
    assert metadata["pairs_quality"]["pairs"]["success"] and metadata["scores_quality"]["scores"]["n_rows"] == N_FIRST
    assert first.model_version.model.name == "ches_curate"

    runs = store.sql("SELECT zenml_run_id, n_scored FROM score_runs ORDER BY run_id")
    assert runs.zenml_run_id.iloc[0] == str(first.id) and runs.n_scored.iloc[0] == N_FIRST
    assert "where to look" in printed and str(pipeline_dir / "store.duckdb") in printed


@pytest.mark.slow
def test_second_curation_run_on_unchanged_data_scores_nothing_new(curation_runs, pipeline_dir):
    first, second, _, loaded = curation_runs
    store = Store(pipeline_dir / "store.duckdb")
    runs = store.sql("SELECT zenml_run_id, n_scored, n_skipped, model_key FROM score_runs WHERE zenml_run_id = ?",
                     params=[str(second.id)])
    assert (runs.n_scored.tolist(), runs.n_skipped.tolist()) == ([0], [N_FIRST])
    assert loaded == [] and runs.model_key.iloc[0] == output(first, "score_pairs", "score_run")["model_key"]
    assert output(second, "ingest_dataset", "dataset_version")["created"] is False
    assert store.sql("SELECT count(*) AS n FROM datasets").n.iloc[0] == 1
    assert second.model_version.number == first.model_version.number + 1
    assert output(second, "select_pairs", "selection").equals(output(first, "select_pairs", "selection"))


@pytest.mark.slow
def test_refresh_scores_only_new_pairs_and_records_the_selection_diff(refresh_run, curation_runs, pipeline_dir):
    _, second, _, _ = curation_runs
    store = Store(pipeline_dir / "store.duckdb")
    assert output(refresh_run, "ingest_dataset", "dataset_version")["version"] == 2
    scored = store.sql("SELECT n_scored, n_skipped FROM score_runs WHERE zenml_run_id = ?", params=[str(refresh_run.id)])
    assert (scored.n_scored.iloc[0], scored.n_skipped.iloc[0]) == (4, N_FIRST - 1)

    before = output(second, "select_pairs", "selection").set_index("pair_id").kept
    scores = output(refresh_run, "score_pairs", "scores")
    after = pd.Series(scores.ln_ches.to_numpy() <= np.percentile(scores.ln_ches, P_CUT), index=scores.pair_id)
    diff = output(refresh_run, "reselect_pairs", "selection_diff").set_index("pair_id").change
    expected = {p: "added" for p in after.index.difference(before.index)}
    expected |= {p: "removed" for p in before.index.difference(after.index)}
    expected |= {p: "now_kept" if after[p] else "now_removed"
                 for p in after.index.intersection(before.index) if after[p] != before[p]}
    assert diff.to_dict() == expected
    assert set(diff[diff == "added"].index) == {pair_id(r) for r in toy_records(N_FIRST, 4)}
    assert list(diff[diff == "removed"].index) == [pair_id(toy_records(0, 1)[0])]
    summary = output(refresh_run, "reselect_pairs", "selection_summary")
    assert summary["previous_selection_id"] == output(second, "select_pairs", "selection_summary")["selection_id"]
    assert summary["diff_unchanged"] == N_FIRST - 1 - sum(c.startswith("now_") for c in expected.values())


@pytest.mark.slow
def test_refresh_of_unchanged_source_loads_no_model_and_scores_nothing(unchanged_refresh_run, refresh_run,
                                                                       pipeline_dir):
    run, loaded = unchanged_refresh_run
    assert loaded == []
    scored = Store(pipeline_dir / "store.duckdb").sql(
        "SELECT n_scored, n_skipped, status, params->>'model_loaded' AS model_loaded FROM score_runs "
        "WHERE zenml_run_id = ?", params=[str(run.id)])
    assert scored.to_dict("records") == [
        {"n_scored": 0, "n_skipped": N_FIRST - 1 + 4, "status": "finished", "model_loaded": "false"}]
    assert output(run, "ingest_dataset", "dataset_version")["created"] is False
    summary = output(run, "reselect_pairs", "selection_summary")
    assert summary["selection_id"] == output(refresh_run, "reselect_pairs", "selection_summary")["selection_id"]
    assert output(run, "reselect_pairs", "selection_diff").empty
    assert output(run, "score_pairs", "scores").equals(output(refresh_run, "score_pairs", "scores"))


@pytest.mark.slow
def test_artifacts_are_named_for_their_dataset_and_tagged_with_its_version(curation_runs, refresh_run):
    first, second, _, _ = curation_runs
    scores = [step_output(run, "score_pairs", "scores") for run in (first, second, refresh_run)]
    assert [a.name for a in scores] == ["scores_toy"] * 3
    assert int(scores[1].version) == int(scores[0].version) + 1
    assert int(scores[2].version) == int(scores[0].version) + 2
    assert {"dataset:toy", "toy:v1"} <= {t.name for t in scores[0].tags}
    assert {"dataset:toy", "toy:v2"} <= {t.name for t in scores[2].tags}
    assert {"dataset:toy", "toy:v2"} <= {t.name for t in refresh_run.tags}
    names = {a.name for step in first.steps.values() for outputs in step.outputs.values() for a in outputs}
    assert names == {f"{stem}_toy" for stem in ("dataset_version", "pairs_quality", "score_run", "scores",
                                                   "scores_quality", "selection", "selection_summary",
                                                   "curated_pairs", "curated_path", "curation_report")}


@pytest.mark.slow
def test_runs_lists_recent_runs_and_shows_one_with_metadata_and_artifact_ids(curation_runs, refresh_run,
                                                                              pipeline_dir):
    first, second, _, _ = curation_runs
    wide = {"COLUMNS": "250"}  # the table fits: one line per run
    listed = CliRunner().invoke(cli(), ["runs", "-n", "50"], env=wide)
    assert listed.exit_code == 0, listed.output + repr(listed.exception)

    def row(run) -> str:
        lines = [line for line in listed.output.splitlines() if line.startswith("│") and run.name in line]
        assert len(lines) == 1, listed.output
        return lines[0]

    report = pipeline_dir / "out" / "toy_v1_report.html"
    assert "toy v1" in row(first) and str(report) in row(first) and "curation" in row(first)
    assert "toy v2 " in row(refresh_run) and "refresh" in row(refresh_run)
    assert f" {refresh_run.run_metadata['selection']['selection_id']} " in row(refresh_run)
    only_refresh = CliRunner().invoke(cli(), ["runs", "--pipeline", "refresh"], env=wide)
    assert refresh_run.name in only_refresh.output and first.name not in only_refresh.output

    shown = CliRunner().invoke(cli(), ["runs", first.name], env=wide)
    assert shown.exit_code == 0, shown.output + repr(shown.exception)
    assert f"report: {report}" in shown.output and "toy v1" in shown.output
    assert str(step_output(first, "score_pairs", "scores").id) in shown.output and "scores_toy" in shown.output
    assert "kept_fraction" in shown.output
    assert first.run_metadata["process"]["pid"] == os.getpid()  # the start hook named the process running the steps
    missing = CliRunner().invoke(cli(), ["runs", "no-such-run"])
    assert isinstance(missing.exception, ChesCurateError) and "no-such-run" in str(missing.exception)


@pytest.mark.slow
def test_ablation_run_writes_one_row_per_arm(ablation_run, refresh_run, pipeline_dir):
    run, printed = ablation_run
    store = Store(pipeline_dir / "store.duckdb")
    assert store.sql("SELECT count(*) AS n FROM datasets").n.iloc[0] == 2
    assert store.sql("SELECT n_scored FROM score_runs WHERE zenml_run_id = ?", params=[str(run.id)]).n_scored.iloc[0] == 0

    scores = output(refresh_run, "score_pairs", "scores")
    n_kept = int((scores.ln_ches <= np.percentile(scores.ln_ches, P_CUT)).sum())
    rows = store.sql("SELECT arm, policy, n_train_pairs, refusal_rate_before, train_loss FROM ablations ORDER BY arm")
    expected_arms = ["full", f"percentile(p={P_CUT})", f"random(n={len(scores) - n_kept},seed=0)"]
    assert rows.arm.tolist() == expected_arms
    assert rows.n_train_pairs.tolist() == [len(scores), n_kept, n_kept]
    assert rows.refusal_rate_before.notna().all() and rows.train_loss.notna().all()
    artifact = output(run, "ablate", "ablation_rows")
    assert sorted(artifact.arm) == expected_arms
    assert set(run.run_metadata["ablation"]["arms"]) == set(expected_arms)
    assert 'ches-curate sql "SELECT * FROM ablations"' in printed and "full" in printed


@pytest.mark.slow
def test_a_failing_step_is_one_error_line_naming_the_run_and_step(curation_runs, pipeline_dir):
    config = yaml.safe_load((pipeline_dir / "config.yaml").read_text())
    config["store"] = str(pipeline_dir / "failing.duckdb")
    config["scoring"]["model"] = str(pipeline_dir / "no_such_model")
    (pipeline_dir / "failing.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(cli(), ["run", "curation", "--config", str(pipeline_dir / "failing.yaml")])
    assert isinstance(result.exception, ChesCurateError)
    message = str(result.exception)
    assert message.startswith("the curation pipeline failed: run curation_pipeline-")
    assert f"step score_pairs: {pipeline_dir / 'no_such_model'}: no such file or directory" in message


def test_refresh_of_unchanged_version_reuses_its_selection_and_validates_once(tmp_path, tiny_llama_dir):
    from ches_curate.scoring.incremental import score_dataset
    from ches_curate.scoring import ScoringConfig

    store = Store(tmp_path / "s.duckdb")
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], row=i) for i, r in enumerate(toy_records(0, 6))]
    store.register_dataset("toy", None, pairs)
    model_key = score_dataset(store, "toy", str(tiny_llama_dir), ScoringConfig(batch_size=6), progress=False).model_key
    policy = PolicySpec(name="top-k", params={"k": 2})
    first, first_diff = reselect(store, "toy", 1, model_key, policy)
    again, again_diff = reselect(store, "toy", 1, model_key, policy)
    assert first_diff.counts() == {"diff_added": 6, "diff_removed": 0, "diff_now_kept": 0, "diff_now_removed": 0,
                                   "diff_unchanged": 0}
    assert again.selection_id == first.selection_id and (again.n_pairs, again.n_kept) == (6, 4)
    assert again_diff.changes.empty and again_diff.n_unchanged == 6
    assert store.sql("SELECT count(DISTINCT selection_id) AS n FROM selections").n.iloc[0] == 1

    assert validate(store, "toy", 1, "pairs", skip_if_passed=True)["pairs"]["n_rows"] == 6
    assert "already passed" in validate(store, "toy", 1, "pairs", skip_if_passed=True)["skipped"]
    assert validate(store, "toy", 1, "pairs")["pairs"]["n_rows"] == 6


def test_scoring_a_fully_scored_version_records_a_run_without_loading_the_model(tmp_path, tiny_llama_dir):
    from ches_curate.curation import score_version
    from ches_curate.models import key_without_loading

    store = Store(tmp_path / "s.duckdb")
    records = toy_records(0, 5)
    store.register_dataset("toy", None, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], row=i)
                                         for i, r in enumerate(records[:4])])
    spec = ScoringSpec(model=str(tiny_llama_dir), batch_size=4, device="cpu")
    with model_loads() as loaded:
        first = score_version(store, "toy", 1, spec)
        again = score_version(store, "toy", 1, spec, zenml_run_id="run-2")
    assert loaded == [str(tiny_llama_dir)] and (first.n_scored, first.n_skipped) == (4, 0)
    assert (again.model_key, again.status, again.n_pairs, again.n_scored, again.n_skipped) == (
        first.model_key, "finished", 4, 0, 4)
    row = store.sql("SELECT status, n_scored, n_skipped, n_failed, zenml_run_id FROM score_runs WHERE run_id = ?",
                    params=[again.run_id])
    assert row.to_dict("records") == [
        {"status": "finished", "n_scored": 0, "n_skipped": 4, "n_failed": 0, "zenml_run_id": "run-2"}]

    store.register_dataset("toy", None, [PreferencePair(r["prompt"], r["chosen"], r["rejected"], row=i)
                                         for i, r in enumerate(records)])
    with model_loads() as loaded:
        gained = score_version(store, "toy", 2, spec)
    assert loaded == [str(tiny_llama_dir)] and (gained.n_scored, gained.n_skipped) == (1, 4)
    assert key_without_loading(str(tiny_llama_dir), "bfloat16")[0] == first.model_key.replace("float32", "bfloat16")
    assert key_without_loading("nobody/no-such-model") is None  # offline, not cached: only loading can tell


def test_diff_selections_classifies_every_changed_pair(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    old = pd.DataFrame({"pair_id": ["a", "b", "c", "d"], "kept": [True, True, False, True], "rank": [3, 4, 1, 2]})
    new = pd.DataFrame({"pair_id": ["b", "c", "d", "e"], "kept": [True, True, False, False], "rank": [3, 4, 1, 2]})
    old_id = store.save_selection("top-k", {"k": 1}, "toy", 1, "m", old, "ches")
    new_id = store.save_selection("top-k", {"k": 1}, "toy", 2, "m", new, "ches")
    diff = diff_selections(store, old_id, new_id)
    assert dict(zip(diff.changes.pair_id, diff.changes.change)) == {
        "a": "removed", "e": "added", "c": "now_kept", "d": "now_removed"}
    assert diff.n_unchanged == 1 and diff.counts()["diff_now_kept"] == 1


@pytest.fixture()
def fake_crontab(tmp_path, monkeypatch) -> Path:
    """A `crontab` stand-in that keeps the table in a file, found through CHES_CURATE_CRONTAB."""
    table = tmp_path / "crontab.txt"
    program = tmp_path / "fake-crontab"
    program.write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = -l ]; then [ -f {table} ] && exec cat {table}; echo 'no crontab for tester' >&2; exit 1; fi\n"
        f"cat > {table}\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(schedule.CRONTAB_ENV, str(program))
    return table


def schedule_cli(config: Path, *flags: str):
    return CliRunner().invoke(cli(), ["schedule", "--pipeline", "refresh", "--cron", "0 3 * * *",
                                      "--config", str(config), *flags])


@pytest.mark.slow
def test_schedule_dry_run_on_the_local_stack_prints_the_crontab_entry(zenml_repo, pipeline_dir, fake_crontab):
    result = schedule_cli(pipeline_dir / "config.yaml", "--local", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "'local' orchestrator, which cannot run schedules" in result.output
    entry = result.output.split("would install this crontab entry:\n")[1].strip()
    assert entry.startswith("0 3 * * * cd ") and entry.endswith("# ches-curate:refresh")
    assert f"run refresh --config {pipeline_dir / 'config.yaml'}" in entry
    assert not fake_crontab.exists()

    declined = schedule_cli(pipeline_dir / "config.yaml")
    assert declined.exit_code == 1 and "run again with --local" in declined.output and not fake_crontab.exists()


def test_schedulable_orchestrator_gets_a_zenml_schedule(pipeline_dir, fake_crontab, monkeypatch):
    from ches_curate import pipelines

    submitted = []
    monkeypatch.setattr(pipelines, "active_orchestrator", lambda: ("cluster", "kubernetes", True))
    monkeypatch.setattr(pipelines, "run_pipeline", lambda name, config, schedule=None: submitted.append(
        (name, config.store, schedule)))
    dry = schedule_cli(pipeline_dir / "config.yaml", "--dry-run")
    assert dry.exit_code == 0 and "would attach ZenML Schedule(name='ches-curate-refresh', cron_expression='0 3 * * *')" \
        in dry.output and not submitted
    done = schedule_cli(pipeline_dir / "config.yaml")
    assert done.exit_code == 0, done.output
    [(name, store, attached)] = submitted
    assert (name, store) == ("refresh", str(pipeline_dir / "store.duckdb"))
    assert (attached.name, attached.cron_expression) == ("ches-curate-refresh", "0 3 * * *")
    assert not fake_crontab.exists()


def test_local_crontab_install_keeps_other_entries_and_replaces_its_own(fake_crontab):
    fake_crontab.write_text("15 * * * * backup.sh\n")
    command = schedule.ches_curate_command("refresh", Path("pipelines/configs/dev.yaml"))
    first = schedule.crontab_line("0 3 * * *", command, REPO, Path("/tmp/r.log"), "refresh")
    second = schedule.crontab_line("30 4 * * 1-5", command, REPO, Path("/tmp/r.log"), "refresh")
    assert schedule.install_crontab_line(first, "refresh").replaced == 0
    change = schedule.install_crontab_line(second, "refresh")
    assert change.replaced == 1
    assert fake_crontab.read_text() == f"15 * * * * backup.sh\n{second}\n"


def test_systemd_timer_translates_cron_and_refuses_what_it_cannot():
    assert schedule.on_calendar("0 3 * * *") == "*-*-* 03:00:00"
    assert schedule.on_calendar("*/15 * * * *") == "*-*-* *:00/15:00"
    assert schedule.on_calendar("0 6 * * 1-5") == "Mon..Fri *-*-* 06:00:00"
    units = schedule.systemd_units("0 3 * * *", ["/venv/bin/ches-curate", "run", "refresh"], Path("/w"), "refresh")
    assert "OnCalendar=*-*-* 03:00:00" in units["ches-curate-refresh.timer"]
    assert "ExecStart=/venv/bin/ches-curate run refresh" in units["ches-curate-refresh.service"]
    with pytest.raises(ChesCurateError, match="both day of month and day of week"):
        schedule.on_calendar("0 3 1 * 1")
    with pytest.raises(ChesCurateError, match="minute field '61'"):
        schedule.validate_cron("61 3 * * *")


def test_run_rejects_a_bad_config_before_starting_zenml(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "x", "source": "x.jsonl"},
                                      "policy": {"name": "percentile", "params": {"q": 3}}}))
    result = CliRunner().invoke(cli(), ["run", "curation", "--config", str(config)])
    assert isinstance(result.exception, ChesCurateError)
    assert "param 'q'" in str(result.exception)
    config.write_text(yaml.safe_dump({"dataset": {"name": "x"}}))
    with pytest.raises(ChesCurateError, match=r"dataset\.source: Field required"):
        PipelineConfig.from_file(config)


def test_committed_zenml_repository_is_a_marker_without_a_local_store():
    zen = REPO / ".zen"
    assert zen.is_dir()
    tracked = {p.name for p in zen.iterdir()} - {"config.yaml"}
    assert tracked == {".gitignore"}
    assert "config.yaml" in (zen / ".gitignore").read_text().splitlines()


def test_shipped_configs_are_valid():
    for name in ("dev", "gpu", "demo"):
        config = PipelineConfig.from_file(REPO / "pipelines" / "configs" / f"{name}.yaml")
        assert config.dataset.format == "hh_rlhf"
    gpu = PipelineConfig.from_file(REPO / "pipelines" / "configs" / "gpu.yaml")
    assert gpu.zenml["steps"]["score_pairs"]["settings"]["resources"]["gpu_count"] == 1


PLUGIN_POLICY = """
from ches_curate.hookspecs import hookimpl
from ches_curate.policies import Policy, remove_highest


class DropTop(Policy):
    name = "drop-top"
    description = "Remove the single highest-CHES pair."

    def select(self, scores, params):
        return remove_highest(scores, params.score_column, 1)


@hookimpl
def register_filter_policies(register):
    register(DropTop())
"""


@pytest.mark.slow
def test_a_config_and_run_plugin_give_the_pipeline_a_policy_from_a_file(zenml_repo, pipeline_dir, tmp_path):
    from ches_curate import plugins

    (tmp_path / "my_policies.py").write_text(PLUGIN_POLICY, encoding="utf-8")
    config = yaml.safe_load((pipeline_dir / "config.yaml").read_text())
    config |= {"store": str(tmp_path / "plugin.duckdb"), "policy": {"name": "drop-top"},
               "plugins": ["my_policies.py"], "export": str(tmp_path / "{dataset}_v{version}.parquet")}
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    plugins.reset()  # nothing registered yet: the config must load it
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a relative plugin path is taken from where the command runs
    try:
        loaded = PipelineConfig.from_file("plugin.yaml").resolved()
        assert loaded.plugins == [str(tmp_path / "my_policies.py")]
        result = CliRunner().invoke(cli(), ["run", "curation", "--config", "plugin.yaml"])
    finally:
        os.chdir(cwd)
        plugins.reset()
    assert result.exit_code == 0, result.output + repr(result.exception)
    selection = Store(tmp_path / "plugin.duckdb").sql(
        "SELECT policy, source, count(*) FILTER (WHERE NOT kept) AS n_removed FROM selections GROUP BY ALL")
    assert selection.to_dict("records") == [{"policy": "drop-top", "source": "pipeline", "n_removed": 1}]
    config["plugins"] = []  # now from --plugin alone: a missing file is one error line naming it, before ZenML
    (tmp_path / "plugin.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    missing = CliRunner().invoke(cli(), ["run", "curation", "--config", str(tmp_path / "plugin.yaml"),
                                         "--plugin", str(tmp_path / "absent.py")])
    assert isinstance(missing.exception, ChesCurateError) and "absent.py" in str(missing.exception)
