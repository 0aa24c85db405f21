"""The built-in filter policies: top-k, percentile, length-normalized, threshold, random, quantile-slice and chain.

Registered through the `register_filter_policies` hook, exactly as a third-party plugin
would be; `ches_curate.plugins.DEFAULT_PLUGINS` names this module, so it is found
without the package's entry-point metadata.
Each ranks pairs by `score_column` (highest first; ties by pair_id) and removes from the
top, except `random`, the ablation control, and `quantile-slice`, which keeps a window of the
ranking (Razin et al.'s Section 5 subsets), and `chain`, which applies several of them in turn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ches_curate.hookspecs import hookimpl
from ches_curate.policies import (
    Policy,
    PolicyParams,
    SelectionResult,
    apply_policy,
    canonical_order,
    count_from_fraction,
    get_policy,
    remove_highest,
    removal_order,
    score_values,
    validate_params,
)


class TopK(Policy):
    name = "top-k"
    description = "Remove the k highest-scoring pairs (all of them when k exceeds the number of pairs)."

    class Params(PolicyParams):
        k: int = Field(..., ge=0, description="Number of highest-scoring pairs to remove.")

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        return remove_highest(scores, params.score_column, params.k)


class Percentile(Policy):
    name = "percentile"
    description = (
        "Remove pairs scoring strictly above the p-th percentile, computed by linear interpolation "
        "between sorted scores (numpy's default): p=100 removes none, p=0 keeps only the minimum."
    )

    class Params(PolicyParams):
        p: float = Field(..., ge=0, le=100, description="Percentile in [0, 100]; pairs scoring above it are removed.")

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        values = score_values(scores, params.score_column)
        if len(values) == 0:
            return SelectionResult.from_kept(scores, [], params.score_column)
        cut = np.percentile(values, params.p, method="linear")
        return SelectionResult.from_kept(scores, values <= cut, params.score_column)


class LengthNormalized(Policy):
    name = "length-normalized"
    description = (
        "Keep the n (or the fraction) lowest-ranked pairs by ln-CHES and remove the rest; "
        "Razin et al. kept the 5% lowest ln-CHES of a refusal set."
    )

    class Params(PolicyParams):
        n: int | None = Field(None, ge=0, description="Number of lowest-scoring pairs to keep (instead of fraction).")
        fraction: float | None = Field(
            0.05, ge=0, le=1, description="Fraction of pairs to keep, lowest scores first (rounded to nearest)."
        )

        @model_validator(mode="before")
        @classmethod
        def _n_replaces_fraction(cls, data: Any) -> Any:
            if isinstance(data, dict) and data.get("n") is not None:
                if data.get("fraction") is not None:
                    raise ValueError("give n or fraction, not both")
                return {**data, "fraction": None}
            return data

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        keep = params.n if params.n is not None else count_from_fraction(params.fraction, len(scores))
        return remove_highest(scores, params.score_column, len(scores) - keep)


class Threshold(Policy):
    name = "threshold"
    description = "Remove pairs whose score is strictly greater than value."

    class Params(PolicyParams):
        value: float = Field(..., allow_inf_nan=False, description="Pairs scoring above this value are removed.")

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        kept = score_values(scores, params.score_column) <= params.value
        return SelectionResult.from_kept(scores, kept, params.score_column)


class Random(Policy):
    name = "random"
    description = (
        "Remove n pairs (or a fraction) uniformly at random with a seed: the ablation control. "
        "To match another selection, pass its removed count as n."
    )

    class Params(PolicyParams):
        n: int | None = Field(None, ge=0, description="Number of pairs to remove.")
        fraction: float | None = Field(None, ge=0, le=1, description="Fraction of pairs to remove (rounded to nearest).")
        seed: int = Field(0, description="Random seed; the same seed and pairs give the same selection.")

        @model_validator(mode="after")
        def _n_or_fraction(self):
            if (self.n is None) == (self.fraction is None):
                raise ValueError("give exactly one of n (pairs to remove) or fraction")
            return self

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        n_remove = params.n if params.n is not None else count_from_fraction(params.fraction, len(scores))
        # Shuffle a canonical (pair_id) order, not the row order, so the draw does not depend on how rows are sorted.
        canonical = canonical_order(scores)
        removed = canonical[np.random.default_rng(params.seed).permutation(len(scores))[:n_remove]]
        kept = np.ones(len(scores), dtype=bool)
        kept[removed] = False
        return SelectionResult.from_kept(scores, kept, params.score_column)


class QuantileSlice(Policy):
    name = "quantile-slice"
    description = (
        "Keep the n pairs centred on the p-th percentile of score_column (the pair at sorted position "
        "p/100*(N-1), halves rounded up) and remove the rest: p=0 keeps the n lowest, p=100 the n highest "
        "(Razin et al., Section 5: 512-pair slices at 0/25/50/75/100)."
    )

    class Params(PolicyParams):
        percentile: float = Field(..., ge=0, le=100, description="Percentile the kept window is centred on.")
        n: int = Field(..., ge=1, description="Pairs kept (all of them when there are fewer).")

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        ascending = removal_order(scores, params.score_column)[::-1]
        n_keep = min(params.n, len(scores))
        centre = math.floor(params.percentile / 100 * (len(scores) - 1) + 0.5)  # position, halves rounded up
        start = min(max(centre - n_keep // 2, 0), len(scores) - n_keep)
        kept = np.zeros(len(scores), dtype=bool)
        kept[ascending[start:start + n_keep]] = True
        return SelectionResult.from_kept(scores, kept, params.score_column)


class ChainStep(BaseModel):
    """One step of a `chain`: a policy and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str
    params: dict[str, Any] = Field(default_factory=dict)


