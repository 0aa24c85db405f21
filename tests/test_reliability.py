"""Reliability through the real CLI: bad inputs, injected faults and the trust boundary.

Every bad input either ends in the store / score table or its quarantine with a reason, or
fails with one `error:` line naming the file, line (or row) and field; no traceback, no
silent drop. Faults (`kill -9`, a locked store, a model that produces NaN/inf, a full disk)
end cleanly and a rerun gives exactly what a clean run gives. The last test prints the
tally that docs/reliability.md reports.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ches_curate import plugins
from ches_curate.store import connections, database as store_module
from ches_curate.errors import ChesCurateError
from ches_curate.scoring.incremental import score_dataset
from ches_curate.pairs import PreferencePair
from ches_curate.pipeline_config import PipelineConfig
from ches_curate.scoring import score_pairs
from ches_curate.store import Store
from ches_curate.tokenization import encode_pair
from tests.reliability_helpers import (
    REMOTE_CODE,
    ROGUE_PLUGIN,
    TALLY,
    FullDiskConnection,
    enospc,
    ids,
    lost_or_duplicated,
    run_cli,
    run_cli_process,
    store_snapshot,
    write_synthetic_pairs,
)
from tests.test_ingest import _input_rows as input_rows
from tests.test_plugins import add_dist_info
from tests.test_store import hold_lock

BAD = Path(__file__).parent / "data" / "bad"
N_SYNTHETIC = 3000
REFERENCED_FAULTS = [
    "kill -9 while scoring a stored dataset, then resume "
    "(tests/test_incremental.py::test_resume_after_kill_scores_each_pair_once)",
]


@pytest.fixture(autouse=True)
def quiet_transformers():
    """No weight-loading progress bars on stderr, so a failure's stderr is its one error line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


# --- bad inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What a bad file does: `row` (one bad row at `line`), `file` (refused whole), `clean` or `too_long`."""

    kind: str
    line: int | None = None
    field: str | None = None
    reason: str = ""
    unit: str = "line"

    def location(self, path: Path) -> str:
        return f"{path}:{self.line}: " if self.unit == "line" else f"{path}: row {self.line}: "


BAD_INPUTS = {
    "chosen_equals_rejected.jsonl": Expect("row", 2, "rejected", "is identical to 'chosen'"),
    "conversational_prefix_mismatch.jsonl": Expect("row", 2, "rejected", "differs from 'chosen'"),
    "duplicate_pairs.jsonl": Expect("clean"),
    "empty.jsonl": Expect("file", reason="has no rows"),
    "empty_prompt.jsonl": Expect("row", 2, "prompt", "is empty"),
    "empty_response.jsonl": Expect("row", 1, "rejected", "is empty"),
    "malformed_json.jsonl": Expect("row", 2, None, "is malformed JSON"),
    "mismatched_hh_transcripts.jsonl": Expect("row", 2, "rejected", "does not match 'chosen'"),
    "missing_field.jsonl": Expect("row", 2, "rejected", "is missing"),
    "non_string_content.jsonl": Expect("row", 2, "chosen", "must be a string, got int"),
    "non_string_message_content.jsonl": Expect("row", 2, "chosen[1].content", "must be a string, got list"),
    "non_utf8.jsonl": Expect("row", 2, "chosen", "is not valid UTF-8 text"),
    "not_json_object.jsonl": Expect("row", 2, None, "must be a JSON object, got list"),
    "null_field.parquet": Expect("row", 2, "chosen", "is null", unit="row"),
    "ragged_row.csv": Expect("row", 3, None, "has 2 values but the header has 3 columns"),
    "response_1mb.jsonl": Expect("too_long", 0, "rejected", "more than the model's context of"),
    "wrong_columns.csv": Expect("file", reason="has columns question, good, bad"),
    "wrong_columns.jsonl": Expect("file", reason="has columns question, good, bad"),
    "wrong_types.parquet": Expect("file", field="chosen", reason="has Parquet type int64"),
}


