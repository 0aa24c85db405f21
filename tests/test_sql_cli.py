"""CLI over the store: `ingest`, `datasets`, `sql` (read-only by default) and `export` (TRL format)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from ches_curate.commands import store as store_commands
from ches_curate.errors import ChesCurateError
from ches_curate.ingest import read_pairs
from ches_curate.pairs import PreferencePair
from ches_curate.store import Store

app = typer.Typer()


@app.callback()
def _root() -> None:
    """A local app holding only the store commands."""


store_commands.register(app)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def chat_pairs(n: int) -> list[PreferencePair]:
    return [
        PreferencePair([{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}"}],
                       f"answer {i}", f"refusal {i}", row=i, format="conversational")
        for i in range(n)
    ]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "s.duckdb"
    source = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]
    rows.insert(3, {"prompt": "p", "chosen": "c", "rejected": ""})
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("ingest", source, "--dataset", "toy", "--on-error", "quarantine", "--db", path)
    assert result.exit_code == 0, result.output
    assert "toy v1: 6 pairs, 1 quarantined (new version)" in result.output
    return path


def test_ingest_same_file_twice_keeps_one_version(db, tmp_path):
    result = invoke("ingest", tmp_path / "pairs.jsonl", "--dataset", "toy", "--on-error", "quarantine", "--db", db)
    assert result.exit_code == 0 and "unchanged: same content as v1" in result.output
    assert Store(db).sql("SELECT name, version, n_pairs, n_quarantined FROM datasets").values.tolist() == [
        ["toy", 1, 6, 1]]
    assert Store(db).sql("SELECT line, field FROM quarantine").values.tolist() == [[4, "rejected"]]


def test_ingest_without_quarantine_stops_at_the_bad_row(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "p", "chosen": "c", "rejected": ""}\n')
    result = invoke("ingest", source, "--dataset", "bad", "--db", tmp_path / "s.duckdb")
    assert isinstance(result.exception, ChesCurateError)
    assert "bad.jsonl:1: field 'rejected'" in str(result.exception)


def test_datasets_lists_versions_and_counts(db):
    result = invoke("datasets", "--db", db)
    assert result.exit_code == 0
    assert "toy" in result.output and "6" in result.output and "1 rows" in result.output


def test_sql_writes_csv_and_json_to_pipes(db):
    query = "SELECT name, version, n_pairs FROM datasets"
    csv = invoke("sql", query, "--db", db)  # not a terminal: CSV
    assert csv.exit_code == 0
    assert pd.read_csv(io.StringIO(csv.stdout)).values.tolist() == [["toy", 1, 6]]
    as_json = invoke("sql", query, "--db", db, "--format", "json")
    assert json.loads(as_json.stdout) == [{"name": "toy", "version": 1, "n_pairs": 6}]


def test_sql_table_and_parquet_formats(db, tmp_path):
    table = invoke("sql", "SELECT name, n_quarantined FROM datasets", "--db", db, "--format", "table")
    assert table.exit_code == 0 and "n_quarantined" in table.stdout and "toy" in table.stdout
    refused = invoke("sql", "SELECT 1", "--db", db, "--format", "parquet")
    assert "--format parquet needs --output" in str(refused.exception)
    out = tmp_path / "q.parquet"
    written = invoke("sql", "SELECT pair_id, chosen FROM pairs ORDER BY chosen", "--db", db, "--output", out)
    assert written.exit_code == 0
    assert pq.read_table(out).column("chosen").to_pylist() == [f"c{i}" for i in range(6)]


def test_sql_is_read_only_unless_write(db):
    refused = invoke("sql", "DELETE FROM quarantine", "--db", db)
    assert isinstance(refused.exception, ChesCurateError)
    message = str(refused.exception)
    assert "read-only" in message and "add --write" in message and "\n" not in message
    assert Store(db).sql("SELECT count(*) AS n FROM quarantine").n.iloc[0] == 1

    allowed = invoke("sql", "DELETE FROM quarantine", "--db", db, "--write")
    assert allowed.exit_code == 0
    assert Store(db).sql("SELECT count(*) AS n FROM quarantine").n.iloc[0] == 0


def test_sql_errors_show_duckdbs_message(db):
    result = invoke("sql", "SELECT nope FROM datasets", "--db", db)
    assert isinstance(result.exception, ChesCurateError)
    assert 'Referenced column "nope" not found' in str(result.exception)
    missing = invoke("sql", "SELECT 1", "--db", db.parent / "typo.duckdb")
    assert "no store at" in str(missing.exception) and not (db.parent / "typo.duckdb").exists()


def read_export(out) -> list[dict]:
    if out.is_dir():
        import datasets

        return datasets.load_from_disk(str(out)).to_list()
    return [json.loads(line) for line in out.open()] if out.suffix == ".jsonl" else pq.read_table(out).to_pylist()


@pytest.mark.parametrize("template", [[], ["--no-chat-template"]], ids=["conversational", "standard"])
@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "datasets"])
def test_export_round_trips_pair_ids(db, tmp_path, suffix, template):
    out = tmp_path / f"toy.{suffix}"
    fmt = ["--format", "datasets"] if suffix == "datasets" else []
    result = invoke("export", "--dataset", "toy", "--output", out, "--db", db, *fmt, *template)
    style, version = ("standard", "2-raw") if template else ("conversational", "2")
    assert result.exit_code == 0 and f"wrote 6 pairs ({style} TRL format, tokenization {version})" in result.output
    first = read_export(out)[0]
    prompt = "p0" if template else [{"role": "user", "content": "p0"}]
    assert first == {"prompt": prompt, "chosen": first["chosen"], "rejected": first["rejected"],
                     "ches_model_key": None, "ches_tokenization_version": version}
    store = Store(db)
    original = [p.pair_id for p in store.dataset_pairs("toy")]
    assert [p.pair_id for p in read_pairs(out)] == original
    invoke("ingest", out, "--dataset", "again", "--db", db)
    assert [p.pair_id for p in store.dataset_pairs("again")] == original


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_export_of_a_selection_writes_only_kept_pairs_conversationally(tmp_path, suffix):
    store = Store(tmp_path / "s.duckdb")
    pairs = chat_pairs(5)
    store.register_dataset("chat", None, pairs)
    decisions = pd.DataFrame({"pair_id": [p.pair_id for p in pairs], "kept": [True, False, True, True, False],
                              "rank": [1, 5, 2, 3, 4]})
    selection = store.save_selection("top", {}, "chat", 1, None, decisions, None)
    out = tmp_path / f"curated.{suffix}"
    result = invoke("export", "--selection", selection, "--output", out, "--db", store.path)
    assert result.exit_code == 0 and "wrote 3 pairs (conversational TRL format, tokenization 2)" in result.output

    assert read_export(out)[0] == {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "question 0"}],
        "chosen": [{"role": "assistant", "content": "answer 0"}],
        "rejected": [{"role": "assistant", "content": "refusal 0"}],
        "ches_model_key": None, "ches_tokenization_version": "2",
    }
    assert [p.pair_id for p in read_pairs(out)] == [pairs[i].pair_id for i in (0, 2, 3)]


def test_export_rejects_unknown_suffix_and_mismatched_dataset(db, tmp_path):
    bad = invoke("export", "--dataset", "toy", "--output", tmp_path / "x.csv", "--db", db)
    assert "unknown export format" in str(bad.exception) and not (tmp_path / "x.csv").exists()
    store = Store(db)
    ids = store.sql("SELECT pair_id FROM pairs").pair_id
    selection = store.save_selection("all", {}, "toy", 1, None, pd.DataFrame({"pair_id": ids, "kept": True, "rank": 1}),
                                     None)
    clash = invoke("export", "--selection", selection, "--dataset", "other", "--output", tmp_path / "x.jsonl", "--db", db)
    assert "selection 1 was made on dataset 'toy' v1" in str(clash.exception)


def scored_selection(store: Store, pairs: list[PreferencePair], version: str) -> int:
    """A selection keeping every pair, over scores of model `m` recorded under tokenization `version`."""
    store.register_dataset("toy", None, pairs)
    scores = pd.DataFrame({"row": [p.row for p in pairs], "pair_id": [p.pair_id for p in pairs], "ches": 0.0,
                           "ln_ches": 0.0, "chosen_tokens": 1, "rejected_tokens": 1, "last_hidden_ip": 0.0,
                           "edit_distance": 0.0, "truncated": False})
    store.write_scores(store.start_score_run("toy", 1, "m"), "m", scores, tokenization_version=version)
    kept = pd.DataFrame({"pair_id": [p.pair_id for p in pairs], "kept": True, "rank": range(1, len(pairs) + 1)})
    return store.save_selection("all", {}, "toy", 1, "m", kept, "ches")


def test_export_follows_the_tokenization_the_selection_was_scored_with(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    selection = scored_selection(store, [PreferencePair(f"q{i}", f"a{i}", f"b{i}", row=i) for i in range(3)], "2-raw")
    out = tmp_path / "out.jsonl"
    result = invoke("export", "--selection", selection, "--output", out, "--db", store.path)
    assert result.exit_code == 0 and "3 pairs (standard TRL format, tokenization 2-raw)" in result.output
    assert read_export(out)[0] == {"prompt": "q0", "chosen": "a0", "rejected": "b0", "ches_model_key": "m",
                                   "ches_tokenization_version": "2-raw"}
    clash = invoke("export", "--selection", selection, "--chat-template", "--output", out, "--db", store.path)
    assert str(clash.exception) == (f"selection {selection} was scored under tokenization 2-raw, not 2: export with "
                                    "--no-chat-template, or re-score with the tokenization you want and filter again")


def test_export_refuses_scores_of_an_older_tokenization(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    selection = scored_selection(store, [PreferencePair("q", "a", "b")], "1")
    result = invoke("export", "--selection", selection, "--output", tmp_path / "out.jsonl", "--db", store.path)
    assert str(result.exception) == (
        f"selection {selection}: model 'm' scored 1 pair under tokenization 1; an export needs them all under one of "
        "2, 2-raw (what TRL trains on): re-score with `ches-curate score --dataset toy` (add --no-chat-template for "
        "2-raw), then filter again")
    assert not (tmp_path / "out.jsonl").exists()


def test_export_keeps_extra_columns_but_those_trl_reads(tmp_path):
    source = tmp_path / "uf.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "b"}],
             "score_chosen": [8, 7.5][i], "score_rejected": 2, "messages": [{"role": "user", "content": "x"}]}
            for i in range(2)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "s.duckdb"
    assert invoke("ingest", source, "--dataset", "uf", "--db", db).exit_code == 0
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"uf.{suffix}"
        result = invoke("export", "--dataset", "uf", "--output", out, "--db", db)
        assert "left out the columns messages: TRL reads them" in result.output
        records = read_export(out)
        assert [(r["score_chosen"], r["score_rejected"]) for r in records] == [(8, 2), (7.5, 2)]
        assert "messages" not in records[0] and records[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    bare = invoke("export", "--dataset", "uf", "--output", tmp_path / "bare.jsonl", "--no-extra-columns", "--db", db)
    assert bare.exit_code == 0 and "left out" not in bare.output
    assert set(read_export(tmp_path / "bare.jsonl")[0]) == {"prompt", "chosen", "rejected", "ches_model_key",
                                                            "ches_tokenization_version"}


def test_standard_export_of_a_multi_message_prompt_names_the_row(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("chat", None, chat_pairs(2))
    result = invoke("export", "--dataset", "chat", "--no-chat-template", "--output", tmp_path / "o.jsonl",
                    "--db", store.path)
    assert str(result.exception).startswith("row 0 (pair ")
    assert str(result.exception).endswith("the prompt is a conversation of 2 messages, which TRL tokenizes only "
                                          "through a chat template (use a model that has one, without "
                                          "--no-chat-template)")
    assert not (tmp_path / "o.jsonl").exists()


def test_datasets_export_replaces_an_earlier_one_whole(db, tmp_path):
    out = tmp_path / "toy_ds"
    for _ in range(2):
        assert invoke("export", "--dataset", "toy", "--format", "datasets", "-o", out, "--db", db).exit_code == 0
    assert len(read_export(out)) == 6 and sorted(os.listdir(tmp_path)) == ["pairs.jsonl", "s.duckdb", "toy_ds"]
    clash = invoke("export", "--dataset", "toy", "--format", "datasets", "-o", tmp_path / "pairs.jsonl", "--db", db)
    assert "is a file; a datasets export is a directory" in str(clash.exception)


REAL_CLI = """
import sys
from ches_curate import cli
from ches_curate.commands import store
if "ches_curate.commands.store" not in cli.COMMAND_MODULES:
    store.register(cli.app)
sys.argv = ["ches-curate", *sys.argv[1:]]
cli.main()
"""


def test_real_cli_prints_duckdb_errors_as_one_line_without_traceback(db):
    done = subprocess.run([sys.executable, "-c", REAL_CLI, "sql", "INSERT INTO models (model_key) VALUES ('x')",
                           "--db", str(db)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "500"})  # rich wraps long lines at 80 columns otherwise
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: Invalid Input Error: Cannot execute statement of type \"INSERT\"")
    assert "add --write" in done.stderr
