"""Which models CHES is defined for, checked before any scoring: a causal decoder, its own code only if trusted,
and a tokenizer whose ids the model can embed.

transformers loads a BERT directory as `BertLMHeadModel` with a warning only, runs a known
`model_type` with its built-in class even when the config's `auto_map` names other code,
and fails on an id past the embedding with an IndexError deep in a forward pass.
"""

from __future__ import annotations

from typing import Any

from ches_curate.errors import ChesCurateError


def remote_code_refusal(spec: str) -> ChesCurateError:
    """The one line for a model whose config asks for its own Python code without --trust-remote-code."""
    return ChesCurateError(f"model {spec!r} needs its own Python code (auto_map in its config), which is not run "
                           "unless you pass --trust-remote-code; read that code first")


def check_causal_lm(spec: str, config: Any, trust_remote_code: bool) -> None:
    """Refuse `config` unless it is a decoder-only causal LM whose code is built in (or trusted).

    An `auto_map` is refused even for a known `model_type`: its code, not the built-in
    class, is what the model was made with.
    """
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise remote_code_refusal(spec)
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder model"
    elif config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        kind = "an encoder-only model (bidirectional attention)"
    else:
        return
    raise ChesCurateError(f"model {spec!r} ({architecture}) is {kind}; CHES is defined for decoder-only causal LMs "
                          "(pass a model such as Llama, Qwen2, Mistral, GPT-2)")


def check_vocabulary(spec: str, model: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer that can produce ids the model's input embedding has no row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ChesCurateError(f"model {spec!r}: its tokenizer has {len(tokenizer):,} ids but the model embeds only "
                              f"{rows:,}; use the tokenizer saved with these weights")
