"""Refresh: re-apply a selection policy after the source changed, and say what changed.

The expensive part of curation is scoring, and incremental scoring already touches
only pairs with no score. What remains is to re-run the (cheap) policy on the new
version and compare its decision with the previous one, pair by pair:

- `added`: in the new selection, not in the previous one (a new pair, or one that passed quality now);
- `removed`: in the previous selection, gone from the new one (dropped from the source, or quarantined);
- `now_kept` / `now_removed`: in both, with the `kept` decision flipped (e.g. a percentile cut moved).

The selection is made by `selection.select`, whose one rule decides reuse: when the
content, its scores and the policy did not change, the refresh selection already made is
reused (no new rows, an empty diff); when more pairs of the same version were scored
since, it is a new selection, compared with the one made on fewer pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ches_curate.selection import Selection, select
from ches_curate.pipeline_config import PolicySpec
from ches_curate.policies import get_policy, validate_params
from ches_curate.store import Store

CHANGES = ("added", "removed", "now_kept", "now_removed")


@dataclass(frozen=True)
class SelectionDiff:
    """How selection `selection_id` differs from `previous_selection_id` (None: there was none)."""

    previous_selection_id: int | None
    selection_id: int
    changes: pd.DataFrame
    """One row per changed pair: pair_id, change (one of CHANGES), kept_before, kept_after (None when absent)."""
    n_unchanged: int

    def counts(self) -> dict[str, int]:
        """`diff_added`, `diff_removed`, `diff_now_kept`, `diff_now_removed`, `diff_unchanged`: pairs per change."""
        tally = self.changes["change"].value_counts()
        return {**{f"diff_{c}": int(tally.get(c, 0)) for c in CHANGES}, "diff_unchanged": self.n_unchanged}

    def metadata(self) -> dict[str, Any]:
        return {"previous_selection_id": self.previous_selection_id, "selection_id": self.selection_id, **self.counts()}


def diff_selections(store: Store, previous_id: int | None, current_id: int) -> SelectionDiff:
    """Compare two recorded selections pair by pair (a full outer join on pair_id in DuckDB)."""
    if previous_id is None:
        current = store.sql("SELECT pair_id, kept FROM selections WHERE selection_id = ? ORDER BY rank, pair_id",
                            params=[current_id])
        changes = pd.DataFrame({"pair_id": current.pair_id, "change": "added", "kept_before": None,
                                "kept_after": current.kept.astype(bool)})
        return SelectionDiff(None, current_id, changes, 0)
    joined = store.sql(
        """SELECT coalesce(n.pair_id, o.pair_id) AS pair_id,
                  CASE WHEN o.pair_id IS NULL THEN 'added' WHEN n.pair_id IS NULL THEN 'removed'
                       WHEN n.kept AND NOT o.kept THEN 'now_kept' WHEN o.kept AND NOT n.kept THEN 'now_removed'
                  END AS change, o.kept AS kept_before, n.kept AS kept_after
           FROM (SELECT pair_id, kept, rank FROM selections WHERE selection_id = ?) n
           FULL OUTER JOIN (SELECT pair_id, kept, rank FROM selections WHERE selection_id = ?) o USING (pair_id)
           ORDER BY change, coalesce(n.rank, o.rank), pair_id""",
        params=[current_id, previous_id],
    )
    changed = joined.change.notna()
    changes = joined[changed].reset_index(drop=True).astype({"kept_before": object, "kept_after": object})
    return SelectionDiff(previous_id, current_id, changes, int((~changed).sum()))


def matching_selections(store: Store, name: str, model_key: str, policy: PolicySpec) -> pd.DataFrame:
    """Selections of dataset `name` made by `policy` with the same (validated) parameters and model, newest first,
    ablation arms aside. Columns: selection_id, dataset_version.
    """
    params = validate_params(get_policy(policy.name).obj, policy.params).model_dump(mode="json")
    found = store.selections(name, include_ablation=False)
    found = found[(found.policy == policy.name) & (found.model_key == model_key)]
    same = pd.Series([json.loads(p) == params for p in found.params], index=found.index, dtype=bool)
    return found.loc[same, ["selection_id", "dataset_version"]].reset_index(drop=True)


def reselect(store: Store, name: str, version: int, model_key: str, policy: PolicySpec) -> tuple[Selection, SelectionDiff]:
    """The selection for `version` (`select`: reused when identical) and its diff with the previous one.

    A reused selection has an empty diff. A new one is compared with the newest matching
    selection made before it on this or an earlier version (None on a first run).
    """
    selection = select(store, name, version, model_key, policy.name, policy.params, source="refresh")
    if selection.reused:
        return selection, diff_selections(store, selection.selection_id, selection.selection_id)
    matching = matching_selections(store, name, model_key, policy)
    earlier = matching[(matching.dataset_version <= version) & (matching.selection_id < selection.selection_id)]
    previous = int(earlier.selection_id.iloc[0]) if len(earlier) else None
    return selection, diff_selections(store, previous, selection.selection_id)