def test_every_file_of_the_bad_corpus_has_an_expectation():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_INPUTS)


def check_ingest(path: Path, expect: Expect, on_error: str, db: Path) -> None:
    run = run_cli("ingest", path, "--dataset", "d", "--db", db, "--on-error", on_error)
    rows = input_rows(path)
    snapshot = store_snapshot(db)
    label = f"ingest {path.name} --on-error {on_error}"
    if expect.kind == "file" or (expect.kind == "row" and on_error == "fail"):
        assert run.code == 2, run.output
        error = run.error
        where = expect.location(path) if expect.kind == "row" else f"{path}: "
        assert error.startswith(f"error: {where}") and expect.reason in error
        if expect.field:
            assert f"field '{expect.field}'" in error
        assert snapshot["datasets"] == [] and snapshot["dataset_pairs"] == []  # refused whole, nothing half-stored
        TALLY.input(label, 0)
        return
    assert run.code == 0, run.output
    ((name, version, n_pairs, n_quarantined, _),) = snapshot["datasets"]
    assert (name, version, len(snapshot["dataset_pairs"])) == ("d", 1, n_pairs)
    quarantined = [(line, field) for *_, line, field, _ in snapshot["quarantine"]]
    if expect.kind == "row":
        assert quarantined == [(expect.line, expect.field)]
        assert expect.reason in snapshot["quarantine"][0][-1] and snapshot["quarantine"][0][2] == "ingest"
    else:
        assert quarantined == []
    assert n_pairs + n_quarantined == rows
    TALLY.input(label, rows - n_pairs - n_quarantined)


def check_score(path: Path, expect: Expect, on_error: str, model: Path, out: Path) -> None:
    run = run_cli("score", path, "--model", model, "--output", out, "--on-error", on_error, "--batch-size", "4")
    rows = input_rows(path)
    rejected_path = out.with_name(out.stem + ".rejected.jsonl")
    label = f"score {path.name} --on-error {on_error}"
    context = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    fails = expect.kind == "file" or (expect.kind in ("row", "too_long") and on_error == "fail")
    if expect.kind == "too_long" and on_error == "quarantine" and rows == 1:  # nothing left to score: no empty table
        assert run.code == 1 and run.error.startswith(f"error: {path}: no pairs to score: its only row was rejected "
                                                      f"(first: row 0: field 'rejected' makes the pair"), run.output
        assert not out.exists() and not rejected_path.exists()
        TALLY.input(label, 0)
        return
    if fails:
        assert run.code == (1 if expect.kind == "too_long" else 2), run.output
        error = run.error
        if expect.kind == "row":
            assert error.startswith(f"error: {expect.location(path)}")
        elif expect.kind == "too_long":
            assert error.startswith(f"error: {path}: row {expect.line} ") and f"context of {context:,}" in error
        else:
            assert error.startswith(f"error: {path}: ")
        assert expect.reason in error and (expect.field is None or f"field '{expect.field}'" in error)
        assert not out.exists() and not rejected_path.exists()
        TALLY.input(label, 0)
        return
    assert run.code == 0, run.output
    scored = pd.read_parquet(out)
    rejected = [json.loads(line) for line in rejected_path.read_text().splitlines()] if rejected_path.exists() else []
    assert scored["ches"].notna().all() and len(scored) + len(rejected) == rows
    if expect.kind == "row":
        assert [(r["stage"], r["line"], r["field"]) for r in rejected] == [("ingest", expect.line, expect.field)]
        assert expect.reason in rejected[0]["reason"]
    elif expect.kind == "too_long":
        assert [(r["stage"], r["row"], r["field"]) for r in rejected] == [("scoring", 0, "rejected")]
        assert f"{expect.reason} {context:,} (pass --max-length {context} to truncate)" in rejected[0]["reason"]
    else:
        assert rejected == [] and list(scored["row"]) == list(range(rows))
    TALLY.input(label, rows - len(scored) - len(rejected))


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_its_location_or_quarantined_and_never_dropped(name, tmp_path, tiny_llama_dir):
    path, expect = BAD / name, BAD_INPUTS[name]
    for on_error in ("fail", "quarantine"):
        check_ingest(path, expect, on_error, tmp_path / f"{on_error}.duckdb")
        check_score(path, expect, on_error, tiny_llama_dir, tmp_path / f"{on_error}.parquet")


