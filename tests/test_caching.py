"""ZenML's cache for the pipelines: keyed on the store's identity and the files each step reads
(`ches_curate.pipelines.caching`), so an unchanged re-run is served from the cache and a replaced store is not."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from zenml.enums import ExecutionStatus
from zenml.utils import source_utils

from ches_curate.pipeline_config import PipelineConfig
from ches_curate.pipelines import caching
from ches_curate.pipelines.curation import curation_outcome
from ches_curate.store import Store
from tests import test_pipelines
from tests.test_pipelines import toy_records, write_jsonl

zenml_repo = test_pipelines.zenml_repo
"""The session's temporary ZenML repository (a fixture of test_pipelines)."""
N_PAIRS = 6
CACHED = ("ingest_dataset", "validate_pairs", "score_pairs", "validate_scores", "select_pairs")


def test_the_cache_function_is_named_for_what_it_reads_and_changes_with_it(tmp_path):
    source = tmp_path / "pairs.jsonl"
    write_jsonl(source, toy_records(0, 2))
    policy = caching.reads(str(tmp_path / "s.duckdb"), str(source), "owner/hub-dataset")
    assert policy.cache_func.module == "ches_curate.pipelines.caching"
    cache_func = source_utils.load(policy.cache_func)  # as ZenML loads it, in any process
    first = cache_func()
    store, files = json.loads(first)
    assert store.startswith(f"{tmp_path / 's.duckdb'}@") and files[0] == caching.file_state(str(source))
    assert files[1].startswith("not local")  # a hub id: a fresh key each time
    write_jsonl(source, toy_records(0, 3))
    assert json.loads(cache_func())[1][0] == caching.file_state(str(source)) != files[0]
    assert json.loads(cache_func())[0] == store  # the same store


def statuses(run) -> dict[str, ExecutionStatus]:
    return {name: step.status for name, step in run.steps.items()}


@pytest.mark.slow
def test_an_unchanged_rerun_is_cached_and_a_replaced_store_runs_again(zenml_repo, tiny_llama_dir, tmp_path):
    from ches_curate.pipelines import run_pipeline

    write_jsonl(tmp_path / "pairs.jsonl", toy_records(0, N_PAIRS))
    config = {"store": "cached.duckdb", "dataset": {"name": "cached_toy", "source": "pairs.jsonl"},
              "scoring": {"model": str(tiny_llama_dir), "batch_size": 4, "device": "cpu"},
              "export": str(tmp_path / "out" / "{dataset}.parquet")}
    (tmp_path / "cached.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    loaded = PipelineConfig.from_file(tmp_path / "cached.yaml").resolved(tmp_path)

    first = run_pipeline("curation", loaded)
    again = run_pipeline("curation", loaded)
    assert all(status == ExecutionStatus.COMPLETED for status in statuses(first).values())
    assert {name: statuses(again)[name] for name in CACHED} == {name: ExecutionStatus.CACHED for name in CACHED}
    assert statuses(again)["export_curated"] == ExecutionStatus.COMPLETED  # writes a file: never cached
    assert Store(tmp_path / "cached.duckdb").sql("SELECT count(*) AS n FROM score_runs").n.iloc[0] == 1
    assert curation_outcome(again)["selection"] == curation_outcome(first)["selection"]  # what the CLI prints
    assert (curation_outcome(first)["cached_steps"], curation_outcome(again)["cached_steps"]) == ([], list(CACHED))

    os.remove(tmp_path / "cached.duckdb")
    rebuilt = run_pipeline("curation", loaded)
    assert all(status == ExecutionStatus.COMPLETED for status in statuses(rebuilt).values())
    store = Store(tmp_path / "cached.duckdb")
    assert store.sql("SELECT n_scored FROM score_runs").n_scored.tolist() == [N_PAIRS]
