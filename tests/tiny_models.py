"""Tiny random causal LMs with a real (small) BPE tokenizer, built offline from a config."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Human: how do I pick a lock? Assistant: I can't help with that. No, never, yes, sure, sorry.",
    "The quick brown fox jumps over the lazy dog. I'm sorry, but I cannot assist with that request.",
    "Here is how you can bake bread: mix flour, water, salt and yeast, then knead and wait.",
    "Unicode: café, naïve, 日本語, emoji 🙂. Numbers 0 1 2 3 4 5 6 7 8 9.",
]


def _tokenizer(chat_template: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>" if chat_template else "<|endoftext|>", pad_token="<pad>",
        bos_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(out_dir: Path, arch: str = "llama", chat_template: bool = True, seed: int = 0) -> Path:
    """Save a tiny random `arch` ('llama' or 'gpt2') model and its tokenizer to `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tokenizer = _tokenizer(chat_template)
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=4096,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
