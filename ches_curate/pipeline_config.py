"""The configuration of the curation, ablation and refresh pipelines: one YAML file, validated here.

A file holds what the pipelines do (the store, the source, the scoring model, the
policy, the ablation arms) and, under `zenml:`, a ZenML run configuration passed
through unchanged (`settings`, `steps`, `enable_cache`, ...), e.g. a GPU for the
scoring step:

    store: ches_curate.duckdb
    dataset: {name: hh_harmless, source: data/hh.jsonl}
    scoring: {model: default, batch_size: 8}
    policy: {name: percentile, params: {p: 90}}
    zenml:
      steps:
        score_pairs: {settings: {resources: {gpu_count: 1}}}

Plain data with no ZenML import, so that the CLI can reject a bad file in
milliseconds, naming the file and the key.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ches_curate.config_files import load_yaml_model
from ches_curate.configs import DesignConfig, EvalConfig, TrainConfig
from ches_curate.errors import ChesCurateError
from ches_curate.scoring.config import ScoringConfig

_SCORING = ScoringConfig()
PACKAGE_PREFIX = "ches_curate:"
"""`ches_curate:data/hh_rlhf_harmless_sample.jsonl`: a file shipped in the package, wherever it is installed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Section):
    """Where the pairs come from. Bad rows are always quarantined (with a reason), never dropped."""

    name: str = Field(description="Dataset name in the store; each changed content becomes a new version.")
    source: str = Field(description="File (JSONL, CSV, Parquet), saved HF dataset directory or hub id.")
    format: Literal["auto", "prompt_chosen_rejected", "conversational", "hh_rlhf"] = Field(
        "auto", description="Input format (auto: detected from the first row)."
    )
    limit: int | None = Field(None, ge=1, description="Read only the first N input rows (a quick demo).")


class ScoringSpec(_Section):
    """The model whose hidden states CHES is computed from, and the `ScoringConfig` settings a pipeline may set.

    Defaults come from `ScoringConfig` itself; `scoring_config()` is the engine's config.
    """

    model: str = Field("default", description="Hub id, local model directory, .gguf file, or 'default' (SmolLM2-135M).")
    max_batch_tokens: int | None = Field(_SCORING.max_batch_tokens, ge=1, description="Tokens per forward pass "
                                         "(default by device: cpu 512, cuda 16384).")
    batch_size: int | None = Field(_SCORING.batch_size, ge=1, description="Optional cap on pairs per forward pass.")
    max_length: int | None = Field(_SCORING.max_length, ge=2, description="Cap on prompt + response tokens.")
    device: str = Field(_SCORING.device, description="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.")
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = Field(_SCORING.dtype, description="Weights dtype.")
    scores: list[str] | None = Field(None, description="Registered scores to compute beside CHES in the same pass "
                                     "(`ches-curate scores list`; [all] for every one); default: the default ones.")

    def scoring_config(self) -> ScoringConfig:
        """The engine's `ScoringConfig`; a pair that cannot be scored is quarantined, not fatal, in a pipeline."""
        return ScoringConfig(max_batch_tokens=self.max_batch_tokens, batch_size=self.batch_size,
                             max_length=self.max_length, device=self.device, dtype=self.dtype, on_error="quarantine",
                             scores=tuple(self.scores) if self.scores is not None else None)


class PolicySpec(_Section):
    """A filter policy by name (`ches-curate policies` lists them) and its parameters."""

    name: str = Field(description="Registered policy name, e.g. percentile, top-k, length-normalized.")
    params: dict[str, Any] = Field(default_factory=dict, description="The policy's parameters.")

    def label(self) -> str:
        """`percentile(p=90)`: how an ablation arm is named."""
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({inner})"


class EvaluateSpec(_Section):
    """Refusal evaluation of the ablation arms: held-out prompts, judged before and after DPO."""

    source: str | None = Field(
        None, description="Pair file whose first human turns are the held-out prompts; none: refusal rates stay empty."
    )
    format: Literal["auto", "prompt_chosen_rejected", "conversational", "hh_rlhf"] = Field("auto", description="Its format.")
    n_prompts: int = Field(32, ge=1, description="How many prompts (the first distinct ones).")
    generation: EvalConfig = Field(
        default_factory=EvalConfig, description="Greedy generation: ches_curate.configs.EvalConfig (max_new_tokens, ...)."
    )


