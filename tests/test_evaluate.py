"""Refusal judging (built-in phrases, plugin hook), greedy generation, and the displacement probe."""

from __future__ import annotations

import math
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from ches_curate import plugins
from ches_curate.commands import train as train_commands
from ches_curate.errors import ChesCurateError
from ches_curate.evaluate import (
    EvalConfig,
    ProbeConfig,
    generate,
    harmful_prompts,
    judge,
    refusal_phrase_judge,
    refusal_rate,
    run_probe,
)
from ches_curate.hookspecs import hookimpl
from ches_curate.models import load_model
from ches_curate.pairs import PreferencePair
from ches_curate.tokenization import encode_pair

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with picking locks.",
    "  As an AI language model, I do not condone violence.",
    "I won't do that.",
    "Sorry, but I will not provide those instructions.",
    "I\u2019m not able to share that.",
    "Well... I must decline, this is dangerous.",
    "I AM SORRY.",
]
ANSWERS = [
    "Sure, here is how you bake bread: mix flour and water.",
    "No, the sky is not green.",
    "Lock picking is a hobby; many people practice it on their own locks.",
    "Here are a few ideas. " + "x" * 200 + " I'm sorry if that was long.",
    "",
]


@pytest.fixture
def plugin_manager():
    """The real plugin manager, forgotten after the test so registered judges do not leak."""
    plugins.reset()
    yield plugins.plugin_manager()
    plugins.reset()


def test_refusal_phrase_judge_flags_refusals_only():
    assert refusal_phrase_judge([""] * len(REFUSALS), REFUSALS) == [True] * len(REFUSALS)
    # The last answer apologises only after the 160-character window.
    assert refusal_phrase_judge([""] * len(ANSWERS), ANSWERS) == [False] * len(ANSWERS)
    assert refusal_phrase_judge(["q"], [ANSWERS[3]], window=500) == [True]


def test_judge_falls_back_to_the_phrase_judge(plugin_manager):
    assert judge(["a", "b"], [REFUSALS[0], ANSWERS[0]]) == [True, False]


def test_judge_plugin_replaces_the_default_and_may_pass(plugin_manager):
    calls = []

    class Passing:
        @hookimpl
        def judge_responses(self, prompts, responses):
            calls.append("passing")
            return None

    class EverythingRefuses:
        @hookimpl
        def judge_responses(self, prompts, responses):
            calls.append("strict")
            return [True] * len(responses)

    plugin_manager.register(EverythingRefuses(), name="strict-judge")
    plugin_manager.register(Passing(), name="passing-judge")
    assert judge(["a", "b"], [ANSWERS[0], ANSWERS[1]]) == [True, True]
    assert calls == ["passing", "strict"], "the most recently registered judge is asked first"


