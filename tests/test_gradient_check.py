"""gradient_ches against a float64 autograd computation, rank_agreement against scipy, and `check-ches`."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from ches_curate.gradient_check import gradient_ches, rank_agreement, sample_pairs, verdict
from ches_curate.pairs import PreferencePair
from ches_curate.tokenization import encode_pair
from tests.reliability_helpers import run_cli, write_synthetic_pairs

PAIRS = [
    PreferencePair("What is the capital of France?", "Paris.", "Lyon, I think.", row=0),
    PreferencePair("Write a haiku about rain.", "Soft rain on the roof", "Rain is wet.", row=1),
    PreferencePair([{"role": "user", "content": "Is the sky blue?"}], "No", "Never", row=2),
]


def float64_reference(loaded, pair: PreferencePair, prefixes: tuple[str, ...] = ("",),
                      max_length: int | None = None) -> tuple[float, float]:
    """(<g+, g->, ||g+||^2) from a float64 copy of the model, flattened gradients, cross-entropy with masked labels."""
    model = copy.deepcopy(loaded.model).double().eval()
    tokens = encode_pair(loaded.tokenizer, pair, max_length)
    weights = [p for name, p in model.named_parameters() if name.startswith(prefixes)]

    def gradient(response_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens.prompt_ids + response_ids])
        labels = ids.clone()
        labels[0, :len(tokens.prompt_ids)] = -100
        logits = model(input_ids=ids).logits[0, :-1]
        logp = -torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
        grads = torch.autograd.grad(logp, weights, allow_unused=True)
        return torch.cat([(torch.zeros_like(w) if g is None else g).reshape(-1) for w, g in zip(weights, grads)])

    g_plus, g_minus = gradient(tokens.chosen_ids), gradient(tokens.rejected_ids)
    return float(g_plus @ g_minus), float(g_plus @ g_plus)


def test_gradient_ches_equals_a_float64_autograd_computation(llama):
    frame = gradient_ches(llama, PAIRS)
    assert list(frame["pair_id"]) == [p.pair_id for p in PAIRS]
    for pair, row in zip(PAIRS, frame.itertuples()):
        inner, plus_sq = float64_reference(llama, pair)
        assert row.grad_inner == pytest.approx(inner, rel=1e-4, abs=1e-6 * plus_sq)
        assert row.grad_plus_sq == pytest.approx(plus_sq, rel=1e-4)
        assert row.gradient_ches == pytest.approx(inner - plus_sq, rel=1e-4, abs=1e-6 * plus_sq)
        assert plus_sq > 0


def test_gradient_ches_over_a_parameter_subset_uses_only_those_parameters(llama):
    subset = ("lm_head", "model.norm")
    frame = gradient_ches(llama, PAIRS[:1], params=list(subset))
    inner, plus_sq = float64_reference(llama, PAIRS[0], subset)
    everything = gradient_ches(llama, PAIRS[:1])
    assert frame.loc[0, "grad_plus_sq"] == pytest.approx(plus_sq, rel=1e-4)
    assert frame.loc[0, "grad_inner"] == pytest.approx(inner, rel=1e-4, abs=1e-6 * plus_sq)
    assert frame.loc[0, "grad_plus_sq"] < everything.loc[0, "grad_plus_sq"]


def test_gradient_ches_uses_the_truncated_ids_of_encode_pair(llama):
    pair = PAIRS[1]
    max_length = len(encode_pair(llama.tokenizer, pair).prompt_ids) + 2
    assert encode_pair(llama.tokenizer, pair, max_length).truncated
    truncated = gradient_ches(llama, [pair], max_length=max_length)
    inner, plus_sq = float64_reference(llama, pair, max_length=max_length)
    assert truncated.loc[0, "grad_plus_sq"] == pytest.approx(plus_sq, rel=1e-4)
    assert truncated.loc[0, "grad_inner"] == pytest.approx(inner, rel=1e-4, abs=1e-6 * plus_sq)
    assert truncated.loc[0, "grad_plus_sq"] != pytest.approx(gradient_ches(llama, [pair]).loc[0, "grad_plus_sq"])


def test_rank_agreement_equals_scipy_spearman_and_counts_the_top_decile():
    rng = np.random.default_rng(0)
    target = rng.normal(size=40)
    frame = pd.DataFrame({
        "gradient_ches": target,
        "ches": target + rng.normal(scale=0.5, size=40),
        "ln_ches": np.round(rng.normal(size=40), 1),  # ties
        "edit_distance": -target,  # negated by rank_agreement: a perfect ranker
        "last_hidden_ip": rng.normal(size=40),
    })
    agreement = rank_agreement(frame).set_index("score")
    for score, sign in [("ches", 1), ("ln_ches", 1), ("edit_distance", -1), ("last_hidden_ip", 1)]:
        expected = spearmanr(frame["gradient_ches"], sign * frame[score]).statistic
        assert agreement.loc[score, "spearman"] == pytest.approx(expected, abs=1e-12)
        top_target = set(np.argsort(-frame["gradient_ches"].to_numpy())[:4])
        top_score = set(np.argsort(-(sign * frame[score]).to_numpy(), kind="stable")[:4])
        assert agreement.loc[score, "top_decile_precision"] == len(top_target & top_score) / 4
    assert agreement.loc["edit_distance", "spearman"] == pytest.approx(1.0)
    assert agreement.loc["edit_distance", "top_decile_precision"] == 1.0
    assert (agreement["n_pairs"] == 40).all()


def test_verdict_names_the_ches_spearman():
    agreement = pd.DataFrame({"score": ["ches", "ln_ches"], "spearman": [0.62, 0.7]})
    assert verdict(agreement) == ("CHES ranks pairs like the gradient quantity: Spearman 0.62; best: ln_ches (0.70)")
    agreement["spearman"] = [0.05, math.nan]
    assert verdict(agreement).startswith("CHES does not rank pairs like the gradient quantity")


def test_sample_pairs_is_seeded_and_keeps_input_order():
    pairs = [PreferencePair(f"p{i}", "a", "b", row=i) for i in range(50)]
    first, again = sample_pairs(pairs, 10, seed=3), sample_pairs(pairs, 10, seed=3)
    assert first == again and len(first) == 10
    assert [p.row for p in first] == sorted(p.row for p in first)
    assert sample_pairs(pairs, 10, seed=4) != first
    assert sample_pairs(pairs, 100) == pairs


def test_check_ches_cli_prints_the_table_and_the_verdict(tiny_llama_dir, tmp_path):
    path = write_synthetic_pairs(tmp_path / "pairs.jsonl", 14, width=20)
    run = run_cli("check-ches", path, "--model", tiny_llama_dir, "--sample", 12, "--device", "cpu")
    assert run.code == 0, run.output
    for score in ("ches", "ln_ches", "edit_distance", "last_hidden_ip", "spearman", "top_decile_precision"):
        assert score in run.output
    assert "12 pairs" in run.output
    assert "ranks pairs" in run.output and "Spearman" in run.output


def test_check_ches_cli_reads_a_stored_dataset(tiny_llama_dir, tmp_path):
    db = tmp_path / "s.duckdb"
    path = write_synthetic_pairs(tmp_path / "pairs.jsonl", 12, width=20)
    assert run_cli("ingest", path, "--dataset", "syn", "--db", db).code == 0
    run = run_cli("check-ches", "--dataset", "syn", "--db", db, "--model", tiny_llama_dir, "--sample", 5,
                  "--device", "cpu")
    assert run.code == 0, run.output
    assert "5 pairs" in run.output and "Spearman" in run.output


def test_check_ches_cli_needs_exactly_one_source(tiny_llama_dir):
    run = run_cli("check-ches", "--model", tiny_llama_dir)
    assert run.code == 1 and "give an INPUT file or --dataset NAME" in run.stderr
