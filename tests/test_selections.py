"""Selections: where each came from (`source`), one row set per identical decision, the default a user's, and
`ches-curate selections` (list and --diff)."""

from __future__ import annotations

import re

import duckdb
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from ches_curate.commands import filter as filter_commands
from ches_curate.report import build_report
from ches_curate.selection import select
from ches_curate.store import Store, migrations
from tests.test_filter_cli import CHES, MODEL_KEY, PROMPTS, store, template_db  # noqa: F401 (fixtures)


def invoke(*args: str):
    app = typer.Typer()
    filter_commands.register(app)
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})  # too narrow for the tables: records


def n_selections(store: Store) -> int:
    return int(store.sql("SELECT count(DISTINCT selection_id) AS n FROM selections").n.iloc[0])


def test_the_same_filter_twice_records_one_selection(store):
    args = ("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "top-k", "--param", "k=2")
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "selection 1:" in second.output and "reused it, nothing new was written" in " ".join(second.output.split())
    assert n_selections(store) == 1 and len(store.selection(1)) == len(PROMPTS)
    other = invoke("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "top-k", "--param", "k=3")
    assert "selection 2:" in other.output and n_selections(store) == 2


def test_identity_covers_source_params_and_decisions(store):
    cli = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 2}, source="cli")
    again = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 2}, source="cli")
    pipeline = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 2}, source="pipeline")
    by_ches = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 2, "score_column": "ches"}, source="cli")
    assert (again.selection_id, again.reused) == (cli.selection_id, True)
    assert not pipeline.reused and pipeline.selection_id != cli.selection_id
    assert not by_ches.reused and by_ches.selection_id not in (cli.selection_id, pipeline.selection_id)
    # Same policy and params, different decisions (the scores changed under the same version): a new selection.
    decisions = cli.frame.assign(kept=~cli.frame.kept)
    changed = store.save_selection("top-k", cli.params, "toy", 1, MODEL_KEY, decisions, "ln_ches", source="cli")
    assert changed not in (cli.selection_id, pipeline.selection_id, by_ches.selection_id)
    sources = store.selections("toy").set_index("selection_id").source
    assert sources[cli.selection_id] == "cli" and sources[pipeline.selection_id] == "pipeline"


def add_ablation_row(store: Store, selection_id: int, arm: str) -> None:
    store.sql("INSERT INTO ablations (ablation_id, arm, policy, selection_id, dataset_name, dataset_version, model_key) "
              "VALUES (1, ?, 'random', ?, 'toy', 1, ?)", write=True, params=[arm, selection_id, MODEL_KEY])


def test_after_an_ablation_the_default_selection_is_the_users(store):
    users = select(store, "toy", 1, MODEL_KEY, "percentile", {"p": 50}, source="cli")
    arm = select(store, "toy", 1, MODEL_KEY, "percentile", {"p": 50}, source="ablation")
    control = select(store, "toy", 1, MODEL_KEY, "random", {"n": 3, "seed": 0})  # an arm whose caller said nothing
    add_ablation_row(store, control.selection_id, "random(n=3,seed=0)")
    assert users.selection_id < arm.selection_id < control.selection_id
    assert store.latest_user_selection("toy", 1, MODEL_KEY) == users.selection_id
    html = build_report(store, "toy")
    assert f"#{users.selection_id} percentile" in html and f"#{control.selection_id} random" not in html
    listed = store.selections("toy", include_ablation=False)
    assert listed.selection_id.tolist() == [users.selection_id]
    everything = store.selections("toy").set_index("selection_id").source
    assert everything[control.selection_id] == everything[arm.selection_id] == "ablation"


def test_selections_command_lists_newest_first_with_source(store):
    invoke("filter", "--db", str(store.path), "--dataset", "toy", "--policy", "top-k", "--param", "k=2")
    select(store, "toy", 1, MODEL_KEY, "random", {"n": 2, "seed": 1}, source="ablation")
    select(store, "toy", 1, MODEL_KEY, "percentile", {"p": 50}, source="pipeline")
    result = invoke("selections", "--db", str(store.path))
    assert result.exit_code == 0, result.output
    ids = [int(n) for n in re.findall(r"^selection_id\s+(\d+)$", result.output, re.M)]
    assert ids == [3, 1]  # not a terminal: one record per selection; the ablation arm (2) is hidden
    sources = re.findall(r"^source\s+(\w+)$", result.output, re.M)
    assert sources == ["pipeline", "cli"]
    assert re.search(r"^n_removed\s+2$", result.output, re.M)
    with_arms = invoke("selections", "--db", str(store.path), "--ablation-arms")
    assert [int(n) for n in re.findall(r"^selection_id\s+(\d+)$", with_arms.output, re.M)] == [3, 2, 1]


def test_selections_diff_counts_each_change(store):
    before = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 2}, source="cli")
    after = select(store, "toy", 1, MODEL_KEY, "top-k", {"k": 3}, source="cli")
    # top-k removes the k highest CHES; k=3 also removes the third highest (row 2, CHES 4.0).
    third_row = pd.Series(CHES).sort_values(ascending=False).index[2]
    third_pair = [p.pair_id for p in store.dataset_pairs("toy")][third_row]
    result = invoke("selections", "--db", str(store.path), "--diff", str(before.selection_id),
                    str(after.selection_id))
    assert result.exit_code == 0, result.output
    assert (f"selection {before.selection_id} -> {after.selection_id}: 0 added, 0 removed, 0 now kept, "
            f"1 now removed, {len(PROMPTS) - 1} unchanged") in result.output
    assert re.search(rf"^pair_id\s+{third_pair}$", result.output, re.M)
    unknown = invoke("selections", "--db", str(store.path), "--diff", "1", "99")
    assert "no selection 99" in str(unknown.exception)


def test_migration_6_marks_old_ablation_arms_and_leaves_the_rest_unknown(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrations.apply(con, up_to=4)
    for selection_id in (1, 2):
        con.execute("INSERT INTO selections (selection_id, policy, params, dataset_name, dataset_version, pair_id, "
                    "kept) VALUES (?, 'all', '{}', 'toy', 1, 'p', true)", [selection_id])
    con.execute("INSERT INTO ablations (ablation_id, arm, selection_id) VALUES (1, 'full', 2)")
    con.close()
    store = Store(path)
    assert store.schema_version() == migrations.LATEST_VERSION
    assert store.sql("SELECT selection_id, source FROM selections ORDER BY 1").source.tolist() == ["unknown", "ablation"]
    assert store.sql("SELECT count(*) AS n FROM train_runs").n.iloc[0] == 0
    assert store.selections("toy").source.tolist() == ["ablation", "unknown"]  # newest first
