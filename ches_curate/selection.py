"""Selecting pairs: a filter policy applied to a dataset version's scores and recorded in `selections`.

`select` is the one way a selection is made, by the CLI (`filter`), the pipelines
(curation, refresh) and the ablation arms alike: the policy sees each scored pair
once, never a quarantined one (it failed an `error` quality expectation or could not
be scored), and the decision is stored in one transaction, with where it came from
(`source`). Making the same selection twice records it once (`Store.record_selection`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ches_curate.errors import ChesCurateError
from ches_curate.policies import SelectionResult, apply_policy
from ches_curate.store import Store

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
                "n_excluded_quarantined": self.n_excluded, "kept_fraction": self.kept_fraction}


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
    result = apply_policy(frame, policy, params)
    selection_id, reused = store.record_selection(result.policy, result.params, name, version, model_key,
                                                  result.frame, result.score_column, source=source)
    return Selection(selection_id, name, version, model_key, result.policy, result.params, len(result.frame),
                     result.n_kept, n_excluded, result.frame, result, reused)


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
    return Selection(selection_id, name, version, model_key, first.policy, params, len(rows),
                     int(rows.kept.astype(bool).sum()), n_excluded, rows.loc[:, ["pair_id", "kept", "rank"]])
