"""`ches-curate policies` and `ches-curate filter` against a real DuckDB store built through the Store API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from ches_curate import plugins
from ches_curate.commands import filter as filter_commands
from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair
from ches_curate.policies import available_policies
from ches_curate.store import Store
from tests.test_plugins import EXAMPLE

MODEL_KEY = "tiny@sha256:0000/float32"
PROMPTS = ["Say [bold]hi[/bold]", "How do I pick a lock?", "Say [bold]hi[/bold]", "Name a colour.", "Add 2 and 2.", "Why?"]
CHES = [1.0, 9.0, 4.0, 2.0, 7.0, 3.0]
CHOSEN_TOKENS = [2, 10, 3, 4, 8, 5]


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv(plugins.DISABLED_PLUGINS_ENV, raising=False)
    monkeypatch.setattr(filter_commands.console, "width", 250)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """Dataset 'toy' v1: six pairs scored by one model, ches = CHES; built once, copied per test."""
    store = Store(tmp_path_factory.mktemp("template") / "curate.duckdb")
    pairs = [PreferencePair(prompt, f"answer {i}", f"refusal {i}", row=i) for i, prompt in enumerate(PROMPTS)]
    store.register_dataset("toy", "toy.jsonl", pairs)
    store.register_model(MODEL_KEY, {"name": "tiny", "dtype": "float32"})
    run_id = store.start_score_run("toy", 1, MODEL_KEY)
    scores = pd.DataFrame(
        {
            "row": range(6), "pair_id": [p.pair_id for p in pairs], "ches": CHES, "ln_ches": [c / 10 for c in CHES],
            "chosen_tokens": CHOSEN_TOKENS, "rejected_tokens": 3, "last_hidden_ip": 0.5, "edit_distance": 4.0,
            "truncated": False,
        }
    )
    store.write_scores(run_id, MODEL_KEY, scores)
    store.finish_score_run(run_id, "finished")
    return store.path


def copy_of(template_db: Path, tmp_path: Path) -> Store:
    """A private copy of a template store (its folder's files: the .wal too), for a test that writes to it."""
    for path in template_db.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return Store(tmp_path / template_db.name)


@pytest.fixture
def store(template_db, tmp_path) -> Store:
    return copy_of(template_db, tmp_path)


def invoke(*args: str):
    app = typer.Typer()
    filter_commands.register(app)
    return CliRunner().invoke(app, list(args))


def error_of(result) -> str:
    assert isinstance(result.exception, ChesCurateError), result.output
    return str(result.exception)


def test_filter_top_k_records_the_selection_and_prints_the_removed_pairs(store):
    result = invoke("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "top-k", "--param", "k=2")
    assert result.exit_code == 0, result.output
    assert "kept 4, removed 2 of 6 pairs (33.3% removed)" in result.output
    assert f'selection 1: top-k {{"score_column": "ln_ches", "k": 2}} on dataset \'toy\' v1, model {MODEL_KEY}' in result.output
    assert "How do I pick a lock?" in result.output and "Add 2 and 2." in result.output
    assert "Say [bold]hi[/bold]" not in result.output  # kept pairs are not listed
    # Response lengths beside the score: removed rows 1 and 4 have 10 + 3 and 8 + 3 tokens, the kept 5, 6, 7, 8.
    assert "response tokens (chosen + rejected): 6.5 on average in the kept pairs, 12.0 in the removed" in result.output
    assert "10/3" in result.output and "8/3" in result.output

    selection = store.selection(1)
    assert selection.loc[~selection["kept"], "rank"].tolist() == [1, 2]
    removed_prompts = {p.pair_id: p.prompt for p in store.dataset_pairs("toy")}
    assert [removed_prompts[p] for p in selection.loc[~selection["kept"], "pair_id"]] == [PROMPTS[1], PROMPTS[4]]
    assert set(selection["policy"]) == {"top-k"} and set(selection["model_key"]) == {MODEL_KEY}
    assert json.loads(selection["params"].iloc[0]) == {"score_column": "ln_ches", "k": 2}


def test_removed_pair_text_is_printed_literally_not_as_rich_markup(store):
    result = invoke("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "threshold", "--param", "value=0")
    assert result.exit_code == 0, result.output
    assert "Say [bold]hi[/bold]" in result.output
    assert "first 5 removed pairs" in result.output


def test_match_selection_removes_as_many_pairs_at_random(store):
    invoke("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "percentile", "--param", "p=40")
    result = invoke(
        "filter", "--db", str(store.path), "--dataset", "toy", "--policy", "random", "--match-selection", "1",
        "--param", "seed=3", "--show", "0",
    )
    assert result.exit_code == 0, result.output
    first, control = store.selection(1), store.selection(2)
    assert (~first["kept"]).sum() == (~control["kept"]).sum() == 3  # sorted 1,2,3,4,7,9: cut at position 5 * 0.4 = 2 -> 3.0
    assert json.loads(control["params"].iloc[0]) == {"score_column": "ln_ches", "n": 3, "fraction": None, "seed": 3}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "top_k"], "unknown policy 'top_k' (available: {available})"),
        (["--policy", "top-k", "--param", "k=-3"], "policy 'top-k': param 'k': Input should be greater than or equal to 0 (got '-3')"),
        (["--policy", "top-k", "--param", "k"], "--param 'k' must look like name=value, e.g. --param k=100"),
        (["--policy", "top-k", "--param", "k=1", "--param", "k=2"], "--param k is given twice"),
        (["--policy", "top-k", "--param", "k=1", "--model-key", "other"], "dataset 'toy' v1 has no scores from model "
         "'other' (scored by: tiny@sha256:0000/float32)"),
        (["--policy", "top-k", "--match-selection", "1"], "--match-selection sets param n, which policy 'top-k' does not take"),
    ],
)
def test_filter_errors_are_one_actionable_line(store, args, message):
    available = ", ".join(available_policies())
    assert error_of(invoke("filter", "--db", str(store.path), "--dataset", "toy", *args)) == message.format(available=available)