class Chain(Policy):
    name = "chain"
    description = (
        "Apply several policies in turn, each to the pairs the previous one kept: e.g. ln_ches at or below its "
        "90th percentile, then reward_margin >= 1. Removed pairs rank by step, then by that step's rank."
    )

    class Params(PolicyParams):
        steps: list[ChainStep] = Field(..., min_length=1, description="The policies, in order: "
                                       "[{policy: NAME, params: {...}}, ...] (on the command line: --then).")

        @model_validator(mode="before")
        @classmethod
        def _validated_steps(cls, data: Any) -> Any:
            """Each step's params validated by its policy (so they are recorded as it reads them); the chain's
            score_column is the last step's."""
            if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
                return data
            steps = []
            for step in data["steps"]:
                step = ChainStep.model_validate(step)
                params = validate_params(get_policy(step.policy).obj, step.params)
                steps.append({"policy": step.policy, "params": params.model_dump(mode="json")})
            score_column = steps[-1]["params"]["score_column"] if steps else data.get("score_column")
            return {**data, "steps": steps, "score_column": data.get("score_column", score_column)}

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        survivors, order = scores, []
        for step in params.steps:
            result = apply_policy(survivors, step.policy, step.params)
            decided = result.frame.sort_values("rank")
            order += decided.loc[~decided["kept"], "pair_id"].tolist()
            kept = decided.loc[decided["kept"], "pair_id"]
            survivors = survivors[survivors["pair_id"].isin(set(kept))]
        order += kept.tolist()
        rank = pd.Series(np.arange(1, len(order) + 1), index=order)
        frame = pd.DataFrame({"pair_id": scores["pair_id"].to_numpy(),
                              "kept": scores["pair_id"].isin(set(kept)).to_numpy(),
                              "rank": rank.loc[scores["pair_id"]].to_numpy()})
        return SelectionResult(frame=frame, score_column=params.score_column)


@hookimpl
def register_filter_policies(register):
    for policy in (TopK(), Percentile(), LengthNormalized(), Threshold(), Random(), QuantileSlice(), Chain()):
        register(policy)
