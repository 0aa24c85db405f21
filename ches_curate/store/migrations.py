"""Numbered schema migrations of the DuckDB store.

Each migration runs once, in its own transaction, together with the row it adds to
`schema_version`; a database at version N gets migrations N+1.. on its next open.
Never edit a released migration: append a new one. Column names are public API
(users write SQL against them), documented table by table in docs/reference/schema.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ches_curate.store import integrity
from ches_curate.errors import ChesCurateError

NOW_UTC = "(timezone('UTC', current_timestamp))"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


CORE = Migration(
    1,
    "datasets, pairs, models, score runs, scores, quarantine",
    (
        f"""CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
        "CREATE SEQUENCE score_run_id_seq START 1",
        "CREATE SEQUENCE quarantine_id_seq START 1",
        f"""CREATE TABLE datasets (
            name VARCHAR NOT NULL, version INTEGER NOT NULL, source VARCHAR, content_hash VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC}, n_pairs BIGINT NOT NULL, n_quarantined BIGINT NOT NULL,
            PRIMARY KEY (name, version))""",
        """CREATE TABLE pairs (
            pair_id VARCHAR PRIMARY KEY, prompt VARCHAR NOT NULL, prompt_messages JSON, chosen VARCHAR NOT NULL,
            rejected VARCHAR NOT NULL, format VARCHAR NOT NULL, metadata JSON)""",
        """CREATE TABLE dataset_pairs (
            name VARCHAR NOT NULL, version INTEGER NOT NULL, "row" BIGINT NOT NULL, pair_id VARCHAR NOT NULL,
            PRIMARY KEY (name, version, "row"))""",
        f"""CREATE TABLE models (
            model_key VARCHAR PRIMARY KEY, name VARCHAR, revision VARCHAR, file_hash VARCHAR, dtype VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
        f"""CREATE TABLE score_runs (
            run_id INTEGER PRIMARY KEY DEFAULT nextval('score_run_id_seq'), dataset_name VARCHAR NOT NULL,
            dataset_version INTEGER NOT NULL, model_key VARCHAR NOT NULL, params JSON, status VARCHAR NOT NULL,
            started_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC}, finished_at TIMESTAMP, n_scored BIGINT NOT NULL DEFAULT 0,
            n_skipped BIGINT NOT NULL DEFAULT 0, n_failed BIGINT NOT NULL DEFAULT 0, zenml_run_id VARCHAR)""",
        f"""CREATE TABLE scores (
            pair_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, ches DOUBLE, ln_ches DOUBLE, chosen_tokens INTEGER,
            rejected_tokens INTEGER, last_hidden_ip DOUBLE, edit_distance DOUBLE, truncated BOOLEAN, run_id INTEGER,
            scored_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC}, PRIMARY KEY (pair_id, model_key))""",
        f"""CREATE TABLE quarantine (
            quarantine_id BIGINT PRIMARY KEY DEFAULT nextval('quarantine_id_seq'), dataset_name VARCHAR,
            dataset_version INTEGER, stage VARCHAR NOT NULL CHECK (stage IN ('ingest', 'quality', 'scoring')),
            source VARCHAR, line BIGINT, field VARCHAR, reason VARCHAR NOT NULL, expectation VARCHAR, pair_id VARCHAR,
            raw VARCHAR, created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
    ),
)

