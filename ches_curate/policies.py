"""Filter policies: decide which pairs to remove from a score table.

A policy sees only the scores table (`SCORE_COLUMNS` plus `prompt`, `chosen`,
`rejected`, `format`, `metadata`), never a model. It returns a `SelectionResult`: per
pair, `kept` and a `rank` where 1 is the first pair to remove. Policies come from
plugins (`register_filter_policies`), the built-ins included; `apply_policy` looks one
up by name, validates its parameters and checks what it returns.

Ranking is deterministic and independent of row order: removed pairs rank before kept
ones, each group by score descending, ties broken by `pair_id` (then `row`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ches_curate import plugins
from ches_curate.errors import ChesCurateError

SCORABLE_COLUMNS = ("ches", "ln_ches", "last_hidden_ip", "edit_distance")
"""Columns a policy may rank by; `score_column` names one, with a leading `-` to negate it."""

POLICY_HOOK = "register_filter_policies"


class PolicyParams(BaseModel):
    """Base of every policy's `Params`: validated, unknown names rejected, help text in Field descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_column: str = Field(
        "ches",
        description="Score to rank by: ches, ln_ches, last_hidden_ip or -edit_distance "
        "(a leading '-' negates, so the most similar pairs rank highest).",
    )

    @field_validator("score_column")
    @classmethod
    def _known_score_column(cls, value: str) -> str:
        if value.removeprefix("-") not in SCORABLE_COLUMNS:
            raise ValueError(f"must be one of {', '.join(SCORABLE_COLUMNS)}, optionally prefixed by '-'")
        return value


class Policy(ABC):
    """A filter policy: a unique `name`, a `description`, a `Params` model and `select`.

    Subclassing is optional: `register` accepts any object with these attributes.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[PolicyParams]] = PolicyParams

    @abstractmethod
    def select(self, scores: pd.DataFrame, params: PolicyParams) -> SelectionResult:
        """Decide, for every row of `scores`, whether to keep the pair and its removal rank."""


@dataclass(frozen=True, eq=False)
class SelectionResult:
    """A policy's decision: `frame` has `pair_id`, `kept` (bool) and `rank` (int, 1 = first to remove),
    one row per row of the scores table, in the same order.

    `apply_policy` fills `policy` and `params` (the validated parameters, JSON-ready).
    """

    frame: pd.DataFrame
    score_column: str
    policy: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kept(cls, scores: pd.DataFrame, kept: Any, score_column: str) -> SelectionResult:
        """Build a result from a kept mask aligned to `scores`; ranks follow the module's ranking rule."""
        kept = np.asarray(kept, dtype=bool)
        if kept.shape != (len(scores),):
            raise ValueError(f"kept has shape {kept.shape}, expected ({len(scores)},)")
        rank = np.empty(len(scores), dtype=np.int64)
        rank[removal_order(scores, score_column, removed=~kept)] = np.arange(1, len(scores) + 1)
        frame = pd.DataFrame({"pair_id": scores["pair_id"].to_numpy(), "kept": kept, "rank": rank})
        return cls(frame=frame, score_column=score_column)

    @property
    def n_kept(self) -> int:
        return int(self.frame["kept"].sum())

    @property
    def n_removed(self) -> int:
        return len(self.frame) - self.n_kept

    @property
    def removed_pair_ids(self) -> list[str]:
        """Removed pairs, first to remove first."""
        removed = self.frame[~self.frame["kept"]].sort_values("rank")
        return removed["pair_id"].tolist()


def score_values(scores: pd.DataFrame, score_column: str) -> np.ndarray:
    """The float64 values of `score_column` (negated for a leading `-`); NaN is an error naming the pairs."""
    column = score_column.removeprefix("-")
    if column not in scores.columns:
        raise ChesCurateError(f"the scores table has no column '{column}' (columns: {', '.join(map(str, scores.columns))})")
    values = scores[column].to_numpy(dtype=np.float64, na_value=np.nan)
    missing = np.isnan(values)
    if missing.any():
        first = ", ".join(scores["pair_id"].to_numpy()[missing][:3])
        raise ChesCurateError(
            f"{int(missing.sum())} of {len(values)} pairs have no '{column}' score (NaN), first pair_ids: {first}; "
            "rescore them or rank by another score_column"
        )
    return -values if score_column.startswith("-") else values


def removal_order(scores: pd.DataFrame, score_column: str, removed: np.ndarray | None = None) -> np.ndarray:
    """Row positions, first to remove first: by score descending, ties by `pair_id` then `row`.

    With a `removed` mask, removed rows come before kept ones, each group in that order.
    """
    keys = _tie_keys(scores)
    keys.insert(0, "neg_score", -score_values(scores, score_column))
    if removed is not None:
        keys.insert(0, "kept", ~np.asarray(removed, dtype=bool))
    return keys.sort_values(list(keys.columns), kind="mergesort").index.to_numpy()


def canonical_order(scores: pd.DataFrame) -> np.ndarray:
    """Row positions sorted by `pair_id` then `row`: an order that does not depend on how rows are sorted."""
    keys = _tie_keys(scores)
    return keys.sort_values(list(keys.columns), kind="mergesort").index.to_numpy()


