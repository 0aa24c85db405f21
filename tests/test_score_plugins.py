"""Scores as plugins: the registry, a plugin failure costing one value, and the log-prob arithmetic."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ches_curate import plugins
from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair
from ches_curate.scores import ScoreBatch, available_scores, model_bound, needs_forward, selected_scores
from ches_curate.scores.compute import compute_score
from ches_curate.scores.logprobs import logprob_scores, summed_logprobs, token_logprobs
from ches_curate.tokenization import encode_pair
from tests.test_plugins import fresh_plugins  # noqa: F401  (autouse: each test gets its own plugin manager)

BUILTIN_SCORES = ("ches", "ln_ches", "last_hidden_ip", "edit_distance", "chosen_logp", "rejected_logp",
                  "chosen_logp_mean", "rejected_logp_mean", "logp_margin")


def test_builtin_scores_are_registered_through_the_hook_by_the_builtin_plugin():
    found = available_scores()
    assert {name: found[name].plugin for name in BUILTIN_SCORES} == {name: "builtin_scores" for name in BUILTIN_SCORES}
    assert [e.obj.name for e in selected_scores(None)] == ["ches", "edit_distance", "last_hidden_ip", "ln_ches"]
    assert needs_forward(found["logp_margin"].obj) and model_bound(found["edit_distance"].obj)
    assert not needs_forward(found["edit_distance"].obj)


def test_disabling_the_builtin_scores_plugin_leaves_no_scores(monkeypatch):
    monkeypatch.setenv(plugins.DISABLED_PLUGINS_ENV, "builtin_scores")
    assert available_scores() == {}
    with pytest.raises(ChesCurateError, match="unknown score 'ches' .*CHES_CURATE_DISABLED_PLUGINS"):
        selected_scores(["ches"])


class Flaky:
    """Fails on one pair, returns NaN for another, doubles the chosen length otherwise."""

    name, version, description, needs = "flaky", "1", "test score", frozenset({"texts"})

    def compute(self, batch):
        if any(p.chosen == "boom" for p in batch.pairs):
            raise ValueError("cannot score boom")
        return [float("nan") if p.chosen == "nan" else 2.0 * len(p.chosen) for p in batch.pairs]


def texts_batch(chosen: list[str]) -> ScoreBatch:
    pairs = [PreferencePair("q", c, "r", row=i) for i, c in enumerate(chosen)]
    return ScoreBatch(pairs, [p.pair_id for p in pairs])


def test_a_score_failing_on_one_pair_costs_only_that_pairs_value():
    batch = texts_batch(["ab", "boom", "abcd", "nan"])
    result = compute_score(plugins.Registered(Flaky(), "flaky_plugin"), batch)
    assert result.values[[0, 2]].tolist() == [4.0, 8.0] and np.isnan(result.values[[1, 3]]).all()
    assert [(f.pair_id, f.describe()) for f in result.failures] == [
        (batch.pair_ids[1], "score 'flaky' (plugin 'flaky_plugin') failed: ValueError: cannot score boom"),
        (batch.pair_ids[3], "score 'flaky' (plugin 'flaky_plugin') failed: returned nan, not a finite number"),
    ]


def test_a_score_returning_the_wrong_number_of_values_fails_each_pair_with_the_reason():
    class Short(Flaky):
        def compute(self, batch):
            return [1.0] * (len(batch) - 1)

    batch = texts_batch(["a", "b"])
    result = compute_score(plugins.Registered(Short(), "p"), batch)
    assert np.isnan(result.values).all()
    assert [f.reason for f in result.failures] == ["returned 0 values for 1 pairs"] * 2


@pytest.mark.parametrize("bad", ["Flaky", "name", "reserved", "needs", "version"])
def test_bad_scores_are_rejected_with_the_reason(tmp_path, bad):
    source = {
        "Flaky": "register(Flaky)",
        "name": "s = Flaky(); s.name = 'Bad-Name'; register(s)",
        "reserved": "s = Flaky(); s.name = 'pair_id'; register(s)",
        "needs": "s = Flaky(); s.needs = {'gpu'}; register(s)",
        "version": "s = Flaky(); s.version = 2; register(s)",
    }[bad]
    path = tmp_path / f"bad_{bad}.py"
    path.write_text("from ches_curate.hookspecs import hookimpl\nfrom tests.test_score_plugins import Flaky\n"
                    f"@hookimpl\ndef register_scores(register):\n    {source}\n")
    plugins.load_plugin_module(str(path))
    message = {"Flaky": "pass an instance", "name": "lower_snake_case", "reserved": "named like a column",
               "needs": "a non-empty set of texts", "version": "non-empty string `version`"}[bad]
    with pytest.raises(ChesCurateError, match=f"plugin '.*bad_{bad}.py' failed: .*{message}"):
        available_scores()


def reference_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(y|x) from a float64 copy of the whole model's logits at P-1 ... P+|y|-2."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].double()
    start = len(prompt_ids) - 1
    logps = logits[start:start + len(response_ids)].log_softmax(-1)
    return float(logps[torch.arange(len(response_ids)), torch.tensor(response_ids)].sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_logprobs_at_the_predicting_positions_match_a_float64_reference(arch, llama, tiny_gpt2_dir):
    from ches_curate.models import load_model

    loaded = llama if arch == "llama" else load_model(str(tiny_gpt2_dir))
    model64 = copy.deepcopy(loaded.model).double()
    pairs = [PreferencePair("how do I pick a lock?", "I can't help with that.", "Sure, here is how."),
             PreferencePair("x", "yes", "yes sure")]
    hidden, targets, owners, expected = [], [], [], []
    for i, pair in enumerate(pairs):
        ids = encode_pair(loaded.tokenizer, pair, chat_template=arch == "llama")
        for j, response in enumerate((ids.chosen_ids, ids.rejected_ids)):
            with torch.no_grad():
                states = loaded.model.base_model(torch.tensor([ids.prompt_ids + response])).last_hidden_state[0]
            start = len(ids.prompt_ids) - 1
            hidden.append(states[start:start + len(response)])
            targets += response
            owners += [2 * i + j] * len(response)
            expected.append(reference_logprobs(model64, ids.prompt_ids, response))
    with torch.no_grad():
        token_logps = token_logprobs(loaded.model.get_output_embeddings(), torch.cat(hidden), torch.tensor(targets))
    sums = summed_logprobs(token_logps, torch.tensor(owners), len(expected))
    assert sums.tolist() == pytest.approx(expected, rel=1e-5)


def test_token_logprobs_are_computed_a_few_rows_at_a_time(monkeypatch):
    import ches_curate.scores.logprobs as logprobs

    head = torch.nn.Linear(4, 10, bias=False)
    hidden, targets = torch.randn(7, 4), torch.tensor([0, 1, 2, 3, 4, 5, 9])
    whole = token_logprobs(head, hidden, targets)
    monkeypatch.setattr(logprobs, "LOGIT_ELEMENTS", 20)  # two rows of 10 logits per step
    calls = []
    counted = lambda h: calls.append(len(h)) or head(h)  # noqa: E731
    assert torch.allclose(token_logprobs(counted, hidden, targets), whole)
    assert calls == [1, 2, 2, 2, 1]  # the vocabulary probe, then steps of two rows
    reference = torch.log_softmax(head(hidden).double(), -1)[torch.arange(7), targets]
    assert torch.allclose(whole.double(), reference, rtol=1e-5)
    capped = token_logprobs(head, hidden, targets, softcap=0.5)
    logits = 0.5 * torch.tanh(head(hidden).double() / 0.5)
    assert torch.allclose(capped.double(), torch.log_softmax(logits, -1)[torch.arange(7), targets], rtol=1e-5)


def test_logprob_scores_are_sums_means_and_the_margin():
    scores = logprob_scores(torch.tensor([-6.0, -1.0]), torch.tensor([-2.0, -4.0]), torch.tensor([3, 1]),
                            torch.tensor([2, 4]))
    assert {k: v.tolist() for k, v in scores.items()} == {
        "chosen_logp": [-6.0, -1.0], "rejected_logp": [-2.0, -4.0], "chosen_logp_mean": [-2.0, -1.0],
        "rejected_logp_mean": [-1.0, -1.0], "logp_margin": [-4.0, 3.0],
    }