def test_duplicate_pairs_are_stored_once_and_scored_at_every_row(tmp_path, tiny_llama_dir):
    path = BAD / "duplicate_pairs.jsonl"
    run_cli("ingest", path, "--dataset", "d", "--db", tmp_path / "s.duckdb")
    snapshot = store_snapshot(tmp_path / "s.duckdb")
    first, second, third = (pair_id for *_, pair_id in snapshot["dataset_pairs"])
    assert first == third != second and len(snapshot["pairs"]) == 2
    run_cli("score", path, "--model", tiny_llama_dir, "--output", tmp_path / "o.parquet")
    assert pd.read_parquet(tmp_path / "o.parquet")["pair_id"].tolist() == [first, second, third]


def test_the_installed_console_script_prints_one_line_for_a_bad_row(tmp_path, tiny_llama_dir):
    script = Path(sys.executable).with_name("ches-curate")
    if not script.exists():
        pytest.skip(f"no console script at {script}")
    path = BAD / "malformed_json.jsonl"
    done = run_cli_process("score", path, "--model", tiny_llama_dir, "--output", tmp_path / "o.parquet",
                           executable=[str(script)])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {path}:2: is malformed JSON (Expecting ',' delimiter at "
                                                "column 38) (use --on-error quarantine to keep going)"]
    TALLY.input("ches-curate (console script) score malformed_json.jsonl --on-error fail", 0)


# --- kill -9 ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """3,000 synthetic pairs, ingested cleanly, and their clean export: what every rerun must equal."""
    base = tmp_path_factory.mktemp("synthetic")
    source = write_synthetic_pairs(base / "pairs.jsonl", N_SYNTHETIC)
    db = base / "clean.duckdb"
    assert run_cli("ingest", source, "--dataset", "syn", "--db", db).code == 0
    assert run_cli("export", "--dataset", "syn", "--db", db, "--output", base / "clean.jsonl").code == 0
    return {"source": source, "db": db, "export": base / "clean.jsonl"}


@pytest.mark.parametrize(("kill_in", "committed_pairs"), [("INTO pairs#3", 1000), ("INTO datasets#1", N_SYNTHETIC)],
                         ids=["third-pair-batch", "version-transaction"])
def test_kill_9_during_ingest_writes_then_rerun_equals_a_clean_run(tmp_path, synthetic, kill_in, committed_pairs):
    db = tmp_path / "s.duckdb"
    killed = run_cli_process("ingest", synthetic["source"], "--dataset", "syn", "--db", db,
                             faults={"insert_batch": 500, "kill_in_transaction": kill_in})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after_kill = store_snapshot(db)
    # The transaction in flight vanished whole; the batches committed before it stay (no version points at them yet).
    assert after_kill["datasets"] == [] and after_kill["dataset_pairs"] == []
    assert len(after_kill["pairs"]) == committed_pairs

    rerun = run_cli("ingest", synthetic["source"], "--dataset", "syn", "--db", db)
    assert rerun.code == 0 and "syn v1: 3,000 pairs" in rerun.stdout
    assert store_snapshot(db) == store_snapshot(synthetic["db"])
    lost = lost_or_duplicated(ids(synthetic["db"]), ids(db))
    TALLY.fault(f"kill -9 during ingest ({kill_in.split('#')[0].lower()} transaction)", lost)
    assert lost == 0


