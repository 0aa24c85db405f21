"""Selecting pairs: a filter policy applied to a dataset version's scores and recorded in `selections`.

`select` is the one way a selection is made, by the CLI (`filter`), the pipelines
(curation, refresh) and the ablation arms alike: the policy sees each scored pair
once, never a quarantined one (it failed an `error` quality expectation or could not
be scored), and the decision is stored in one transaction, with where it came from
(`source`), the scores it read (model key, tokenization version) and the set of scored
pairs it decided on (`scored_pairs_hash`). It is also the one reuse rule: a selection is
reused only when all of these, the policy, its params and every decision are identical
(`Store.record_selection`), so a selection made before more pairs were scored is never
taken for the version's. The pairs of the version left undecided for want of a score are
counted (`unscored`), so `filter`, `export` and the report can say so.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ches_curate.errors import ChesCurateError
from ches_curate.policies import SCORABLE_COLUMNS, SelectionResult, apply_policy, get_policy, validate_params
from ches_curate.tokenization import is_raw
from ches_curate.store import Store
from ches_curate.store.database import default_path
from ches_curate.store.plugin_scores import with_plugin_scores

EXCLUDED_STAGES = ("quality", "scoring")
"""Quarantine stages whose pairs never reach a policy: they failed an `error` expectation or could not be scored."""
KEEPS_PAIR = ("unique_pair",)
"""Quality expectations whose quarantined rows are repeats of a pair that stays (its first row)."""


@dataclass(frozen=True)
class Selection:
    """A recorded selection (`selections` rows under `selection_id`) and its counts."""

    selection_id: int
    dataset_name: str
    dataset_version: int
    model_key: str
    policy: str
    params: dict[str, Any]
    n_pairs: int
    """Distinct pairs the policy saw (scored, not quarantined)."""
    n_kept: int
    n_excluded: int
    """Scored pairs left out before the policy because they are quarantined."""
    frame: pd.DataFrame
    """pair_id, kept, rank: the policy's decision."""
    result: SelectionResult | None = None
    """The policy's full result (with the input-row counts), when the selection was just made."""
    reused: bool = False
    """True when an identical selection was already recorded and `selection_id` is that one."""
    unscored: Unscored | None = None
    """The pairs of the version the policy could not decide on for want of a score (None: no model)."""
    n_without_score: int = 0
    """Scored pairs left out before the policy because a plugin score it ranks by failed on them or was not
    computed for them (`plugin_scores`)."""

    @property
    def kept_fraction(self) -> float:
        return self.n_kept / self.n_pairs if self.n_pairs else 0.0

    @property
    def kept_pair_ids(self) -> list[str]:
        return list(dict.fromkeys(self.frame.loc[self.frame["kept"].astype(bool), "pair_id"]))

    def metadata(self) -> dict[str, Any]:
        """The counts as JSON-ready run metadata."""
        return {"selection_id": self.selection_id, "policy": self.policy, "policy_params": self.params,
                "n_selected_from": self.n_pairs, "n_kept": self.n_kept, "n_removed": self.n_pairs - self.n_kept,
                "n_excluded_quarantined": self.n_excluded, "kept_fraction": self.kept_fraction,
                "n_unscored": self.unscored.n_unscored if self.unscored else 0,
                "n_without_plugin_score": self.n_without_score}


@dataclass(frozen=True)
class Unscored:
    """How many distinct pairs of a dataset version have no score from a model under a tokenization version.

    A pair quarantined at stage `scoring` (the model could not score it) is not counted: the
    quarantine table says why it has no score.
    """

    dataset_name: str
    dataset_version: int
    model_key: str
    tokenization_version: str
    n_pairs: int
    n_unscored: int
    command: str
    """The `ches-curate score` command that scores them."""

    def note(self) -> str | None:
        """One line saying how many pairs are unscored and how to score them; None when none is."""
        if not self.n_unscored:
            return None
        return (f"{self.n_unscored:,} of the {self.n_pairs:,} pairs of '{self.dataset_name}' v{self.dataset_version} "
                f"have no score from {self.model_key} (tokenization {self.tokenization_version}), so no selection "
                f"decides on them; score them with `{self.command}`")