def _tie_keys(scores: pd.DataFrame) -> pd.DataFrame:
    keys = pd.DataFrame({"pair_id": scores["pair_id"].to_numpy()}, index=np.arange(len(scores)))
    if "row" in scores.columns:
        keys["row"] = scores["row"].to_numpy()
    return keys


def remove_highest(scores: pd.DataFrame, score_column: str, n_remove: int) -> SelectionResult:
    """Remove the `n_remove` highest-scoring pairs (all of them when `n_remove` >= the number of pairs)."""
    kept = np.ones(len(scores), dtype=bool)
    kept[removal_order(scores, score_column)[: max(n_remove, 0)]] = False
    return SelectionResult.from_kept(scores, kept, score_column)


def count_from_fraction(fraction: float, total: int) -> int:
    """`fraction` of `total` pairs, rounded to the nearest integer (halves round up)."""
    return int(np.floor(fraction * total + 0.5))


def available_policies() -> dict[str, plugins.Registered]:
    """Every registered policy by name (sorted), with the plugin that registered it."""
    return plugins.registered(POLICY_HOOK, kind="policy", check=check_policy)


def get_policy(name: str) -> plugins.Registered:
    """The registered policy called `name`; an unknown name is an error listing the available ones."""
    found = available_policies()
    if name in found:
        return found[name]
    if not found:
        raise ChesCurateError(
            f"unknown policy '{name}': no policies are registered (is ches-curate installed, e.g. `pip install -e .`? "
            f"{plugins.DISABLED_PLUGINS_ENV}={','.join(sorted(plugins.disabled_plugins()))})"
        )
    raise ChesCurateError(f"unknown policy '{name}' (available: {', '.join(found)})")


def check_policy(policy: Any) -> None:
    """Reject objects that cannot work as a policy, with a message saying what is missing."""
    if isinstance(policy, type):
        raise TypeError(f"register() got the class {policy.__name__}; pass an instance: register({policy.__name__}())")
    name = getattr(policy, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"policy {policy!r} needs a non-empty string `name`")
    params = getattr(policy, "Params", None)
    if not (isinstance(params, type) and issubclass(params, PolicyParams)):
        raise TypeError(f"policy '{name}' needs a `Params` class derived from ches_curate.policies.PolicyParams")
    if not callable(getattr(policy, "select", None)):
        raise TypeError(f"policy '{name}' needs a `select(scores, params)` method")


def validate_params(policy: Any, params: dict[str, Any]) -> PolicyParams:
    """`policy.Params(**params)`, with pydantic's errors turned into one line naming each param."""
    try:
        return policy.Params(**params)
    except ValidationError as err:
        known = ", ".join(policy.Params.model_fields)
        problems = []
        for error in err.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message += f" (known params: {known})"
            elif where and error["type"] != "missing":
                message += f" (got {error['input']!r})"
            problems.append(f"param '{where}': {message}" if where else message)
        raise ChesCurateError(f"policy '{policy.name}': {'; '.join(problems)}") from None


def apply_policy(scores: Any, policy_name: str, params: dict[str, Any] | None = None) -> SelectionResult:
    """Run the policy `policy_name` on a scores table (pandas DataFrame or Arrow table).

    Returns its `SelectionResult`, aligned to `scores` row by row, with the policy name
    and validated parameters filled in.
    """
    if hasattr(scores, "to_pandas"):
        scores = scores.to_pandas()
    entry = get_policy(policy_name)
    validated = validate_params(entry.obj, params or {})
    try:
        result = entry.obj.select(scores, validated)
    except ChesCurateError:
        raise
    except Exception as err:
        raise ChesCurateError(
            f"policy '{policy_name}' (plugin '{entry.plugin}') failed: {type(err).__name__}: {err}"
        ) from err
    problem = _result_problem(result, scores)
    if problem:
        raise ChesCurateError(f"policy '{policy_name}' (plugin '{entry.plugin}') returned a bad selection: {problem}")
    return dataclasses.replace(
        result, policy=policy_name, params=validated.model_dump(mode="json"), score_column=validated.score_column
    )


def _result_problem(result: Any, scores: pd.DataFrame) -> str | None:
    if not isinstance(result, SelectionResult):
        return f"expected a SelectionResult, got {type(result).__name__}"
    frame = result.frame
    missing = {"pair_id", "kept", "rank"} - set(frame.columns)
    if missing:
        return f"frame lacks columns {sorted(missing)}"
    if len(frame) != len(scores) or not np.array_equal(frame["pair_id"].to_numpy(), scores["pair_id"].to_numpy()):
        return "frame.pair_id is not aligned to scores.pair_id"
    if frame["kept"].dtype != bool:
        return f"kept has dtype {frame['kept'].dtype}, expected bool"
    if not np.array_equal(np.sort(frame["rank"].to_numpy()), np.arange(1, len(frame) + 1)):
        return "rank is not a permutation of 1..n"
    return None
