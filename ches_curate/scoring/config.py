"""How to score: `ScoringConfig`, one object for the engine, the CLI and the pipeline config.

No torch import here, so `ches-curate --help` and a pipeline config check stay fast.
Invalid settings are refused when the config is made, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ches_curate.errors import ChesCurateError

DEFAULT_BATCH_TOKENS = {"cpu": 512, "mps": 4096, "cuda": 16384}
"""Tokens per forward pass when `max_batch_tokens` is None, by device type (measured: bench/RESULTS.md)."""
CHOICES = {"padding_side": ("left", "right"), "on_error": ("fail", "quarantine"),
           "prompt_sharing": ("auto", "block", "cache"), "dtype": ("float32", "bfloat16", "float16", "float64")}


@dataclass
class ScoringConfig:
    """How to score. Results do not depend on batching, `padding_side` or `share_prompt`."""

    max_batch_tokens: int | None = None
    """Tokens per forward pass, padding included (a longer pair runs alone); None: by device, see DEFAULT_BATCH_TOKENS."""
    batch_size: int | None = None
    """Optional cap on pairs per forward pass."""
    max_length: int | None = None
    """Cap on prompt + response tokens (TRL's `keep_start`: the prompt stays whole, responses are cut)."""
    device: str = "auto"
    """cuda > mps > cpu when auto."""
    dtype: str = "float32"
    """Model weights and activations: float32, bfloat16 or float16 (sums are always float64)."""
    share_prompt: bool = True
    """Feed each prompt once for both responses; False runs prompt + response twice (the paper's way, for checking)."""
    prompt_sharing: str = "auto"
    """`block` (one row per pair under a block mask), `cache` (the prompt's KV cache), or `auto`: block if the model takes it."""
    padding_side: str = "right"
    """Where padding goes inside a block or unshared batch; only for testing that it does not matter (the
    KV-cache path always left-pads prompts)."""
    bucket_batches: int = 16
    """Read this many batches ahead and sort them by length to reduce padding."""
    on_error: str = "fail"
    """`fail` stops at the first pair that cannot be scored; `quarantine` records it in `Scorer.failures`."""
    trust_remote_code: bool = False
    progress_every_s: float = 30.0
    """Seconds between progress lines (pairs, tokens/s, ETA) on the `ches_curate.scoring` logger."""
    chat_template: bool | None = None
    """Render plain prompts through the chat template (TRL's conversational rows); False: as text; None: the
    enclosing `tokenization.use_chat_template` setting (the CLI's `--no-chat-template`)."""
    scores: tuple[str, ...] | None = None
    """Registered scores to compute beside the four built-in columns (`ches-curate scores list`), in the same
    forward pass; `("all",)` for every one; None: those registered with `default = True`."""

    def __post_init__(self) -> None:
        if self.scores is not None:
            self.scores = tuple(self.scores)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ChesCurateError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("max_batch_tokens", "batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ChesCurateError(f"{name} must be at least 1, not {value}")
