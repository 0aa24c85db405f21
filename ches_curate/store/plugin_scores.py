"""Plugin scores in the store: one row per pair, model key and score name; a wide view with a column per score.

The four built-in scores are columns of `scores`; every other score (a plugin's, the
log-probs, an imported file's) is a row of `plugin_scores` (migration 10):

- a score that depends on the scoring model (it needs tokens, hidden states or log-probs)
  is stored under that model's key and tokenization version; any other score (texts, its
  own model, an import) under `model_key = ''`, once per pair, whatever model scored it;
- one row per (pair_id, model_key, score_name): computing a score again (a new
  `score_version`, a new tokenization) replaces the row, as `scores` does;
- a pair a score failed on has `value` NULL and `failure` saying why, naming the plugin:
  the pair is quarantined for that score only, and is not retried until the version changes.

`score_definitions` holds each score's latest version, plugin, description and needs.
Whenever a new score name is stored, the view `latest_scores_wide` is recreated: every
column of `latest_scores` and one column per stored score, so `reward_margin` is queried
like `ln_ches`.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pandas as pd

from ches_curate.store.database import Store

INDEPENDENT = ""
"""`model_key` and `tokenization_version` of a score that does not depend on the scoring model."""
ROW_COLUMNS = ("pair_id", "model_key", "tokenization_version", "score_name", "score_version", "value", "failure")
"""Columns of a frame of plugin score rows, as `write_plugin_scores` takes it."""


def definition(name: str, version: str, plugin: str, description: str, needs: list[str], bound: bool) -> dict[str, Any]:
    """One `score_definitions` row."""
    return {"score_name": name, "score_version": version, "plugin": plugin, "description": description,
            "needs": json.dumps(sorted(needs)), "model_bound": bound}


def write_plugin_scores(store: Store, rows: pd.DataFrame, definitions: list[dict[str, Any]], *,
                        run_id: int | None = None, import_id: int | None = None,
                        con: duckdb.DuckDBPyConnection | None = None) -> int:
    """Store `rows` (columns `ROW_COLUMNS`) and their scores' `definitions` in one transaction; returns rows written.

    A row replaces the pair's row of the same score under the same model key (or the
    model-independent one), whatever its version. With `con`, runs inside the caller's transaction.
    """
    if con is None:
        with store.transaction() as own:
            return write_plugin_scores(store, rows, definitions, run_id=run_id, import_id=import_id, con=own)
    new_names = _upsert_definitions(con, definitions)
    batch = rows.loc[:, list(ROW_COLUMNS)].drop_duplicates(["pair_id", "model_key", "score_name"], keep="last")
    con.register("plugin_batch", batch)
    con.execute("DELETE FROM plugin_scores ps USING plugin_batch b WHERE ps.pair_id = b.pair_id "
                "AND ps.score_name = b.score_name AND ps.model_key IN (b.model_key, '')")
    con.execute(f"INSERT INTO plugin_scores ({', '.join(ROW_COLUMNS)}, run_id, import_id) "
                f"SELECT {', '.join(ROW_COLUMNS)}, ?, ? FROM plugin_batch", [run_id, import_id])
    con.unregister("plugin_batch")
    if new_names:
        refresh_wide_view(con)
    return len(batch)


def _upsert_definitions(con: duckdb.DuckDBPyConnection, definitions: list[dict[str, Any]]) -> set[str]:
    """Record each score's latest definition; returns the names stored for the first time."""
    if not definitions:
        return set()
    frame = pd.DataFrame(definitions).drop_duplicates("score_name", keep="last")
    known = {r[0] for r in con.execute("SELECT score_name FROM score_definitions").fetchall()}
    con.register("new_definitions", frame)
    con.execute("DELETE FROM score_definitions WHERE score_name IN (SELECT score_name FROM new_definitions)")
    con.execute("INSERT INTO score_definitions (score_name, score_version, plugin, description, needs, model_bound) "
                "SELECT score_name, score_version, plugin, description, CAST(needs AS JSON), model_bound "
                "FROM new_definitions")
    con.unregister("new_definitions")
    return set(frame.score_name) - known


