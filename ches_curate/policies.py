"""Filter policies: decide which pairs to remove from a score table.

A policy sees only the scores table (`SCORE_COLUMNS` plus `prompt`, `chosen`,
`rejected`, `format`, `metadata`), never a model. It returns a `SelectionResult`: per
pair, `kept` and a `rank` where 1 is the first pair to remove. Policies come from
plugins (`register_filter_policies`), the built-ins included; `apply_policy` looks one
up by name, validates its parameters and checks what it returns.

A dataset may repeat a pair at many rows; a policy sees each `pair_id` once (its first
row), on a copy it may change freely, and decides per distinct pair.

Ranking is deterministic and independent of row order: removed pairs rank before kept
ones, each group by score descending, ties broken by `pair_id` (then `row`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ches_curate import plugins
from ches_curate.errors import ChesCurateError
from ches_curate.terminal import printable

SCORABLE_COLUMNS = ("ches", "ln_ches", "last_hidden_ip", "edit_distance")
"""The built-in score columns. A policy may rank by any stored score (these, a plugin's, an imported one):
`score_column` names one, with a leading `-` to negate it."""
_SCORE_NAME = re.compile(r"^-?[a-z][a-z0-9_]*$")
_NOT_SCORES = ("row", "chosen_tokens", "rejected_tokens", "truncated")

POLICY_HOOK = "register_filter_policies"


class PolicyParams(BaseModel):
    """Base of every policy's `Params`: validated, unknown names rejected, help text in Field descriptions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_column: str = Field(
        "ln_ches",
        description="Score to rank by: ln_ches (the length-normalised CHES the paper filters on; raw ches grows with "
        "the square of the response lengths), ches, last_hidden_ip, -edit_distance or any stored score (a plugin's, "
        "an imported one); a leading '-' negates, so -edit_distance ranks the most similar pairs highest.",
    )

    @field_validator("score_column")
    @classmethod
    def _known_score_column(cls, value: str) -> str:
        if not _SCORE_NAME.match(value):
            raise ValueError(f"must be a score name such as {', '.join(SCORABLE_COLUMNS)}, optionally prefixed by '-'")
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
    one row per row of the scores table the policy was given, in the same order.

    `apply_policy` fills `policy`, `params` (the validated parameters, JSON-ready) and
    `n_input_rows`, the rows of the caller's table the distinct pairs stand for.
    """

    frame: pd.DataFrame
    score_column: str
    policy: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    n_input_rows: int | None = None

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
    def n_duplicate_rows(self) -> int:
        """Input rows beyond the first of each pair (0 unless `apply_policy` saw a pair repeated)."""
        return 0 if self.n_input_rows is None else self.n_input_rows - len(self.frame)

    @property
    def removed_pair_ids(self) -> list[str]:
        """Removed pairs, first to remove first."""
        removed = self.frame[~self.frame["kept"]].sort_values("rank")
        return removed["pair_id"].tolist()


def score_values(scores: pd.DataFrame, score_column: str) -> np.ndarray:
    """The float64 values of `score_column` (negated for a leading `-`); NaN is an error naming the pairs."""
    column = score_column.removeprefix("-")
    if column not in scores.columns:
        known = [str(c) for c in scores.columns if c not in _NOT_SCORES and pd.api.types.is_numeric_dtype(scores[c])]
        raise ChesCurateError(
            f"the scores table has no score '{column}' (scores: {', '.join(known)}); compute a registered score with "
            "`ches-curate score --scores NAME` or bring values in with `ches-curate scores import`"
        )
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


def distinct_pairs(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per `pair_id`, its first (lowest `row`, else first listed), in the table's order.

    `Store.scores` lists a pair once per dataset row that holds it; deciding on each
    copy separately would count one pair many times and store contradictory decisions.
    """
    scores = scores.reset_index(drop=True)
    by_row = scores.sort_values("row", kind="mergesort") if "row" in scores.columns else scores
    firsts = np.sort(by_row.drop_duplicates("pair_id").index.to_numpy())
    return scores if len(firsts) == len(scores) else scores.iloc[firsts].reset_index(drop=True)


