"""Sharded scoring: torchrun ranks and hand-run shards give the single-process table; a killed rank is recovered."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from ches_curate import cli
from ches_curate.scoring import distributed, sharded as sharding
from ches_curate.errors import ChesCurateError
from ches_curate.ingest import RejectedRow, read_pairs
from ches_curate.pairs import SCORE_COLUMNS, pair_id
from ches_curate.scoring.file_run import score_file, write_parquet_atomic
from ches_curate.scoring import ScoringConfig, score_pairs
from ches_curate.store import Store

SAMPLE = Path(cli.__file__).parent / "data" / "hh_rlhf_harmless_sample.jsonl"

# Runs `ches-curate` under torchrun; the rank named by KILL_RANK is killed with SIGKILL right
# after its first scored batch, once KILL_AFTER_PART (the other rank's part) exists.
LAUNCHER = """
import os, signal, time
from pathlib import Path

if os.environ.get("KILL_RANK") == os.environ["RANK"]:
    from ches_curate.scoring import Scorer

    score_batches = Scorer.score_batches

    def score_then_die(self, pairs):
        for frame in score_batches(self, pairs):
            yield frame
            deadline = time.monotonic() + 60
            while not Path(os.environ["KILL_AFTER_PART"]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    Scorer.score_batches = score_then_die

import ches_curate.cli as cli

cli.main()
"""


@pytest.fixture(scope="module")
def app():
    return cli.app


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """16 hh-rlhf pairs plus one malformed line (row 5), so rejected rows are merged too."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:16]
    lines.insert(5, "{not json")
    path = tmp_path_factory.mktemp("sharding") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single_process(pairs_file, tiny_llama_dir) -> pd.DataFrame:
    """The reference: every pair scored in one process and one pass (float64, so rounding is ~1e-15)."""
    pairs = [p for p in read_pairs(pairs_file, on_error="quarantine") if not isinstance(p, RejectedRow)]
    return score_pairs(pairs, model=str(tiny_llama_dir), dtype="float64", batch_size=3)


def assert_same_table(table: pd.DataFrame, expected: pd.DataFrame, check_dtype: bool = True) -> None:
    assert list(table.columns) == list(SCORE_COLUMNS)
    assert table["row"].tolist() == expected["row"].tolist()
    pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-9, check_dtype=check_dtype)


def cli_args(pairs_file, tiny_llama_dir, out: Path, *extra: str) -> list[str]:
    return ["score", str(pairs_file), "--model", str(tiny_llama_dir), "--output", str(out),
            "--dtype", "float64", "--batch-size", "2", "--on-error", "quarantine", *extra]


def torchrun(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--tee", "3", "--nproc_per_node", "2",
               str(launcher), *args]
    env = {**os.environ, "COLUMNS": "1000", **env}  # rich wraps at 80 columns when not on a terminal
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def test_shard_of_is_the_first_64_bits_of_pair_id_modulo_n():
    ids = [pair_id(f"prompt {i}", "yes", "no") for i in range(4000)]
    assert [sharding.shard_of(i, 7) for i in ids[:3]] == [int(i[:16], 16) % 7 for i in ids[:3]]
    counts = pd.Series([sharding.shard_of(i, 4) for i in ids]).value_counts()
    assert sorted(counts.index) == [0, 1, 2, 3]
    assert counts.min() > 900 and counts.max() < 1100  # 1000 each, give or take sampling noise