def test_kill_9_during_export_keeps_the_old_file_and_rerun_equals_a_clean_export(tmp_path, synthetic):
    out = tmp_path / "curated.jsonl"
    out.write_text("previous export\n")
    killed = run_cli_process("export", "--dataset", "syn", "--db", synthetic["db"], "--output", out,
                             faults={"kill_at_record": N_SYNTHETIC // 2})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert out.read_text() == "previous export\n"  # written beside it and renamed: never half a file

    assert run_cli("export", "--dataset", "syn", "--db", synthetic["db"], "--output", out).code == 0
    assert out.read_bytes() == synthetic["export"].read_bytes()
    clean = synthetic["export"].read_text().splitlines()  # one record a line: a prompt's messages are unhashable
    lost = lost_or_duplicated(clean, out.read_text().splitlines())
    TALLY.fault("kill -9 during export", lost)
    assert lost == 0 and len(clean) == N_SYNTHETIC


def test_kill_9_while_scoring_a_file_leaves_no_table_and_rerun_equals_a_clean_run(tmp_path, tiny_llama_dir):
    source = write_synthetic_pairs(tmp_path / "pairs.jsonl", 24, width=14)
    out = tmp_path / "scores.parquet"
    args = ("score", source, "--model", tiny_llama_dir, "--batch-size", "4")
    killed = run_cli_process(*args, "--output", out, faults={"kill_at_batch": 3})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]  # no table, no partial file

    assert run_cli(*args, "--output", out).code == 0
    assert run_cli(*args, "--output", tmp_path / "clean.parquet").code == 0
    rerun, clean = pd.read_parquet(out), pd.read_parquet(tmp_path / "clean.parquet")
    pd.testing.assert_frame_equal(rerun, clean)
    lost = lost_or_duplicated(list(range(24)), rerun["row"].tolist())
    TALLY.fault("kill -9 while scoring a file", lost)
    assert lost == 0


# --- a locked store --------------------------------------------------------------------------------------------------


def test_a_locked_store_names_the_holder_pid_and_keeps_its_data(tmp_path, monkeypatch, synthetic):
    db = tmp_path / "s.duckdb"
    assert run_cli("ingest", BAD / "duplicate_pairs.jsonl", "--dataset", "d", "--db", db).code == 0
    before = store_snapshot(db)
    monkeypatch.setenv("CHES_CURATE_LOCK_TIMEOUT", "0.3")
    holder = hold_lock(db, 30)
    try:
        run = run_cli("ingest", synthetic["source"], "--dataset", "syn", "--db", db)
    finally:
        holder.kill()
        holder.wait()
    assert run.code == 3
    assert run.error.startswith(f"error: {db} is locked by process {holder.pid} (")
    assert "CHES_CURATE_LOCK_TIMEOUT" in run.error
    assert store_snapshot(db) == before
    TALLY.fault("a store locked by another process", 0)


# --- a model that produces NaN / inf ---------------------------------------------------------------------------------

POISON_PAIRS = [
    {"prompt": "Tell me about the quick brown fox.", "chosen": "It jumps.", "rejected": "No."},  # NaN in the prompt
    {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."},
    {"prompt": "Hi?", "chosen": "Hello.", "rejected": "A lazy answer."},  # inf in the rejected response
    {"prompt": "How do I bake bread?", "chosen": "Mix flour, water, salt and yeast.", "rejected": "I cannot help."},
]
POISONED_ROWS, CLEAN_ROWS = [0, 2], [1, 3]


@pytest.fixture(scope="module")
def poisoned(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama with the embedding of a token of 'fox' set to NaN and one of ' lazy' to +inf.

    Only pairs holding those tokens can go non-finite: the clean pairs' scores must not change.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path_factory.mktemp("poisoned")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pairs = [PreferencePair(**r, row=i) for i, r in enumerate(POISON_PAIRS)]
    token_sets = []
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair)
        token_sets.append(set(encoded.prompt_ids + encoded.chosen_ids + encoded.rejected_ids))
    clean_tokens = set().union(*(token_sets[i] for i in CLEAN_ROWS))
    nan_token = min(set(tokenizer(" fox", add_special_tokens=False)["input_ids"]) - clean_tokens)
    inf_token = min(set(tokenizer(" lazy", add_special_tokens=False)["input_ids"]) - clean_tokens)
    assert nan_token in token_sets[0] and inf_token in token_sets[2]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight[nan_token] = float("nan")
        model.get_input_embeddings().weight[inf_token] = float("inf")
    model.save_pretrained(base / "model")
    tokenizer.save_pretrained(base / "model")
    source = base / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in POISON_PAIRS))
    reference = score_pairs([pairs[i] for i in CLEAN_ROWS], str(tiny_llama_dir), batch_size=1)
    return {"model": base / "model", "source": source, "reference": reference}


