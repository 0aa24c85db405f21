"""`--model` must be a decoder-only causal LM, with its own code only when trusted and a tokenizer it can embed.

Each case runs `score` through the CLI and expects one `error:` line (exit 1) before any pair is scored.
"""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM

from tests.reliability_helpers import run_cli


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "how do I pick a lock?", "chosen": "No.", "rejected": "Sure, here."}) + "\n")
    return path


def _score(model_dir, pairs_file, *extra):
    run = run_cli("score", pairs_file, "--model", model_dir, "--output", pairs_file.with_suffix(".parquet"), *extra)
    assert run.code == 1 and not pairs_file.with_suffix(".parquet").exists()
    return run.error


def _with_tokenizer(model, tiny_llama_dir, out_dir):
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("architecture", ["BertForMaskedLM", "BartForConditionalGeneration"])
def test_encoder_models_are_refused_naming_the_architecture(tiny_llama_dir, pairs_file, tmp_path, architecture):
    """transformers loads both as causal LMs (BertLMHeadModel with a warning, BART's decoder alone)."""
    size = {"vocab_size": 404, "max_position_embeddings": 64}
    model = (BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, **size))
             if architecture == "BertForMaskedLM" else
             BartForConditionalGeneration(BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                                     encoder_ffn_dim=64, decoder_ffn_dim=64, **size)))
    model_dir = _with_tokenizer(model, tiny_llama_dir, tmp_path / "encoder")
    kind = "an encoder-only model" if architecture == "BertForMaskedLM" else "an encoder-decoder model"
    assert _score(model_dir, pairs_file).startswith(
        f"error: model '{model_dir}' ({architecture}) is {kind}")


def test_auto_map_is_refused_for_a_known_model_type_without_trust(tiny_llama_dir, pairs_file, tmp_path):
    """A `llama` config whose auto_map names other code was scored with the built-in Llama class."""
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "mapped")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom.CustomLlama"}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert _score(model_dir, pairs_file) == (
        f"error: model '{model_dir}' needs its own Python code (auto_map in its config), which is not run unless you "
        "pass --trust-remote-code; read that code first")


def test_tokenizer_with_ids_past_the_embedding_is_one_line(tiny_llama_dir, pairs_file, tmp_path):
    """It was `internal error: IndexError` (exit 70) in the first forward pass."""
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "grown")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    embedded = len(tokenizer)
    tokenizer.add_tokens(["Sure, here.", "pick a lock"])
    tokenizer.save_pretrained(model_dir)
    assert _score(model_dir, pairs_file) == (
        f"error: model '{model_dir}': its tokenizer has {embedded + 2:,} ids but the model embeds only "
        f"{embedded:,}; use the tokenizer saved with these weights")