def test_torchrun_env_gives_each_rank_every_world_size_th_shard():
    assert distributed.launch_from_env({}) is None
    launch = distributed.launch_from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert list(launch.shards(7)) == [1, 4]
    assert distributed.rank_device(launch, "cpu") == "cpu"
    with pytest.raises(ChesCurateError, match="outside WORLD_SIZE=2"):
        distributed.launch_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_two_torchrun_processes_produce_the_single_process_table(app, pairs_file, tiny_llama_dir, single_process,
                                                                 tmp_path):
    out = tmp_path / "scores.parquet"
    done = torchrun(cli_args(pairs_file, tiny_llama_dir, out, "--shards", "4"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_table(pd.read_parquet(out), single_process)
    for shard in range(4):  # rank r scores shards r and r + 2; rank 0 merges
        part = pd.read_parquet(sharding.part_path(tmp_path / "scores.shards", shard, 4))
        assert {sharding.shard_of(i, 4) for i in part.pair_id} == {shard}
        assert f"[default{shard % 2}]:shard {shard} of 4: {len(part)} pairs scored" in done.stdout
    assert f"[default0]:wrote {out} from 4 parts" in done.stdout
    rejected = [json.loads(line) for line in (tmp_path / "scores.rejected.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["line"]) for r in rejected] == [("ingest", 6)]


def test_killed_rank_is_recovered_by_rerunning_it_alone(app, pairs_file, tiny_llama_dir, single_process, tmp_path):
    out, work = tmp_path / "scores.parquet", tmp_path / "scores.shards"
    part0, part1 = sharding.part_path(work, 0, 2), sharding.part_path(work, 1, 2)
    crashed = torchrun(cli_args(pairs_file, tiny_llama_dir, out), tmp_path, KILL_RANK="1", KILL_AFTER_PART=str(part0))
    assert crashed.returncode != 0
    assert part0.exists() and not part1.exists() and not out.exists()
    finished_at = part0.stat().st_mtime_ns

    runner = CliRunner()
    status = runner.invoke(app, cli_args(pairs_file, tiny_llama_dir, out, "--shards", "2", "--rank", "0"))
    assert status.exit_code == 0, status.output
    assert "already done" in status.output and not out.exists()
    rerun = status.output.split("still to score: ")[1].strip()
    assert rerun.endswith("--work-dir " + str(work) + f" --output {out} --dtype float64 --on-error quarantine --rank 1")

    recovered = runner.invoke(app, shlex.split(rerun)[1:] + ["--batch-size", "5"])
    assert recovered.exit_code == 0, recovered.output
    assert part0.stat().st_mtime_ns == finished_at  # the finished part was not redone
    assert_same_table(pd.read_parquet(out), single_process)


def test_shards_run_in_one_process_match_score_and_its_rejected_rows(app, pairs_file, tiny_llama_dir, single_process,
                                                                     tmp_path):
    result = CliRunner().invoke(app, cli_args(pairs_file, tiny_llama_dir, tmp_path / "s.parquet", "--shards", "3"))
    assert result.exit_code == 0, result.output
    config = ScoringConfig(dtype="float64", batch_size=4, on_error="quarantine")
    score_file(pairs_file, tmp_path / "single.parquet", model=str(tiny_llama_dir), config=config, progress=False)
    single = pd.read_parquet(tmp_path / "single.parquet")
    assert len(single) == 16
    assert_same_table(pd.read_parquet(tmp_path / "s.parquet"), single)
    assert_same_table(single, single_process)
    assert (tmp_path / "s.rejected.jsonl").read_text() == (tmp_path / "single.rejected.jsonl").read_text()


def test_merge_names_the_missing_shards_and_the_command_for_them(tmp_path):
    write_parquet_atomic(sharding.SCORE_SCHEMA.empty_table(), sharding.part_path(tmp_path, 1, 3))
    with pytest.raises(ChesCurateError, match=r"2 of 3 parts missing \(shards 0, 2\).*with: run --rank 0 --rank 2"):
        sharding.merge_parts(tmp_path, 3, rerun=lambda shards: "run " + " ".join(f"--rank {s}" for s in shards))


def test_parts_of_another_model_or_input_are_not_mixed_in(app, pairs_file, tiny_llama_dir, tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(pairs_file.read_bytes())
    runner = CliRunner()

    def run(*extra: str, dtype: str = "float64"):
        args = cli_args(source, tiny_llama_dir, tmp_path / "s.parquet", "--shards", "2", *extra)
        return runner.invoke(app, [a if a != "float64" else dtype for a in args])

    assert run("--rank", "0").exit_code == 0
    other_model = run("--rank", "1", dtype="float32")
    assert isinstance(other_model.exception, ChesCurateError)
    assert "model_key: 'tiny_llama@" in str(other_model.exception) and "/float32/tokenizer-" in str(other_model.exception)
    assert not sharding.part_path(tmp_path / "s.shards", 1, 2).exists()

    with source.open("a") as handle:
        handle.write(pairs_file.read_text().splitlines()[0] + "\n")
    other_input = run("--rank", "0")  # its part exists, but the input changed since
    assert isinstance(other_input.exception, ChesCurateError)
    assert "source_fingerprint" in str(other_input.exception)


def test_dataset_shards_load_into_the_store_once(app, pairs_file, tiny_llama_dir, single_process, tmp_path):
    store = Store(tmp_path / "c.duckdb")
    store.register_dataset("hh", str(pairs_file), read_pairs(pairs_file, on_error="quarantine"))
    args = ["score", "--dataset", "hh", "--db", str(store.path), "--model", str(tiny_llama_dir),
            "--dtype", "float64", "--shards", "2"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 scores added" in again.output, again.output
    stored = store.scores("hh")[list(SCORE_COLUMNS)]
    assert_same_table(stored, single_process, check_dtype=False)  # DuckDB keeps token counts as INTEGER
    runs = store.sql("SELECT n_scored, status FROM score_runs ORDER BY run_id")
    assert runs.values.tolist() == [[len(single_process), "finished"], [0, "finished"]]
