"""The settings of the training and evaluation stages: one object per stage, defaults documented.

Plain dataclasses with no torch import, so the CLI builds its options from their
defaults and a pipeline config validates its `ablation.train` and
`ablation.evaluate.generation` sections against them (unknown keys are refused)
without loading a model. (Scoring's settings are `ches_curate.scoring.ScoringConfig`.)
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ConfigDict

_STRICT = ConfigDict(extra="forbid")
"""How pydantic validates these dataclasses inside a pipeline config: an unknown key is an error."""


@dataclass
class TrainConfig:
    """DPO hyper-parameters; CPU-safe defaults (float32, no gradient checkpointing, no reporting)."""

    __pydantic_config__ = _STRICT

    beta: float = 0.1
    """DPO temperature: the implicit reward is beta * log(pi / pi_ref)."""
    learning_rate: float = 1e-6
    epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; overrides `epochs` when > 0."""
    batch_size: int = 4
    """Pairs per device step (TRL's `per_device_train_batch_size`)."""
    gradient_accumulation: int = 1
    max_length: int | None = 512
    """Tokens of prompt + response; the same limit applies to likelihood tracking."""
    sft_weight: float = 0.0
    """> 0 adds an SFT term on y+ (TRL `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, sft_weight]`)."""
    lora: bool = False
    """Train a LoRA adapter (peft) instead of all weights; it is merged into the model after training."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: str | list[str] = "all-linear"
    lr_scheduler_type: str = "linear"
    optimizer: str = "adamw_torch"
    """transformers' `optim` name: `adamw_torch`, or `rmsprop` (Razin et al.'s optimizer)."""
    seed: int = 0
    output_dir: str = "runs/dpo"
    save_model: bool = True
    """Save the trained model (or LoRA adapter) and tokenizer to `output_dir`."""
    track_every: int = 0
    """Also record per-pair log-probabilities every N optimizer steps (0: before and after only)."""
    track_batch_size: int = 8


DESIGNS = ("policies", "quantile-slices", "keep-lowest")
"""Ablation designs: `policies` (full vs each policy vs same-size random controls), `quantile-slices`
(Razin et al. Section 5: subsets centred on percentiles of each score) and `keep-lowest` (Section 6: the
lowest fraction by ln-CHES vs the full set vs a random subset of the same size)."""

PAPER_TRAIN = {
    "quantile-slices": {"optimizer": "rmsprop", "learning_rate": 1e-7, "batch_size": 32, "beta": 0.1, "epochs": 1.0,
                        "lr_scheduler_type": "constant"},
    "keep-lowest": {"optimizer": "rmsprop", "learning_rate": 5e-6, "batch_size": 32, "beta": 0.1, "epochs": 1.0,
                    "lr_scheduler_type": "constant"},
}
"""The paper's DPO settings per design (Razin et al., Sections 5 and 6): the defaults of `ablate --design`."""


@dataclass
class DesignConfig:
    """What an ablation compares (`DESIGNS`); each design reads only its own fields."""

    __pydantic_config__ = _STRICT

    design: str = "policies"
    score_columns: tuple[str, ...] = ("ches", "ln_ches", "-edit_distance", "last_hidden_ip")
    """quantile-slices: the scores ranked (a leading `-` negates: -edit_distance puts the most similar pairs high)."""
    percentiles: tuple[float, ...] = (0.0, 25.0, 50.0, 75.0, 100.0)
    """quantile-slices: the percentile each slice is centred on."""
    slice_size: int = 512
    """quantile-slices: pairs per slice (the paper: 512)."""
    keep_fraction: float = 0.05
    """keep-lowest: the fraction kept (the paper: 5%)."""
    keep_column: str = "ln_ches"
    """keep-lowest: the score whose lowest values are kept."""

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ValueError(f"ablation design must be one of {', '.join(DESIGNS)}, not {self.design!r}")
        if self.slice_size < 1:
            raise ValueError(f"slice_size must be at least 1, not {self.slice_size}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], not {self.keep_fraction}")
        bad = [p for p in self.percentiles if not 0 <= p <= 100]
        if bad or not self.percentiles:
            raise ValueError(f"percentiles must be in [0, 100], got {list(self.percentiles)}")
        if not self.score_columns:
            raise ValueError("quantile-slices needs at least one score column")


@dataclass
class EvalConfig:
    """Greedy generation settings for the refusal evaluation."""

    __pydantic_config__ = _STRICT

    max_new_tokens: int = 48
    batch_size: int = 8
    max_prompt_tokens: int = 256
    """Longer prompts keep their last tokens."""


@dataclass
class ProbeConfig:
    """The single-pair DPO probe. Mode `paper` (the default) is Razin et al.'s Section 3 set-up: single-token
    responses (no end-of-turn token), RMSProp, full batch, lr 1e-7, 100 steps, beta 0.1; mode `response` trains
    the whole responses through `train_dpo` (TRL, AdamW) and judges log P of the whole response."""

    __pydantic_config__ = _STRICT

    mode: str = "paper"
    """`paper` or `response`."""
    steps: int = 100
    learning_rate: float = 1e-7
    beta: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    """One run per seed (the paper uses 10). Full-batch training of a model without dropout is deterministic, so
    seeds differ only through nondeterministic kernels."""
    top_k: int = 10
    min_prob: float = 1e-3
    """Observed gainers are among tokens with p_before or p_after at least this (not noise at p ~ 1e-9)."""
    watch: tuple[str, ...] = ("Yes",)
    """Tokens to report whatever their rank (the first token of each)."""

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "response"):
            raise ValueError(f"probe mode must be 'paper' or 'response', not {self.mode!r}")