def scored_pairs_hash(pair_ids: Any) -> str:
    """sha256 hex of the distinct `pair_ids`, sorted and joined by newlines: the set of pairs a selection decided."""
    return hashlib.sha256("\n".join(sorted(set(pair_ids))).encode()).hexdigest()


def unscored(store: Store, name: str, version: int, model_key: str,
             tokenization_version: str | None = None) -> Unscored:
    """The pairs of the version without a score from `model_key` under `tokenization_version` (default: the one
    `Store.scores` reads), with the command that scores them."""
    tokenization_version = tokenization_version or store.read_tokenization(name, version, model_key)
    n_pairs, n_unscored = store.sql(
        """SELECT count(DISTINCT dp.pair_id) AS n_pairs,
                  count(DISTINCT dp.pair_id) FILTER (WHERE s.pair_id IS NULL AND q.pair_id IS NULL) AS n_unscored
           FROM dataset_pairs dp
           LEFT JOIN scores s ON s.pair_id = dp.pair_id AND s.model_key = ? AND s.tokenization_version = ?
           LEFT JOIN (SELECT DISTINCT pair_id FROM quarantine WHERE stage = 'scoring' AND dataset_name = ?
                      AND dataset_version = ?) q ON q.pair_id = dp.pair_id
           WHERE dp.name = ? AND dp.version = ?""",
        params=[model_key, tokenization_version, name, version, name, version],
    ).iloc[0]
    return Unscored(name, version, model_key, tokenization_version, int(n_pairs), int(n_unscored),
                    _score_command(store, name, version, model_key, tokenization_version))


def _score_command(store: Store, name: str, version: int, model_key: str, tokenization_version: str) -> str:
    """`ches-curate score` for the version with the model of `model_key` (where it was loaded from, when known)."""
    found = store.sql("SELECT coalesce(path, name) AS model, dtype FROM models WHERE model_key = ?", params=[model_key])
    model, dtype = (found.model.iloc[0], found.dtype.iloc[0]) if len(found) else (None, None)
    args = ["ches-curate", "score", "--dataset", name, "--version", str(version), "--model", model or "MODEL"]
    if dtype and dtype != "float32":
        args += ["--dtype", dtype]
    if is_raw(tokenization_version):
        args.append("--no-chat-template")
    if store.path.resolve() != default_path().resolve():
        args += ["--db", str(store.path)]
    return shlex.join(args)


def quarantined_pair_ids(store: Store, name: str, version: int) -> set[str]:
    """Pairs of the version quarantined by quality checks or scoring failures (repeats of a kept pair aside)."""
    stages = ", ".join(f"'{s}'" for s in EXCLUDED_STAGES)
    keeps = ", ".join(f"'{e}'" for e in KEEPS_PAIR)
    found = store.sql(
        f"SELECT DISTINCT pair_id FROM quarantine WHERE dataset_name = ? AND dataset_version = ? "
        f"AND pair_id IS NOT NULL AND stage IN ({stages}) AND coalesce(expectation, '') NOT IN ({keeps})",
        params=[name, version],
    )
    return set(found.pair_id) if len(found) else set()


def selectable_scores(store: Store, name: str, version: int, model_key: str) -> tuple[pd.DataFrame, int]:
    """The version's scores a policy may see (every row of every scored, non-quarantined pair, in row
    order) and how many distinct scored pairs were left out as quarantined."""
    scores = store.scores(name, version, model_key)
    if scores.empty:
        raise ChesCurateError(f"dataset {name!r} v{version} has no scores for model {model_key!r}; "
                              f"run `ches-curate score --dataset {name}` first")
    scores = with_plugin_scores(store, scores, name, version, model_key)
    excluded = scores.pair_id.isin(quarantined_pair_ids(store, name, version))
    n_excluded = int(scores.loc[excluded, "pair_id"].nunique())
    if excluded.all():
        raise ChesCurateError(f"every scored pair of dataset {name!r} v{version} is quarantined; nothing to select "
                              "from (see the quarantine table)")
    return scores[~excluded].reset_index(drop=True), n_excluded


