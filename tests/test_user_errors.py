"""User mistakes that once surfaced as `internal error` (exit 70): each is now one `error:` line that names it.

Every case runs the real CLI and checks the exit code (1 for `ChesCurateError`, 2 for
`InputError`), that stderr is exactly one `error:` line naming the file, line or field,
and that no traceback is shown. Mistakes in `score`'s options or output are caught
before any model is loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from ches_curate.ingest import MAX_NESTING
from tests.reliability_helpers import run_cli, run_cli_process, store_snapshot

PAIR = {"prompt": "how do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Sure, here is how."}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _pair(i: int, **extra) -> str:
    return json.dumps({"prompt": f"question {i}", "chosen": f"answer {i}", "rejected": f"refusal {i}", **extra})


def _nested(depth: int) -> object:
    """A value `depth` levels of lists deep (0: a string)."""
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def error_line(run, code: int) -> str:
    """The run's only stderr line, an `error:` one, after checking the exit code (run_cli rejects tracebacks)."""
    assert run.code == code, run.output
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


@pytest.fixture()
def model_loads(monkeypatch):
    """Every model or tokenizer load by transformers, recorded (loading still happens)."""
    loads = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        def record(*args, _load=auto.from_pretrained, **kwargs):
            loads.append(args[0] if args else kwargs)
            return _load(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", record)
    return loads


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(_pair(0) + "\n" + _pair(1) + "\n", encoding="utf-8")
    return path


# --- 1. JSON nested too deeply --------------------------------------------------------------------------------------


@pytest.fixture()
def deep_file(tmp_path):
    """Line 2 nests 100,000 levels (deeper than Python's parser goes), line 3 one level too many in `meta`."""
    path = tmp_path / "deep.jsonl"
    too_deep_for_python = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": "a", "rejected": "b"}'
    lines = [_pair(0), too_deep_for_python, _pair(2, meta=_nested(MAX_NESTING)),
             _pair(3, meta=_nested(MAX_NESTING - 1))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_json_nested_too_deeply_fails_naming_the_file_and_line(deep_file, tmp_path):
    db = tmp_path / "s.duckdb"
    error = error_line(run_cli("ingest", deep_file, "--dataset", "d", "--db", db), 2)
    assert error.startswith(f"error: {deep_file}:2: is JSON nested too deeply (more than {MAX_NESTING} levels")
    assert "--on-error quarantine" in error
    assert store_snapshot(db)["datasets"] == []


def test_json_nested_too_deeply_is_quarantined_and_the_other_lines_ingested(deep_file, tmp_path):
    db = tmp_path / "s.duckdb"
    run = run_cli("ingest", deep_file, "--dataset", "d", "--db", db, "--on-error", "quarantine")
    assert run.code == 0, run.output
    snapshot = store_snapshot(db)
    assert [row[:4] for row in snapshot["datasets"]] == [("d", 1, 2, 2)]
    assert [(line, field) for *_, line, field, _ in snapshot["quarantine"]] == [(2, None), (3, "meta")]
    assert all("JSON nested too deeply" in reason for *_, reason in snapshot["quarantine"])
    kept = sorted((prompt, json.loads(metadata) if metadata else None)
                  for _, prompt, _, _, _, metadata in snapshot["pairs"])
    assert kept == [("question 0", None), ("question 3", {"meta": _nested(MAX_NESTING - 1)})]


def test_parquet_nested_too_deeply_is_refused_by_its_reader_naming_the_file(tmp_path):
    path = tmp_path / "deep.parquet"
    pq.write_table(pa.table({"prompt": [_nested(MAX_NESTING + 20)], "chosen": ["a"], "rejected": ["b"]}), path)
    error = error_line(run_cli("ingest", path, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {path}: is not a readable Parquet file") and "too deeply nested" in error


# --- 2. unreadable input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_unreadable_input_names_the_path_and_permission_denied(suffix, tmp_path, monkeypatch):
    path = tmp_path / f"pairs.{suffix}"
    path.write_bytes(b"prompt,chosen,rejected\np,a,b\n")
    real_open = open

    def refuse(file, *args, **kwargs):  # what chmod 000 does to a non-root user; root reads anyway
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    error = error_line(run_cli("ingest", path, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {path}: cannot be read: permission denied")


@pytest.mark.skipif(IS_ROOT or sys.platform == "win32", reason="root reads a chmod 000 file")
def test_chmod_000_input_names_the_path_and_permission_denied(pairs_file, tmp_path):
    pairs_file.chmod(0)
    try:
        error = error_line(run_cli("ingest", pairs_file, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    finally:
        pairs_file.chmod(0o644)
    assert error.startswith(f"error: {pairs_file}: cannot be read: permission denied")


# --- 3. not a regular file -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_fifo_is_named_as_one_without_being_opened(tmp_path):
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    # A child process, so that a reader that opened the pipe (blocking until a writer comes) hits the timeout.
    done = run_cli_process("ingest", fifo, "--dataset", "d", "--db", tmp_path / "s.duckdb", timeout_s=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {fifo}: is a named pipe (FIFO), not a regular file (save the pairs to a .jsonl, .csv "
                     "or .parquet file and pass that)"]


def test_a_symlink_loop_is_named_as_one(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.symlink_to(second)
    second.symlink_to(first)
    error = error_line(run_cli("ingest", first, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {first}: is a symbolic link loop")


def test_a_dangling_symlink_names_its_missing_target(tmp_path):
    link = tmp_path / "pairs.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    error = error_line(run_cli("ingest", link, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {link}: is a symbolic link to {tmp_path / 'gone.jsonl'}, which does not exist")


def test_a_directory_that_is_not_a_saved_dataset_is_named_as_one(tmp_path):
    folder = tmp_path / "pairs.jsonl"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a dataset")
    error = error_line(run_cli("ingest", folder, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {folder}: is a directory but not one written by datasets' save_to_disk")


# --- 4. repeated column names ----------------------------------------------------------------------------------------


def test_a_csv_header_that_repeats_a_column_is_refused_at_line_1(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("prompt,chosen,rejected,chosen\np,first,b,second\n", encoding="utf-8")
    db = tmp_path / "s.duckdb"
    error = error_line(run_cli("ingest", path, "--dataset", "d", "--db", db), 2)
    assert error.startswith(f"error: {path}:1: field 'chosen' is a repeated column name (columns 2 and 4)")
    assert store_snapshot(db)["pairs"] == []


def test_a_parquet_file_that_repeats_a_column_is_refused(tmp_path):
    path = tmp_path / "dup.parquet"
    columns = [pa.array(["p"]), pa.array(["first"]), pa.array(["b"]), pa.array(["second"])]
    pq.write_table(pa.Table.from_arrays(columns, names=["prompt", "chosen", "rejected", "chosen"]), path)
    error = error_line(run_cli("ingest", path, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {path}: field 'chosen' is a repeated column name (columns 2 and 4)")


def test_a_csv_whose_first_line_is_blank_is_refused_at_line_1(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\nprompt,chosen,rejected\np,a,b\n", encoding="utf-8")
    error = error_line(run_cli("ingest", path, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {path}:1: is blank; the first line must be the header")


# --- 5. a device this machine does not have --------------------------------------------------------------------------


def _absent_cuda() -> list[str]:
    if not torch.cuda.is_available():
        return ["cuda", "cuda:1"]
    return [f"cuda:{torch.cuda.device_count()}"]


@pytest.mark.parametrize("device", [*_absent_cuda(), "mps", "gpu0", "cuda:x"])
def test_a_missing_or_misspelled_device_fails_before_any_model_loads(device, pairs_file, tmp_path, tiny_llama_dir,
                                                                    model_loads):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "scores.parquet"
    run = run_cli("score", pairs_file, "--model", tiny_llama_dir, "--output", out, "--device", device)
    error = error_line(run, 1)
    assert error.startswith(f"error: --device {device}:") or error.startswith(f"error: --device '{device}' is not")
    if device.startswith("cuda:") and torch.cuda.is_available():
        assert f"has {torch.cuda.device_count()} CUDA device(s)" in error
    elif device in ("cuda", "cuda:1"):
        assert f"CUDA is not available on this machine (torch {torch.__version__}); use --device cpu" in error
    assert model_loads == [] and not out.exists()


# --- 6. damaged model files ------------------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_named_as_damaged(pairs_file, tmp_path, tiny_llama_dir, model_loads):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    weights = model_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "scores.parquet"
    error = error_line(run_cli("score", pairs_file, "--model", model_dir, "--output", out), 1)
    assert error.startswith(f"error: {weights}: damaged or not a valid safetensors file")
    assert model_loads == [] and not out.exists()


def _truncated_gguf(path):
    """A small valid GGUF file (one 64x64 tensor), cut in half."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("weight", np.zeros((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.truncate(path, path.stat().st_size // 2)
    return path


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_gguf_file_is_named_as_damaged(damage, pairs_file, tmp_path, model_loads):
    gguf_path = tmp_path / "model.gguf"
    if damage == "random bytes":
        gguf_path.write_bytes(random.Random(0).randbytes(4096))
    else:
        _truncated_gguf(gguf_path)
    out = tmp_path / "scores.parquet"
    error = error_line(run_cli("score", pairs_file, "--model", gguf_path, "--output", out), 1)
    expected = "not a valid GGUF file" if damage == "random bytes" else "damaged GGUF file, truncated or corrupt"
    assert error.startswith(f"error: {gguf_path}: {expected}") and "download it again" in error
    assert model_loads == [] and not out.exists()


# --- 7. an output that cannot be written -----------------------------------------------------------------------------


def _unwritable_outputs(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    folder = tmp_path / "scores.parquet"
    folder.mkdir()
    cases = {
        "under a file": (a_file / "out.parquet", f"{a_file} is a file, not a folder"),
        "deeper under a file": (a_file / "sub" / "out.parquet", f"{a_file} is a file, not a folder"),
        "a directory": (folder, "it is a directory; give a file name"),
    }
    if os.path.isdir("/proc/self"):
        cases["in /proc"] = ("/proc/out.parquet", "no file can be created in /proc")
    if not IS_ROOT:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cases["read-only folder"] = (read_only / "out.parquet", f"permission denied in {read_only}")
    return cases


@pytest.mark.parametrize("shards", [[], ["--shards", "2"]], ids=["plain", "sharded"])
def test_an_unwritable_output_fails_before_the_model_loads(shards, pairs_file, tmp_path, tiny_llama_dir,
                                                           model_loads):
    for label, (out, reason) in _unwritable_outputs(tmp_path).items():
        run = run_cli("score", pairs_file, "--model", tiny_llama_dir, "--output", out, *shards)
        error = error_line(run, 1)
        assert error.startswith(f"error: cannot write {out}: {reason}"), (label, error)
        assert error.endswith("(pick another --output)"), (label, error)
        assert not os.path.isfile(out) and not list(tmp_path.glob("**/*.shards")), label
    assert model_loads == []


# --- outputs that cannot be written, values that cannot be exported, plugins that raise GeneratorExit ---------------


def _enospc_mid_write(self, *args, **kwargs):
    raise OSError(28, os.strerror(28))


@pytest.mark.parametrize("where", ["a directory", "/proc/version", "full disk"])
def test_a_report_that_cannot_be_written_is_one_line_and_leaves_no_file(where, tmp_path, monkeypatch):
    from tests.test_exit_codes import scored_store

    db = scored_store(tmp_path)
    out = {"a directory": tmp_path / "r.html", "/proc/version": "/proc/version"}.get(where, tmp_path / "r.html")
    if where == "a directory":
        out.mkdir()
    if where == "full disk":
        monkeypatch.setattr(Path, "write_text", _enospc_mid_write)
    before = sorted(p.name for p in tmp_path.iterdir())
    error = error_line(run_cli("report", "--dataset", "toy", "--db", db, "-o", out), 1)
    assert error.startswith(f"error: cannot write {out}: ") and "nothing was written" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _export_store(tmp_path, extra: str) -> Path:
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({**PAIR, "prompt": f"q{i}"})[:-1] + f", {extra}}}\n" for i in range(2)))
    assert run_cli("ingest", source, "--dataset", "toy", "--db", tmp_path / "s.duckdb").code == 0
    return tmp_path / "s.duckdb"


def test_export_of_an_integer_beyond_64_bits_is_one_line(tmp_path):
    db = _export_store(tmp_path, f'"big": {2 ** 70}')
    error = error_line(run_cli("export", "--dataset", "toy", "--db", db, "-o", tmp_path / "out.jsonl"), 1)
    assert error.startswith("error: extra column 'big' holds an integer beyond 64 bits"), error
    assert not (tmp_path / "out.jsonl").exists()


def test_export_writes_nan_and_infinity_as_json_null(tmp_path):
    db = _export_store(tmp_path, '"nan": NaN, "inf": [Infinity, 1.5]')
    assert run_cli("export", "--dataset", "toy", "--db", db, "-o", tmp_path / "out.jsonl").code == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(row["nan"], row["inf"]) for row in rows] == [(None, [None, 1.5])] * 2


def test_a_policy_raising_generator_exit_is_that_plugins_failure(tmp_path):
    from tests.test_exit_codes import plugin_file, scored_store

    db = scored_store(tmp_path)
    plugin = plugin_file(tmp_path, "raise GeneratorExit('bye')")
    error = error_line(run_cli("filter", "--plugin", plugin, "--policy", "sly", "--dataset", "toy", "--db", db), 1)
    assert "policy 'sly'" in error and "failed: GeneratorExit: bye" in error, error


def test_scoring_a_file_whose_every_row_is_rejected_fails_and_writes_nothing(tmp_path, tiny_llama_dir):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({**PAIR, "chosen": ""}) + "\n" + json.dumps({**PAIR, "rejected": ""}) + "\n")
    run = run_cli("score", source, "--model", tiny_llama_dir, "--on-error", "quarantine", "-o", tmp_path / "s.parquet")
    assert run.code == 1 and run.error == (f"error: {source}: no pairs to score: all 2 rows were rejected (first: line 1: "
                                  "field 'chosen' is empty); nothing was written. Fix the file (or check --format) "
                                  "and rerun")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_a_full_disk_writing_the_rejected_rows_names_that_file_and_leaves_neither(tmp_path, tiny_llama_dir,
                                                                                   monkeypatch):
    source = tmp_path / "pairs.jsonl"
    source.write_text(_pair(0) + "\n" + json.dumps({**PAIR, "chosen": ""}) + "\n")
    monkeypatch.setattr(Path, "write_text", _enospc_mid_write)
    out = tmp_path / "s.parquet"
    run = run_cli("score", source, "--model", tiny_llama_dir, "--on-error", "quarantine", "-o", out)
    assert run.code == 1 and run.error.startswith(f"error: cannot write {tmp_path / 's.rejected.jsonl'}: No space left")
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]


# --- keys JSON would keep or drop unseen, names nobody installed, paths that do not exist ---------------------------


def test_a_json_object_that_repeats_a_key_is_refused_like_a_repeated_csv_column(tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text(_pair(0) + "\n" + _pair(1)[:-1] + ', "chosen": "the other answer"}\n')
    error = error_line(run_cli("ingest", source, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error == (f"error: {source}:2: field 'chosen' is a repeated key in one JSON object; remove one of them "
                     "(which one to keep is not guessed) (use --on-error quarantine to keep going)")


def test_a_message_key_other_than_role_and_content_is_refused_not_dropped(tmp_path):
    turn = {"role": "user", "content": "hi", "name": "bob"}
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"chosen": [turn, {"role": "assistant", "content": "a"}],
                                  "rejected": [turn, {"role": "assistant", "content": "b"}]}) + "\n")
    error = error_line(run_cli("ingest", source, "--dataset", "d", "--db", tmp_path / "s.duckdb"), 2)
    assert error.startswith(f"error: {source}:1: field 'chosen[0].name' is not kept: a message is scored and stored "
                            "as role and content only"), error


@pytest.mark.parametrize("model", ["./models/tiny", "models/llama/tiny", "~/no-such-model", "/no/such/model/"])
def test_a_path_like_model_that_does_not_exist_is_no_such_file(model, pairs_file, tmp_path, model_loads):
    error = error_line(run_cli("score", pairs_file, "--model", model, "-o", tmp_path / "s.parquet"), 1)
    assert error == f"error: {model}: no such file or directory (a hub id has the form org/name)"
    assert model_loads == []


def test_an_unknown_name_in_disabled_plugins_is_warned_about(monkeypatch, caplog):
    from ches_curate import plugins

    monkeypatch.setenv(plugins.DISABLED_PLUGINS_ENV, "builtin_scores,no_such_plugin")
    plugins.reset()
    try:
        with caplog.at_level("WARNING", logger="ches_curate.plugins"):
            plugins.plugin_manager()
    finally:
        plugins.reset()
    assert [record.getMessage().split(" (known")[0] for record in caplog.records] == [
        "CHES_CURATE_DISABLED_PLUGINS names no installed plugin: no_such_plugin"]