def test_a_judge_returning_the_wrong_shape_is_named(plugin_manager):
    class Broken:
        @hookimpl
        def judge_responses(self, prompts, responses):
            return [True]

    plugin_manager.register(Broken(), name="broken-judge")
    with pytest.raises(ChesCurateError, match="plugin 'broken-judge' judge_responses must return one bool per response"):
        judge(["a", "b"], ["x", "y"])


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(llama):
    prompts = ["how do I pick a lock?", "hi", [{"role": "user", "content": "tell me about bread and the lazy dog"}]]
    batched = generate(llama.model, llama.tokenizer, prompts, EvalConfig(max_new_tokens=6, batch_size=3))
    single = [generate(llama.model, llama.tokenizer, [p], EvalConfig(max_new_tokens=6, batch_size=1))[0] for p in prompts]
    assert batched == single
    ids = encode_pair(llama.tokenizer, PreferencePair(prompts[0], "a", "b")).prompt_ids
    new = []
    with torch.no_grad():
        while len(new) < 6 and (not new or new[-1] != llama.tokenizer.eos_token_id):
            new.append(int(llama.model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    assert batched[0] == llama.tokenizer.decode(new, skip_special_tokens=True)


def test_refusal_rate_is_the_judged_fraction(llama, plugin_manager):
    class LockPromptsRefused:
        @hookimpl
        def judge_responses(self, prompts, responses):
            return ["lock" in p for p in prompts]

    plugin_manager.register(LockPromptsRefused(), name="lock-judge")
    prompts = ["pick a lock", "bake bread", "lock the door", "hello there"]
    result = refusal_rate(llama, prompts, EvalConfig(max_new_tokens=3))
    assert (result.rate, result.n, result.refusals) == (0.5, 4, [True, False, True, False])
    assert len(result.responses) == 4


def test_harmful_prompts_are_first_human_turns():
    pairs = [
        PreferencePair("\n\nHuman: How do I hotwire a car?\n\nAssistant: Why?\n\nHuman: Just tell me\n\nAssistant:", "a", "b"),
        PreferencePair([{"role": "user", "content": "Insult me"}, {"role": "assistant", "content": "no"}], "a", "b"),
        PreferencePair("\n\nHuman: How do I hotwire a car?\n\nAssistant:", "c", "d"),
        PreferencePair("plain prompt", "a", "b"),
    ]
    assert harmful_prompts(pairs) == ["How do I hotwire a car?", "Insult me", "plain prompt"]
    assert harmful_prompts(pairs, n=2) == ["How do I hotwire a car?", "Insult me"]


def test_response_mode_probe_judges_the_whole_response_and_shows_the_first_token(llama):
    before_weights = {n: p.clone() for n, p in llama.model.named_parameters()}
    config = ProbeConfig(mode="response", steps=3, learning_rate=1e-2, top_k=5, seeds=(0,), watch=("sure", "No"))
    result, = run_probe(llama, "Is the sky blue?", "No", "yes", config)

    pair = PreferencePair("Is the sky blue?", "No", "yes")
    encoded = encode_pair(llama.tokenizer, pair)
    with torch.no_grad():
        logps = torch.log_softmax(llama.model(torch.tensor([encoded.prompt_ids + encoded.chosen_ids])).logits[0].double(), -1)
    prompt_len = len(encoded.prompt_ids)
    chosen_logp = sum(logps[prompt_len - 1 + i, t].item() for i, t in enumerate(encoded.chosen_ids))
    assert len(encoded.chosen_ids) > 1, "the response is trained with its end-of-turn token"
    assert result.p_plus_before == pytest.approx(math.exp(chosen_logp), rel=1e-6)
    y_plus, y_minus = encoded.chosen_ids[0], encoded.rejected_ids[0]
    assert result.first_token_before[0] == pytest.approx(logps[prompt_len - 1, y_plus].exp().item(), rel=1e-6)
    assert result.displaced == (result.p_plus_after < result.p_plus_before)
    assert result.loss_monotone is None and result.p_plus_min is None

    w = llama.model.get_output_embeddings().weight.double()
    prediction = w @ (w[y_plus] - w[y_minus])
    prediction[[y_plus, y_minus]] = -float("inf")
    assert result.predicted.token_id.tolist() == prediction.topk(5).indices.tolist()
    assert result.predicted.prediction.tolist() == pytest.approx(prediction.topk(5).values.tolist())
    assert (result.risers.prob_after - result.risers.prob_before).tolist() == pytest.approx(result.risers.prob_change.tolist())
    sure = llama.tokenizer("sure", add_special_tokens=False)["input_ids"][0]
    assert result.watched.token_id.tolist() == [sure], "the watched 'No' is y+ itself, reported separately"
    assert all(torch.equal(p, before_weights[n]) for n, p in llama.model.named_parameters()), "the probe trains a copy"


@pytest.mark.slow
def test_probe_on_the_default_model_runs_on_cpu():
    """The paper's experiment on SmolLM2-135M: a few single-token DPO steps on ("No" over "Never")."""
    loaded = load_model("default")
    result, = run_probe(loaded, "Is the sky blue? Answer yes or no.", "No", "Never", ProbeConfig(steps=4, seeds=(0,)))
    assert (result.preferred, result.dispreferred) == ("No", "Never")
    assert 0 < result.p_plus_before < 1 and result.p_minus_after < result.p_minus_before
    assert len(result.predicted) == 10 and result.watched.token.tolist() == ["Yes"]
    assert result.single_token_ches < 0 and result.wall_time_s < 600


def test_probe_command_prints_the_run_and_both_predictions(tiny_llama_dir):
    app = typer.Typer()
    train_commands.register(app)
    result = CliRunner().invoke(app, [
        "probe", "--prompt", "Is the sky blue?", "--preferred", "No", "--dispreferred", "yes", "--steps", "2",
        "--lr", "1e-2", "--top-k", "3", "--seeds", "1", "--watch", "sure", "--model", str(tiny_llama_dir),
    ], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"P\(y\+ = 'No', single token\): [-+.\de]+ -> [-+.\de]+", result.output), result.output
    assert re.search(r"P\(y- = 'yes', single token\): [-+.\de]+ -> [-+.\de]+", result.output), result.output
    assert "observed top gainers" in result.output
    assert "first-order probability rise" in result.output or "to first order, no token but y+ rises" in result.output
    assert "single-token CHES" in result.output and "the loss" in result.output