def test_nan_and_inf_hidden_states_are_quarantined_and_the_other_pairs_scored(tmp_path, poisoned):
    out = tmp_path / "scores.parquet"
    run = run_cli("score", poisoned["source"], "--model", poisoned["model"], "--output", out, "--batch-size", "4",
                  "--on-error", "quarantine")
    assert run.code == 0, run.output
    scored = pd.read_parquet(out)
    assert scored["row"].tolist() == CLEAN_ROWS
    assert scored["ches"].tolist() == pytest.approx(poisoned["reference"]["ches"].tolist(), rel=1e-5)
    assert scored["ln_ches"].tolist() == pytest.approx(poisoned["reference"]["ln_ches"].tolist(), rel=1e-5)
    rejected = [json.loads(line) for line in out.with_name("scores.rejected.jsonl").read_text().splitlines()]
    assert sorted((r["stage"], r["row"], r["reason"]) for r in rejected) == [
        ("scoring", row, "the model produced non-finite hidden states") for row in POISONED_ROWS]
    lost = len(POISON_PAIRS) - len(scored) - len(rejected)
    TALLY.fault("NaN/inf hidden states, score FILE --on-error quarantine", lost)
    assert lost == 0


def test_nan_hidden_states_stop_the_run_with_the_row_when_on_error_is_fail(tmp_path, poisoned):
    out = tmp_path / "scores.parquet"
    run = run_cli("score", poisoned["source"], "--model", poisoned["model"], "--output", out, "--batch-size", "4")
    assert run.code == 1
    assert run.error.startswith(f"error: {poisoned['source']}: row ")
    assert int(run.error.split(": row ")[1].split()[0]) in POISONED_ROWS
    assert "non-finite hidden states (use --on-error quarantine to keep going)" in run.error
    assert not out.exists()
    TALLY.fault("NaN/inf hidden states, score FILE --on-error fail", 0)


def test_nan_pairs_of_a_stored_dataset_are_quarantined_at_stage_scoring(tmp_path, poisoned):
    db = tmp_path / "s.duckdb"
    run_cli("ingest", poisoned["source"], "--dataset", "p", "--db", db)
    run = run_cli("score", "--dataset", "p", "--db", db, "--model", poisoned["model"], "--on-error", "quarantine")
    assert run.code == 0, run.output
    store = Store(db)
    scores = store.scores("p")
    assert scores["row"].tolist() == CLEAN_ROWS
    assert scores["ches"].tolist() == pytest.approx(poisoned["reference"]["ches"].tolist(), rel=1e-5)
    quarantine = store.sql("SELECT stage, pair_id FROM quarantine ORDER BY pair_id")
    pair_ids = dict(store.sql('SELECT "row", pair_id FROM dataset_pairs').itertuples(index=False, name=None))
    assert quarantine.values.tolist() == sorted(["scoring", pair_ids[row]] for row in POISONED_ROWS)
    run_row = store.sql("SELECT status, n_scored, n_failed FROM score_runs").iloc[0].tolist()
    assert run_row == ["finished", 2, 2]
    TALLY.fault("NaN/inf hidden states, score --dataset --on-error quarantine", len(POISON_PAIRS) - 2 - 2)