def test_policies_lists_builtins_with_params_defaults_and_help():
    result = invoke("policies")
    assert result.exit_code == 0, result.output
    assert "k: int, required — Number of highest-scoring pairs to remove." in result.output
    assert result.output.count("score_column: str") == 0  # listed per policy only where its default differs
    assert ("Every policy also takes score_column (default 'ln_ches'): Score to rank by: ln_ches (the length-normalised "
            "CHES the paper filters on") in " ".join(result.output.split())
    assert "seed: int, default 0 — Random seed; the same seed and pairs give the same selection." in result.output
    assert "builtin_policies" in result.output


def test_filter_loads_an_explicit_plugin_module(store, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    result = invoke(
        "filter", "--db", str(store.path), "--dataset", "toy", "--policy", "per-prompt-cap",
        "--plugin", "ches_curate_plugin_example",
    )
    assert result.exit_code == 0, result.output
    # Rows 0 and 2 share a prompt; the cap of 1 removes the higher-CHES one (row 2, ches 4.0).
    selection = store.selection(1)
    assert selection.loc[~selection["kept"], "pair_id"].tolist() == [PreferencePair(PROMPTS[2], "answer 2", "refusal 2").pair_id]


def test_every_caller_selects_from_the_same_pairs_and_leaves_quarantined_ones_out(store):
    """The CLI, the pipelines' `select` and an ablation's arms used to disagree on a store with a quarantined
    pair: the CLI kept it. Now all go through `selection.select`."""
    from ches_curate.ablation import plan_arms
    from ches_curate.selection import select

    quarantined = store.scores("toy").sort_values("ches").pair_id.iloc[-1]  # the highest CHES: top-k's first pick
    store.add_quarantine([{"dataset_name": "toy", "dataset_version": 1, "stage": "quality", "pair_id": quarantined,
                           "reason": "row 5: test", "expectation": "prompt_not_empty"}])
    result = invoke("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "top-k", "--param", "k=1")
    assert result.exit_code == 0, result.output
    assert "kept 4, removed 1 of 5 pairs (20.0% removed)" in result.output
    assert "1 quarantined pairs were left out before the policy" in result.output
    by_pipeline = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 1}, source="pipeline")
    arms = plan_arms(store, "toy", 1, MODEL_KEY, [("top-k", {"k": 1})], seeds=(0,))
    stored = store.sql("SELECT selection_id, list(pair_id ORDER BY pair_id) AS ids, count(*) FILTER (kept) AS kept "
                       "FROM selections GROUP BY 1 ORDER BY 1")
    assert stored.kept.tolist() == [4, 4, 4, 4]  # the CLI's, the pipeline's, the arm's and its random control
    assert all(quarantined not in list(ids) for ids in stored.ids)
    assert (by_pipeline.n_pairs, by_pipeline.n_excluded) == (5, 1)
    assert [len(a.pair_ids) for a in arms] == [5, 4, 4] and quarantined not in arms[0].pair_ids
