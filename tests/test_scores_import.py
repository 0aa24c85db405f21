"""`ches-curate scores import`: a round trip into `latest_scores_wide`, and every malformed row reported by line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ches_curate.cli import app
from ches_curate.errors import ChesCurateError
from ches_curate.models import file_sha256
from ches_curate.report import build_report
from ches_curate.scores.imports import import_scores
from ches_curate.store import Store
from tests.test_plugins import fresh_plugins  # noqa: F401  (autouse: each test gets its own plugin manager)
from tests.test_store import fake_scores, make_pairs

MODEL_KEY = "m@abc/float32"


@pytest.fixture
def scored(tmp_path) -> Store:
    """A store with dataset 'd' v1 of six rows (row 2 repeats row 0's pair), scored by MODEL_KEY."""
    store = Store(tmp_path / "s.duckdb")
    base = make_pairs(5)
    rows = [base[0], base[1], base[0], *base[2:]]
    store.register_dataset("d", None, iter([replace(p, row=i) for i, p in enumerate(rows)]))
    run_id = store.start_score_run("d", 1, MODEL_KEY)
    store.write_scores(run_id, MODEL_KEY, fake_scores(base))
    return store


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_ids(store: Store) -> list[str]:
    return store.sql('SELECT pair_id FROM dataset_pairs ORDER BY "row"').pair_id.tolist()


def test_values_keyed_by_pair_id_come_back_as_a_column_of_latest_scores_wide(scored, tmp_path):
    ids = pair_ids(scored)
    values = {pid: float(i) - 2.5 for i, pid in enumerate(dict.fromkeys(ids))}
    source = write_jsonl(tmp_path / "m.jsonl", [{"pair_id": pid, "value": v} for pid, v in values.items()])
    result = import_scores(scored, source, "reward_margin")
    assert (result.n_rows, result.n_imported, result.problems) == (5, 5, [])
    wide = scored.sql('SELECT "row", pair_id, ln_ches, reward_margin FROM latest_scores_wide ORDER BY "row"')
    assert wide.reward_margin.tolist() == [values[pid] for pid in ids]  # the repeated pair at row 2 too
    record = scored.sql("SELECT * FROM score_imports").iloc[0]
    assert (record.score_name, record.source, record.source_sha256, record.key_column, record.n_rows,
            record.n_imported, record.n_rejected) == ("reward_margin", str(source.resolve()), file_sha256(source),
                                                      "pair_id", 5, 5, 0)
    summary = scored.sql("SELECT * FROM plugin_score_summary").iloc[0]
    assert (summary.dataset_name, summary.model_key, summary.score_name, summary.n_scored, summary.n_failed) == (
        "d", "", "reward_margin", 6, 0)
    assert summary.value_p50 == pytest.approx(np.percentile([values[pid] for pid in ids], 50))


def test_values_keyed_by_row_of_a_dataset_from_csv_and_a_reimport_replaces_them(scored, tmp_path):
    source = tmp_path / "m.csv"
    source.write_text("row,judge\n0,1\n1,0\n3,1\n4,0.5\n5,1\n")
    import_scores(scored, source, "judge", dataset="d")
    wide = scored.sql('SELECT "row", judge FROM latest_scores_wide ORDER BY "row"')
    assert wide.judge.tolist() == [1.0, 0.0, 1.0, 1.0, 0.5, 1.0]  # row 2 is row 0's pair
    source.write_text("row,judge\n0,0\n")
    import_scores(scored, source, "judge", dataset="d")
    assert scored.sql('SELECT judge FROM latest_scores_wide WHERE "row" = 0').judge.tolist() == [0.0]
    assert scored.sql("SELECT count(*) AS n FROM plugin_scores").n.iloc[0] == 5  # replaced, not added


BAD_ROWS = [
    ("unknown pair", {"pair_id": "f" * 64, "value": 1}, "field 'pair_id' 'ffff"),
    ("duplicate", "DUP", "field 'pair_id' repeats the pair of line 1"),
    ("NaN", "NAN", "field 'value' is NaN, not a finite number"),
    ("string", "STRING", "field 'value' is \"high\", not a finite number"),
    ("boolean", "BOOL", "field 'value' is true, not a finite number"),
    ("missing value", "NOVALUE", "field 'value' is missing"),
    ("missing key", {"value": 1.0}, "field 'pair_id' is missing"),
    ("malformed JSON", "{oops", "is malformed JSON"),
]


def bad_file(store: Store, tmp_path: Path) -> Path:
    ids = list(dict.fromkeys(pair_ids(store)))
    fill = {"DUP": {"pair_id": ids[0], "value": 2.0}, "NAN": f'{{"pair_id": "{ids[1]}", "value": NaN}}',
            "STRING": {"pair_id": ids[2], "value": "high"}, "BOOL": {"pair_id": ids[3], "value": True},
            "NOVALUE": {"pair_id": ids[4]}}
    rows = [{"pair_id": ids[0], "value": 1.0}] + [fill.get(r, r) if isinstance(r, str) else r for _, r, _ in BAD_ROWS]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_every_bad_row_is_reported_with_its_line_and_nothing_is_imported(scored, tmp_path):
    source = bad_file(scored, tmp_path)
    with pytest.raises(ChesCurateError) as err:
        import_scores(scored, source, "reward_margin")
    lines = str(err.value).splitlines()
    assert lines[0] == f"scores import of {source}: 8 bad rows, nothing imported (use --on-error quarantine to " \
                       "import the good ones):"
    for number, (line, (_, _, message)) in enumerate(zip(lines[1:], BAD_ROWS, strict=True), start=2):
        assert line.startswith(f"{source}:{number}: {message}"), line
    assert scored.sql("SELECT count(*) AS n FROM plugin_scores").n.iloc[0] == 0
    assert scored.sql("SELECT count(*) AS n FROM score_imports").n.iloc[0] == 0


def test_quarantine_imports_the_good_rows_and_records_every_bad_one(scored, tmp_path):
    source = bad_file(scored, tmp_path)
    result = import_scores(scored, source, "reward_margin", on_error="quarantine")
    assert (result.n_rows, result.n_imported, len(result.problems)) == (9, 1, 8)
    stored = scored.sql("SELECT pair_id, value, failure FROM plugin_scores ORDER BY failure NULLS FIRST")
    ids = list(dict.fromkeys(pair_ids(scored)))
    assert stored.value.iloc[0] == 1.0 and stored.pair_id.iloc[0] == ids[0]
    failures = dict(zip(stored.pair_id[1:], stored.failure[1:]))  # known pairs: failed for this score only
    assert sorted(failures) == sorted(ids[1:5])
    assert failures[ids[1]] == f"scores import {result.import_id}, line 4: field 'value' is NaN, not a finite number"
    quarantined = scored.sql("SELECT line, reason FROM quarantine ORDER BY line")
    assert quarantined.line.tolist() == [2, 3, 8, 9]  # unknown, duplicate, no key, malformed: no pair to hold them
    assert quarantined.reason.iloc[1] == (f"scores import {result.import_id} (reward_margin): field 'pair_id' "
                                          "repeats the pair of line 1")
    assert scored.sql("SELECT n_rejected FROM score_imports").n_rejected.tolist() == [8]


@pytest.mark.parametrize(("name", "message"), [
    ("Reward", "use lower_snake_case"),
    ("ln_ches", "is a column of latest_scores already"),
    ("truncated", "is a column of latest_scores already"),
    ("logp_margin", r"is a registered score \(plugin 'builtin_scores'\)"),
])
def test_an_import_may_not_take_a_column_or_a_registered_scores_name(scored, tmp_path, name, message):
    source = write_jsonl(tmp_path / "m.jsonl", [{"pair_id": pair_ids(scored)[0], "value": 1}])
    with pytest.raises(ChesCurateError, match=message):
        import_scores(scored, source, name)


def test_rows_need_a_dataset_and_the_cli_imports_and_reports(scored, tmp_path):
    source = write_jsonl(tmp_path / "m.jsonl", [{"row": 0, "value": 1}, {"row": 9, "value": 2}])
    with pytest.raises(ChesCurateError, match="keys by `row` need the dataset"):
        import_scores(scored, source, "reward_margin")
    runner = CliRunner()
    args = ["scores", "import", str(source), "--name", "reward_margin", "--dataset", "d", "--db", str(scored.path)]
    failed = runner.invoke(app, args)
    assert f"{source}:2: field 'row' 9 is not a known row of the dataset" in str(failed.exception)
    done = runner.invoke(app, [*args, "--on-error", "quarantine"])
    assert done.exit_code == 0, done.output
    assert "import 1: 1 values of score 'reward_margin' from 2 rows, 1 rejected" in done.output
    frame = scored.sql('SELECT "row", reward_margin FROM latest_scores_wide ORDER BY "row"')
    assert frame.reward_margin.isna().tolist() == [False, True, False, True, True, True]
    assert frame.reward_margin[[0, 2]].tolist() == [1.0, 1.0]


def test_filter_chains_ln_ches_and_an_imported_score_as_one_selection_equal_to_pandas(scored, tmp_path):
    ids = list(dict.fromkeys(pair_ids(scored)))
    margins = [2.0, 0.5, 1.5, -1.0, "n/a"]  # the last pair is quarantined for reward_margin
    source = write_jsonl(tmp_path / "m.jsonl", [{"pair_id": p, "value": m} for p, m in zip(ids, margins)])
    import_scores(scored, source, "reward_margin", on_error="quarantine")
    runner = CliRunner()
    result = runner.invoke(app, ["filter", "--dataset", "d", "--db", str(scored.path), "--policy", "percentile",
                                 "--param", "p=75", "--param", "score_column=ln_ches",
                                 "--then", "threshold value=-1 score_column=-reward_margin"])
    assert result.exit_code == 0, result.output

    scores = scored.scores("d").drop_duplicates("pair_id").set_index("pair_id").loc[ids[:4]]
    scores["reward_margin"] = margins[:4]
    first = scores[scores.ln_ches <= np.percentile(scores.ln_ches, 75)]
    by_hand = set(first[first.reward_margin >= 1].index)
    selection = scored.selections().iloc[0]
    kept = scored.selection(int(selection.selection_id))
    assert set(kept.pair_id[kept.kept]) == by_hand and len(kept) == 4  # the failed pair is left out, counted
    assert "1 pairs have no value of a score the policy ranks by" in " ".join(result.output.split())
    assert (selection.policy, selection.score_column) == ("chain", "-reward_margin")
    assert json.loads(selection.params)["steps"] == [
        {"policy": "percentile", "params": {"score_column": "ln_ches", "p": 75.0}},
        {"policy": "threshold", "params": {"score_column": "-reward_margin", "value": -1.0}},
    ]
    html = build_report(scored, "d")
    assert "percentile(p=75.0, score_column=ln_ches) → threshold(score_column=-reward_margin, value=-1.0)" in html
    assert "reward_margin (vimport-1, 1 failed)" in html


def test_refresh_reproduces_a_chained_selection_from_its_recorded_steps(scored, tmp_path):
    from ches_curate.pipeline_config import PolicySpec
    from ches_curate.refresh import matching_selections, reselect
    from ches_curate.selection import select

    ids = list(dict.fromkeys(pair_ids(scored)))
    import_scores(scored, write_jsonl(tmp_path / "m.jsonl", [{"pair_id": p, "value": float(i)}
                                                             for i, p in enumerate(ids)]), "reward_margin")
    steps = [{"policy": "top-k", "params": {"k": "1", "score_column": "ln_ches"}},
             {"policy": "threshold", "params": {"value": "-1", "score_column": "-reward_margin"}}]
    made = select(scored, "d", 1, MODEL_KEY, "chain", {"steps": steps}, source="cli")
    spec = PolicySpec(name="chain", params=json.loads(scored.selections().params.iloc[0]))
    again, diff = reselect(scored, "d", 1, MODEL_KEY, spec)
    assert again.kept_pair_ids == made.kept_pair_ids and len(diff.changes) == 0
    assert set(matching_selections(scored, "d", MODEL_KEY, spec).selection_id) == {made.selection_id,
                                                                                   again.selection_id}



def test_a_parquet_file_imports_as_well_and_an_unsupported_file_is_named(scored, tmp_path):
    ids = list(dict.fromkeys(pair_ids(scored)))
    source = tmp_path / "m.parquet"
    pd.DataFrame({"pair_id": ids, "judge": [1.0, 0.0, 1.0, 0.0, 1.0]}).to_parquet(source)
    assert import_scores(scored, source, "judge").n_imported == 5
    stored = scored.sql("SELECT pair_id, value FROM plugin_scores ORDER BY pair_id")
    assert dict(zip(stored.pair_id, stored.value)) == dict(zip(ids, [1.0, 0.0, 1.0, 0.0, 1.0]))
    other = tmp_path / "m.txt"
    other.write_text("pair_id value\n")
    with pytest.raises(ChesCurateError, match=r"m.txt: has an unsupported type '.txt' \(expected .jsonl, .csv or"):
        import_scores(scored, other, "judge")
