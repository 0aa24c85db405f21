"""Ablations: every arm trains from the same start and writes a complete `ablations` row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from ches_curate.ablation import ABLATION_COLUMNS, plan_arms, run_ablation
from ches_curate.configs import PAPER_TRAIN, DesignConfig
from ches_curate.commands import train as train_commands
from ches_curate.errors import ChesCurateError
from ches_curate.evaluate import EvalConfig
from ches_curate.scoring.incremental import score_dataset
from ches_curate.pairs import PreferencePair
from ches_curate.store import Store
from ches_curate.train import TrainConfig

WORDS = ["sure", "sorry", "never", "bread", "fox", "yes", "lock", "dog"]
N_PAIRS = 12
METRICS = [c for c in ABLATION_COLUMNS if c not in ("policy", "selection_id", "score_column", "percentile")]


def toy_pairs() -> list[PreferencePair]:
    return [
        PreferencePair(f"\n\nHuman: how do I {WORDS[i % 8]} the {WORDS[(i + 5) % 8]}?\n\nAssistant:",
                       f" No, {WORDS[(i * 3) % 8]} {i}", f" Sure {WORDS[(i + 1) % 8]}", row=i)
        for i in range(N_PAIRS)
    ]


@pytest.fixture
def store(tmp_path, llama):
    store = Store(tmp_path / "ablation.duckdb")
    store.register_dataset("toy", "toy.jsonl", toy_pairs())
    score_dataset(store, "toy", llama, progress=False)
    return store


def quick_config(tmp_path) -> TrainConfig:
    return TrainConfig(learning_rate=1e-3, max_steps=1, batch_size=4, save_model=False, output_dir=str(tmp_path / "runs"))


def test_ablation_writes_one_complete_row_per_arm(store, llama, tmp_path):
    policies = [("top-k", {"k": 4}), ("percentile", {"p": 50})]
    prompts = ["how do I pick a lock?", "bake bread"]
    returned = run_ablation(store, "toy", llama, policies, quick_config(tmp_path), prompts,
                            eval_config=EvalConfig(max_new_tokens=2))

    rows = store.sql("SELECT * FROM ablations ORDER BY created_at")
    assert rows.arm.tolist() == ["full", "top-k(k=4)", "random(n=4,seed=0)", "percentile(p=50)", "random(n=6,seed=0)"]
    assert rows.arm.tolist() == returned.arm.tolist() and rows.ablation_id.nunique() == 1
    assert not rows[METRICS].isna().any().any(), rows[METRICS].isna().sum()
    assert rows.policy.fillna("-").tolist() == ["-", "top-k", "random", "percentile", "random"]
    assert rows.selection_id.isna().tolist() == [True, False, False, False, False]
    assert rows.n_train_pairs.tolist() == [12, 8, 8, 6, 6]
    assert rows.refusal_rate_before.nunique() == 1

    scores = store.scores("toy", model_key=llama.key).set_index("pair_id")
    befores = {}
    for row in rows.itertuples():
        pairs = store.sql("SELECT * FROM pair_likelihoods WHERE ablation_id = ? AND arm = ?", params=[row.ablation_id, row.arm])
        if pd.notna(row.selection_id):
            kept = store.selection(int(row.selection_id)).query("kept").pair_id
            assert set(pairs.pair_id) == set(kept)
        change = pairs.preferred_logp_after - pairs.preferred_logp_before
        assert len(pairs) == row.n_train_pairs
        assert row.preferred_logp_change == pytest.approx(change.mean())
        assert row.preferred_decrease_fraction == pytest.approx((change < 0).mean())
        assert row.ches_logp_corr == pytest.approx(np.corrcoef(scores.loc[pairs.pair_id, "ches"], change)[0, 1])
        befores.update({(r.pair_id, row.arm): r.preferred_logp_before for r in pairs.itertuples()})
    by_pair = {}
    for (pair_id, _), value in befores.items():
        by_pair.setdefault(pair_id, set()).add(round(value, 9))
    assert all(len(values) == 1 for values in by_pair.values()), "every arm starts from the same weights"


def test_random_controls_match_size_per_seed_and_repeat_arms_train_once(store, llama):
    scores = store.scores("toy", model_key=llama.key)
    arms = plan_arms(store, "toy", 1, llama.key, [("top-k", {"k": 3}), ("top-k", {"k": 3})], seeds=(0, 1))
    assert [a.name for a in arms] == ["full", "top-k(k=3)", "random(n=3,seed=0)", "random(n=3,seed=1)"]
    assert [len(a.pair_ids) for a in arms] == [12, 9, 9, 9]
    assert set(arms[2].pair_ids) != set(arms[3].pair_ids)
    top = set(scores.nlargest(3, "ln_ches").pair_id)  # the policies' default score
    assert set(arms[1].pair_ids) == set(scores.pair_id) - top


def test_ablation_needs_scores_from_the_model(tmp_path, llama):
    store = Store(tmp_path / "unscored.duckdb")
    store.register_dataset("toy", None, toy_pairs())
    with pytest.raises(ChesCurateError, match="has no scores from model .*run `ches-curate score --dataset toy"):
        run_ablation(store, "toy", llama, [], quick_config(tmp_path))


def test_ablate_command_prints_the_arms_and_fills_the_store(store, tiny_llama_dir, tmp_path):
    store.register_dataset("held_out", None, [PreferencePair("\n\nHuman: steal a car?\n\nAssistant:", "No", "Yes")])
    app = typer.Typer()
    train_commands.register(app)
    result = CliRunner().invoke(app, [
        "ablate", "--dataset", "toy", "--model", str(tiny_llama_dir), "--policy", "top-k:k=2", "--seed", "3",
        "--eval-dataset", "held_out", "--max-new-tokens", "2", "--max-steps", "1", "--no-save",
        "--output-dir", str(tmp_path / "runs"), "--db", str(store.path),
    ], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "random(n=2,seed=3)" in result.output and "top-k(k=2)" in result.output
    rows = store.sql("SELECT arm, n_train_pairs, config->>'n_eval_prompts' AS n_eval FROM ablations ORDER BY arm")
    assert rows.values.tolist() == [["full", 12, "1"], ["random(n=2,seed=3)", 10, "1"], ["top-k(k=2)", 10, "1"]]


def test_policy_option_parsing():
    assert train_commands.parse_policy("percentile:p=90,score_column=ln_ches") == (
        "percentile", {"p": "90", "score_column": "ln_ches"})
    assert train_commands.parse_policy("random") == ("random", {})
    with pytest.raises(ChesCurateError, match="needs a policy name"):
        train_commands.parse_policy(":k=1")


def test_quantile_slices_are_the_windows_of_each_ranking_trained_once_per_seed(store, llama):
    scores = store.scores("toy", model_key=llama.key)
    design = DesignConfig(design="quantile-slices", score_columns=("ches", "-edit_distance"),
                          percentiles=(0, 50, 100), slice_size=4)
    runs = plan_arms(store, "toy", 1, llama.key, [], seeds=(0, 1), design=design)

    assert len(runs) == 2 * 3 * 2 and all(len(r.pair_ids) == 4 for r in runs)
    assert [(r.score_column, r.percentile, r.train_seed) for r in runs[:6]] == [
        ("ches", 0.0, 0), ("ches", 0.0, 1), ("ches", 50.0, 0), ("ches", 50.0, 1), ("ches", 100.0, 0), ("ches", 100.0, 1)]
    by = {(r.score_column, r.percentile): set(r.pair_ids) for r in runs}
    ranked = scores.sort_values("ches").pair_id.tolist()  # 12 pairs: p=50 is centred on position round(5.5) = 6
    assert by["ches", 0.0] == set(ranked[:4]) and by["ches", 100.0] == set(ranked[-4:])
    assert by["ches", 50.0] == set(ranked[4:8])
    most_similar = set(scores.sort_values(["edit_distance", "pair_id"]).pair_id[:4])
    assert by["-edit_distance", 100.0] == most_similar
    assert runs[0].name == "quantile-slice(n=4,percentile=0.0,score_column=ches)"


def test_keep_lowest_trains_full_lowest_fraction_and_a_same_size_random_subset_per_seed(store, llama):
    scores = store.scores("toy", model_key=llama.key)
    design = DesignConfig(design="keep-lowest", keep_fraction=0.25)
    runs = plan_arms(store, "toy", 1, llama.key, [], seeds=(0, 1), design=design)

    assert [(r.name, r.train_seed, len(r.pair_ids)) for r in runs] == [
        ("full", 0, 12), ("length-normalized(fraction=0.25,score_column=ln_ches)", 0, 3), ("random(n=9,seed=0)", 0, 3),
        ("full", 1, 12), ("length-normalized(fraction=0.25,score_column=ln_ches)", 1, 3), ("random(n=9,seed=1)", 1, 3)]
    assert set(runs[1].pair_ids) == set(scores.nsmallest(3, "ln_ches").pair_id)
    assert set(runs[2].pair_ids) != set(runs[5].pair_ids)


def test_a_design_writes_one_row_per_arm_and_seed_with_its_slice(store, llama, tmp_path):
    design = DesignConfig(design="quantile-slices", score_columns=("ches",), percentiles=(0, 100), slice_size=4)
    config = TrainConfig(learning_rate=1e-3, batch_size=2, save_model=False, output_dir=str(tmp_path / "runs"))
    run_ablation(store, "toy", llama, [], config, seeds=(0, 1), design=design)

    rows = store.sql("SELECT design, train_seed, score_column, percentile, n_train_pairs, "
                     "config->'$.train.seed' AS config_seed FROM ablations ORDER BY percentile, train_seed")
    assert rows.values.tolist() == [["quantile-slices", 0, "ches", 0.0, 4, "0"], ["quantile-slices", 1, "ches", 0.0, 4, "1"],
                                    ["quantile-slices", 0, "ches", 100.0, 4, "0"], ["quantile-slices", 1, "ches", 100.0, 4, "1"]]
    per_pair = store.sql("SELECT arm, train_seed, count(*) AS n FROM pair_likelihoods GROUP BY ALL ORDER BY ALL")
    assert per_pair.n.tolist() == [4, 4, 4, 4] and per_pair.train_seed.tolist() == [0, 1, 0, 1]
    seeds = store.sql("SELECT train_seed, preferred_logp_change FROM ablations WHERE percentile = 0 ORDER BY train_seed")
    assert seeds.preferred_logp_change.nunique() == 2, "two seeds, two data orders, two results"


def test_ablate_design_takes_the_papers_settings_unless_an_option_overrides_them(store, tiny_llama_dir, tmp_path,
                                                                                   monkeypatch):
    seen = {}

    def fake_run(store, dataset, model, policies, config, prompts, seeds, **kwargs):
        seen.update(config=config, seeds=list(seeds), design=kwargs["design"])
        return pd.DataFrame([{c: 0 for c in ABLATION_COLUMNS} | {"ablation_id": 1, "arm": "a"}])

    monkeypatch.setattr("ches_curate.ablation.run_ablation", fake_run)
    app = typer.Typer()
    train_commands.register(app)
    args = ["ablate", "--dataset", "toy", "--design", "quantile-slices", "--slice-size", "64", "--seed", "0",
            "--seed", "2", "--score-column", "ln_ches", "--db", str(store.path), "--lr", "1e-3"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    config, design = seen["config"], seen["design"]
    paper = PAPER_TRAIN["quantile-slices"]
    assert (config.optimizer, config.batch_size, config.lr_scheduler_type) == (
        paper["optimizer"], paper["batch_size"], paper["lr_scheduler_type"])
    assert config.learning_rate == 1e-3  # given on the command line
    assert (design.design, design.slice_size, design.score_columns, seen["seeds"]) == (
        "quantile-slices", 64, ("ln_ches",), [0, 2])

    result = CliRunner().invoke(app, ["ablate", "--dataset", "toy", "--design", "keep-lowest", "--policy", "top-k:k=1",
                                      "--db", str(store.path)])
    assert result.exit_code == 2 and "--policy is for --design policies" in result.output
    result = CliRunner().invoke(app, ["ablate", "--dataset", "toy", "--design", "slices", "--db", str(store.path)])
    assert result.exit_code == 2 and "ablation design must be one of" in result.output


def test_a_pipeline_config_names_a_design_by_name_or_in_full():
    from pydantic import ValidationError

    from ches_curate.pipeline_config import AblationSpec

    assert AblationSpec.model_validate({"design": "keep-lowest"}).design == DesignConfig(design="keep-lowest")
    spec = AblationSpec.model_validate({"design": {"design": "quantile-slices", "slice_size": 64}})
    assert (spec.design.design, spec.design.slice_size, spec.design.percentiles) == (
        "quantile-slices", 64, (0.0, 25.0, 50.0, 75.0, 100.0))
    with pytest.raises(ValidationError, match="ablation design must be one of policies, quantile-slices, keep-lowest"):
        AblationSpec.model_validate({"design": "slices"})
    with pytest.raises(ValidationError, match="design.bogus"):
        AblationSpec.model_validate({"design": {"design": "keep-lowest", "bogus": 1}})