def select(store: Store, name: str, version: int, model_key: str, policy: str, params: dict[str, Any] | None = None,
           *, scores: tuple[pd.DataFrame, int] | None = None, source: str = "api") -> Selection:
    """Apply `policy` to the version's scored, non-quarantined pairs and record the decision.

    Quarantined pairs get no `selections` row, so a selection's kept pairs (what `export`
    writes) passed quality and the policy. `scores` is `selectable_scores(...)` when the
    caller already has it (an ablation selects several arms from one read). `source` says
    who asked: `cli`, `pipeline`, `refresh`, `ablation` or `api` (a Python caller).
    """
    frame, n_excluded = scores if scores is not None else selectable_scores(store, name, version, model_key)
    frame, n_failed = without_failed_scores(frame, policy, params)
    result = apply_policy(frame, policy, params)
    missing = unscored(store, name, version, model_key)
    selection_id, reused = store.record_selection(
        result.policy, result.params, name, version, model_key, result.frame, result.score_column, source=source,
        tokenization_version=missing.tokenization_version, scored_pairs_hash=scored_pairs_hash(result.frame.pair_id),
    )
    return Selection(selection_id, name, version, model_key, result.policy, result.params, len(result.frame),
                     result.n_kept, n_excluded, result.frame, result, reused, missing, n_failed)


def without_failed_scores(frame: pd.DataFrame, policy: str, params: dict[str, Any] | None) -> tuple[pd.DataFrame, int]:
    """`frame` without the pairs a plugin score the policy ranks by failed on (quarantined for that score; NaN),
    and how many distinct pairs that left out. The built-in scores' NaN stays an error (`score_values`)."""
    validated = validate_params(get_policy(policy).obj, params or {}).model_dump(mode="json")
    columns = {c.removeprefix("-") for c in _score_columns(validated)} & set(frame.columns) - set(SCORABLE_COLUMNS)
    failed = frame[sorted(columns)].isna().any(axis=1) if columns else pd.Series(False, index=frame.index)
    return frame[~failed].reset_index(drop=True), int(frame.loc[failed, "pair_id"].nunique())


def _score_columns(params: Any) -> list[str]:
    """Every `score_column` in validated params, a chain's steps included."""
    if isinstance(params, dict):
        own = [params["score_column"]] if isinstance(params.get("score_column"), str) else []
        return own + [c for key, value in params.items() if key != "score_column" for c in _score_columns(value)]
    if isinstance(params, list):
        return [c for value in params for c in _score_columns(value)]
    return []


def load_selection(store: Store, selection_id: int) -> Selection:
    """A recorded selection with its counts, as `select` returned it (without the policy's full result)."""
    rows = store.selection(selection_id)
    first = rows.iloc[0]
    name, version, model_key = first.dataset_name, int(first.dataset_version), first.model_key
    quarantined = quarantined_pair_ids(store, name, version)
    n_excluded = int(store.sql(
        "SELECT count(DISTINCT dp.pair_id) AS n FROM dataset_pairs dp JOIN scores s ON s.pair_id = dp.pair_id "
        "AND s.model_key = ? WHERE dp.name = ? AND dp.version = ? AND list_contains(?, dp.pair_id)",
        params=[model_key, name, version, sorted(quarantined)],
    ).n.iloc[0])
    params = json.loads(first.params) if isinstance(first.params, str) else dict(first.params or {})
    scored_under = first.tokenization_version if isinstance(first.tokenization_version, str) else None
    missing = unscored(store, name, version, model_key, scored_under) if isinstance(model_key, str) else None
    return Selection(selection_id, name, version, model_key, first.policy, params, len(rows),
                     int(rows.kept.astype(bool).sum()), n_excluded, rows.loc[:, ["pair_id", "kept", "rank"]],
                     unscored=missing)