def apply_policy(scores: Any, policy_name: str, params: dict[str, Any] | None = None) -> SelectionResult:
    """Run the policy `policy_name` on the distinct pairs of a scores table (pandas DataFrame or Arrow table).

    The policy gets a deep copy of `distinct_pairs(scores)`, so nothing it does reaches
    the caller's table. Its `SelectionResult` must decide every offered pair exactly
    once; it comes back in the offered order with the policy name, validated
    parameters and `n_input_rows` filled in.
    """
    if hasattr(scores, "to_pandas"):
        scores = scores.to_pandas()
    entry = get_policy(policy_name)
    validated = validate_params(entry.obj, params or {})
    offered = distinct_pairs(scores)
    offered_ids = pd.Index(offered["pair_id"].to_numpy(copy=True), name="pair_id")
    try:
        result = entry.obj.select(_private_copy(offered), validated)
    except ChesCurateError:
        raise
    except (Exception, SystemExit, GeneratorExit) as err:  # a plugin's sys.exit() must not end the command as a success
        raise ChesCurateError(
            f"policy '{policy_name}' (plugin '{entry.plugin}') failed: {plugins.describe_failure(err)}"
        ) from err
    problem = _result_problem(result, offered_ids)
    if problem:
        raise ChesCurateError(f"policy '{policy_name}' (plugin '{entry.plugin}') returned {problem}")
    frame = result.frame.set_index("pair_id").loc[offered_ids, ["kept", "rank"]].reset_index()
    return dataclasses.replace(
        result, frame=frame, policy=policy_name,
        params=validated.model_dump(mode="json"), score_column=validated.score_column, n_input_rows=len(scores),
    )


def _private_copy(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy sharing nothing mutable with `frame`: pandas' deep copy leaves the dicts and
    message lists of object columns (`metadata`, chat `prompt`) shared, so those are copied too."""
    copied = frame.copy(deep=True)
    for column in copied.columns[copied.dtypes == object]:
        values = copied[column].to_numpy()
        if any(isinstance(v, (dict, list, np.ndarray)) for v in values):
            copied[column] = pd.Series([copy.deepcopy(v) for v in values], index=copied.index, dtype=object)
    return copied


def _result_problem(result: Any, offered_ids: pd.Index) -> str | None:
    if not isinstance(result, SelectionResult):
        return f"a bad selection: expected a SelectionResult, got {type(result).__name__}"
    frame = result.frame
    missing = {"pair_id", "kept", "rank"} - set(frame.columns)
    if missing:
        return f"a bad selection: frame lacks columns {sorted(missing)}"
    coverage = _coverage_problems(pd.Index(frame["pair_id"]), offered_ids)
    if coverage:
        return (f"a selection of {len(frame):,} pairs for the {len(offered_ids):,} it was offered: {coverage} "
                "(decide each offered pair once, e.g. SelectionResult.from_kept(scores, kept, score_column))")
    if frame["kept"].dtype != bool:
        return f"a bad selection: kept has dtype {frame['kept'].dtype}, expected bool"
    ranks = frame["rank"]
    if not pd.api.types.is_integer_dtype(ranks) or not np.array_equal(np.sort(ranks), np.arange(1, len(frame) + 1)):
        return f"a bad selection: rank is not a permutation of 1..{len(frame)}"
    return None


def _coverage_problems(ids: pd.Index, offered_ids: pd.Index) -> str:
    """What keeps `ids` from listing each offered pair exactly once, as '; '-joined clauses ('' if nothing)."""
    known = ids.isin(offered_ids)
    missing = offered_ids[~offered_ids.isin(ids)]
    unknown = ids[~known].unique()
    repeated = ids[known & ids.duplicated()].unique()
    clauses = [
        (len(missing), "offered pairs missing", missing),
        (len(unknown), "pair_ids it was not offered", unknown),
        (len(repeated), "pairs listed more than once", repeated),
    ]
    return "; ".join(f"{count:,} {what} (first: {_first_ids(values)})" for count, what, values in clauses if count)


def _first_ids(values: Any) -> str:
    return ", ".join(printable(value)[:16] for value in list(values)[:3])
