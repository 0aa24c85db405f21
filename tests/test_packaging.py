"""ches-curate as a component: the wheel, installed into a user's own ZenML project, and its declared dependencies.

The wheel is built from the working tree (a copy of the files it packages, so no build
folder appears in the checkout) and installed with `--no-deps --target` into a folder that
comes first on `PYTHONPATH`: it shadows the editable install and reuses this environment's
dependencies (nothing is downloaded, torch is not reinstalled). The user project has its own
`pipelines`, `steps` and `plugins` packages, is the working directory and the ZenML
repository, and runs the CLI and a pipeline of its own steps around the library's steps in
subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ches_curate.pipeline_config import PipelineConfig, find_config
from tests.test_pipelines import REPO, pair_id, toy_records, write_jsonl

PACKAGED = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "ches_curate", "pipelines", "plugins")
INSTALLED_AS = {"ches_curate": "ches_curate", "pipelines": "ches_curate/pipelines",
                "plugins": "ches_curate/builtin_plugins"}
P_CUT = 75
N_PAIRS = 10


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the working tree, built without build isolation (this environment's setuptools, offline)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in PACKAGED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, tree / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(tree)], check=True, capture_output=True)
    [built] = out.glob("ches_curate-*.whl")
    return built


def test_the_wheel_installs_one_import_name_with_every_module_configs_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"ches_curate"}
    expected = {f"{INSTALLED_AS[folder]}/{path.relative_to(REPO / folder).as_posix()}"
                for folder in INSTALLED_AS for path in (REPO / folder).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".yaml", ".jsonl")}
    assert expected - set(names) == set()
    assert "ches_curate/pipelines/configs/demo.yaml" in names
    assert "ches_curate/data/hh_rlhf_harmless_sample.jsonl" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


USER_STEPS = '''
import datasets
import pandas as pd
from zenml import step


@step
def load_pairs(path: str) -> pd.DataFrame:
    return pd.read_json(path, lines=True)


@step
def count_kept(curated: datasets.Dataset) -> int:
    return len(curated)
'''

USER_PIPELINES = '''
from zenml import pipeline

from ches_curate.pipelines.steps import curate_table, score_table
from steps.user_steps import count_kept, load_pairs


@pipeline(enable_cache=False)
def user_pipeline(path: str, model: str) -> None:
    pairs = load_pairs(path)
    scores = score_table(pairs, dataset="user_toy", model=model, scoring={"model": model, "batch_size": 4,
                                                                          "device": "cpu"})
    curated = curate_table(scores, policy={"name": "percentile", "params": {"p": %d}})
    count_kept(curated)
''' % P_CUT

RUN_USER_PIPELINE = '''
import json, sys
import ches_curate
from ches_curate.cli import main
from zenml.client import Client
from zenml.steps.base_step import BaseStep
from zenml.utils import source_utils

from pipelines.user_pipeline import user_pipeline

config, path, model = sys.argv[1:]
sys.argv = ["ches-curate", "run", "curation", "--config", config]
try:
    main()  # the CLI, in this process: one start-up of ZenML and torch for both runs
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
run = user_pipeline(path=path, model=model)
runs = [run, Client().get_pipeline("curation_pipeline").last_run]
sources = {}
for each in runs:
    each = Client().get_pipeline_run(each.id)
    for name, step_run in each.steps.items():
        loaded = BaseStep.load_from_source(step_run.spec.source)  # what a remote step entrypoint does
        sources[name] = [step_run.spec.source.import_path, loaded.name]
    sources[each.pipeline.name] = [each.snapshot.pipeline_spec.source.import_path,
                                   source_utils.load(each.snapshot.pipeline_spec.source).name]
steps = Client().get_pipeline_run(run.id).steps
print(json.dumps({
    "ches_curate": ches_curate.__file__, "status": str(run.status.value), "sources": sources,
    "scores": steps["score_table"].outputs["ches_scores"][0].load()[["pair_id", "ches"]].to_dict("list"),
    "n_kept": steps["count_kept"].output.load(),
    "curated_columns": steps["curate_table"].outputs["curated_dataset"][0].load().column_names,
}))
'''


@pytest.fixture(scope="module")
def user_project(tmp_path_factory, wheel) -> tuple[Path, dict[str, str]]:
    """A ZenML project with its own `pipelines`, `steps` and `plugins` packages, and the environment that runs
    its commands with ches-curate from the wheel (first on PYTHONPATH) and the project as the ZenML repository."""
    project = tmp_path_factory.mktemp("user_project")
    site = tmp_path_factory.mktemp("wheel_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    for package, module, code in (("pipelines", "user_pipeline", USER_PIPELINES), ("steps", "user_steps", USER_STEPS),
                                  ("plugins", "user_plugins", "")):
        (project / package).mkdir()
        (project / package / "__init__.py").write_text("", encoding="utf-8")
        (project / package / f"{module}.py").write_text(code, encoding="utf-8")
    (project / "configs" / "data").mkdir(parents=True)
    write_jsonl(project / "configs" / "data" / "pairs.jsonl", toy_records(0, N_PAIRS))
    write_jsonl(project / "user_pairs.jsonl", toy_records(100, N_PAIRS))
    (project / "run_user_pipeline.py").write_text(RUN_USER_PIPELINE, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(project), str(site)]),
               ZENML_REPOSITORY_PATH=str(project))
    subprocess.run([sys.executable, "-c", "from zenml.client import Client; Client.initialize()"], cwd=project,
                   env=env, check=True, capture_output=True)
    return project, env


def in_project(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)


def cli(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return in_project(project, env, "-m", "ches_curate.cli", *args)


def test_in_a_user_project_the_wheel_lists_its_policies_despite_the_users_plugins_package(user_project):
    project, env = user_project
    result = cli(project, env, "policies")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {"percentile", "top-k", "length-normalized"} <= set(re.findall(r"[a-z][a-z-]+", result.stdout))
    where = in_project(project, env, "-c", "import ches_curate, pipelines; print(ches_curate.__file__); "
                       "print(pipelines.__file__)").stdout.split()
    assert where == [str(Path(env["PYTHONPATH"].split(os.pathsep)[1]) / "ches_curate" / "__init__.py"),
                     str(project / "pipelines" / "__init__.py")]


@pytest.mark.slow
def test_in_a_user_project_the_cli_and_a_user_pipeline_run_and_zenml_loads_every_step(user_project, tiny_llama_dir):
    project, env = user_project
    config = {"store": "store.duckdb", "dataset": {"name": "toy", "source": "data/pairs.jsonl"},
              "scoring": {"model": str(tiny_llama_dir), "batch_size": 4, "device": "cpu"},
              "policy": {"name": "percentile", "params": {"p": P_CUT}}, "export": "out/{dataset}_v{version}.parquet"}
    (project / "configs" / "small.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    user = in_project(project, dict(env, ZENML_LOGGING_VERBOSITY="INFO"), "run_user_pipeline.py",
                      "configs/small.yaml", "user_pairs.jsonl", str(tiny_llama_dir))  # INFO: as a user's project logs
    assert user.returncode == 0, user.stdout[-3000:] + user.stderr[-5000:]
    assert "zenml login --local" in user.stdout and "make dashboard" not in user.stdout  # the CLI's summary
    assert (project / "store.duckdb").exists() and (project / "out" / "toy_v1.parquet").exists()
    assert "Skipping registering function" not in user.stdout + user.stderr
    found = json.loads(user.stdout.strip().splitlines()[-1])
    assert found["status"] == "completed" and found["ches_curate"].startswith(env["PYTHONPATH"].split(os.pathsep)[1])
    sources = found["sources"]
    assert sources["load_pairs"] == ["steps.user_steps.load_pairs", "load_pairs"]
    assert sources["user_pipeline"] == ["pipelines.user_pipeline.user_pipeline", "user_pipeline"]
    library = {name: path for name, (path, _) in sources.items() if name not in (
        "load_pairs", "count_kept", "user_pipeline")}
    assert library["score_table"] == "ches_curate.pipelines.steps.score_table"
    assert library["curation_pipeline"] == "ches_curate.pipelines.curation.curation_pipeline"
    assert {"ingest_dataset", "validate_pairs", "score_pairs", "select_pairs", "export_curated"} <= set(library)
    assert all(path.startswith("ches_curate.pipelines.") for path in library.values())
    assert all(loaded == name for name, (_, loaded) in sources.items() if not name.endswith("_pipeline"))

    scores = found["scores"]
    assert sorted(scores["pair_id"]) == sorted(pair_id(r) for r in toy_records(100, N_PAIRS))
    assert found["n_kept"] == int(np.sum(np.array(scores["ches"]) <= np.percentile(scores["ches"], P_CUT)))
    assert found["curated_columns"][:3] == ["prompt", "chosen", "rejected"]


def test_schedule_dry_run_in_a_user_project_uses_the_shipped_dev_config(user_project):
    project, env = user_project
    result = cli(project, env, "schedule", "--pipeline", "refresh", "--cron", "0 3 * * *", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = Path(env["PYTHONPATH"].split(os.pathsep)[1]) / "ches_curate" / "pipelines" / "configs" / "dev.yaml"
    assert f"--config {shipped}" in result.stdout


def test_outside_the_checkout_a_shipped_config_by_name_and_relative_sources_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = PipelineConfig.from_file("demo").resolved()
    assert find_config("demo") == REPO / "pipelines" / "configs" / "demo.yaml"
    assert Path(demo.dataset.source) == REPO / "ches_curate" / "data" / "hh_rlhf_harmless_sample.jsonl"
    assert demo.store == str(tmp_path / "ches_curate.duckdb")  # outputs go where the command runs

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    write_jsonl(elsewhere / "data" / "pairs.jsonl", toy_records(0, 2))
    (elsewhere / "curate.yaml").write_text(yaml.safe_dump(
        {"dataset": {"name": "toy", "source": "data/pairs.jsonl"}, "export": "out/{dataset}.parquet"}))
    config = PipelineConfig.from_file(elsewhere / "curate.yaml").resolved()
    assert config.dataset.source == str(elsewhere / "data" / "pairs.jsonl")
    assert config.export == str(tmp_path / "out" / "{dataset}.parquet")
    with pytest.raises(Exception, match="shipped configs: .*demo.*dev"):
        find_config("no_such_config")


def declared_ranges() -> dict[str, Requirement]:
    """Every requirement pyproject.toml declares (core and extras), by canonical name; self-references skipped."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    requirements = [Requirement(r) for r in declared]
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) != "ches-curate"}


def pins() -> dict[str, str]:
    """The pins of requirements.txt and the Makefile's `--no-deps` installs, by canonical name."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    lines += re.findall(r"--no-deps (\S+==\S+)", (REPO / "Makefile").read_text())
    found = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            [spec] = requirement.specifier
            assert spec.operator == "==", f"requirements.txt: {line!r} is not a pin"
            found[canonicalize_name(requirement.name)] = spec.version
    return found


def test_every_pin_satisfies_the_range_pyproject_declares_and_every_declared_package_is_pinned():
    declared, pinned = declared_ranges(), pins()
    assert set(declared) - set(pinned) == set()
    wrong = {name: (pinned[name], str(req.specifier)) for name, req in declared.items()
             if not req.specifier.contains(pinned[name], prereleases=True)}
    assert wrong == {}
    assert all(str(req.specifier) for name, req in declared.items()), "every declared dependency has a lower bound"