# --- a full disk -----------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 3 MiB tmpfs (needs root and mount); the injected variants below run everywhere."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tmpfs needs root; the OSError-injection tests cover a full disk instead")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); OSError injection covers it")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_tmpfs_fails_ingest_cleanly_keeps_the_store_and_the_rerun_completes(tmp_path, tiny_tmpfs):
    db = tiny_tmpfs / "s.duckdb"
    assert run_cli("ingest", BAD / "duplicate_pairs.jsonl", "--dataset", "small", "--db", db).code == 0
    before = store_snapshot(db)
    big = write_synthetic_pairs(tmp_path / "big.jsonl", 2000, width=600)
    run = run_cli("ingest", big, "--dataset", "big", "--db", db)
    assert run.code == 1
    assert run.error.startswith(f"error: {db}: no space left on device; the write in progress was rolled back")
    assert store_snapshot(db) == before

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_tmpfs)], check=True)
    assert run_cli("ingest", big, "--dataset", "big", "--db", db).code == 0
    after = store_snapshot(db)
    big_rows = [(row, pid) for name, _, row, pid in after["dataset_pairs"] if name == "big"]
    assert [row for row, _ in big_rows] == list(range(2000)) and len(after["pairs"]) == len(before["pairs"]) + 2000
    TALLY.fault("full disk (3 MiB tmpfs) during ingest", 2000 - len({pid for _, pid in big_rows}))


def test_injected_enospc_on_a_store_commit_fails_cleanly_and_the_rerun_completes(tmp_path, monkeypatch, synthetic):
    db = tmp_path / "s.duckdb"
    Store(db)  # schema first, so the injected failure hits the data
    opened = connections.open_connection
    monkeypatch.setattr(FullDiskConnection, "commits", 0)
    monkeypatch.setattr(connections, "open_connection",
                        lambda *args: FullDiskConnection(opened(*args), commit_at=3))
    monkeypatch.setattr(store_module, "INSERT_BATCH", 500)
    run = run_cli("ingest", synthetic["source"], "--dataset", "syn", "--db", db)
    assert run.code == 1
    assert run.error == (f"error: {db}: no space left on device; the write in progress was rolled back and the store "
                         "keeps everything committed before it (free some space and rerun)")
    monkeypatch.undo()
    after_failure = store_snapshot(db)
    assert after_failure["datasets"] == [] and len(after_failure["pairs"]) == 1000  # two batches committed, one not

    assert run_cli("ingest", synthetic["source"], "--dataset", "syn", "--db", db).code == 0
    assert store_snapshot(db) == store_snapshot(synthetic["db"])
    lost = lost_or_duplicated(ids(synthetic["db"]), ids(db))
    TALLY.fault("ENOSPC injected on a DuckDB commit during ingest", lost)
    assert lost == 0


def test_enospc_during_export_fails_cleanly_and_leaves_no_partial_file(tmp_path, monkeypatch, synthetic):
    from ches_curate import export

    out = tmp_path / "curated.jsonl"
    out.write_text("previous export\n")
    write_jsonl = export._write_jsonl

    def write_until_full(records, path, conversational):
        write_jsonl((r for i, r in enumerate(records) if i < 100 or enospc()), path, conversational)

    monkeypatch.setattr(export, "_write_jsonl", write_until_full)
    before = store_snapshot(synthetic["db"])
    run = run_cli("export", "--dataset", "syn", "--db", synthetic["db"], "--output", out)
    assert run.code == 1
    assert run.error == (f"error: cannot write {out}: No space left on device (nothing was exported; a file already "
                         "at that path is unchanged)")
    assert sorted(os.listdir(tmp_path)) == ["curated.jsonl"] and out.read_text() == "previous export\n"
    assert store_snapshot(synthetic["db"]) == before
    TALLY.fault("ENOSPC injected while exporting", 0)


