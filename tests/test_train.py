"""DPO training through TRL, and per-pair likelihood tracking checked against a naive computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from ches_curate import train as train_module
from ches_curate.commands import train as train_commands
from ches_curate.errors import ChesCurateError
from ches_curate.scoring.incremental import score_dataset
from ches_curate.likelihood import displacement_summary, pair_logps
from ches_curate.models import load_model
from ches_curate.pairs import PreferencePair
from ches_curate.store import Store
from ches_curate.tokenization import encode_pair
from ches_curate.train import TrainConfig, _dpo_config, clone_model, train_dpo

WORDS = ["sure", "sorry", "never", "bread", "fox", "yes", "lock", "dog"]


def toy_pairs(n: int = 6) -> list[PreferencePair]:
    return [
        PreferencePair(
            f"how do I {WORDS[i % 8]} a {WORDS[(i + 3) % 8]}?" if i % 3 else [
                {"role": "user", "content": f"tell me about {WORDS[i % 8]}"},
                {"role": "assistant", "content": "what about it?"},
                {"role": "user", "content": "everything"},
            ],
            f"No, {WORDS[(i * 3) % 8]} " * (1 + i % 3),
            f"Sure {WORDS[(i + 1) % 8]}",
            row=i,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def fresh(loaded):
    """The same loaded model with its own copy of the weights, to train."""
    return dataclasses.replace(loaded, model=clone_model(loaded.model))


def naive_logp(model, tokenizer, pair: PreferencePair, response: str, max_length=None) -> float:
    """log pi(response | prompt), one unpadded sequence: sum of log-softmax at the positions before each token."""
    encoded = encode_pair(tokenizer, pair, max_length)
    response_ids = encoded.chosen_ids if response == "chosen" else encoded.rejected_ids
    ids = torch.tensor([encoded.prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(encoded.prompt_ids)
    return sum(logps[start - 1 + t, token].item() for t, token in enumerate(response_ids))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size,max_length", [(1, None), (4, None), (3, "tight")])
def test_batched_pair_logps_match_naive_per_pair_computation(request, which, batch_size, max_length):
    loaded = request.getfixturevalue(which)
    pairs = [p for p in toy_pairs(7) if which == "llama" or isinstance(p.prompt, str)]
    if max_length == "tight":  # every prompt fits (TRL would drop the others), some responses are cut
        max_length = max(len(encode_pair(loaded.tokenizer, p).prompt_ids) for p in pairs) + 3
    frame = pair_logps(loaded.model, loaded.tokenizer, pairs, batch_size=batch_size, max_length=max_length)
    assert frame.pair_id.tolist() == [p.pair_id for p in pairs]
    assert frame.truncated.any() == (max_length is not None)
    for pair, row in zip(pairs, frame.itertuples()):
        expected = naive_logp(loaded.model, loaded.tokenizer, pair, "chosen", max_length)
        assert row.preferred_logp == pytest.approx(expected, abs=1e-5)
        assert row.dispreferred_logp == pytest.approx(naive_logp(loaded.model, loaded.tokenizer, pair, "rejected", max_length), abs=1e-5)
        assert row.chosen_tokens == len(encode_pair(loaded.tokenizer, pair, max_length).chosen_ids)


def test_displacement_summary_on_hand_made_values():
    before = pd.DataFrame({"pair_id": list("abcd"), "preferred_logp": [-10.0, -8, -6, -4], "dispreferred_logp": [-5.0] * 4})
    after = pd.DataFrame({"pair_id": list("dcba"), "preferred_logp": [-3.0, -7, -8, -13], "dispreferred_logp": [-9.0] * 4})
    scores = pd.DataFrame({"pair_id": list("abcd"), "ches": [4.0, 3, 1, 0], "ln_ches": [1.0, 2, 3, 4]})
    summary = displacement_summary(before, after, scores)
    change = np.array([-3.0, 0, -1, 1])  # a, b, c, d
    assert summary.n_pairs == 4
    assert summary.preferred_logp_change == pytest.approx(change.mean())
    assert summary.dispreferred_logp_change == pytest.approx(-4.0)
    assert summary.preferred_decrease_fraction == pytest.approx(0.5)
    assert summary.ches_logp_corr == pytest.approx(np.corrcoef([4, 3, 1, 0], change)[0, 1])
    assert summary.ln_ches_logp_corr == pytest.approx(np.corrcoef([1, 2, 3, 4], change)[0, 1])
    # ranks of change: a=1, b=3, c=2, d=4; ranks of ches: a=4, b=3, c=2, d=1
    assert summary.ches_logp_spearman == pytest.approx(np.corrcoef([4, 3, 2, 1], [1, 3, 2, 4])[0, 1])
    assert displacement_summary(before, after).ches_logp_corr is None


def test_training_changes_weights_and_records_likelihoods(llama, tmp_path):
    start = clone_model(llama.model)
    loaded = fresh(llama)
    pairs = toy_pairs(6)
    config = TrainConfig(learning_rate=1e-2, max_steps=3, batch_size=2, track_every=1, output_dir=str(tmp_path / "ckpt"))
    result = train_dpo(loaded, None, pairs, config)

    assert result.model is loaded.model and result.global_step == 3
    changed = [n for n, p in loaded.model.named_parameters() if not torch.equal(p, start.get_parameter(n))]
    assert len(changed) == len(list(start.parameters()))
    pd.testing.assert_frame_equal(result.before, pair_logps(start, llama.tokenizer, pairs, max_length=512))
    pd.testing.assert_frame_equal(result.after, pair_logps(loaded.model, llama.tokenizer, pairs, max_length=512))
    assert sorted(result.snapshots.step.unique()) == [0, 1, 2, 3]
    assert result.tokenization_mismatches == 0

    likelihoods = result.pair_likelihoods()
    margin = (likelihoods.preferred_logp_after - likelihoods.preferred_logp_before) - (
        likelihoods.dispreferred_logp_after - likelihoods.dispreferred_logp_before)
    assert result.reward_accuracy == pytest.approx((margin > 0).mean())
    assert result.reward_accuracy > 0.5  # a large learning rate on 6 pairs: the margins grow
    losses = [log["loss"] for log in result.log_history if "loss" in log]
    assert len(losses) == 3 and result.train_loss == pytest.approx(np.mean(losses), rel=1e-4)

    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], loaded.model.model.layers[0].mlp.up_proj.weight)
    assert "forward" not in vars(loaded.model), "TRL's patched forward must not outlive training"


def test_trl_tokenizes_pairs_like_the_scoring_contract(llama, gpt2, tmp_path):
    """TRL's prepared ids are encode_pair's, truncation included; the pairs TRL would drop are left out first."""
    for loaded, max_length in ((llama, 30), (gpt2, 10)):
        pairs = [p for p in toy_pairs(6) if loaded is llama or isinstance(p.prompt, str)]
        prompts = [len(encode_pair(loaded.tokenizer, p).prompt_ids) for p in pairs]
        config = TrainConfig(max_steps=1, batch_size=2, save_model=False, output_dir=str(tmp_path),
                             max_length=max_length)
        result = train_dpo(fresh(loaded), loaded.model, pairs, config)
        assert result.tokenization_mismatches == 0
        assert result.n_dropped == sum(n >= max_length for n in prompts) > 0
        assert result.before.truncated.any() and len(result.before) == len(pairs) - result.n_dropped


def test_training_refuses_when_every_prompt_fills_max_length(llama, tmp_path):
    config = TrainConfig(max_steps=1, max_length=8, save_model=False, output_dir=str(tmp_path))
    with pytest.raises(ChesCurateError, match="every prompt fills max_length=8"):
        train_dpo(fresh(llama), llama.model, toy_pairs(2), config)


def test_lora_adapter_is_trained_then_merged(llama, tmp_path):
    loaded = fresh(llama)
    config = TrainConfig(learning_rate=5e-2, max_steps=2, batch_size=2, lora=True, output_dir=str(tmp_path / "lora"))
    result = train_dpo(loaded, llama.model, toy_pairs(4), config)
    assert not any("lora" in name for name, _ in result.model.named_modules())
    assert not torch.equal(result.model.model.layers[0].self_attn.q_proj.weight, llama.model.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(result.model.model.embed_tokens.weight, llama.model.model.embed_tokens.weight)
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    pd.testing.assert_frame_equal(result.after, pair_logps(result.model, llama.tokenizer, toy_pairs(4), max_length=512))


def test_dpo_config_is_cpu_safe_and_adds_the_sft_term(llama):
    args = _dpo_config(TrainConfig(sft_weight=0.25, beta=0.3, max_length=64), llama.model)
    assert (args.use_cpu, args.bf16, args.gradient_checkpointing, args.report_to) == (True, False, False, [])
    assert (args.loss_type, args.loss_weights, args.beta, args.max_length) == (["sigmoid", "sft"], [1.0, 0.25], 0.3, 64)
    assert _dpo_config(TrainConfig(), llama.model).loss_type == ["sigmoid"]


def test_clone_of_a_trained_model_owns_its_weights(llama, tmp_path):
    """TRL patches `forward` to call the original object; a clone must run its own weights."""
    loaded = fresh(llama)
    train_dpo(loaded, llama.model, toy_pairs(2), TrainConfig(max_steps=1, batch_size=2, save_model=False, output_dir=str(tmp_path)))
    clone = clone_model(loaded.model)
    with torch.no_grad():
        clone.lm_head.weight.zero_()
        ids = torch.tensor([[1, 2, 3]])
        assert torch.count_nonzero(clone(ids).logits) == 0
        assert torch.count_nonzero(loaded.model(ids).logits) > 0


def test_train_command_trains_on_a_selection_and_saves(llama, tiny_llama_dir, tmp_path):
    store = Store(tmp_path / "train.duckdb")
    store.register_dataset("toy", None, toy_pairs(6))
    score_dataset(store, "toy", llama, progress=False)
    kept = pd.DataFrame({"pair_id": [p.pair_id for p in toy_pairs(6)], "kept": [True, False] * 3, "rank": range(1, 7)})
    selection_id = store.save_selection("manual", {}, "toy", 1, llama.key, kept, "ches")
    app = typer.Typer()
    train_commands.register(app)
    result = CliRunner().invoke(app, [
        "train", "--dataset", "toy", "--selection", str(selection_id), "--model", str(tiny_llama_dir),
        "--max-steps", "2", "--lr", "1e-3", "--output-dir", str(tmp_path / "ckpt"), "--db", str(store.path),
    ], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "on 3 pairs of 'toy' v1" in result.output and "DPO: 2 steps" in result.output
    assert "ches logp corr" in result.output and f"saved to {tmp_path / 'ckpt'}" in result.output
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


def test_train_command_trains_with_the_tokenization_the_pairs_were_scored_with(llama, tiny_llama_dir, tmp_path,
                                                                               monkeypatch):
    from ches_curate.tokenization import use_chat_template

    store = Store(tmp_path / "raw.duckdb")
    store.register_dataset("toy", None, [PreferencePair(f"Question {i}: may I?", f" No {i}", f" Yes {i}", row=i)
                                         for i in range(4)])
    with use_chat_template(False):
        score_dataset(store, "toy", llama, progress=False)
    seen = []
    real = train_module.train_dpo

    def spy(model, ref, pairs, config, chat_template=None):
        seen.append(chat_template)
        return real(model, ref, pairs, config, chat_template=chat_template)

    monkeypatch.setattr(train_module, "train_dpo", spy)
    app = typer.Typer()
    train_commands.register(app)
    result = CliRunner().invoke(app, ["train", "--dataset", "toy", "--model", str(tiny_llama_dir), "--max-steps", "1",
                                      "--no-save", "--db", str(store.path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert seen == [False]  # scored with --no-chat-template, so trained on the raw-text ids
