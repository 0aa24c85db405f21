"""The paper-mode probe (Razin et al., Section 3): the single-token DPO loop, its flags, the sweep, storage, CLI."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from ches_curate.commands import train as train_commands
from ches_curate.evaluate import (
    ProbeConfig,
    _token_table,
    observed_risers,
    probe_sweep,
    run_probe,
    single_token_dpo_loss,
)
from ches_curate.store import Store
from ches_curate.tokenization import encode_prompt
from ches_curate.train import clone_model

PROMPT = "Is the sky blue?"


@pytest.fixture(scope="module")
def llama64(llama):
    """The tiny Llama in float64, so one RMSProp step can be checked against a hand computation."""
    return replace(llama, model=clone_model(llama.model).double())


def _token(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def test_single_token_dpo_loss_is_minus_log_sigmoid_of_the_beta_scaled_margin():
    logps, ref = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0]), 0), torch.log_softmax(torch.tensor([0.0, 0.5, 1.0]), 0)
    margin = (logps[2] - ref[2]) - (logps[0] - ref[0])
    expected = math.log1p(math.exp(-0.1 * margin.item()))
    assert single_token_dpo_loss(logps, ref, 2, 0, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_first_step_matches_a_hand_computation_of_loss_gradient_and_rmsprop_update(llama64):
    tokenizer, lr, beta = llama64.tokenizer, 1e-4, 0.1
    y_plus, y_minus = _token(tokenizer, "No"), _token(tokenizer, "yes")
    prompt_ids = encode_prompt(tokenizer, PROMPT)
    with torch.no_grad():
        out = llama64.model(torch.tensor([prompt_ids]), output_hidden_states=True)
    h, probs = out.hidden_states[-1][0, -1], torch.softmax(out.logits[0, -1], -1)
    # At the reference the margin is 0: loss = log 2, dL/dlogits = -(beta/2)(e+ - e-), so dL/dW = outer(., h):
    # rows y+ and y- only; RMSProp's first step (alpha 0.99) moves them by lr * g / sqrt(0.01 g^2) = 10 lr sign(g).
    grad = torch.zeros_like(llama64.model.lm_head.weight)
    grad[y_plus], grad[y_minus] = -beta / 2 * h, beta / 2 * h
    expected_step = -lr * grad / ((1 - 0.99) * grad**2).sqrt().add(1e-8)

    one = run_probe(llama64, PROMPT, "No", "yes", ProbeConfig(steps=1, learning_rate=lr, beta=beta, seeds=(0,)))[0]
    assert one.p_plus_before == pytest.approx(probs[y_plus].item(), rel=1e-12)
    assert one.p_minus_before == pytest.approx(probs[y_minus].item(), rel=1e-12)
    policy = clone_model(llama64.model)
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=lr)
    logps = torch.log_softmax(policy(torch.tensor([prompt_ids])).logits[0, -1], -1)
    loss = single_token_dpo_loss(logps, logps.detach(), y_plus, y_minus, beta)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    loss.backward()
    torch.testing.assert_close(policy.lm_head.weight.grad, grad, rtol=1e-9, atol=1e-12)
    before = policy.lm_head.weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(policy.lm_head.weight.detach() - before, expected_step, rtol=1e-6, atol=1e-15)
    with torch.no_grad():
        after = torch.log_softmax(policy(torch.tensor([prompt_ids])).logits[0, -1], -1)
    assert one.p_plus_after == pytest.approx(after[y_plus].exp().item(), rel=1e-9)
    assert one.final_loss == pytest.approx(single_token_dpo_loss(after, logps.detach(), y_plus, y_minus, beta).item(), rel=1e-9)
    w = llama64.model.lm_head.weight.detach()
    assert one.single_token_ches == pytest.approx((w[y_plus] @ w[y_minus] - w[y_plus] @ w[y_plus]).item())
    assert one.hidden_norm_sq == pytest.approx((h @ h).item())


def test_flags_follow_the_trajectory(llama):
    gentle, = run_probe(llama, PROMPT, "No", "yes", ProbeConfig(steps=5, learning_rate=1e-4, seeds=(0,)))
    assert gentle.loss_monotone and gentle.final_loss < math.log(2)
    assert gentle.displaced == (gentle.p_plus_after < gentle.p_plus_before)
    assert gentle.p_plus_min <= min(gentle.p_plus_before, gentle.p_plus_after)
    assert 0 <= gentle.p_plus_min_step <= 5
    wild, = run_probe(llama, PROMPT, "No", "yes", ProbeConfig(steps=6, learning_rate=0.5, seeds=(0,)))
    assert not wild.loss_monotone, "RMSProp at lr 0.5 overshoots: the loss does not fall at every step"
    assert len(gentle.risers) and (gentle.risers.prob_before.ge(1e-3) | gentle.risers.prob_after.ge(1e-3)).all()
    assert gentle.risers.prob_change.is_monotonic_decreasing
    assert gentle.predicted_change.predicted_change.is_monotonic_decreasing
    assert (gentle.predicted_change.predicted_change > 0).all()


def test_displacement_is_flagged_when_the_preferred_token_loses_probability(llama):
    runs = probe_sweep(llama, PROMPT, "No", "yes", ProbeConfig(steps=3, seeds=(0,)), learning_rates=(1e-3, 0.05))
    for run in runs:
        assert run.displaced == (run.p_plus_after < run.p_plus_before)
        gainers = json.loads(run.row()["top_gainers"])
        assert [g["token_id"] for g in gainers] == run.risers.token_id.tolist()
        assert all(g["prob_after"] > g["prob_before"] for g in gainers), "a stored gainer's probability rose"


def test_sweep_has_one_run_per_learning_rate_seed_and_leading_space(llama):
    runs = probe_sweep(llama, PROMPT, "No", "yes", ProbeConfig(steps=1, seeds=(0, 1)), learning_rates=(1e-6, 1e-5))
    assert [(r.learning_rate, r.leading_space, r.seed) for r in runs] == [
        (lr, space, seed) for lr in (1e-6, 1e-5) for space in (False, True) for seed in (0, 1)]
    spaced = next(r for r in runs if r.leading_space)
    assert spaced.p_plus_before != runs[0].p_plus_before, "' No' is another token than 'No'"


def test_runs_are_stored_in_probe_runs(llama, tmp_path):
    run, = run_probe(llama, PROMPT, "No", "yes", ProbeConfig(steps=2, learning_rate=1e-4, seeds=(0,)))
    store = Store(tmp_path / "s.duckdb")
    assert store.record_probe_run(run.row()) == 1
    stored = store.sql("SELECT * FROM probe_runs").iloc[0]
    assert (stored.model_key, stored["mode"], stored.steps, stored.seed) == (llama.key, "paper", 2, 0)
    assert stored.p_plus_after == pytest.approx(run.p_plus_after) and bool(stored.displaced) == run.displaced
    assert [g["token_id"] for g in json.loads(stored.predicted_gainers)] == run.predicted_change.token_id.tolist()


def test_probe_command_sweeps_and_records(tiny_llama_dir, tmp_path):
    app = typer.Typer()
    train_commands.register(app)
    db = tmp_path / "s.duckdb"
    result = CliRunner().invoke(app, [
        "probe", "--prompt", PROMPT, "--preferred", "No", "--dispreferred", "yes", "--steps", "2", "--sweep",
        "--sweep-lr", "1e-5", "--sweep-lr", "1e-3", "--seeds", "1", "--model", str(tiny_llama_dir), "--db", str(db),
    ], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "probe sweep" in result.output and "recorded as probe runs 1..4" in result.output
    assert Store(db).sql("SELECT count(*) AS n FROM probe_runs").n.iloc[0] == 4


def test_observed_gainers_are_only_tokens_whose_probability_rose():
    y_plus, y_minus = 0, 1
    before = torch.log_softmax(torch.tensor([0.0, 0.0, 1.0, 0.5, 0.2, -12.0], dtype=torch.float64), 0)
    flat = torch.zeros(6, dtype=torch.float64)
    # y+ takes mass from every other token: the largest change (token 5's, the least fall) is no gain.
    after = torch.log_softmax(torch.tensor([3.0, -1.0, 1.0, 0.5, 0.2, -12.0], dtype=torch.float64), 0)
    table = _token_table(before, after, flat, flat, exclude=(y_plus, y_minus))
    assert (table.prob_change < 0).all() and table.prob_change.idxmax() == 5
    assert observed_risers(table, 1e-3, 5).empty
    # Tokens 3 and 5 rise; token 5 (p about 1e-5) stays below min_prob; y+ rises most but is no "other" token.
    after = torch.log_softmax(torch.tensor([2.0, -1.0, 0.5, 1.5, 0.0, -11.0], dtype=torch.float64), 0)
    table = _token_table(before, after, flat, flat, exclude=(y_plus, y_minus))
    p0, p1 = before.exp(), after.exp()
    rose = [i for i in range(2, 6) if p1[i] > p0[i] and max(p0[i], p1[i]) >= 1e-3]
    assert rose == [3]
    risers = observed_risers(table, 1e-3, 5)
    assert risers.index.tolist() == [3]
    assert risers.prob_change.iloc[0] == pytest.approx((p1[3] - p0[3]).item())
    assert observed_risers(table, 1e-6, 5).index.tolist() == [3, 5]


def test_probe_output_shows_no_gainer_when_every_other_token_fell(llama, monkeypatch):
    run, = run_probe(llama, PROMPT, "No", "yes", ProbeConfig(steps=2, learning_rate=1e-4, seeds=(0,)))
    assert len(run.risers) and ((run.risers.prob_after > run.risers.prob_before).all()
            and not run.risers.token_id.isin([_token(llama.tokenizer, t) for t in ("No", "yes")]).any())
    fell = replace(run, risers=run.risers.iloc[:0])
    out = io.StringIO()
    monkeypatch.setattr(train_commands, "console", Console(file=out, width=250))
    train_commands._report_run(fell)
    assert "observed top gainers: no other token rose" in out.getvalue()
    sweep = io.StringIO()
    monkeypatch.setattr(train_commands, "console", Console(file=sweep, width=250))
    train_commands._sweep_table([fell, run])
    rows = [line for line in sweep.getvalue().splitlines() if line.startswith("│ 0.0001 ")]
    last_cells = [line.strip("│ ").split("│")[-1].strip() for line in rows]
    assert last_cells == ["-", repr(run.risers.token.iloc[0])]


def test_predicted_gainers_are_only_tokens_predicted_to_rise():
    from ches_curate.evaluate import predicted_risers

    table = pd.DataFrame({"predicted_change": [-0.2, 0.0, 0.0, 0.03, 0.1, -1e-9]}, index=[10, 11, 12, 13, 14, 15])
    assert predicted_risers(table, 3).index.tolist() == [14, 13]
    assert predicted_risers(table.assign(predicted_change=[-0.1, 0, 0, -0.2, -0.3, 0]), 3).empty
