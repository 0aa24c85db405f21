"""`ches-curate runs` and `ches_curate.pipelines.runs` on stand-in runs: the listing, one run in full, artifacts by name.

The same command against real ZenML runs is tested end to end in test_pipelines.py
(`test_runs_lists_recent_runs_and_shows_one_with_metadata_and_artifact_ids`).
"""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from ches_curate.commands import pipelines as pipeline_commands
from ches_curate.errors import ChesCurateError
from ches_curate.pipelines import runs

REPORT = "/data/out/hh_v3_curated_report.html"


def artifact(name: str, version: int, artifact_id: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, version=str(version), id=artifact_id)


def step_run(substitutions: dict[str, str], **outputs: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(substitutions=substitutions),
                           outputs={name: [a] for name, a in outputs.items()})


def fake_run(name: str = "curation_pipeline-1", pipeline: str = "curation_pipeline", **metadata) -> SimpleNamespace:
    """A stand-in for a hydrated ZenML run: what `summarize` and `run_artifacts` read."""
    dated = {"dataset": "hh", "date": "2026_01_02"}
    return SimpleNamespace(
        name=name, id=f"id-of-{name}", pipeline=SimpleNamespace(name=pipeline), status=SimpleNamespace(value="completed"),
        start_time=datetime(2026, 1, 2, 3, 4, 5), run_metadata=metadata,
        steps={"score_pairs": step_run(dated, score_run_hh=artifact("score_run_hh", 3, "a-1"),
                                       scores_hh=artifact("scores_hh", 3, "a-2"))},
    )


CURATION_METADATA = {
    "report": {"report_path": REPORT, "selection_id": 7},
    "selection": {"selection_id": 7, "kept_fraction": 0.9},
    "ingest": {"name": "hh", "version": 3, "n_pairs": 300, "created": True},
    "pairs_quality": {"success": True, "pairs": {"n_rows": 300, "failed_errors": {}}},
    "export": {"curated_path": "/data/out/hh_v3_curated.parquet", "n_pairs": 270},
}


def cli() -> typer.Typer:
    app = typer.Typer()
    pipeline_commands.register(app)
    return app


def test_step_output_finds_dataset_named_and_older_generic_artifacts():
    named = SimpleNamespace(steps={"score_pairs": step_run({"dataset": "hh"}, scores_hh=artifact("scores_hh", 2, "x"))})
    generic = SimpleNamespace(steps={"score_pairs": step_run({"date": "2026_01_02"}, scores=artifact("scores", 9, "y"))})
    assert runs.step_output(named, "score_pairs", "scores").id == "x"
    assert runs.step_output(generic, "score_pairs", "scores").id == "y"
    assert runs.artifact_template("scores").format(dataset="hh_rlhf") == "scores_hh_rlhf"
    assert runs.dataset_tags("hh", 3) == ["dataset:hh", "hh:v3"]


def test_summarize_reads_dataset_version_selection_and_files_from_run_metadata():
    run = runs.summarize(fake_run(**CURATION_METADATA))
    assert (run.name, run.pipeline, run.status, run.dataset, run.dataset_version, run.selection_id) == (
        "curation_pipeline-1", "curation", "completed", "hh", 3, 7)
    assert (run.report_path, run.curated_path) == (REPORT, "/data/out/hh_v3_curated.parquet")
    assert list(run.metadata) == ["ingest", "pairs_quality", "selection", "export", "report"]
    ablation = runs.summarize(fake_run("ablation_pipeline-4", "ablation_pipeline", ingest={"name": "hh", "version": 3},
                                       ablation={"ablation_id": 2}))
    assert (ablation.pipeline, ablation.selection_id, ablation.report_path, ablation.curated_path) == (
        "ablation", None, None, None)


def test_run_artifacts_lists_every_output_with_its_version_and_id():
    assert runs.run_artifacts(fake_run()) == [runs.RunArtifact("score_pairs", "score_run_hh", "3", "a-1"),
                                              runs.RunArtifact("score_pairs", "scores_hh", "3", "a-2")]


