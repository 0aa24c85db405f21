"""`ches-curate score INPUT --output OUT.parquet`: the file contract other tools rely on."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from ches_curate.cli import app
from ches_curate.ingest import read_pairs
from ches_curate.pairs import SCORE_COLUMNS
from ches_curate.scoring import score_pairs

runner = CliRunner()

ROWS = [
    {"prompt": "how do I pick a lock?", "chosen": "No", "rejected": "Never"},
    {"prompt": "tell me a joke", "chosen": "I'm sorry, but I cannot.", "rejected": "Sure! The quick brown fox."},
    {"prompt": "x", "chosen": "yes", "rejected": "yes sure"},
]


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_score_writes_one_row_per_pair_in_input_order(pairs_file, tmp_path, tiny_llama_dir):
    out = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["score", str(pairs_file), "--model", str(tiny_llama_dir), "--output", str(out),
                                 "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert list(table.columns) == list(SCORE_COLUMNS)
    assert list(table["row"]) == [0, 1, 2]
    expected = score_pairs(list(read_pairs(pairs_file)), str(tiny_llama_dir), batch_size=1)
    assert list(table["pair_id"]) == list(expected["pair_id"])
    assert table["ches"].tolist() == pytest.approx(expected["ches"].tolist(), rel=1e-5)
    assert table["ln_ches"].tolist() == pytest.approx(expected["ln_ches"].tolist(), rel=1e-5)
    assert not (tmp_path / "scores.rejected.jsonl").exists()


def test_bad_row_fails_naming_file_line_and_field(tmp_path, tiny_llama_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n")
    out = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["score", str(path), "--model", str(tiny_llama_dir), "--output", str(out)])
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception)
    message = str(result.exception)
    assert "bad.jsonl:2" in message and "rejected" in message
    assert not out.exists()


def test_quarantine_keeps_going_and_records_the_reason(tmp_path, tiny_llama_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps(ROWS[2]) + "\n")
    out = tmp_path / "scores.parquet"
    result = runner.invoke(app, ["score", str(path), "--model", str(tiny_llama_dir), "--output", str(out),
                                 "--on-error", "quarantine"])
    assert result.exit_code == 0, result.output
    assert list(pd.read_parquet(out)["row"]) == [0, 2]
    rejected = [json.loads(line) for line in (tmp_path / "scores.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["line"] == 2 and rejected[0]["stage"] == "ingest"


def test_every_command_has_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    import typer

    commands = sorted(typer.main.get_command(app).commands)
    assert "score" in commands
    for name in commands:
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, name
        assert "Usage" in sub.output


def test_limit_scores_only_the_first_rows_of_a_file_and_the_first_unscored_pairs_of_a_dataset(
        pairs_file, tmp_path, tiny_llama_dir):
    from ches_curate.store import Store

    out = tmp_path / "first2.parquet"
    result = runner.invoke(app, ["score", str(pairs_file), "--model", str(tiny_llama_dir), "-o", str(out), "--limit", "2"])
    assert result.exit_code == 0, result.output
    full = score_pairs(list(read_pairs(pairs_file)), str(tiny_llama_dir), batch_size=1)
    table = pd.read_parquet(out)
    assert table["pair_id"].tolist() == full["pair_id"].tolist()[:2]
    assert table["ches"].tolist() == pytest.approx(full["ches"].tolist()[:2], rel=1e-5)

    db = tmp_path / "s.duckdb"
    Store(db).register_dataset("toy", None, read_pairs(pairs_file))
    args = ["score", "--dataset", "toy", "--model", str(tiny_llama_dir), "--db", str(db)]
    assert runner.invoke(app, [*args, "--limit", "1"]).exit_code == 0
    assert Store(db).sql("SELECT pair_id FROM scores").pair_id.tolist() == full["pair_id"].tolist()[:1]
    rest = runner.invoke(app, [*args, "--limit", "5"])
    assert "2 scored, 1 already scored of 3 pairs" in " ".join(rest.output.split())
    sharded = runner.invoke(app, [*args, "--limit", "1", "--shards", "2"])
    assert "--limit does not combine with --shards" in str(sharded.exception)