CURATION = Migration(
    2,
    "selections, quality runs and results, ablations, pair likelihoods",
    (
        "CREATE SEQUENCE selection_id_seq START 1",
        "CREATE SEQUENCE quality_run_id_seq START 1",
        "CREATE SEQUENCE ablation_id_seq START 1",
        f"""CREATE TABLE selections (
            selection_id INTEGER NOT NULL, policy VARCHAR NOT NULL, params JSON, dataset_name VARCHAR NOT NULL,
            dataset_version INTEGER NOT NULL, model_key VARCHAR, pair_id VARCHAR NOT NULL, kept BOOLEAN NOT NULL,
            rank INTEGER, score_column VARCHAR, created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC},
            PRIMARY KEY (selection_id, pair_id))""",
        f"""CREATE TABLE quality_runs (
            quality_run_id INTEGER PRIMARY KEY DEFAULT nextval('quality_run_id_seq'), suite VARCHAR NOT NULL,
            dataset_name VARCHAR, dataset_version INTEGER, model_key VARCHAR,
            started_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC}, finished_at TIMESTAMP, success BOOLEAN, n_rows BIGINT,
            failure_rate DOUBLE, summary JSON, ge_result JSON)""",
        """CREATE TABLE quality_results (
            quality_run_id INTEGER NOT NULL, expectation VARCHAR NOT NULL, severity VARCHAR, success BOOLEAN,
            unexpected_count BIGINT, unexpected_pair_ids JSON, details JSON)""",
        f"""CREATE TABLE ablations (
            ablation_id INTEGER NOT NULL DEFAULT nextval('ablation_id_seq'), arm VARCHAR NOT NULL, policy VARCHAR,
            selection_id INTEGER, dataset_name VARCHAR, dataset_version INTEGER, model_key VARCHAR,
            n_train_pairs BIGINT, preferred_logp_change DOUBLE, dispreferred_logp_change DOUBLE,
            preferred_decrease_fraction DOUBLE, ches_logp_corr DOUBLE, ln_ches_logp_corr DOUBLE,
            refusal_rate_before DOUBLE, refusal_rate_after DOUBLE, train_loss DOUBLE, reward_accuracy DOUBLE,
            wall_time_s DOUBLE, config JSON, created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
        """CREATE TABLE pair_likelihoods (
            ablation_id INTEGER NOT NULL, arm VARCHAR NOT NULL, pair_id VARCHAR NOT NULL,
            preferred_logp_before DOUBLE, preferred_logp_after DOUBLE, dispreferred_logp_before DOUBLE,
            dispreferred_logp_after DOUBLE)""",
    ),
)


def _quantiles(column: str) -> str:
    """`quantile_cont` of several levels computed in one pass, unpacked into named columns."""
    return ", ".join(
        f"{column}_q[{i}] AS {column}_p{level:02d}" for i, level in enumerate((5, 25, 50, 75, 95), start=1)
    )


def _score_views(columns: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The views `latest_scores` and `score_summary`, with `columns` of `scores` after `model_key` (and grouped by).

    Migration 3 created them; migration 5 replaces them, with `tokenization_version`.
    """
    inner, outer = "".join(f"s.{c}, " for c in columns), "".join(f"{c}, " for c in columns)
    return (
        f"""CREATE OR REPLACE VIEW latest_scores AS
            WITH latest AS (SELECT name, max(version) AS version FROM datasets GROUP BY name)
            SELECT dp.name AS dataset_name, dp.version AS dataset_version, dp."row", s.pair_id, s.model_key,
                   {inner}s.ches, s.ln_ches, s.chosen_tokens, s.rejected_tokens, s.last_hidden_ip, s.edit_distance,
                   s.truncated, s.run_id, s.scored_at
            FROM latest JOIN dataset_pairs dp USING (name, version) JOIN scores s ON s.pair_id = dp.pair_id""",
        f"""CREATE OR REPLACE VIEW score_summary AS
            SELECT dataset_name, dataset_version, model_key, {outer}n_scored,
                   ches_mean, ches_min, {_quantiles("ches")}, ches_max,
                   ln_ches_mean, ln_ches_min, {_quantiles("ln_ches")}, ln_ches_max
            FROM (
                SELECT dp.name AS dataset_name, dp.version AS dataset_version, s.model_key, {inner}count(*) AS n_scored,
                       avg(s.ches) AS ches_mean, min(s.ches) AS ches_min, max(s.ches) AS ches_max,
                       quantile_cont(s.ches, [0.05, 0.25, 0.5, 0.75, 0.95]) AS ches_q,
                       avg(s.ln_ches) AS ln_ches_mean, min(s.ln_ches) AS ln_ches_min, max(s.ln_ches) AS ln_ches_max,
                       quantile_cont(s.ln_ches, [0.05, 0.25, 0.5, 0.75, 0.95]) AS ln_ches_q
                FROM dataset_pairs dp JOIN scores s ON s.pair_id = dp.pair_id
                GROUP BY {inner}dp.name, dp.version, s.model_key)""",
    )


VIEWS = Migration(3, "views latest_scores and score_summary", _score_views())


def _rebuild(table: str, create: str) -> tuple[str, ...]:
    """Recreate `table` from `create` (same columns, in order), keeping its rows."""
    return (f"CREATE TABLE {table}_v3 AS SELECT * FROM {table}", f"DROP TABLE {table}", create,
            f"INSERT INTO {table} SELECT * FROM {table}_v3", f"DROP TABLE {table}_v3")


# DuckDB keeps a PRIMARY KEY's ART index wholly in memory and cannot evict it, so every insert
# into these tables cost memory in proportion to the rows stored (830 MB peak RSS at 1M pairs,
# bench/RESULTS_ingest_memory.md). Uniqueness stays with the writers: `Store` inserts pairs and
# scores with an anti-join (INSERT ... WHERE NOT EXISTS), and DuckDB's file lock makes it the only writer.
UNINDEXED_PAIRS_AND_SCORES = Migration(
    4,
    "pairs, dataset_pairs and scores without primary-key indexes (flat ingest memory)",
    (
        *_rebuild("pairs", """CREATE TABLE pairs (
            pair_id VARCHAR NOT NULL, prompt VARCHAR NOT NULL, prompt_messages JSON, chosen VARCHAR NOT NULL,
            rejected VARCHAR NOT NULL, format VARCHAR NOT NULL, metadata JSON)"""),
        *_rebuild("dataset_pairs", """CREATE TABLE dataset_pairs (
            name VARCHAR NOT NULL, version INTEGER NOT NULL, "row" BIGINT NOT NULL, pair_id VARCHAR NOT NULL)"""),
        *_rebuild("scores", f"""CREATE TABLE scores (
            pair_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, ches DOUBLE, ln_ches DOUBLE, chosen_tokens INTEGER,
            rejected_tokens INTEGER, last_hidden_ip DOUBLE, edit_distance DOUBLE, truncated BOOLEAN, run_id INTEGER,
            scored_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})"""),
    ),
)

# Which tokenization a score was computed under (`ches_curate.tokenization.current_version`): `2` is
# TRL's DPO tokenization, `2-raw` the same without the chat template, and the rows scored before this
# migration get `1` (the response tokenized alone + EOS, which DPO does not train on). A column, not a
# model key of its own: the model key names the weights, and `models`, selections and ablations join
# on it. The store keeps one score per (pair_id, model_key): scoring under another version replaces
# the row (`Store.write_scores`), so no reader ever sees two scores of one pair and model, and the
# readers of a version (`unscored_pairs`, `score_counts`, `scores`) treat every other version as
# unscored: old scores are re-scored, never mixed with new ones. A row written outside the store's
# methods gets NULL, which no version reads either.
TOKENIZATION_VERSION_OF_SCORES = Migration(
    5,
    "scores.tokenization_version (existing scores: 1); the score views show and group by it",
    (
        "ALTER TABLE scores ADD COLUMN tokenization_version VARCHAR DEFAULT '1'",
        "ALTER TABLE scores ALTER COLUMN tokenization_version DROP DEFAULT",
        *_score_views(("tokenization_version",)),
    ),
)

# Selections made before this migration get the source `unknown`, except the ablation arms (which an
# `ablations` row names): `report` and `selections` take the latest selection that is not an arm.
SELECTION_SOURCE_AND_TRAIN_RUNS = Migration(
    6,
    "selections.source (cli, pipeline, refresh, ablation, api) and train_runs",
    (
        "ALTER TABLE selections ADD COLUMN source VARCHAR DEFAULT 'unknown'",
        "UPDATE selections SET source = 'ablation' WHERE selection_id IN "
        "(SELECT selection_id FROM ablations WHERE selection_id IS NOT NULL)",
        "CREATE SEQUENCE train_run_id_seq START 1",
        f"""CREATE TABLE train_runs (
            train_run_id INTEGER PRIMARY KEY DEFAULT nextval('train_run_id_seq'), dataset_name VARCHAR NOT NULL,
            dataset_version INTEGER NOT NULL, selection_id INTEGER, model_key VARCHAR NOT NULL,
            n_train_pairs BIGINT NOT NULL, global_step INTEGER, train_loss DOUBLE, reward_accuracy DOUBLE,
            preferred_logp_change DOUBLE, dispreferred_logp_change DOUBLE, preferred_decrease_fraction DOUBLE,
            ches_logp_corr DOUBLE, ln_ches_logp_corr DOUBLE, wall_time_s DOUBLE, checkpoint_dir VARCHAR,
            config JSON, created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
    ),
)

# One row per `ches-curate probe` run (a single-pair DPO run; `ches_curate.evaluate.ProbeRun`). The
# probabilities are of the single token (mode `paper`) or of the whole response (mode `response`).
PROBE_RUNS = Migration(
    7,
    "probe_runs: single-pair DPO probe runs (Razin et al., Section 3)",
    (
        "CREATE SEQUENCE probe_run_id_seq START 1",
        f"""CREATE TABLE probe_runs (
            probe_run_id INTEGER PRIMARY KEY DEFAULT nextval('probe_run_id_seq'), model_key VARCHAR NOT NULL,
            prompt VARCHAR NOT NULL, preferred VARCHAR NOT NULL, dispreferred VARCHAR NOT NULL, mode VARCHAR NOT NULL,
            leading_space BOOLEAN NOT NULL, learning_rate DOUBLE NOT NULL, steps INTEGER NOT NULL, seed INTEGER NOT NULL,
            p_plus_before DOUBLE, p_plus_after DOUBLE, p_plus_min DOUBLE, p_plus_min_step INTEGER,
            p_minus_before DOUBLE, p_minus_after DOUBLE, loss_monotone BOOLEAN, final_loss DOUBLE, displaced BOOLEAN,
            single_token_ches DOUBLE, hidden_norm_sq DOUBLE, top_gainers JSON, predicted_gainers JSON,
            wall_time_s DOUBLE, created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
    ),
)

# The paper's ablation designs (`ches_curate.configs.DESIGNS`) train each arm under several seeds and
# slice by a score at a percentile, so a row says which. Rows written before are design `policies`
# and take their training seed from their config.
ABLATION_DESIGNS = Migration(
    8,
    "ablations.design, train_seed, score_column, percentile; pair_likelihoods.train_seed",
    (
        "ALTER TABLE ablations ADD COLUMN design VARCHAR DEFAULT 'policies'",
        "ALTER TABLE ablations ADD COLUMN train_seed INTEGER",
        "UPDATE ablations SET train_seed = coalesce(TRY_CAST(json_extract_string(config, '$.train.seed') AS INTEGER), 0)",
        "ALTER TABLE ablations ADD COLUMN score_column VARCHAR",
        "ALTER TABLE ablations ADD COLUMN percentile DOUBLE",
        "ALTER TABLE pair_likelihoods ADD COLUMN train_seed INTEGER",
        "UPDATE pair_likelihoods pl SET train_seed = a.train_seed FROM ablations a "
        "WHERE a.ablation_id = pl.ablation_id AND a.arm = pl.arm",
    ),
)

KEYED_TABLES = ("models", "scores", "score_runs", "selections", "quality_runs", "ablations", "train_runs", "probe_runs")
"""The tables with a `model_key` column when migration 9 was written."""

# A model key names the tokenizer too (`models.tokenizer_hash`: vocabulary, special tokens, chat
# template), so a changed template is a new key. The keys made before cannot say which tokenizer
# scored: each gets `/tokenizer-unknown` appended everywhere it appears, so its scores stay and say
# so; loading the model gives a key that names its tokenizer, under which the pairs are scored again.
# A selection records the scores it read (their tokenization version) and the set of scored pairs it
# decided on (`scored_pairs_hash`); one made before records neither (NULL) and is never reused.
TOKENIZER_IN_MODEL_KEY = Migration(
    9,
    "model keys name the tokenizer (older keys: /tokenizer-unknown); models.tokenizer_hash, path; "
    "selections.tokenization_version, scored_pairs_hash",
    (
        "ALTER TABLE models ADD COLUMN tokenizer_hash VARCHAR",
        "ALTER TABLE models ADD COLUMN path VARCHAR",
        "ALTER TABLE selections ADD COLUMN tokenization_version VARCHAR",
        "ALTER TABLE selections ADD COLUMN scored_pairs_hash VARCHAR",
        *(f"UPDATE {table} SET model_key = model_key || '/tokenizer-unknown' WHERE model_key IS NOT NULL"
          for table in KEYED_TABLES),
    ),
)

# Scores beyond the four columns of `scores`: plugins' scores, the log-probs and imported values, one row per
# pair, model key and score name (`ches_curate.store.plugin_scores` says how they are written and read). The
# store recreates `latest_scores_wide` (latest_scores plus a column per stored score) whenever a new score is
# stored; a later migration that changes latest_scores' columns must recreate it too (DuckDB refuses a view
# whose underlying columns changed).
PLUGIN_SCORES = Migration(
    10,
    "plugin_scores, score_definitions, score_imports; views latest_scores_wide, plugin_score_summary",
    (
        f"""CREATE TABLE plugin_scores (
            pair_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, tokenization_version VARCHAR NOT NULL,
            score_name VARCHAR NOT NULL, score_version VARCHAR NOT NULL, value DOUBLE, failure VARCHAR,
            run_id INTEGER, import_id INTEGER, computed_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
        f"""CREATE TABLE score_definitions (
            score_name VARCHAR NOT NULL, score_version VARCHAR NOT NULL, plugin VARCHAR NOT NULL, description VARCHAR,
            needs JSON, model_bound BOOLEAN NOT NULL, updated_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
        "CREATE SEQUENCE score_import_id_seq START 1",
        f"""CREATE TABLE score_imports (
            import_id INTEGER PRIMARY KEY DEFAULT nextval('score_import_id_seq'), score_name VARCHAR NOT NULL,
            source VARCHAR NOT NULL, source_sha256 VARCHAR NOT NULL, key_column VARCHAR NOT NULL,
            dataset_name VARCHAR, dataset_version INTEGER, n_rows BIGINT NOT NULL, n_imported BIGINT NOT NULL,
            n_rejected BIGINT NOT NULL, created_at TIMESTAMP NOT NULL DEFAULT {NOW_UTC})""",
        "CREATE VIEW latest_scores_wide AS SELECT l.* FROM latest_scores l",
        f"""CREATE VIEW plugin_score_summary AS
            SELECT dataset_name, dataset_version, model_key, score_name, score_version, n_scored, n_failed,
                   value_mean, value_min, {_quantiles("value")}, value_max
            FROM (
                SELECT dp.name AS dataset_name, dp.version AS dataset_version, ps.model_key, ps.score_name,
                       ps.score_version, count(ps.value) AS n_scored, count(ps.failure) AS n_failed,
                       avg(ps.value) AS value_mean, min(ps.value) AS value_min, max(ps.value) AS value_max,
                       quantile_cont(ps.value, [0.05, 0.25, 0.5, 0.75, 0.95]) AS value_q
                FROM dataset_pairs dp JOIN plugin_scores ps ON ps.pair_id = dp.pair_id
                GROUP BY dp.name, dp.version, ps.model_key, ps.score_name, ps.score_version)""",
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    CORE, CURATION, VIEWS, UNINDEXED_PAIRS_AND_SCORES, TOKENIZATION_VERSION_OF_SCORES, SELECTION_SOURCE_AND_TRAIN_RUNS,
    PROBE_RUNS, ABLATION_DESIGNS, TOKENIZER_IN_MODEL_KEY, PLUGIN_SCORES,
)
LATEST_VERSION = MIGRATIONS[-1].version


def current_version(con) -> int:
    """The schema version of the database behind `con`: 0 for a file without our schema."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchall()[0][0]
    if not exists:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]


def applied_versions(con) -> set[int]:
    """The migrations recorded in `schema_version`.

    Not always 1..N: migration 6 landed before 5, so a store made in between has 6 and
    gets 5 on its next open (they touch different tables).
    """
    if not current_version(con):
        return set()
    return {row[0] for row in con.execute("SELECT version FROM schema_version").fetchall()}


def apply(con, up_to: int = LATEST_VERSION) -> list[int]:
    """Apply the pending migrations up to `up_to` (each in its own transaction); returns the versions applied."""
    applied = []
    for migration in MIGRATIONS:
        if migration.version > up_to or migration.version in applied_versions(con):
            continue
        con.begin()
        try:
            for statement in migration.statements:
                con.execute(statement)
            con.execute("INSERT INTO schema_version (version) VALUES (?)", [migration.version])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        applied.append(migration.version)
    return applied


def _user_tables(con) -> list[str]:
    return [row[0] for row in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND NOT temporary "
        "UNION ALL SELECT view_name FROM duckdb_views() WHERE database_name = current_database() AND NOT internal"
    ).fetchall()]


def ensure_latest(path: Path, connect: Callable) -> None:
    """Bring the database at `path` to the latest schema, creating it if missing.

    An up-to-date file is only opened read-only, so readers never take the write lock.
    A file from a newer ches-curate is refused rather than guessed at; so are a truncated
    file and a DuckDB database that is not a store (our tables are never added to it).
    """
    if path.exists() and _checked_version(path, connect)[1]:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with connect() as con:
        apply(con)


def require_latest(path: Path, connect: Callable) -> None:
    """Refuse the store at `path` unless it is at the latest schema, writing nothing (for read-only use).

    An empty DuckDB file or an older store is named with the command that makes it
    current; everything `ensure_latest` refuses is refused the same way.
    """
    version, current = _checked_version(path, connect)
    if version == 0:
        raise ChesCurateError(f"{path} is an empty DuckDB database, not a ches_curate store yet; nothing was written "
                              f"to it (make it one with `ches-curate ingest FILE --dataset NAME --db {path}`)")
    if not current:
        raise ChesCurateError(
            f"{path} has schema version {version}; this ches-curate reads version {LATEST_VERSION} and a read-only "
            f"command does not migrate (upgrade it with `ches-curate datasets --db {path}`, which migrates on open; "
            "an older ches-curate cannot open it after that)"
        )


def _checked_version(path: Path, connect: Callable) -> tuple[int, bool]:
    """The schema version of the existing file at `path`, read without writing, and whether it is current
    (every migration recorded). A truncated file, a foreign database and a newer store raise."""
    with connect(read_only=True) as con:
        integrity.check_file_size(con, path)
        version, done = current_version(con), applied_versions(con)
        if version == 0 and (tables := _user_tables(con)):
            raise integrity.foreign_database_error(path, tables)
    if version > LATEST_VERSION:
        raise ChesCurateError(
            f"{path} has schema version {version}, newer than this ches-curate knows ({LATEST_VERSION}); "
            "upgrade ches-curate"
        )
    return version, version == LATEST_VERSION and done.issuperset(m.version for m in MIGRATIONS)
