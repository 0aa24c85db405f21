"""`Store`: the one class every read and write of the DuckDB store goes through.

One file (default `./ches_curate.duckdb`, or `$CHES_CURATE_DB`). Every method opens a
short-lived connection, writes one small transaction, commits and closes, so readers
in other processes wait at most one batch. DuckDB lets one process hold the file for
writing and blocks every other process meanwhile (readers too): `connect` retries for
a bounded time, then raises `StoreLockedError` naming the holder's PID.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ches_curate import query_guard, tokenization
from ches_curate.store import connections, integrity, migrations
from ches_curate.errors import ChesCurateError
from ches_curate.models import superseded_keys
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.store.records import (
    LINK_SCHEMA, QUARANTINE_FIELDS, QUARANTINE_SCHEMA, ContentHash, DatasetVersion, ParquetSpill, pair_from_record,
    pairs_table, quarantine_table, to_json,
)

DEFAULT_DB = "ches_curate.duckdb"
INSERT_BATCH = 10_000
PAGE_SIZE = 5_000
SCORE_VALUES = SCORE_COLUMNS[2:]
SELECTION_SOURCES = ("cli", "pipeline", "refresh", "ablation", "api", "unknown")
"""Where a selection came from (`selections.source`): `unknown` marks the ones made before migration 6."""
TRAIN_RUN_COLUMNS = (
    "dataset_name", "dataset_version", "selection_id", "model_key", "n_train_pairs", "global_step", "train_loss",
    "reward_accuracy", "preferred_logp_change", "dispreferred_logp_change", "preferred_decrease_fraction",
    "ches_logp_corr", "ln_ches_logp_corr", "wall_time_s", "checkpoint_dir", "config",
)
"""Columns of a `train_runs` row as written (`train_run_id` and `created_at` are filled by the store)."""

PROBE_RUN_COLUMNS = (
    "model_key", "prompt", "preferred", "dispreferred", "mode", "leading_space", "learning_rate", "steps", "seed",
    "p_plus_before", "p_plus_after", "p_plus_min", "p_plus_min_step", "p_minus_before", "p_minus_after",
    "loss_monotone", "final_loss", "displaced", "single_token_ches", "hidden_norm_sq", "top_gainers",
    "predicted_gainers", "wall_time_s",
)
"""Columns of a `probe_runs` row as written (`probe_run_id` and `created_at` are filled by the store)."""


def _sql_error(err: duckdb.Error, write: bool, path: Path, memory_limit: str | None = None) -> ChesCurateError:
    """DuckDB's error on one line: its hint and `LINE 1: ...` context kept, the line of carets dropped.

    A refusal by the sandbox or by read-only mode says so, and how to get past it; so
    does a query that outgrew its memory limit.
    """
    message = str(err)
    if integrity.is_damage(err):
        return integrity.damaged_error(path, message)
    lines = [line.strip() for line in message.splitlines() if line.strip().strip("^")] or [type(err).__name__]
    if isinstance(err, duckdb.OutOfMemoryException):
        return ChesCurateError(f"sql: the query needs more memory than its limit ({memory_limit or '80% of RAM'}): "
                               f"{lines[0]} (raise --memory-limit, or select fewer rows or columns)")
    if not write and (isinstance(err, duckdb.PermissionException) or "configuration has been locked" in message):
        return ChesCurateError(f"sql: refused by the read-only sandbox: {lines[0]} (reading or writing files outside "
                               "the store, loading extensions and changing settings are off; use --write to trust "
                               "this query)")
    if not write and "read-only mode" in message:
        return ChesCurateError(f"{lines[0]} (the store is opened read-only; add --write to modify it)")
    return ChesCurateError(" ".join(lines))


def _insert_model(con: duckdb.DuckDBPyConnection, key: str, info: dict[str, Any]) -> None:
    columns = ("name", "revision", "file_hash", "dtype", "tokenizer_hash", "path")
    con.execute(f"INSERT OR IGNORE INTO models (model_key, {', '.join(columns)}) VALUES (?{', ?' * len(columns)})",
                [key, *(info.get(c) for c in columns)])


def _no_valid_pairs(source: str, rejected: ParquetSpill) -> ChesCurateError:
    """No version is made of a source without one valid pair: `filter` and `export` would take it as the latest."""
    if not rejected.num_rows:
        return ChesCurateError(f"{source}: no preference pairs found; nothing was stored")
    first = pq.read_table(rejected.path).slice(0, 1).to_pylist()[0]
    where = f"line {first['line']}: " if first.get("line") is not None else ""
    what = f"field '{first['field']}' {first['reason']}" if first.get("field") else first["reason"]
    return ChesCurateError(
        f"{source}: no valid pairs: all {rejected.num_rows:,} rows failed (first: {where}{what}); no version was "
        "stored. Fix the file (or check --format) and ingest again"
    )


def _current_versions() -> tuple[str, str]:
    """The tokenization versions scores are read under: the one in effect first, then the other current one."""
    requested = tokenization.chat_template_requested()
    return tokenization.current_version(requested), tokenization.current_version(not requested)


def default_path() -> Path:
    return Path(os.environ.get("CHES_CURATE_DB") or DEFAULT_DB)


class Store:
    """A DuckDB file with the ches_curate schema; migrated to the latest version on open.

    `create=False` refuses a path that does not exist (for read-only commands, where a
    typo should not create an empty store); `migrate=False` writes nothing at all and
    refuses a file that is not a store at the latest schema. `lock_timeout_s` bounds the wait for a
    lock held by another process (default 5 s, or `$CHES_CURATE_LOCK_TIMEOUT`).
    """

    def __init__(
        self, path: str | Path | None = None, *, create: bool = True, lock_timeout_s: float | None = None,
        migrate: bool = True,
    ):
        self.path = Path(path) if path is not None else default_path()
        self.lock_timeout_s = connections.lock_timeout() if lock_timeout_s is None else lock_timeout_s
        if not self.path.exists() and not create:
            raise ChesCurateError(f"no store at {self.path} (create one with `ches-curate ingest FILE --dataset NAME`, "
                                  "or pass --db)")
        if migrate:
            migrations.ensure_latest(self.path, self.connect)
        else:
            migrations.require_latest(self.path, self.connect)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits up to `lock_timeout_s` for another process's lock.

        DuckDB's errors about a damaged file become one `DamagedStoreError` line.
        """
        try:
            with connections.connect(self.path, read_only, self.lock_timeout_s) as con:
                yield con
        except duckdb.Error as err:
            if integrity.is_damage(err):
                raise integrity.damaged_error(self.path, str(err)) from err
            raise

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction: all of it is committed, or (on any error, or a kill) none of it."""
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    def schema_version(self) -> int:
        with self.connect(read_only=True) as con:
            return migrations.current_version(con)

    def register_dataset(
        self, name: str, source: str | None, items: Iterable[PreferencePair | Any]
    ) -> DatasetVersion:
        """Store a dataset read from `source`; a new version only if its content changed.

        `items` are `PreferencePair`s and ingest's `RejectedRow`s (quarantined with stage
        `ingest`). The content hash is sha256 over `row, pair_id` of each pair and
        `line, field, reason, raw` of each rejected row, in input order: the same file
        ingested twice is one version. Pair texts are written in batches of 10k
        (deduplicated by `pair_id`); the version's links and rejected rows wait in
        temporary Parquet files, so memory stays flat, and the version itself appears
        in one transaction.
        """
        self.verify()
        digest = ContentHash()
        with tempfile.TemporaryDirectory(prefix="ches_curate_ingest_") as spill_dir:
            links = ParquetSpill(Path(spill_dir) / "links.parquet", LINK_SCHEMA)
            rejected = ParquetSpill(Path(spill_dir) / "rejected.parquet", QUARANTINE_SCHEMA)
            self._store_pairs(items, digest, links, rejected)
            if not links.num_rows:
                raise _no_valid_pairs(source or name, rejected)
            content_hash = digest.hexdigest()
            with self.transaction() as con:
                latest = con.execute(
                    "SELECT version, content_hash, n_pairs, n_quarantined, source FROM datasets WHERE name = ? "
                    "ORDER BY version DESC LIMIT 1", [name]
                ).fetchall()
                latest = latest[0] if latest else None
                if latest and latest[1] == content_hash:
                    return DatasetVersion(name, latest[0], latest[2], latest[3], False, content_hash, latest[4])
                version = latest[0] + 1 if latest else 1
                con.execute(
                    "INSERT INTO datasets (name, version, source, content_hash, n_pairs, n_quarantined) "
                    "VALUES (?, ?, ?, ?, ?, ?)", [name, version, source, content_hash, links.num_rows, rejected.num_rows]
                )
                self._add_version_rows(con, name, version, links, rejected)
        return DatasetVersion(name, version, links.num_rows, rejected.num_rows, True, content_hash, source)

    def verify(self) -> None:
        """Read every block of the store (DuckDB checks each checksum); a damaged store raises before any write."""
        with self.connect(read_only=True) as con:
            integrity.verify_blocks(con, self.path)

    @staticmethod
    def _add_version_rows(
        con: duckdb.DuckDBPyConnection, name: str, version: int, links: ParquetSpill, rejected: ParquetSpill
    ) -> None:
        if links.num_rows:
            con.execute('INSERT INTO dataset_pairs SELECT ?, ?, "row", pair_id FROM read_parquet(?)',
                        [name, version, str(links.path)])
        if rejected.num_rows:
            con.execute(f"INSERT INTO quarantine ({', '.join(QUARANTINE_FIELDS)}) "
                        f"SELECT ?, ?, {', '.join(QUARANTINE_FIELDS[2:])} FROM read_parquet(?)",
                        [name, version, str(rejected.path)])

    def _store_pairs(
        self, items: Iterable[PreferencePair | Any], digest: ContentHash, links: ParquetSpill, rejected: ParquetSpill
    ) -> None:
        """Write the pairs batch by batch; spill the version's (row, pair_id) links and rejected rows."""
        pairs: list[PreferencePair] = []
        rejects: list[dict] = []
        for item in items:
            if not isinstance(item, PreferencePair):
                rejects.append(digest.add_rejected(item))
                if len(rejects) >= INSERT_BATCH:
                    rejected.append(quarantine_table(rejects))
                    rejects = []
                continue
            pairs.append(item)
            if len(pairs) >= INSERT_BATCH:
                links.append(self._insert_pairs(pairs, digest))
                pairs = []
        if pairs:
            links.append(self._insert_pairs(pairs, digest))
        if rejects:
            rejected.append(quarantine_table(rejects))
        links.close()
        rejected.close()

    def _insert_pairs(self, batch: list[PreferencePair], digest: ContentHash) -> pa.Table:
        """Insert the batch's new pairs (the first of each `pair_id`); return its links."""
        table = pairs_table(batch)
        pair_ids = table["pair_id"].to_pylist()
        rows = [p.row for p in batch]
        digest.add_pairs(rows, pair_ids)
        first: dict[str, int] = {}
        for i, pair_id in enumerate(pair_ids):
            first.setdefault(pair_id, i)
        with self.transaction() as con:
            con.register("new_pairs", table if len(first) == len(pair_ids) else table.take(list(first.values())))
            con.execute(
                "INSERT INTO pairs SELECT * FROM new_pairs n "
                "WHERE NOT EXISTS (SELECT 1 FROM pairs p WHERE p.pair_id = n.pair_id)"
            )
        return pa.table({"row": pa.array(rows, pa.int64()), "pair_id": table["pair_id"]}, schema=LINK_SCHEMA)

    def datasets(self) -> pd.DataFrame:
        """Every dataset version with its counts and the models that scored it."""
        return self.sql(
            """SELECT d.name, d.version, d.n_pairs, d.n_quarantined, d.source, d.created_at, d.content_hash,
                      (SELECT count(DISTINCT s.model_key) FROM dataset_pairs dp JOIN scores s USING (pair_id)
                       WHERE dp.name = d.name AND dp.version = d.version) AS n_models
               FROM datasets d ORDER BY d.name, d.version"""
        )

    def latest_version(self, name: str) -> DatasetVersion:
        return self.dataset_version(name)

    def dataset_version(self, name: str, version: int | None = None) -> DatasetVersion:
        """The given (default: latest) version of dataset `name`; a clear error when unknown."""
        with self.connect(read_only=True) as con:
            rows = con.execute(
                "SELECT version, n_pairs, n_quarantined, content_hash, source FROM datasets WHERE name = ? "
                "ORDER BY version", [name]
            ).fetchall()
            known = [r[0] for r in con.execute("SELECT DISTINCT name FROM datasets ORDER BY name").fetchall()]
        if not rows:
            raise ChesCurateError(f"unknown dataset {name!r} in {self.path} (known: {', '.join(known) or 'none yet'}); "
                                  f"add it with `ches-curate ingest FILE --dataset {name}`")
        chosen = rows[-1] if version is None else next((r for r in rows if r[0] == version), None)
        if chosen is None:
            raise ChesCurateError(f"dataset {name!r} has no version {version} "
                                  f"(versions: {', '.join(str(r[0]) for r in rows)})")
        return DatasetVersion(name, chosen[0], chosen[1], chosen[2], False, chosen[3], chosen[4])

    def dataset_pairs(
        self, name: str, version: int | None = None, *, selection_id: int | None = None, distinct: bool = False
    ) -> Iterator[PreferencePair]:
        """The pairs of a dataset version in row order, read page by page (no lock held between pages).

        `selection_id` keeps only the pairs that selection kept; `distinct` yields each
        `pair_id` once (at its first row) when the dataset repeats a pair.
        """
        dv = self.dataset_version(name, version)
        kept = "AND EXISTS (SELECT 1 FROM selections sel WHERE sel.selection_id = ? AND sel.pair_id = dp.pair_id AND sel.kept)"
        filters = [(kept, [selection_id])] if selection_id is not None else []
        return self._pages(dv, filters, distinct)

    def unscored_pairs(self, name: str, version: int, model_key: str,
                       tokenization_version: str | None = None) -> Iterator[PreferencePair]:
        """Pairs of the version with no score for `model_key` under `tokenization_version`, in row order, each once.

        `tokenization_version` defaults to the one in effect (`tokenization.current_version`);
        a score under any other version (an old one, say) does not count: the pair is offered
        again. Paged by row with a fresh read-only connection per page, so the caller may write
        scores between pages; a pair scored meanwhile is simply not offered again.
        """
        unscored = ("AND NOT EXISTS (SELECT 1 FROM scores s WHERE s.pair_id = dp.pair_id AND s.model_key = ? "
                    "AND s.tokenization_version = ?)")
        values = [model_key, tokenization_version or tokenization.current_version()]
        return self._pages(DatasetVersion(name, version, 0, 0), [(unscored, values)], distinct=True, verify=True)

    def _pages(
        self, dv: DatasetVersion, filters: list[tuple[str, list]], distinct: bool, verify: bool = False
    ) -> Iterator[PreferencePair]:
        conditions = " ".join(sql for sql, _ in filters)
        # The page is cut from the narrow dataset_pairs first, so only its pairs' texts are read.
        query = (
            'WITH page AS (SELECT dp."row", dp.pair_id FROM dataset_pairs dp WHERE dp.name = ? AND dp.version = ? '
            f'AND dp."row" > ? {conditions} ORDER BY dp."row" LIMIT ?) '
            'SELECT page."row", p.* FROM page JOIN pairs p USING (pair_id) ORDER BY page."row"'
        )
        repeated: set[str] | None = None if distinct else set()
        seen: set[str] = set()
        last_row = -1
        while True:
            params = [dv.name, dv.version, last_row, *(v for _, values in filters for v in values), PAGE_SIZE]
            with self.connect(read_only=True) as con:
                if verify:  # checked in the first page's connection: one connection less for the scoring loop
                    verify = not con.execute("SELECT count(*) FROM datasets WHERE name = ? AND version = ?",
                                             [dv.name, dv.version]).fetchall()[0][0]
                if repeated is None:
                    repeated = {r[0] for r in con.execute(
                        "SELECT pair_id FROM dataset_pairs WHERE name = ? AND version = ? GROUP BY pair_id "
                        "HAVING count(*) > 1", [dv.name, dv.version]).fetchall()}
                result = con.execute(query, params)
                names = [d[0] for d in result.description]
                page = [dict(zip(names, values)) for values in result.fetchall()]
            if verify:
                self.dataset_version(dv.name, dv.version)  # raises, listing what exists
            for rec in page:
                if rec["pair_id"] in repeated:
                    if rec["pair_id"] in seen:
                        continue
                    seen.add(rec["pair_id"])
                yield pair_from_record(rec)
            if len(page) < PAGE_SIZE:
                return
            last_row = page[-1]["row"]

    def register_model(self, key: str, info: dict[str, Any]) -> None:
        with self.transaction() as con:
            _insert_model(con, key, info)

    def score_counts(self, name: str, version: int, model_key: str,
                     tokenization_version: str | None = None) -> tuple[int, int]:
        """(distinct pairs in the version, how many have a score for `model_key` under `tokenization_version`).

        `tokenization_version` defaults to the one in effect, as in `unscored_pairs`.
        """
        with self.connect(read_only=True) as con:
            n_pairs, n_scored = con.execute(
                "SELECT count(DISTINCT dp.pair_id), count(DISTINCT s.pair_id) FROM dataset_pairs dp LEFT JOIN scores s "
                "ON s.pair_id = dp.pair_id AND s.model_key = ? AND s.tokenization_version = ? "
                "WHERE dp.name = ? AND dp.version = ?",
                [model_key, tokenization_version or tokenization.current_version(), name, version],
            ).fetchall()[0]
        return n_pairs, n_scored

    def start_score_run(
        self, dataset_name: str, dataset_version: int, model_key: str, params: dict[str, Any] | None = None,
        zenml_run_id: str | None = None, n_skipped: int = 0, model_info: dict[str, Any] | None = None,
    ) -> int:
        """Open a `running` score run; with `model_info`, register the model in the same transaction."""
        with self.transaction() as con:
            if model_info is not None:
                _insert_model(con, model_key, model_info)
            return con.execute(
                "INSERT INTO score_runs (dataset_name, dataset_version, model_key, params, status, n_skipped, "
                "zenml_run_id) VALUES (?, ?, ?, ?, 'running', ?, ?) RETURNING run_id",
                [dataset_name, dataset_version, model_key, to_json(params), n_skipped, zenml_run_id],
            ).fetchall()[0][0]

    def write_scores(self, run_id: int, model_key: str, frame: pd.DataFrame,
                     tokenization_version: str | None = None) -> int:
        """Commit one batch of scores (columns SCORE_COLUMNS) in one transaction; returns rows added.

        The scores were computed under `tokenization_version` (default: the one in effect).
        One score per (pair_id, model_key) is kept: a score of the same pair and model under
        another version is replaced (migration 5 says why). Idempotent: a pair that already
        has a score for `model_key` under this version keeps it (an anti-join; DuckDB's file
        lock makes this the only writer), and a pair repeated in the batch is added once,
        so a retried batch never duplicates.
        """
        columns = ", ".join(SCORE_VALUES)
        batch = frame.loc[:, ["pair_id", *SCORE_VALUES]]
        version = tokenization_version or tokenization.current_version()
        with self.transaction() as con:
            con.register("batch", batch)
            con.execute("DELETE FROM scores WHERE model_key = ? AND tokenization_version IS DISTINCT FROM ? "
                        "AND pair_id IN (SELECT pair_id FROM batch)", [model_key, version])
            added = con.execute(
                f"INSERT INTO scores (pair_id, model_key, {columns}, run_id, tokenization_version) "
                f"SELECT DISTINCT ON (pair_id) pair_id, ?, {columns}, ?, ? FROM batch b WHERE NOT EXISTS "
                "(SELECT 1 FROM scores s WHERE s.pair_id = b.pair_id AND s.model_key = ?)",
                [model_key, run_id, version, model_key],
            ).fetchall()[0][0]
            con.execute("UPDATE score_runs SET n_scored = n_scored + ? WHERE run_id = ?", [added, run_id])
        return added

    def finish_score_run(self, run_id: int, status: str, **counts: int) -> None:
        """Close a run with `status` (`finished`, `failed`, `interrupted`); counts: n_skipped, n_failed."""
        unknown = set(counts) - {"n_skipped", "n_failed", "n_scored"}
        if unknown:
            raise ValueError(f"unknown score_runs counts: {sorted(unknown)}")
        sets = "".join(f", {name} = ?" for name in counts)
        with self.transaction() as con:
            con.execute(
                f"UPDATE score_runs SET status = ?, finished_at = {migrations.NOW_UTC}{sets} WHERE run_id = ?",
                [status, *counts.values(), run_id],
            )

    def scores(self, name: str, version: int | None = None, model_key: str | None = None,
               tokenization_version: str | None = None) -> pd.DataFrame:
        """Scores of a dataset version joined with its pairs, in row order, all of one tokenization version.

        Columns: SCORE_COLUMNS, then `prompt` (a string, or the message list of a
        conversational prompt), `chosen`, `rejected`, `format`, `metadata` (dict).
        Without `model_key`, the one model that scored the version is used. Without
        `tokenization_version`, the one in effect, or else the other current one (a version
        scored only with `--no-chat-template`, say); scores of older versions are never read.
        """
        dv = self.dataset_version(name, version)
        model_key = self.scoring_model(dv.name, dv.version, model_key)
        tokenization_version = tokenization_version or self.read_tokenization(dv.name, dv.version, model_key)
        score_cols = ", ".join(f"s.{c}" for c in SCORE_VALUES)
        with self.connect(read_only=True) as con:
            frame = con.execute(
                f'SELECT dp."row", dp.pair_id, {score_cols}, p.prompt, p.prompt_messages, p.chosen, p.rejected, '
                "p.format, p.metadata FROM dataset_pairs dp JOIN scores s ON s.pair_id = dp.pair_id "
                "AND s.model_key = ? AND s.tokenization_version = ? JOIN pairs p ON p.pair_id = dp.pair_id "
                'WHERE dp.name = ? AND dp.version = ? ORDER BY dp."row"',
                [model_key, tokenization_version, dv.name, dv.version],
            ).df()
        frame["prompt"] = [json.loads(m) if isinstance(m, str) else p for p, m in zip(frame.prompt, frame.prompt_messages)]
        frame["metadata"] = [json.loads(m) if isinstance(m, str) else {} for m in frame.metadata]
        return frame.drop(columns="prompt_messages")

    def read_tokenization(self, name: str, version: int, model_key: str) -> str:
        """The tokenization version `scores` reads `model_key`'s scores of the version under when not told: the one
        in effect if it has scores there, else the other current one (`2-raw`, say, for a model without a chat
        template), else the one in effect."""
        found = self.tokenization_versions(name, version, model_key)
        return next((v for v in _current_versions() if v in found), _current_versions()[0])

    def tokenization_versions(self, name: str, version: int, model_key: str,
                              selection_id: int | None = None) -> dict[str, int]:
        """How many distinct pairs of the version (kept by `selection_id`, if given) `model_key` scored, by version.

        Keys are `tokenization_version`s (`None` for a row written outside the store's methods).
        """
        kept = ("AND EXISTS (SELECT 1 FROM selections sel WHERE sel.selection_id = ? AND sel.pair_id = dp.pair_id "
                "AND sel.kept)") if selection_id is not None else "AND ? IS NULL"
        counts = self.sql(
            "SELECT s.tokenization_version AS v, count(DISTINCT s.pair_id) AS n FROM dataset_pairs dp JOIN scores s "
            f"ON s.pair_id = dp.pair_id AND s.model_key = ? WHERE dp.name = ? AND dp.version = ? {kept} GROUP BY 1",
            params=[model_key, name, version, selection_id],
        )
        return {v: int(n) for v, n in counts.itertuples(index=False)}

    def scored_chat_template(self, name: str, version: int, model_key: str, selection_id: int | None = None) -> bool | None:
        """How `model_key` scored these pairs: with the chat template (True), without (`--no-chat-template`, False),
        or None when it scored none of them under a current tokenization, or some under each.

        Training on scored pairs takes this, so DPO trains on the ids that were scored.
        """
        found = set(self.tokenization_versions(name, version, model_key, selection_id)) & set(_current_versions())
        return not tokenization.is_raw(found.pop()) if len(found) == 1 else None

    def scoring_models(self, name: str, version: int) -> list[str]:
        """Keys of the models with scores for pairs of a dataset version, sorted."""
        return self.sql(
            "SELECT DISTINCT s.model_key FROM dataset_pairs dp JOIN scores s USING (pair_id) "
            "WHERE dp.name = ? AND dp.version = ? ORDER BY 1", params=[name, version],
        ).model_key.tolist()

    def scoring_model(self, name: str, version: int, requested: str | None = None, *,
                      required: bool = True) -> str | None:
        """The model whose scores of a version to use: `requested` if it scored the version, else the only one.

        Several models and no choice is an error naming them, except that a key of unknown tokenizer
        (`models.superseded_keys`) gives way to its model's key that names one; no model at all is an
        error unless `required=False` (then None). Every command that reads scores asks here.
        """
        keys = self.scoring_models(name, version)
        if requested is None and len(keys) > 1:  # a key of unknown tokenizer whose model has scored again
            keys = [k for k in keys if k not in superseded_keys(keys)]
        if requested is not None:
            if requested not in keys:
                raise ChesCurateError(f"dataset {name!r} v{version} has no scores from model {requested!r} "
                                      f"(scored by: {', '.join(keys) or 'no model yet'})")
            return requested
        if len(keys) > 1:
            raise ChesCurateError(f"dataset {name!r} v{version} was scored by several models; pick one with "
                                  f"--model-key: {', '.join(keys)}")
        if not keys and required:
            raise ChesCurateError(f"dataset {name!r} v{version} has no scores yet; "
                                  f"run `ches-curate score --dataset {name}`")
        return keys[0] if keys else None

    def save_selection(
        self, policy: str, params: dict[str, Any] | None, name: str, version: int, model_key: str | None,
        frame: pd.DataFrame, score_column: str | None, *, source: str = "api",
    ) -> int:
        """Record one filter decision per pair (`frame`: pair_id, kept, rank); returns the selection_id.

        An identical selection already recorded (see `record_selection`) is returned instead of a copy.
        """
        return self.record_selection(policy, params, name, version, model_key, frame, score_column, source=source)[0]

    def record_selection(
        self, policy: str, params: dict[str, Any] | None, name: str, version: int, model_key: str | None,
        frame: pd.DataFrame, score_column: str | None, *, source: str = "api", tokenization_version: str | None = None,
        scored_pairs_hash: str | None = None,
    ) -> tuple[int, bool]:
        """`save_selection`, and whether an identical selection was reused rather than written.

        Identical: same source, dataset version, model, tokenization version of the scores, policy,
        params, score column, set of scored pairs decided (`selection.scored_pairs_hash`) and the
        same (pair_id, kept, rank) for every pair; `selection.select` passes them all, so every
        selection follows this one rule. The source is part of it so that a selection keeps
        saying where it came from: the same `filter` twice is one selection, while an ablation
        arm never takes over (or hands over) a user's selection, which `report` and
        `selections` show by default.
        """
        if source not in SELECTION_SOURCES:
            raise ValueError(f"selection source {source!r} is not one of {', '.join(SELECTION_SOURCES)}")
        decisions = frame.loc[:, ["pair_id", "kept", "rank"]].drop_duplicates("pair_id")
        params_json = to_json(params)
        with self.transaction() as con:
            con.register("decisions", decisions)
            same = con.execute(
                """SELECT s.selection_id FROM selections s
                   LEFT JOIN decisions d ON d.pair_id = s.pair_id AND d.kept = s.kept AND d.rank IS NOT DISTINCT FROM s.rank
                   WHERE s.dataset_name = ? AND s.dataset_version = ? AND s.model_key IS NOT DISTINCT FROM ?
                     AND s.policy = ? AND CAST(s.params AS VARCHAR) IS NOT DISTINCT FROM ?
                     AND s.score_column IS NOT DISTINCT FROM ? AND s.source = ?
                     AND s.tokenization_version IS NOT DISTINCT FROM ? AND s.scored_pairs_hash IS NOT DISTINCT FROM ?
                   GROUP BY s.selection_id HAVING count(*) = ? AND count(d.pair_id) = ?
                   ORDER BY s.selection_id DESC LIMIT 1""",
                [name, version, model_key, policy, params_json, score_column, source, tokenization_version,
                 scored_pairs_hash, len(decisions), len(decisions)],
            ).fetchall()
            if same:
                return int(same[0][0]), True
            selection_id = con.execute("SELECT nextval('selection_id_seq')").fetchall()[0][0]
            con.execute(
                "INSERT INTO selections (selection_id, policy, params, dataset_name, dataset_version, model_key, "
                "pair_id, kept, rank, score_column, source, tokenization_version, scored_pairs_hash) "
                "SELECT ?, ?, ?, ?, ?, ?, pair_id, kept, rank, ?, ?, ?, ? FROM decisions",
                [selection_id, policy, params_json, name, version, model_key, score_column, source,
                 tokenization_version, scored_pairs_hash],
            )
        return int(selection_id), False

    def selections(self, name: str | None = None, version: int | None = None, *,
                   include_ablation: bool = True) -> pd.DataFrame:
        """One row per selection, newest first: selection_id, source, dataset_name, dataset_version, model_key,
        policy, params, score_column, tokenization_version, n_pairs, n_kept, n_removed, created_at.

        An arm named by an `ablations` row counts as `ablation` whatever its recorded source.
        """
        arms = "(SELECT selection_id FROM ablations WHERE selection_id IS NOT NULL)"
        where = ["TRUE"]
        values: list[Any] = []
        if name is not None:
            where.append("dataset_name = ?")
            values.append(name)
        if version is not None:
            where.append("dataset_version = ?")
            values.append(version)
        if not include_ablation:
            where.append("source <> 'ablation'")
        return self.sql(
            f"""SELECT * FROM (
                  SELECT selection_id, CASE WHEN selection_id IN {arms} THEN 'ablation' ELSE any_value(source) END
                         AS source, any_value(dataset_name) AS dataset_name,
                         any_value(dataset_version) AS dataset_version, any_value(model_key) AS model_key,
                         any_value(policy) AS policy, CAST(any_value(params) AS VARCHAR) AS params,
                         any_value(score_column) AS score_column,
                         any_value(tokenization_version) AS tokenization_version, count(*) AS n_pairs,
                         count(*) FILTER (WHERE kept) AS n_kept, count(*) FILTER (WHERE NOT kept) AS n_removed,
                         min(created_at) AS created_at
                  FROM selections GROUP BY selection_id)
                WHERE {" AND ".join(where)} ORDER BY selection_id DESC""",
            params=values,
        )

    def latest_user_selection(self, name: str, version: int, model_key: str | None = None) -> int | None:
        """The newest selection of a dataset version (and model, if given) that is not an ablation arm."""
        found = self.selections(name, version, include_ablation=False)
        if model_key is not None:
            found = found[found.model_key.isna() | (found.model_key == model_key)]
        return int(found.selection_id.iloc[0]) if len(found) else None

    def add_train_run(self, row: dict[str, Any]) -> int:
        """Append one `train_runs` row (keys: its columns but the id and time); returns its train_run_id."""
        return self._append_run("train_runs", TRAIN_RUN_COLUMNS, "train_run_id", row)

    def record_probe_run(self, row: dict[str, Any]) -> int:
        """Append one `probe_runs` row (`ProbeRun.row()`: its columns but the id and time); returns its probe_run_id."""
        return self._append_run("probe_runs", PROBE_RUN_COLUMNS, "probe_run_id", row)

    def _append_run(self, table: str, known: tuple[str, ...], id_column: str, row: dict[str, Any]) -> int:
        """Insert the `known` columns `row` has into `table` in one transaction; the new row's `id_column`."""
        columns = [c for c in known if c in row]
        with self.transaction() as con:
            return int(con.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
                f"RETURNING {id_column}", [row[c] for c in columns],
            ).fetchall()[0][0])

    def selection(self, selection_id: int) -> pd.DataFrame:
        frame = self.sql("SELECT * FROM selections WHERE selection_id = ? ORDER BY rank, pair_id", params=[selection_id])
        if frame.empty:
            known = self.sql("SELECT DISTINCT selection_id FROM selections ORDER BY 1").selection_id.tolist()
            raise ChesCurateError(f"no selection {selection_id} in {self.path} (known: "
                                  f"{', '.join(map(str, known)) or 'none yet; run `ches-curate filter`'})")
        return frame

    def add_quarantine(self, rows: Iterable[dict[str, Any]]) -> int:
        """Quarantine rows (dicts with keys from QUARANTINE_FIELDS; `stage` and `reason` required)."""
        rows = list(rows)
        with self.transaction() as con:
            self.append_quarantine(con, rows)
        return len(rows)

    @staticmethod
    def append_quarantine(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
        """Quarantine rows inside the caller's `transaction()` (so they commit with what flagged them)."""
        if rows:
            con.register("new_quarantine", quarantine_table(rows))
            columns = ", ".join(QUARANTINE_FIELDS)
            con.execute(f"INSERT INTO quarantine ({columns}) SELECT {columns} FROM new_quarantine")

    def sql(
        self, query: str, write: bool = False, params: list | None = None, *, arrow: bool = False,
        limits: query_guard.QueryLimits | None = None,
    ) -> pd.DataFrame | pa.Table:
        """Run SQL over the store: a DataFrame, or with `arrow` a pyarrow Table (DuckDB's exact types).

        Without `write` the query runs in `connections.connect_sandboxed`: the store is
        read-only and DuckDB refuses files outside it, URLs, extensions and settings, so
        no statement (EXPLAIN ANALYZE COPY ..., PREPARE, SET profiling_output) escapes it.
        `write` opens the usual writable connection and trusts the query. `limits` bound
        the query's time and memory and let SIGINT/SIGTERM stop it (`ches_curate.query_guard`; none by
        default, for the library's own reads). A query
        without statements and DuckDB's errors become a `ChesCurateError`.
        """
        limits = limits or query_guard.UNBOUNDED
        if write:
            opened = self.connect()
        else:
            opened = connections.connect_sandboxed(self.path, self.lock_timeout_s, limits.memory_limit)
        with opened as con, query_guard.guarded(con, limits) as guard:
            try:
                if write and limits.memory_limit:
                    connections.set_memory_limit(con, limits.memory_limit)
                if not con.extract_statements(query):
                    raise ChesCurateError("sql: no statement to run (the query is empty or only comments)")
                if arrow:  # a relation streams into Arrow; a DB-API result would copy every row first
                    relation = con.sql(query, params=params)
                    return relation.to_arrow_table() if relation is not None else pa.table({})
                result = con.execute(query, params)
                return result.df() if result.description else pd.DataFrame()
            except duckdb.Error as err:
                guard.raise_if_stopped(err)
                raise _sql_error(err, write, self.path, limits.memory_limit) from err
