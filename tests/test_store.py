"""The DuckDB store: schema and migrations, versioned ingest, scores, selections, locking."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from ches_curate.store import database as store_module, migrations
from ches_curate.errors import ChesCurateError, StoreLockedError
from ches_curate.ingest import RejectedRow
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair
from ches_curate.store import Store
from ches_curate.tokenization import use_chat_template

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "reference" / "schema.md"
ALL_VERSIONS = [m.version for m in migrations.MIGRATIONS]
OLD_M = "m/tokenizer-unknown"
"""Model key 'm' of a store made before migration 9, after it."""

CONTRACT_COLUMNS = {
    "schema_version": "version applied_at",
    "datasets": "name version source content_hash created_at n_pairs n_quarantined",
    "pairs": "pair_id prompt prompt_messages chosen rejected format metadata",
    "dataset_pairs": "name version row pair_id",
    "models": "model_key name revision file_hash dtype created_at tokenizer_hash path",
    "score_runs": "run_id dataset_name dataset_version model_key params status started_at finished_at n_scored "
                  "n_skipped n_failed zenml_run_id",
    "scores": "pair_id model_key ches ln_ches chosen_tokens rejected_tokens last_hidden_ip edit_distance truncated "
              "run_id scored_at tokenization_version",
    "quarantine": "quarantine_id dataset_name dataset_version stage source line field reason expectation pair_id raw "
                  "created_at",
    "selections": "selection_id policy params dataset_name dataset_version model_key pair_id kept rank score_column "
                  "created_at source tokenization_version scored_pairs_hash",
    "quality_runs": "quality_run_id suite dataset_name dataset_version model_key started_at finished_at success n_rows "
                    "failure_rate summary ge_result",
    "quality_results": "quality_run_id expectation severity success unexpected_count unexpected_pair_ids details",
    "ablations": "ablation_id arm policy selection_id dataset_name dataset_version model_key n_train_pairs "
                 "preferred_logp_change dispreferred_logp_change preferred_decrease_fraction ches_logp_corr "
                 "ln_ches_logp_corr refusal_rate_before refusal_rate_after train_loss reward_accuracy wall_time_s "
                 "config created_at design train_seed score_column percentile",
    "pair_likelihoods": "ablation_id arm pair_id preferred_logp_before preferred_logp_after dispreferred_logp_before "
                        "dispreferred_logp_after train_seed",
    "plugin_scores": "pair_id model_key tokenization_version score_name score_version value failure run_id import_id "
                     "computed_at",
    "score_definitions": "score_name score_version plugin description needs model_bound updated_at",
    "score_imports": "import_id score_name source source_sha256 key_column dataset_name dataset_version n_rows "
                     "n_imported n_rejected created_at",
}


def make_pairs(n: int, start: int = 0, tag: str = "") -> list[PreferencePair]:
    pairs = []
    for i in range(start, start + n):
        prompt = f"question {i}{tag}" if i % 3 else [{"role": "user", "content": f"chat {i}{tag}"}]
        pairs.append(PreferencePair(prompt, f"good answer {i}", f"bad answer {i}", row=i - start,
                                    format="conversational" if i % 3 == 0 else "prompt_chosen_rejected",
                                    metadata={"i": i}))
    return pairs


def fake_scores(pairs: list[PreferencePair], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(pairs)
    return pd.DataFrame({
        "row": [p.row for p in pairs], "pair_id": [p.pair_id for p in pairs], "ches": rng.normal(size=n),
        "ln_ches": rng.normal(size=n), "chosen_tokens": rng.integers(1, 50, n), "rejected_tokens": rng.integers(1, 50, n),
        "last_hidden_ip": rng.normal(size=n), "edit_distance": rng.random(n), "truncated": np.zeros(n, dtype=bool),
    })[list(SCORE_COLUMNS)]


def columns_of(con, name: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position", [name]
    ).fetchall()]


def test_new_store_has_every_contract_table_and_column(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    assert store.schema_version() == migrations.LATEST_VERSION == len(migrations.MIGRATIONS)
    with store.connect(read_only=True) as con:
        for table, expected in CONTRACT_COLUMNS.items():
            assert columns_of(con, table) == expected.split(), table
        assert columns_of(con, "latest_scores")[:6] == ["dataset_name", "dataset_version", "row", "pair_id",
                                                        "model_key", "tokenization_version"]
        assert "ches_p95" in columns_of(con, "score_summary")


def test_docs_describe_every_column_of_every_table_and_view(tmp_path):
    text = SCHEMA_DOC.read_text(encoding="utf-8")
    store = Store(tmp_path / "s.duckdb")
    with store.connect(read_only=True) as con:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        for name in names:
            section = re.search(rf"^## `{name}`.*?(?=^## |\Z)", text, re.S | re.M)
            assert section, f"docs/reference/schema.md has no section for {name}"
            for column in columns_of(con, name):
                assert f"`{column}`" in section.group(0), f"{name}.{column} undocumented"


def test_old_database_is_migrated_to_latest_keeping_its_data(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    assert migrations.apply(con, up_to=1) == [1]
    con.execute("INSERT INTO datasets (name, version, content_hash, n_pairs, n_quarantined) VALUES ('old', 1, 'h', 0, 0)")
    con.close()

    store = Store(path)
    assert store.sql("SELECT version FROM schema_version ORDER BY version").version.tolist() == ALL_VERSIONS
    assert store.latest_version("old").version == 1
    assert store.sql("SELECT count(*) AS n FROM selections").n.iloc[0] == 0
    assert store.sql("SELECT count(*) AS n FROM score_summary").n.iloc[0] == 0
    assert Store(path).schema_version() == migrations.LATEST_VERSION  # reopening applies nothing twice


def key_constraints(store: Store) -> list[str]:
    return store.sql("SELECT table_name FROM duckdb_constraints() WHERE constraint_type IN ('PRIMARY KEY', 'UNIQUE') "
                     "AND table_name IN ('pairs', 'dataset_pairs', 'scores')").table_name.tolist()


def test_migration_4_drops_the_in_memory_keys_of_pairs_and_scores_keeping_their_rows(tmp_path):
    path = tmp_path / "v3.duckdb"
    pairs = make_pairs(4)
    con = duckdb.connect(str(path))
    assert migrations.apply(con, up_to=3) == [1, 2, 3]
    for p in pairs:
        con.execute("INSERT INTO pairs VALUES (?, ?, NULL, ?, ?, ?, '{}')", [p.pair_id, p.prompt_text, p.chosen,
                                                                              p.rejected, p.format])
        con.execute("INSERT INTO dataset_pairs VALUES ('old', 1, ?, ?)", [p.row, p.pair_id])
        con.execute("INSERT INTO scores (pair_id, model_key, ches, run_id) VALUES (?, 'm', ?, 1)", [p.pair_id, p.row / 2])
    con.execute("INSERT INTO datasets (name, version, content_hash, n_pairs, n_quarantined) VALUES ('old', 1, 'h', 4, 0)")
    tables = ("pairs", "dataset_pairs", "scores")
    before = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables}
    con.close()

    store = Store(path)
    assert store.schema_version() == migrations.LATEST_VERSION and key_constraints(store) == []
    with store.connect(read_only=True) as con:
        # migration 5: scored under tokenization 1; migration 9: by a key whose tokenizer is unknown
        before["scores"] = [(row[0], f"{row[1]}/tokenizer-unknown", *row[2:], "1") for row in before["scores"]]
        assert {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables} == before
        assert columns_of(con, "scores") == CONTRACT_COLUMNS["scores"].split()
    assert [(p.row, p.chosen) for p in store.dataset_pairs("old")] == [(p.row, p.chosen) for p in pairs]
    assert store.sql("SELECT n_scored, ches_max FROM score_summary").values.tolist() == [[4, 1.5]]


def test_a_version_4_store_keeps_its_scores_as_tokenization_1_and_rescoring_replaces_them(tmp_path):
    path = tmp_path / "v4.duckdb"
    pairs = make_pairs(4)
    con = duckdb.connect(str(path))
    assert migrations.apply(con, up_to=4) == [1, 2, 3, 4]
    for p in pairs:
        con.execute("INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?, NULL)", [p.pair_id, p.prompt_text, json.dumps(p.prompt)
                    if isinstance(p.prompt, list) else None, p.chosen, p.rejected, p.format])
        con.execute("INSERT INTO dataset_pairs VALUES ('old', 1, ?, ?)", [p.row, p.pair_id])
        con.execute("INSERT INTO scores (pair_id, model_key, ches, run_id) VALUES (?, 'm', 9.0, 1)", [p.pair_id])
    con.execute("INSERT INTO datasets (name, version, content_hash, n_pairs, n_quarantined) "
                "VALUES ('old', 1, 'h', 4, 0)")
    con.close()

    store = Store(path)
    assert store.sql("SELECT version FROM schema_version ORDER BY version").version.tolist() == ALL_VERSIONS
    assert store.sql("SELECT DISTINCT tokenization_version AS v FROM scores").v.tolist() == ["1"]
    assert store.sql("SELECT tokenization_version, n_scored FROM score_summary").values.tolist() == [["1", 4]]
    # Old scores are kept but never read as current: every pair is offered for scoring again.
    assert store.score_counts("old", 1, OLD_M) == (4, 0)
    assert [p.row for p in store.unscored_pairs("old", 1, OLD_M)] == [0, 1, 2, 3]
    assert store.scores("old", model_key=OLD_M).empty
    assert store.tokenization_versions("old", 1, OLD_M) == {"1": 4}

    frame = fake_scores(pairs[:2])
    assert store.write_scores(store.start_score_run("old", 1, OLD_M), OLD_M, frame) == 2
    rows = store.sql("SELECT pair_id, tokenization_version AS v, ches FROM scores ORDER BY v, pair_id")
    assert len(rows) == 4 and rows.v.tolist() == ["1", "1", "2", "2"]  # one row per pair and model: replaced
    assert set(rows[rows.v == "2"].pair_id) == {p.pair_id for p in pairs[:2]}
    assert store.scores("old", model_key=OLD_M).ches.tolist() == frame.ches.tolist()  # only the new ones
    assert store.score_counts("old", 1, OLD_M) == (4, 2)
    assert store.tokenization_versions("old", 1, OLD_M) == {"1": 2, "2": 2}


def test_scores_of_the_chat_and_raw_tokenizations_are_kept_apart(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(3)
    store.register_dataset("toy", None, pairs)
    raw = fake_scores(pairs, seed=1)
    with use_chat_template(False):
        assert store.write_scores(store.start_score_run("toy", 1, "m"), "m", raw) == 3
        assert store.score_counts("toy", 1, "m") == (3, 3)
    assert store.score_counts("toy", 1, "m") == (3, 0)  # in effect: the chat template, which scored nothing
    # Read without a choice: the only current version there is.
    np.testing.assert_array_equal(store.scores("toy", model_key="m").ches, raw.ches)
    chat = fake_scores(pairs[:1], seed=2)
    assert store.write_scores(store.start_score_run("toy", 1, "m"), "m", chat) == 1  # replaces pair 0's raw score
    assert store.tokenization_versions("toy", 1, "m") == {"2": 1, "2-raw": 2}
    assert store.scores("toy", model_key="m").ches.tolist() == chat.ches.tolist()
    with use_chat_template(False):
        np.testing.assert_array_equal(store.scores("toy", model_key="m").ches, raw.ches[1:])
    assert len(store.scores("toy", model_key="m", tokenization_version="2-raw")) == 2
    assert store.scored_chat_template("toy", 1, "m") is None  # some pairs under each: no single answer
    assert store.scored_chat_template("toy", 1, "other") is None  # not scored by that model


def test_training_takes_the_chat_template_choice_of_the_scores(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(3)
    store.register_dataset("toy", None, pairs)
    with use_chat_template(False):
        store.write_scores(store.start_score_run("toy", 1, "m"), "m", fake_scores(pairs, seed=1))
    assert store.scored_chat_template("toy", 1, "m") is False  # whatever is in effect when training starts
    store.write_scores(store.start_score_run("toy", 1, "m"), "m", fake_scores(pairs, seed=2))
    assert store.scored_chat_template("toy", 1, "m") is True


def test_a_store_that_got_migration_6_before_5_gets_5_on_open(tmp_path):
    path = tmp_path / "hole.duckdb"
    con = duckdb.connect(str(path))
    migrations.apply(con, up_to=4)
    six = next(m for m in migrations.MIGRATIONS if m.version == 6)
    for statement in six.statements:
        con.execute(statement)
    con.execute("INSERT INTO schema_version (version) VALUES (6)")
    con.close()
    store = Store(path)
    assert store.sql("SELECT version FROM schema_version ORDER BY version").version.tolist() == ALL_VERSIONS
    with store.connect(read_only=True) as con:
        assert columns_of(con, "scores") == CONTRACT_COLUMNS["scores"].split()


def test_writing_connections_take_their_memory_limit_from_the_environment(tmp_path, monkeypatch):
    store = Store(tmp_path / "s.duckdb")
    monkeypatch.setenv("CHES_CURATE_DUCKDB_MEMORY", "300MiB")
    assert store.sql("SELECT current_setting('memory_limit') AS m", write=True).m.iloc[0] == "300.0 MiB"
    assert store.sql("SELECT current_setting('memory_limit') AS m").m.iloc[0] != "300.0 MiB"  # reads stay uncapped


def test_database_from_a_newer_release_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    Store(path)
    with duckdb.connect(str(path)) as con:
        con.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(ChesCurateError, match="schema version 99, newer"):
        Store(path)


def test_read_only_open_of_missing_store_names_the_fix(tmp_path):
    with pytest.raises(ChesCurateError, match="no store at .*ches-curate ingest"):
        Store(tmp_path / "missing.duckdb", create=False)
    assert not (tmp_path / "missing.duckdb").exists()


def test_same_content_twice_is_one_version_and_changes_make_new_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "INSERT_BATCH", 7)  # several pair batches
    store = Store(tmp_path / "s.duckdb")
    first = store.register_dataset("toy", "a.jsonl", make_pairs(20))
    again = store.register_dataset("toy", "copy-of-a.jsonl", make_pairs(20))
    assert (first.version, first.created, first.n_pairs) == (1, True, 20)
    assert (again.version, again.created, again.content_hash) == (1, False, first.content_hash)

    grown = store.register_dataset("toy", "b.jsonl", make_pairs(22))
    assert (grown.version, grown.created, grown.n_pairs) == (2, True, 22)
    assert store.sql("SELECT name, version, n_pairs FROM datasets ORDER BY version").values.tolist() == [
        ["toy", 1, 20], ["toy", 2, 22]]
    assert store.sql("SELECT count(*) AS n FROM pairs").n.iloc[0] == 22  # pairs are shared, not copied
    assert store.sql("SELECT count(*) AS n FROM dataset_pairs").n.iloc[0] == 42
    assert store.latest_version("toy").version == 2


def test_rejected_rows_are_quarantined_and_part_of_the_content(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    bad = RejectedRow("a.jsonl", 3, "rejected", "is empty", '{"prompt": "p", "chosen": "c", "rejected": ""}')
    items = [*make_pairs(2), bad]
    dv = store.register_dataset("toy", "a.jsonl", items)
    assert (dv.n_pairs, dv.n_quarantined) == (2, 1)
    q = store.sql("SELECT dataset_name, dataset_version, stage, source, line, field, reason, raw FROM quarantine")
    assert q.values.tolist() == [["toy", 1, "ingest", "a.jsonl", 3, "rejected", "is empty", bad.raw]]
    fixed = store.register_dataset("toy", "a.jsonl", make_pairs(2))
    assert (fixed.version, fixed.created, fixed.n_quarantined) == (2, True, 0)


def test_ingest_spills_across_batches_and_stores_a_repeated_pair_once_with_its_first_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "INSERT_BATCH", 3)
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(7)
    twin = PreferencePair(pairs[0].prompt, pairs[0].chosen, pairs[0].rejected, row=100, metadata={"i": "twin"})
    bad = [RejectedRow("a.jsonl", 100 + i, "chosen", "is empty", f"raw {i}") for i in range(7)]
    items = [pairs[0], twin, *[p for i, p in enumerate(pairs[1:]) for p in (p, bad[i])], bad[6]]
    dv = store.register_dataset("toy", "a.jsonl", items)
    assert (dv.n_pairs, dv.n_quarantined) == (8, 7)
    assert store.sql("SELECT pair_id, metadata FROM pairs WHERE pair_id = ?", params=[twin.pair_id]).values.tolist() == [
        [twin.pair_id, '{"i": 0}']]
    assert store.sql("SELECT count(*) AS n FROM pairs").n.iloc[0] == 7
    links = store.sql('SELECT "row", pair_id FROM dataset_pairs WHERE name = \'toy\' AND version = 1 ORDER BY "row"')
    assert links.values.tolist() == [[p.row, p.pair_id] for p in [*pairs, twin]]
    assert store.sql("SELECT line, raw FROM quarantine WHERE dataset_version = 1 ORDER BY line").values.tolist() == [
        [r.line, r.raw] for r in bad]
    assert store.register_dataset("toy", "a.jsonl", items).created is False


def test_dataset_pairs_round_trip_prompts_and_metadata_in_row_order(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PAGE_SIZE", 3)
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(10)
    store.register_dataset("toy", None, list(reversed(pairs)))
    back = list(store.dataset_pairs("toy"))
    assert [p.row for p in back] == list(range(10))
    assert back == pairs and [p.metadata for p in back] == [p.metadata for p in pairs]
    assert [p.pair_id for p in back] == [p.pair_id for p in pairs]


def test_unknown_dataset_and_version_list_what_exists(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("alpha", None, make_pairs(1))
    with pytest.raises(ChesCurateError, match=r"unknown dataset 'beta'.*known: alpha"):
        store.latest_version("beta")
    with pytest.raises(ChesCurateError, match=r"no version 5 \(versions: 1\)"):
        store.dataset_version("alpha", 5)


def test_write_scores_is_idempotent_and_counts_what_it_added(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(6)
    store.register_dataset("toy", None, pairs)
    store.register_model("m@1/float32", {"name": "m", "dtype": "float32"})
    run = store.start_score_run("toy", 1, "m@1/float32", {"batch_size": 2})
    frame = fake_scores(pairs)
    assert store.write_scores(run, "m@1/float32", frame.iloc[:4]) == 4
    assert store.write_scores(run, "m@1/float32", frame) == 2  # the first four are kept, not duplicated
    assert store.write_scores(run, "m@1/float32", pd.concat([frame, frame])) == 0
    store.finish_score_run(run, "finished", n_failed=0)
    assert store.sql("SELECT count(*) AS n, count(DISTINCT pair_id) AS d FROM scores").values.tolist() == [[6, 6]]
    assert store.sql("SELECT status, n_scored FROM score_runs").values.tolist() == [["finished", 6]]
    got = store.scores("toy").set_index("pair_id").loc[frame.pair_id]
    np.testing.assert_array_equal(got.ches.to_numpy(), frame.ches.to_numpy())
    assert got.prompt.iloc[0] == [{"role": "user", "content": "chat 0"}] and got.metadata.iloc[1] == {"i": 1}


def test_unscored_pairs_skips_scored_and_repeated_pairs(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PAGE_SIZE", 2)
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(5)
    repeated = PreferencePair(pairs[1].prompt, pairs[1].chosen, pairs[1].rejected, row=5)
    store.register_dataset("toy", None, [*pairs, repeated])
    run = store.start_score_run("toy", 1, "m")
    store.write_scores(run, "m", fake_scores([pairs[0], pairs[3]]))
    assert [p.row for p in store.unscored_pairs("toy", 1, "m")] == [1, 2, 4]
    assert [p.row for p in store.unscored_pairs("toy", 1, "other")] == [0, 1, 2, 3, 4]
    assert store.score_counts("toy", 1, "m") == (5, 2)  # the repeated pair counts once


def test_scores_needs_a_model_when_several_scored_the_dataset(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(3)
    store.register_dataset("toy", None, pairs)
    with pytest.raises(ChesCurateError, match="no scores yet; run `ches-curate score --dataset toy`"):
        store.scores("toy")
    for key in ("a", "b"):
        store.write_scores(store.start_score_run("toy", 1, key), key, fake_scores(pairs))
    with pytest.raises(ChesCurateError, match="several models; pick one with --model-key: a, b"):
        store.scores("toy")
    assert len(store.scores("toy", model_key="b")) == 3


def test_views_follow_the_latest_version_and_summarise_percentiles(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    old, new = make_pairs(50), make_pairs(80)
    store.register_dataset("toy", None, old)
    store.register_dataset("toy", None, new)
    frame = fake_scores(new, seed=3)
    store.write_scores(store.start_score_run("toy", 2, "m"), "m", frame)

    latest = store.sql("SELECT DISTINCT dataset_version, count(*) OVER () AS n FROM latest_scores")
    assert latest.values.tolist() == [[2, 80]]
    summary = store.sql("SELECT * FROM score_summary ORDER BY dataset_version").set_index("dataset_version")
    assert summary.n_scored.to_dict() == {1: 50, 2: 80}
    for column in ("ches", "ln_ches"):
        values = frame[column].to_numpy()
        for level in (5, 25, 50, 75, 95):
            assert summary.loc[2, f"{column}_p{level:02d}"] == pytest.approx(np.quantile(values, level / 100), abs=1e-12)
        assert summary.loc[2, f"{column}_mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert summary.loc[2, f"{column}_max"] == values.max()


def test_selection_is_saved_and_read_back(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    pairs = make_pairs(4)
    store.register_dataset("toy", None, pairs)
    decisions = pd.DataFrame({"pair_id": [p.pair_id for p in pairs], "kept": [True, False, True, False],
                              "rank": [1, 4, 2, 3]})
    first = store.save_selection("top_k", {"k": 2}, "toy", 1, "m", decisions, "ln_ches")
    second = store.save_selection("all", {}, "toy", 1, None, decisions.assign(kept=True), None)
    assert (first, second) == (1, 2)
    got = store.selection(first)
    assert got.pair_id.tolist() == [pairs[i].pair_id for i in (0, 2, 3, 1)]
    assert got.kept.tolist() == [True, True, False, False] and set(got.policy) == {"top_k"}
    with pytest.raises(ChesCurateError, match=r"no selection 9 .*known: 1, 2"):
        store.selection(9)


def test_add_quarantine_rejects_unknown_fields(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    assert store.add_quarantine([{"stage": "quality", "reason": "too long", "expectation": "max_len", "pair_id": "x"}]) == 1
    assert store.sql("SELECT stage, expectation, pair_id FROM quarantine").values.tolist() == [["quality", "max_len", "x"]]
    with pytest.raises(ValueError, match="unknown quarantine fields"):
        store.add_quarantine([{"stage": "quality", "reason": "r", "colour": "red"}])


HOLD_LOCK = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_lock_held_by_another_process_gives_a_clear_error_after_bounded_retry(tmp_path):
    path = tmp_path / "s.duckdb"
    store = Store(path, lock_timeout_s=0.5)
    holder = hold_lock(path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLockedError) as caught:
            store.sql("SELECT 1")
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    message = str(caught.value)
    assert f"locked by process {holder.pid}" in message and "CHES_CURATE_LOCK_TIMEOUT" in message
    assert 0.3 <= waited < 5
    assert store.sql("SELECT 1 AS one").one.iloc[0] == 1  # free again once the holder is gone


def test_writer_waits_for_a_short_lock_to_be_released(tmp_path):
    path = tmp_path / "s.duckdb"
    store = Store(path, lock_timeout_s=20)
    holder = hold_lock(path, 0.5)
    try:
        dv = store.register_dataset("toy", None, make_pairs(3))
    finally:
        holder.wait()
    assert dv.created and store.latest_version("toy").n_pairs == 3


def test_unscored_pairs_of_an_unknown_version_lists_what_exists(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, make_pairs(2))
    with pytest.raises(ChesCurateError, match=r"no version 3 \(versions: 1\)"):
        list(store.unscored_pairs("toy", 3, "m"))
