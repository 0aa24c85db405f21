"""Tiny random causal LMs with a real (small) BPE tokenizer, built offline from a config.

ches_curate's own tests use them, and plugin authors get them through `ches_curate.testing.tiny_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import models as hf

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


# Tiny configs of each attention variant the engine must score exactly: full attention with GQA (Llama), absolute
# positions (GPT-2), a parallel block with partial rotary (GPT-NeoX/Pythia), ALiBi (BLOOM), one sliding window on every
# layer (Mistral), windows on the upper layers only (Qwen2 `max_window_layers`) and alternating sliding/full layers
# (Gemma-2, Gemma-3 with its own local rotary base). Windows of 4 tokens are shorter than every test pair.
_LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32,
           "intermediate_size": 64, "max_position_embeddings": 4096, "tie_word_embeddings": False}
_CONFIGS = {
    "llama": lambda: hf.llama.LlamaConfig(**_LAYERS),
    "gpt2": lambda: hf.gpt2.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=4096),
    "gpt_neox": lambda: hf.gpt_neox.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
        use_parallel_residual=True, max_position_embeddings=4096, tie_word_embeddings=False),
    "bloom": lambda: hf.bloom.BloomConfig(hidden_size=32, n_layer=2, n_head=4),
    "mpt": lambda: hf.mpt.MptConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=4096, expansion_ratio=2),
    "gpt_neo": lambda: hf.gpt_neo.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, window_size=4,
                                               attention_types=[[["global", "local"], 1]], max_position_embeddings=4096),
    "mistral": lambda: hf.mistral.MistralConfig(**_LAYERS, sliding_window=4),
    "qwen2": lambda: hf.qwen2.Qwen2Config(**{**_LAYERS, "num_hidden_layers": 3}, use_sliding_window=True,
                                          sliding_window=4, max_window_layers=1),
    "gemma2": lambda: hf.gemma2.Gemma2Config(**{**_LAYERS, "num_hidden_layers": 3}, head_dim=8, sliding_window=4),
    "gemma3": lambda: hf.gemma3.Gemma3TextConfig(**{**_LAYERS, "num_hidden_layers": 3}, head_dim=8, sliding_window=4,
                                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
ARCHS = tuple(_CONFIGS)


def build_tiny_model(out_dir: Path, arch: str = "llama", chat_template: bool = True, seed: int = 0) -> Path:
    """Save a tiny random `arch` model (one of `ARCHS`) and its tokenizer to `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}")
    tokenizer = _tokenizer(chat_template)
    torch.manual_seed(seed)
    config = _CONFIGS[arch]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
