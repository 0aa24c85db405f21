"""The shared table renderer: a table only when every cell fits the width (a terminal's, or 80 / $COLUMNS in a
pipe), records otherwise; and the commands that print tables (`datasets`, `sql`, `train`) through it."""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest
import typer
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from ches_curate.commands import store as store_commands
from ches_curate.commands import tables
from ches_curate.commands import train as train_commands
from ches_curate.store import Store

COLUMNS = ["arm", tables.Column("preferred logp change", numeric=True), tables.Column("refusal rate", numeric=True)]
ROWS = [["percentile(p=90,score_column=ln_ches,seed=12)", tables.cell(-43012345.678), tables.cell(None)],
        ["random(n=30,seed=0)", tables.cell(0.123456789), tables.cell(0.25)]]


def render(console_width: int, terminal: bool, rows=ROWS) -> str:
    out = io.StringIO()
    console = Console(file=out, width=console_width, force_terminal=terminal, color_system=None)
    tables.print_table(console, COLUMNS, rows, title="ablation 3")
    return out.getvalue()


@pytest.mark.parametrize("terminal", [True, False])
def test_a_table_that_fits_is_drawn_whole(terminal):
    text = render(120, terminal)
    assert "┃ arm" in text and "percentile(p=90,score_column=ln_ches,seed=12)" in text and "-4.301e+07" in text
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) == tables.table_width(
        [c if isinstance(c, tables.Column) else tables.Column(c) for c in COLUMNS],
        [[Text(str(c)) for c in row] for row in ROWS])


@pytest.mark.parametrize("width, terminal", [(80, False), (80, True), (60, True)])
def test_a_table_wider_than_the_terminal_or_pipe_becomes_one_record_per_row_every_cell_in_full(width, terminal):
    text = render(width, terminal)
    assert "…" not in text and "┃" not in text
    lines = text.splitlines()
    assert lines[0] == "ablation 3" and lines[1].startswith("-[ 1 ]")
    assert "arm                    percentile(p=90,score_column=ln_ches,seed=12)" in lines
    assert "preferred logp change  -4.301e+07" in lines
    assert "refusal rate           -" in lines and "refusal rate           0.25" in lines


def test_cells_are_shown_literally_control_codes_escaped():
    text = render(80, False, rows=[["[bold]x[/bold] \x1b[2J", "1", "2"]])
    assert "│ [bold]x[/bold] \\x1b[2J │" in text and "\x1b" not in text


@pytest.fixture
def store(tmp_path) -> Store:
    from tests.test_store import make_pairs

    store = Store(tmp_path / "tables.duckdb")
    store.register_dataset("a_dataset_with_a_long_name", "/data/some/long/path/to/preference_pairs_2025.jsonl",
                           make_pairs(4))
    return store


def test_datasets_through_a_pipe_at_80_columns_shows_whole_values(store):
    app = typer.Typer()
    store_commands.register(app)
    result = CliRunner().invoke(app, ["datasets", "--db", str(store.path)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert re.search(r"^source\s+/data/some/long/path/to/preference_pairs_2025\.jsonl$", result.output, re.M)
    assert re.search(r"^name\s+a_dataset_with_a_long_name$", result.output, re.M)
    sql = CliRunner().invoke(app, ["sql", "SELECT name, source, NULL AS nothing FROM datasets", "--format", "table",
                                   "--db", str(store.path)], env={"COLUMNS": "80"})
    assert re.search(r"^nothing\s+NULL$", sql.stdout, re.M) and "…" not in sql.stdout


def test_train_limit_trains_on_the_first_pairs_and_records_a_train_run(tmp_path, tiny_llama_dir):
    from ches_curate.scoring.incremental import score_dataset
    from tests.test_train import toy_pairs

    store = Store(tmp_path / "train.duckdb")
    store.register_dataset("toy", None, toy_pairs(6))
    score_dataset(store, "toy", str(tiny_llama_dir), progress=False)
    app = typer.Typer()
    train_commands.register(app)
    result = CliRunner().invoke(app, [
        "train", "--dataset", "toy", "--limit", "4", "--model", str(tiny_llama_dir), "--max-steps", "1",
        "--no-save", "--output-dir", str(tmp_path / "ckpt"), "--db", str(store.path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "on 4 pairs of 'toy' v1" in result.output and "recorded as train run 1" in result.output
    assert "┃ metric" in result.output and "…" not in result.output  # two columns fit in 80
    run = store.sql("SELECT * FROM train_runs").iloc[0]
    assert (run.dataset_name, run.dataset_version, run.n_train_pairs, run.global_step) == ("toy", 1, 4, 1)
    assert pd.isna(run.selection_id) and run.checkpoint_dir is None and run.model_key.startswith("tiny_llama")
    shown = float(re.search(r"│ train loss\s+│\s+(\S+) │", result.output).group(1))
    assert shown == pytest.approx(run.train_loss, rel=1e-3)