class AblationSpec(_Section):
    """The ablation arms: by default (design `policies`) the full set, each policy's selection, and a same-size
    random control per seed; `design` switches to the paper's quantile slices or keep-lowest comparison."""

    design: DesignConfig = Field(
        default_factory=DesignConfig, description="What is compared: ches_curate.configs.DesignConfig (design: "
        "policies, quantile-slices or keep-lowest; slice_size, percentiles, score_columns, keep_fraction, ...)."
    )
    policies: list[PolicySpec] = Field(default_factory=list, description="Policies compared (default: `policy`).")
    seeds: list[int] = Field(default_factory=lambda: [0], description="Seeds of the random controls (design "
                             "policies) or the training seeds of every arm (quantile-slices, keep-lowest).")
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="DPO settings: ches_curate.configs.TrainConfig (beta, learning_rate, ...)."
    )
    output_dir: str = Field("runs/ablation", description="Checkpoints of the arms go under this directory.")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)

    @field_validator("design", mode="before")
    @classmethod
    def _design_by_name(cls, value: Any) -> Any:
        """`design: keep-lowest` is short for `design: {design: keep-lowest}` (the design's other defaults)."""
        return {"design": value} if isinstance(value, str) else value

    @field_validator("train", mode="before")
    @classmethod
    def _one_output_dir(cls, value: Any) -> Any:
        """Checkpoints go under `ablation.output_dir`; a different `train.output_dir` would be ignored, so it is refused.

        (A serialized config, as ZenML hands it to a step, carries the default: that one passes.)
        """
        if isinstance(value, dict) and value.get("output_dir", TrainConfig.output_dir) != TrainConfig.output_dir:
            raise ValueError("set ablation.output_dir instead of ablation.train.output_dir")
        return value


class RefusalSpec(_Section):
    """The on-policy refusal experiment of the `refusal` pipeline (Razin et al., Section 6).

    The scoring model samples two responses to each of the first `n_prompts` harmful prompts of
    `source`, the refusal judge (`judge_responses` hook) labels them, and the refusal-preferred
    pairs are written to `dataset.source`, then ingested, scored and ablated (`ablation.design`,
    keep-lowest in the shipped configs). Refusal rates are measured on the next `n_eval_prompts`
    distinct prompts of `source`, which no training pair uses.
    """

    source: str = Field(description="Pair file whose first human turns are the harmful prompts (hh-rlhf "
                        "harmless-base).")
    format: Literal["auto", "prompt_chosen_rejected", "conversational", "hh_rlhf"] = Field(
        "hh_rlhf", description="Its format.")
    n_prompts: int = Field(1200, ge=1, description="Training prompts: the first N distinct first human turns.")
    n_eval_prompts: int = Field(200, ge=1, description="Held-out evaluation prompts: the next N distinct ones.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens sampled per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: the full distribution).")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (two responses each).")
    max_prompt_tokens: int = Field(256, ge=1, description="Longer prompts keep their last tokens.")
    seed: int = Field(0, description="Seed of the sampling (torch.manual_seed): same seed, same pairs.")
    keep_both_refusals: bool = Field(True, description="Keep pairs of two refusals (the first sample preferred), "
                                     "the paper's majority case; false keeps only refusal-vs-compliance pairs.")


