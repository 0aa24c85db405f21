"""A scheduled refresh runs as cron runs it: the installed entry's command under `env -i`, nothing inherited.

The entry must carry every variable the run needs (here the test session's ZenML config
and repository, and CHES_CURATE_HOME, forwarded at scheduling time), write a log without
colour codes, exit 0 and score only the pairs the source gained.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ches_curate import curation, schedule
from ches_curate.pipeline_config import PipelineConfig
from ches_curate.store import Store
from tests.test_pipelines import cli, fake_crontab, toy_records, write_jsonl, zenml_repo  # noqa: F401 (fixtures)

N_BEFORE, N_NEW = 6, 3
ANSI = re.compile(r"\x1b\[")


def installed_command(crontab: Path) -> str:
    """The shell command of the one installed entry: the line minus its 5 cron fields and marker, `\\%` undone."""
    [line] = [entry for entry in crontab.read_text().splitlines() if entry.endswith(schedule.marker("refresh"))]
    command = line.split(" ", 5)[5].removesuffix(" " + schedule.marker("refresh"))
    return command.replace(r"\%", "%")


@pytest.mark.slow
def test_installed_cron_entry_runs_under_an_empty_environment_and_scores_only_new_pairs(
    zenml_repo, fake_crontab, tmp_path, tiny_llama_dir
):
    from ches_curate.scoring.incremental import score_dataset

    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, toy_records(100, N_BEFORE))
    config = {"store": str(tmp_path / "store.duckdb"), "dataset": {"name": "nightly", "source": str(source)},
              "scoring": {"model": str(tiny_llama_dir), "batch_size": 4, "device": "cpu"},
              "policy": {"name": "percentile", "params": {"p": 75}},
              "export": str(tmp_path / "out" / "{dataset}_v{version}.parquet")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    loaded = PipelineConfig.from_file(tmp_path / "config.yaml")
    store = Store(loaded.store)
    curation.ingest_source(store, loaded.dataset)
    score_dataset(store, "nightly", loaded.scoring.model, loaded.scoring.scoring_config(), progress=False)

    result = CliRunner().invoke(cli(), ["schedule", "--pipeline", "refresh", "--cron", "0 3 * * *", "--config",
                                        str(tmp_path / "config.yaml"), "--local"])
    assert result.exit_code == 0, result.output
    command = installed_command(fake_crontab)
    for name, value in schedule.SCHEDULED_ENV.items():
        assert f"{name}={value} " in command
    assert f"ZENML_CONFIG_PATH={os.environ['ZENML_CONFIG_PATH']} " in command

    write_jsonl(source, toy_records(100, N_BEFORE + N_NEW))  # the source gained three pairs overnight
    log = schedule.log_path("refresh")
    log.unlink(missing_ok=True)
    ran = subprocess.run(["env", "-i", shutil.which("sh"), "-c", command], capture_output=True, text=True,
                         timeout=540)
    text = log.read_text(encoding="utf-8")
    assert ran.returncode == 0, ran.stderr + text
    assert not ANSI.search(text), text[:2000]
    assert "Traceback" not in text
    runs = store.sql("SELECT dataset_version, n_scored, n_skipped, zenml_run_id FROM score_runs ORDER BY run_id")
    assert runs.dataset_version.tolist() == [1, 2]
    assert (runs.n_scored.iloc[-1], runs.n_skipped.iloc[-1]) == (N_NEW, N_BEFORE)
    assert runs.zenml_run_id.iloc[-1] is not None
    assert "dataset nightly v2 (new version)" in text


def test_systemd_units_are_written_where_the_message_says_with_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ZENML_CONFIG_PATH", "/srv/zen config")
    units = schedule.systemd_units("0 3 * * 1-5", ["/venv/bin/ches-curate", "run", "refresh"], Path("/w"), "refresh",
                                   Path("/logs/refresh.log"))
    paths = schedule.write_systemd_units(units)
    directory = tmp_path / "xdg" / "systemd" / "user"
    assert paths == [directory / "ches-curate-refresh.service", directory / "ches-curate-refresh.timer"]
    service = paths[0].read_text()
    assert 'Environment="NO_COLOR=1"\n' in service and 'Environment="HF_HUB_OFFLINE=1"\n' in service
    assert 'Environment="ZENML_CONFIG_PATH=/srv/zen config"\n' in service
    assert "StandardOutput=append:/logs/refresh.log\n" in service
    assert "OnCalendar=Mon..Fri *-*-* 03:00:00" in paths[1].read_text()
    assert schedule.systemd_install_commands(units) == [
        "systemctl --user daemon-reload", "systemctl --user enable --now ches-curate-refresh.timer"]


def test_schedule_systemd_writes_the_units_and_dry_run_only_prints_them(zenml_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "x", "source": "x.jsonl"}}), encoding="utf-8")
    args = ["schedule", "--pipeline", "refresh", "--cron", "0 3 * * *", "--config", str(config), "--systemd"]
    directory = tmp_path / "xdg" / "systemd" / "user"
    dry = CliRunner().invoke(cli(), [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would write {directory / 'ches-curate-refresh.service'}" in dry.output and not directory.exists()
    done = CliRunner().invoke(cli(), args)
    assert done.exit_code == 0, done.output
    assert f"wrote {directory / 'ches-curate-refresh.timer'}" in done.output
    assert sorted(p.name for p in directory.iterdir()) == ["ches-curate-refresh.service", "ches-curate-refresh.timer"]
    assert "systemctl --user enable --now ches-curate-refresh.timer" in done.output