@pytest.fixture()
def listed_runs(monkeypatch) -> list[tuple[int, str | None]]:
    """`recent_runs` answering two stand-in runs; the (limit, pipeline) it was asked for."""
    asked = []

    def recent(limit, pipeline):
        asked.append((limit, pipeline))
        return [runs.summarize(fake_run("refresh_pipeline-2", "refresh_pipeline", ingest={"name": "hh", "version": 4},
                                        selection={"selection_id": 9})),
                runs.summarize(fake_run(**CURATION_METADATA))]

    monkeypatch.setattr(runs, "recent_runs", recent)
    return asked


def test_runs_lists_each_run_on_one_row_when_the_table_fits(listed_runs):
    result = CliRunner().invoke(cli(), ["runs", "-n", "5", "--pipeline", "curation"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert listed_runs == [(5, "curation")]
    [refresh] = [line for line in result.output.splitlines() if "refresh_pipeline-2" in line and "│" in line]
    [curation] = [line for line in result.output.splitlines() if "curation_pipeline-1" in line and "│" in line]
    assert "hh v4" in refresh and " 9 " in refresh and "2026-01-02 03:04:05" in refresh
    assert "hh v3" in curation and " 7 " in curation and REPORT in curation
    assert "one run in full: ches-curate runs refresh_pipeline-2" in result.output


def test_runs_on_a_narrow_terminal_prints_records_with_every_value_whole(listed_runs):
    result = CliRunner().invoke(cli(), ["runs"], env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    assert "│" not in result.output and f"report         {REPORT}" in result.output


def test_runs_with_a_run_name_shows_its_metadata_files_and_artifact_ids(monkeypatch):
    monkeypatch.setattr(runs, "find_run", lambda name: fake_run(name, **CURATION_METADATA))
    result = CliRunner().invoke(cli(), ["runs", "curation_pipeline-1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "curation_pipeline-1 (curation pipeline) completed, started 2026-01-02 03:04:05 UTC" in out
    assert "dataset hh v3, selection 7" in out and f"report: {REPORT}" in out
    assert "curated pairs: /data/out/hh_v3_curated.parquet" in out
    [kept] = [line for line in out.splitlines() if "kept_fraction" in line]
    assert "selection" in kept and "0.9" in kept
    [quality] = [line for line in out.splitlines() if "pairs_quality" in line and "pairs " in line]
    assert '{"n_rows": 300, "failed_errors": {}}' in quality
    [scores] = [line for line in out.splitlines() if "scores_hh" in line]
    assert "score_pairs" in scores and "a-2" in scores


def test_runs_refuses_an_unknown_pipeline_before_asking_zenml():
    with pytest.raises(ChesCurateError, match="unknown pipeline 'curate'; choose one of curation, ablation, refresh"):
        runs.recent_runs(pipeline="curate")


def test_runs_has_an_example_in_its_help():
    from ches_curate.cli import EXAMPLES, app

    [command] = [c for c in app.registered_commands if c.name == "runs"]
    assert command.epilog == f"Example: {EXAMPLES['runs']}" and EXAMPLES["runs"].startswith("ches-curate runs ")


def test_a_running_run_whose_process_is_gone_is_dead_and_others_keep_their_status():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        recorded = runs.process_identity(child.pid)
    finally:
        child.kill()
        child.wait()
    assert runs.run_status("running", recorded) == "dead"  # killed with -9: ZenML would say running for ever
    assert runs.run_status("initializing", recorded) == "dead"
    assert runs.run_status("failed", recorded) == "failed"
    me = runs.process_identity()
    assert runs.run_status("running", me) == "running"
    assert runs.run_status("running", {**me, "started": me["started"] - 3600}) == "dead"  # the pid was reused
    assert runs.run_status("running", {**recorded, "host": "another-host"}) == "running"  # not ours to judge
    assert runs.run_status("running", None) == "running"  # a run from before the start hook


def test_runs_lists_a_killed_run_as_dead():
    gone = {"host": runs.process_identity()["host"], "pid": 2 ** 22 + 7, "started": 0.0}
    run = fake_run(process=gone, **CURATION_METADATA)
    run.status = SimpleNamespace(value="running")
    assert runs.summarize(run).status == "dead"