def refresh_wide_view(con: duckdb.DuckDBPyConnection) -> None:
    """(Re)create `latest_scores_wide`: `latest_scores` and a column per stored score (NULL where not computed)."""
    names = con.execute("SELECT score_name, model_bound FROM score_definitions ORDER BY score_name").fetchall()
    sql = "CREATE OR REPLACE VIEW latest_scores_wide AS SELECT l.*"
    joins = ""
    for bound, alias, keys in ((True, "b", "pair_id, model_key, tokenization_version"), (False, "i", "pair_id")):
        chosen = [name for name, is_bound in names if bool(is_bound) == bound]
        if not chosen:
            continue
        sql += "".join(f', {alias}."{name}"' for name in chosen)
        pivot = ", ".join(f"max(value) FILTER (WHERE score_name = '{name}') AS \"{name}\"" for name in chosen)
        where = "model_key <> ''" if bound else "model_key = ''"
        on = " AND ".join(f"{alias}.{key} = l.{key}" for key in keys.split(", "))
        joins += f" LEFT JOIN (SELECT {keys}, {pivot} FROM plugin_scores WHERE {where} GROUP BY {keys}) {alias} ON {on}"
    con.execute(sql + " FROM latest_scores l" + joins)


def missing_plugin_scores(store: Store, name: str, version: int, model_key: str, tokenization_version: str,
                          wanted: list[tuple[str, str, bool]]) -> pd.DataFrame:
    """(pair_id, score_name) for each pair of the version scored by `model_key` under `tokenization_version`
    that has no row of a `wanted` score (name, version, model_bound) at that version; failures count as done."""
    if not wanted:
        return pd.DataFrame(columns=["pair_id", "score_name"])
    with store.connect(read_only=True) as con:
        con.register("wanted", pd.DataFrame(wanted, columns=["score_name", "score_version", "model_bound"]))
        return con.execute(
            "SELECT DISTINCT dp.pair_id, w.score_name FROM dataset_pairs dp JOIN scores s ON s.pair_id = dp.pair_id "
            "AND s.model_key = ? AND s.tokenization_version = ? CROSS JOIN wanted w WHERE dp.name = ? "
            "AND dp.version = ? AND NOT EXISTS (SELECT 1 FROM plugin_scores ps WHERE ps.pair_id = dp.pair_id "
            "AND ps.score_name = w.score_name AND ps.score_version = w.score_version AND CASE WHEN w.model_bound "
            "THEN ps.model_key = ? AND ps.tokenization_version = ? ELSE ps.model_key = '' END) ORDER BY 1, 2",
            [model_key, tokenization_version, name, version, model_key, tokenization_version],
        ).df()


def plugin_score_table(store: Store, name: str, version: int, model_key: str) -> pd.DataFrame:
    """pair_id and one column per stored score for the pairs of the version (NaN where failed or not computed).

    A model-bound score counts only under the tokenization of the pair's current `scores` row
    for `model_key`, as in `latest_scores_wide`.
    """
    with store.connect(read_only=True) as con:
        long = con.execute(
            "SELECT DISTINCT ps.pair_id, ps.score_name, ps.value FROM dataset_pairs dp JOIN plugin_scores ps "
            "ON ps.pair_id = dp.pair_id LEFT JOIN scores s ON s.pair_id = ps.pair_id AND s.model_key = ps.model_key "
            "AND s.tokenization_version = ps.tokenization_version WHERE dp.name = ? AND dp.version = ? "
            "AND (ps.model_key = '' OR (ps.model_key = ? AND s.pair_id IS NOT NULL))", [name, version, model_key],
        ).df()
    if long.empty:
        return pd.DataFrame({"pair_id": pd.Series(dtype=object)})
    wide = long.pivot_table(index="pair_id", columns="score_name", values="value", aggfunc="first", dropna=False)
    return wide.reindex(long.pair_id.unique()).rename_axis(columns=None).reset_index()


def with_plugin_scores(store: Store, scores: pd.DataFrame, name: str, version: int, model_key: str) -> pd.DataFrame:
    """`scores` (a `Store.scores` frame) with a column per stored score, in the same row order."""
    extra = plugin_score_table(store, name, version, model_key)
    if len(extra.columns) == 1:
        return scores
    return scores.merge(extra, on="pair_id", how="left", validate="many_to_one")


def stored_score_names(store: Store) -> list[str]:
    """Names of the scores `plugin_scores` holds (those of `score_definitions`), sorted."""
    return store.sql("SELECT score_name FROM score_definitions ORDER BY 1").score_name.tolist()