class PipelineConfig(_Section):
    """One file configures all three pipelines; `zenml` is a ZenML run configuration applied to each."""

    store: str = Field("ches_curate.duckdb", description="DuckDB store file, referenced by path (never copied).")
    plugins: list[str] = Field(
        default_factory=list,
        description="Plugin modules to load (import names or .py files) besides installed ones, e.g. [my_policies.py].",
    )
    dataset: DatasetSpec
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    quality: str | None = Field(None, description="Quality config YAML (bounds, extra expectations); default rules if unset.")
    policy: PolicySpec = Field(
        default_factory=lambda: PolicySpec(name="percentile", params={"p": 90}),
        description="The selection policy of the curation and refresh pipelines.",
    )
    export: str = Field(
        "out/{dataset}_v{version}_curated.parquet",
        description="Curated file (.parquet or .jsonl); {dataset}, {version}, {selection_id} are filled in.",
    )
    allow_unscored_export: bool = Field(
        False, description="Let the export step write a selection of a version some of whose pairs have no score "
        "(they are left out); by default it refuses, naming the command that scores them.",
    )
    ablation: AblationSpec = Field(default_factory=AblationSpec)
    refusal: RefusalSpec | None = Field(None, description="The refusal pipeline's on-policy pair generation.")
    zenml: dict[str, Any] = Field(default_factory=dict, description="ZenML run configuration (settings, steps, ...).")

    def ablation_policies(self) -> list[PolicySpec]:
        return self.ablation.policies or [self.policy]

    def with_store(self, store: str | os.PathLike | None) -> PipelineConfig:
        """A copy using `store` (the CLI's `--db`) when given."""
        return self if store is None else self.model_copy(update={"store": str(store)})

    def with_plugins(self, plugins: list[str]) -> PipelineConfig:
        """A copy that also loads `plugins` (the CLI's `--plugin`), each once."""
        return self.model_copy(update={"plugins": list(dict.fromkeys([*self.plugins, *plugins]))})

    def with_inputs_from(self, folder: str | os.PathLike) -> PipelineConfig:
        """A copy whose input paths (the files it reads: `dataset.source`, `quality`, `plugins`,
        `refusal.source`, `ablation.evaluate.source`) are taken from `folder`, the config file's own, where a
        file of that name exists there; `ches_curate:data/...` names a file shipped in the package.

        Outputs (`store`, `export`, `ablation.output_dir`, the refusal pipeline's `dataset.source`) stay
        relative to the working directory (`resolved`), so a shipped config writes where the command runs.
        """
        folder = Path(folder)

        def local(path: str | None) -> str | None:
            if path is not None and path.startswith(PACKAGE_PREFIX):
                return str(resources.files("ches_curate").joinpath(path.removeprefix(PACKAGE_PREFIX)))
            return str(folder / path) if path is not None and (folder / path).exists() else path

        evaluate = self.ablation.evaluate.model_copy(update={"source": local(self.ablation.evaluate.source)})
        return self.model_copy(update={
            "plugins": [local(plugin) for plugin in self.plugins],
            "quality": local(self.quality),
            "dataset": self.dataset if self.refusal else self.dataset.model_copy(
                update={"source": local(self.dataset.source)}),
            "refusal": self.refusal and self.refusal.model_copy(update={"source": local(self.refusal.source)}),
            "ablation": self.ablation.model_copy(update={"evaluate": evaluate}),
        })

    def resolved(self, base: str | os.PathLike | None = None) -> PipelineConfig:
        """A copy whose local paths are absolute (relative ones are taken from `base`, default the working
        directory), so that a run records where its files are and a scheduled run finds them.

        The source and plugins stay as written unless they are existing local paths (a hub id, an
        import name).
        """
        base = Path(base or Path.cwd())

        def local(path: str | None) -> str | None:
            return str(base / path) if path is not None and (base / path).exists() else path

        evaluate = self.ablation.evaluate.model_copy(update={"source": local(self.ablation.evaluate.source)})
        update = {
            "store": str(base / self.store),
            "plugins": [local(plugin) for plugin in self.plugins],
            "export": str(base / self.export),
            "quality": str(base / self.quality) if self.quality else None,
            # The refusal pipeline writes its pairs to dataset.source: an output, made absolute even before it exists.
            "dataset": self.dataset.model_copy(update={"source": str(base / self.dataset.source) if self.refusal
                                                       else local(self.dataset.source)}),
            "refusal": self.refusal and self.refusal.model_copy(update={"source": local(self.refusal.source)}),
            "ablation": self.ablation.model_copy(update={"output_dir": str(base / self.ablation.output_dir),
                                                         "evaluate": evaluate}),
        }
        return self.model_copy(update=update)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PipelineConfig:
        """Load and validate a YAML file (or a shipped config by name, `find_config`); errors name the file and
        the offending key. Relative input paths are taken from the file's folder (`with_inputs_from`)."""
        path = find_config(path)
        return load_yaml_model(cls, path, "pipeline config").with_inputs_from(path.parent)


def shipped_configs() -> dict[str, Path]:
    """The pipeline configs installed with the package (`ches_curate/pipelines/configs/*.yaml`), by name."""
    folder = Path(str(resources.files("ches_curate.pipelines").joinpath("configs")))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def find_config(config: str | os.PathLike) -> Path:
    """`config` if it is a file, else the shipped config of that name (`demo`, `dev`, ...): `--config demo` works
    from any directory. A name that is neither is an error listing the shipped ones."""
    path = Path(config)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    shipped = shipped_configs()
    if path.name in shipped:
        return shipped[path.name]
    raise ChesCurateError(f"no config file {str(config)!r} and no shipped config of that name; shipped configs: "
                          f"{', '.join(shipped)} (or give a path to a YAML file)")