def test_enospc_writing_the_score_table_fails_cleanly_and_leaves_no_partial_file(tmp_path, monkeypatch,
                                                                                  tiny_llama_dir):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in POISON_PAIRS[1:]))
    import pyarrow.parquet as pq

    write_table = pq.write_table

    def half_written(table, path, *args, **kwargs):
        write_table(table, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        enospc()

    monkeypatch.setattr(pq, "write_table", half_written)
    out = tmp_path / "scores.parquet"
    run = run_cli("score", source, "--model", tiny_llama_dir, "--output", out)
    assert run.code == 1
    assert run.error == (f"error: cannot write {out}: No space left on device (free some space or pick another "
                         "--output, then rerun)")
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]
    TALLY.fault("ENOSPC injected writing the score table", 0)


# --- the trust boundary ----------------------------------------------------------------------------------------------

@pytest.fixture
def rogue_plugin(tmp_path, monkeypatch):
    """An importable plugin module in the working directory and on sys.path that marks its import."""
    marker = tmp_path / "plugin_was_imported"
    (tmp_path / "rogue_policies.py").write_text(ROGUE_PLUGIN.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(plugins.DISABLED_PLUGINS_ENV, raising=False)
    plugins.reset()
    yield marker
    plugins.reset()
    sys.modules.pop("rogue_policies", None)


def test_a_plugin_module_is_imported_only_when_named_with_plugin(rogue_plugin):
    listed = run_cli("policies")
    assert listed.code == 0 and "percentile" in listed.stdout
    assert "rogue-policy" not in listed.stdout and not rogue_plugin.exists() and "rogue_policies" not in sys.modules

    plugins.reset()
    named = run_cli("policies", "--plugin", "rogue_policies")
    assert named.code == 0 and "rogue-policy" in named.stdout and rogue_plugin.read_text() == "imported"


def test_a_plugin_module_is_imported_when_installed_as_an_entry_point(rogue_plugin, tmp_path, monkeypatch):
    add_dist_info(tmp_path / "site", "rogue-dist", {"rogue": "rogue_policies"}, monkeypatch)
    listed = run_cli("policies")
    assert listed.code == 0 and "rogue-policy" in listed.stdout and rogue_plugin.exists()


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("sql") / "s.duckdb"
    assert run_cli("ingest", BAD / "duplicate_pairs.jsonl", "--dataset", "d", "--db", db).code == 0
    return db


SANDBOX = "refused by the read-only sandbox"
SQL_WRITES = {
    "COPY (SELECT * FROM pairs) TO '{dir}/leak.csv'": SANDBOX,
    "EXPORT DATABASE '{dir}/dump'": SANDBOX,
    "ATTACH '{dir}/other.duckdb' AS other (READ_WRITE)": SANDBOX,
    "INSTALL httpfs": SANDBOX,
    "LOAD '{dir}/evil.duckdb_extension'": SANDBOX,
    "SELECT 1; COPY pairs TO '{dir}/leak.parquet'": SANDBOX,
    "DELETE FROM pairs": "add --write to modify it",
    "UPDATE datasets SET n_pairs = 0": "add --write to modify it",
    "DROP TABLE scores": "add --write to modify it",
    "CREATE TABLE notes AS SELECT 1 AS x": "add --write to modify it",
}


@pytest.mark.parametrize("statement", list(SQL_WRITES))
def test_sql_refuses_every_write_without_write(statement, small_store, tmp_path):
    before = store_snapshot(small_store)
    run = run_cli("sql", statement.format(dir=tmp_path), "--db", small_store)
    assert run.code == 1 and SQL_WRITES[statement] in run.error and "--write" in run.error
    assert os.listdir(tmp_path) == [] and store_snapshot(small_store) == before


def test_sql_with_write_runs_the_statement_it_refused_without(small_store, tmp_path):
    run = run_cli("sql", f"COPY (SELECT pair_id FROM pairs ORDER BY 1) TO '{tmp_path}/ids.csv'", "--db", small_store,
                  "--write")
    assert run.code == 0
    assert (tmp_path / "ids.csv").read_text().split() == ["pair_id", *sorted(p for p, *_ in
                                                                              store_snapshot(small_store)["pairs"])]


@pytest.fixture
def remote_code_model(tiny_llama_dir, tmp_path) -> tuple[Path, Path]:
    """The tiny Llama re-declared as a custom architecture whose code (auto_map) would mark its execution."""
    model_dir, marker = tmp_path / "remote_model", tmp_path / "remote_code_ran"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("architectures", None)
    config.update(model_type="remote_llama",
                  auto_map={"AutoConfig": "remote.RemoteConfig", "AutoModelForCausalLM": "remote.RemoteModel"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "remote.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    return model_dir, marker


def test_model_code_runs_only_with_trust_remote_code(remote_code_model, tmp_path):
    model_dir, marker = remote_code_model
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in POISON_PAIRS[1:]))
    script = Path(sys.executable).with_name("ches-curate")
    command = [str(script)] if script.exists() else None
    env = {"HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    args = ("score", source, "--model", model_dir, "--output", tmp_path / "o.parquet")

    refused = run_cli_process(*args, executable=command, env=env)
    assert refused.returncode == 1 and not marker.exists() and not (tmp_path / "o.parquet").exists()
    assert refused.stderr.strip().splitlines() == [
        f"error: model '{model_dir}' needs its own Python code (auto_map in its config), which is not run unless you "
        "pass --trust-remote-code; read that code first"]

    trusted = run_cli_process(*args, "--trust-remote-code", executable=command, env=env)
    assert trusted.returncode == 0, trusted.stderr
    assert marker.read_text() == "executed" and len(pd.read_parquet(tmp_path / "o.parquet")) == 3


def test_a_pipeline_config_cannot_enable_remote_code_and_its_model_is_not_executed(remote_code_model, tmp_path):
    model_dir, marker = remote_code_model
    config = {"dataset": {"name": "toy", "source": str(BAD / "duplicate_pairs.jsonl")},
              "scoring": {"model": str(model_dir), "trust_remote_code": True}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ChesCurateError, match="scoring.trust_remote_code: Extra inputs are not permitted"):
        PipelineConfig.from_file(path)

    del config["scoring"]["trust_remote_code"]
    path.write_text(yaml.safe_dump(config))
    scoring = PipelineConfig.from_file(path).scoring
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, [PreferencePair("a fox", "yes", "no")])
    with pytest.raises(ChesCurateError, match="not run unless you pass --trust-remote-code"):
        score_dataset(store, "toy", scoring.model, scoring.scoring_config(), progress=False)  # the pipeline's step
    assert not marker.exists()


def test_quality_never_runs_a_tokenizers_code_even_if_the_terminal_says_yes(remote_code_model, tmp_path,
                                                                              monkeypatch):
    model_dir, marker = remote_code_model
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="RemoteTokenizer", auto_map={"AutoTokenizer": ["remote.RemoteTokenizer", None]})
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    db = tmp_path / "s.duckdb"
    run_cli("ingest", BAD / "duplicate_pairs.jsonl", "--dataset", "d", "--db", db)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 3))  # transformers' own default asks there
    run = run_cli("quality", "--dataset", "d", "--suite", "pairs", "--tokenizer", model_dir, "--db", db)
    assert run.code == 1 and not marker.exists()
    assert run.error == (f"error: tokenizer '{model_dir}' needs its own Python code (auto_map in its config), which "
                         "quality never runs; use a tokenizer without custom code")


# --- the tally -------------------------------------------------------------------------------------------------------


def test_tally_inputs_tried_faults_injected_and_no_row_lost(capsys):
    """Runs last: what the tests above measured, for docs/reliability.md."""
    expected_inputs = 4 * len(BAD_INPUTS) + 1
    if len(TALLY.inputs) < expected_inputs:
        pytest.skip("only part of the module ran; the tally needs all of it")
    assert TALLY.rows_lost == 0
    report = TALLY.report(len(BAD_INPUTS), REFERENCED_FAULTS)
    with capsys.disabled():
        print("\n" + report)
    assert len(TALLY.inputs) == expected_inputs
