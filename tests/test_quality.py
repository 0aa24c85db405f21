"""Data-quality suites: each bad-row kind is caught by its expectation, quarantined, and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from ches_curate.errors import ChesCurateError
from ches_curate.pairs import PreferencePair, pair_id
from ches_curate.quality import (
    QualityConfig, QualityFailedError, hh_transcripts_frame, latest_quality_results, ln_ches_consistent,
    run_quality, validate_hh_transcripts, validate_pairs, validate_scores,
)
from ches_curate.store import Store

DATA = Path(__file__).parent / "data" / "quality"
BOUNDS = QualityConfig(response_chars=(None, 200), prompt_chars=(None, 500), response_tokens=(None, 20))
SHARED_HH_MISMATCHED = [810, 1099, 1265, 1267, 1325]
SHARED_HH_EMPTY_CHOSEN = [337, 706]


class WhitespaceTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per whitespace-separated word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [text.split() for text in texts]}


def read_jsonl(path: Path) -> pd.DataFrame:
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()], dtype=object)


def flagged_by(report) -> dict[int, set[str]]:
    """Row position -> names of the failing expectations that flagged it."""
    rows: dict[int, set[str]] = {}
    for name, positions in report.failed().items():
        for row in positions:
            rows.setdefault(row, set()).add(name)
    return rows


def expected_by_row(frame: pd.DataFrame) -> dict[int, set[str]]:
    return {i: {name} for i, name in enumerate(frame.pop("expect")) if name is not None}


def consistent_scores(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """Scores computed from the definition on random hidden states; every third pair has n+ = n-."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        n_pos = int(rng.integers(1, 12))
        n_neg = n_pos if i % 3 == 0 else int(rng.integers(1, 12))
        hidden = rng.normal(size=(n_pos + n_neg, 16)) + 0.3
        s_pos, s_neg = hidden[:n_pos].sum(axis=0), hidden[n_pos:].sum(axis=0)
        cross, sq = float(s_pos @ s_neg), float(s_pos @ s_pos)
        rows.append({"row": i, "pair_id": f"pair-{seed}-{i}", "ches": cross - sq + shift,
                     "ln_ches": cross / (n_pos * n_neg) - sq / n_pos**2 + shift / (n_pos * n_neg),
                     "chosen_tokens": n_pos, "rejected_tokens": n_neg,
                     "last_hidden_ip": float(hidden[n_pos - 1] @ hidden[-1]),
                     "edit_distance": 0.5, "truncated": False})
    return pd.DataFrame(rows)


# --- pairs -----------------------------------------------------------------------------------------


def test_each_bad_pair_is_caught_by_its_own_expectation():
    frame = read_jsonl(DATA / "bad_pairs.jsonl")
    expected = expected_by_row(frame)

    report = validate_pairs(frame, BOUNDS, tokenizer=WhitespaceTokenizer())

    assert flagged_by(report) == expected
    suite = report.suite("pairs")
    error_rows = {r for r, names in expected.items() if all(BOUNDS.severity(n) == "error" for n in names)}
    assert {q["expectation"] for q in suite.quarantine} == {n for r in error_rows for n in expected[r]}
    assert suite.failure_rate == pytest.approx(len(error_rows) / len(frame))
    assert not suite.success  # 7 of 12 rows fail error checks, above the default 5%
    assert report.result("unique_pair").rows == [6]  # the later copy only; row 0 is kept


def test_quarantine_records_name_the_pair_and_keep_the_raw_row():
    frame = read_jsonl(DATA / "bad_pairs.jsonl").drop(columns="expect")
    quarantined = {q["expectation"]: q for q in validate_pairs(frame).suite("pairs").quarantine}

    repeat = quarantined["unique_pair"]  # the repeat carries the id of the pair that stays (row 0)
    assert repeat["pair_id"] == pair_id("What is 2+2?", "4.", "5.")
    assert repeat["reason"] == "row 6: (prompt, chosen, rejected) must not repeat an earlier row (unique_pair)"
    assert (repeat["stage"], repeat["field"], json.loads(repeat["raw"])["row"]) == ("quality", None, 6)
    undecodable = quarantined["chosen_valid_utf8"]  # no pair_id exists for text that is not UTF-8
    assert undecodable["pair_id"] is None and undecodable["field"] == "chosen"
    assert json.loads(undecodable["raw"])["chosen"] == "broken \ud800 bytes"


def test_missing_columns_fail_the_whole_table():
    report = validate_pairs(pd.DataFrame({"prompt": ["p"], "chosen": ["c"]}))
    result = report.result("required_columns")
    assert not result.success and not result.row_level
    assert result.details["observed_value"] == ["chosen", "prompt", "row"]
    assert report.suite("pairs").failure_rate == 1.0 and [r.name for r in report.results] == ["required_columns"]


def test_raw_hh_transcripts_with_different_prefixes_are_caught():
    frame = read_jsonl(DATA / "bad_hh.jsonl")
    expected = expected_by_row(frame)
    report = validate_hh_transcripts(frame)
    assert flagged_by(report) == expected


def test_shared_hh_data_has_only_the_known_findings(shared_hh_path):
    from ches_curate.ingest import RejectedRow, read_pairs

    records = [json.loads(line) for line in shared_hh_path.read_text(encoding="utf-8").splitlines()]
    report = validate_hh_transcripts(pd.DataFrame(records, dtype=object))

    assert report.failed() == {"chosen_not_empty": SHARED_HH_EMPTY_CHOSEN,
                               "same_conversation_prefix": SHARED_HH_MISMATCHED}
    assert report.success and report.suite("pairs").failure_rate == pytest.approx(7 / 1500)
    # ingest rejects exactly these rows (1-based lines) and splits the others as we do: same pair_ids
    items = list(read_pairs(shared_hh_path, format="hh_rlhf", on_error="quarantine"))
    flagged = set(SHARED_HH_EMPTY_CHOSEN + SHARED_HH_MISMATCHED)
    assert {item.line - 1 for item in items if isinstance(item, RejectedRow)} == flagged
    frame = hh_transcripts_frame(pd.DataFrame(records, dtype=object))
    ours = [pair_id(p, c, r) for i, (p, c, r) in enumerate(zip(frame.prompt, frame.chosen, frame.rejected))
            if i not in flagged]
    assert ours == [item.pair_id for item in items if isinstance(item, PreferencePair)]


# --- scores ----------------------------------------------------------------------------------------


def test_ln_ches_identity_holds_for_scores_computed_from_the_definition():
    scores = consistent_scores(300, seed=1)
    assert ln_ches_consistent(scores).tolist() == [True] * 300

    equal = scores[scores.chosen_tokens == scores.rejected_tokens].index
    longer = scores[scores.chosen_tokens > scores.rejected_tokens].index
    broken = scores.copy()
    broken.loc[equal, "ln_ches"] *= 1.001  # equal lengths: ln_ches must be exactly ches / n^2
    baseline = broken.ches / (broken.chosen_tokens * broken.rejected_tokens)
    broken.loc[longer, "ln_ches"] = baseline[longer] - 1.0  # n+ > n-: ln_ches must be >= ches / (n+ n-)
    flags = ln_ches_consistent(broken)
    assert not flags[equal].any() and not flags[longer].any()
    assert flags[~scores.index.isin(equal.union(longer))].all()


def test_each_bad_score_row_is_caught_by_its_own_expectation():
    scores = consistent_scores(12, seed=2)
    expected = {1: "ches_finite", 2: "ln_ches_finite", 3: "chosen_tokens_at_least_one",
                4: "rejected_tokens_at_least_one", 5: "ln_ches_consistent_with_ches", 6: "last_hidden_ip_finite",
                7: "one_score_per_pair", 8: "one_score_per_pair", 12: "every_pair_scored"}
    scores.loc[1, "ches"] = np.nan
    scores.loc[2, "ln_ches"] = np.inf
    scores.loc[3, "chosen_tokens"] = 0
    scores.loc[4, "rejected_tokens"] = 0
    scores.loc[5, "ln_ches"] = scores.loc[5, "ln_ches"] + 50.0 * np.sign(
        scores.loc[5, "rejected_tokens"] - scores.loc[5, "chosen_tokens"] or 1)
    scores.loc[6, "last_hidden_ip"] = np.nan
    scores.loc[8, "pair_id"] = scores.loc[7, "pair_id"]  # two different scores for one pair

    report = validate_scores(scores, pair_ids=[*scores.pair_id, "never-scored"])

    assert flagged_by(report) == {row: {name} for row, name in expected.items()}
    quarantined = sorted((q["expectation"], q["pair_id"]) for q in report.suite("scores").quarantine)
    assert quarantined == sorted((name, scores.pair_id[row]) for row, name in expected.items() if row < 12)
    assert report.suite("scores").failure_rate == pytest.approx(8 / 13)


def test_drift_against_the_previous_version_warns_but_never_fails():
    previous = consistent_scores(400, seed=3)
    same_distribution = validate_scores(consistent_scores(400, seed=4), previous_scores_df=previous)
    assert same_distribution.failed() == {}

    std = previous.ches.std()
    shifted = validate_scores(consistent_scores(400, seed=4, shift=2 * std), previous_scores_df=previous)
    assert set(shifted.failed()) == {"ches_mean_drift", "ches_quantiles_drift", "ln_ches_mean_drift",
                                     "ln_ches_quantiles_drift"}  # the shift moves ln_ches by shift / (n+ n-)
    assert shifted.result("ches_mean_drift").severity == "warn" and shifted.success
    assert shifted.suite("scores").quarantine == [] and shifted.suite("scores").failure_rate == 0.0
    observed = shifted.result("ches_mean_drift").details["observed_value"]
    assert observed == pytest.approx(consistent_scores(400, seed=4, shift=2 * std).ches.mean())


# --- configuration ---------------------------------------------------------------------------------


def test_user_expectations_from_yaml_and_json_run_with_their_severity(tmp_path):
    config = QualityConfig.from_file(DATA / "expectations.yaml")
    as_json = tmp_path / "expectations.json"
    as_json.write_text(json.dumps(config.model_dump()))
    assert QualityConfig.from_file(as_json) == config

    frame = pd.DataFrame({"prompt": ["Hi?", "Help me.", "Why?"], "chosen": ["Hello there.", "Ok", "Because."],
                          "rejected": ["Go away.", "As an AI, I cannot.", "R" * 4001]})
    report = validate_pairs(frame, config)

    assert report.failed() == {"chosen_at_least_3_chars": [1], "expect_column_values_to_not_match_regex:rejected": [1],
                               "rejected_chars_within_bounds": [2]}
    assert report.result("chosen_at_least_3_chars").severity == "warn"
    assert {q["expectation"] for q in report.suite("pairs").quarantine} == {
        "expect_column_values_to_not_match_regex:rejected", "rejected_chars_within_bounds"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("expectations:\n  - expectation: expect_values_to_be_nice\n    column: chosen\n",
         "unknown expectation 'expect_values_to_be_nice'; valid names: expect_column_distinct_values_to_be_in_set"),
        ("expectations:\n  - expectation: expect_column_values_to_be_between\n    column: ches\n"
         "    kwargs: {maximum: 3}\n", "invalid arguments"),
        ("severities: {ches_mean_drift: error}\n", "drift checks only warn"),
        ("severities: {no_such_check: warn}\n", "unknown built-in expectation(s) ['no_such_check']"),
        ("max_failure_rate: 2\n", "max_failure_rate: Input should be less than or equal to 1"),
    ],
)
def test_bad_configs_are_rejected_with_an_actionable_message(tmp_path, config, message):
    path = tmp_path / "quality.yaml"
    path.write_text(config)
    with pytest.raises(ChesCurateError, match="quality.yaml") as failure:
        QualityConfig.from_file(path)
    assert message in str(failure.value)


def test_user_expectation_on_a_missing_column_names_the_columns():
    config = QualityConfig.model_validate({"expectations": [{"expectation": "expect_column_values_to_not_be_null",
                                                             "column": "answer"}]})
    with pytest.raises(ChesCurateError, match="no column 'answer' in the pairs table"):
        validate_pairs(pd.DataFrame({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}), config)


# --- the store and the CLI -------------------------------------------------------------------------


def stored_bad_pairs(tmp_path: Path) -> Store:
    """The bad-pair fixture minus the rows a store cannot hold (a null prompt, a lone surrogate)."""
    frame = read_jsonl(DATA / "bad_pairs.jsonl")
    store = Store(tmp_path / "quality.duckdb")
    pairs = [PreferencePair(r.prompt, r.chosen, r.rejected, row=i) for i, r in enumerate(frame.itertuples())
             if r.expect not in ("prompt_not_null", "chosen_valid_utf8")]
    store.register_dataset("bad", "bad_pairs.jsonl", pairs)
    return store


def test_run_quality_records_results_and_quarantines_error_rows_once(tmp_path):
    store = stored_bad_pairs(tmp_path)
    lenient = BOUNDS.model_copy(update={"max_failure_rate": 1.0})

    report = run_quality(store, "bad", suites="all", config=lenient)
    with pytest.raises(QualityFailedError, match="(?s)quality suite 'pairs' failed: 50.00% of 10 rows.*"
                                                 "chosen_differs_from_rejected +error +1"):
        run_quality(store, "bad", config=BOUNDS)

    assert report.notes == ["scores suite skipped: dataset 'bad' v1 has no scores yet"]
    quarantine = store.sql("SELECT expectation, pair_id, stage, field FROM quarantine ORDER BY expectation")
    expected = {name: ids for name, ids in ((r.name, r.unexpected_pair_ids) for r in report.results)
                if report.result(name).severity == "error" and ids}
    assert quarantine.expectation.tolist() == sorted(expected)  # one row each, not repeated by the second run
    assert all(quarantine.pair_id == [expected[name][0] for name in quarantine.expectation])
    assert set(quarantine.stage) == {"quality"}
    runs = store.sql("SELECT suite, success, n_rows, failure_rate, summary FROM quality_runs ORDER BY quality_run_id")
    assert runs.success.tolist() == [True, False] and runs.failure_rate.tolist() == [0.5, 0.5]
    warnings = json.loads(runs.summary[0])["failed_warnings"]
    assert warnings == ["prompt_chars_within_bounds", "chosen_chars_within_bounds"]
    warned = store.sql("SELECT unexpected_pair_ids FROM quality_results r JOIN quality_runs q USING (quality_run_id) "
                       "WHERE expectation = 'chosen_chars_within_bounds' AND quality_run_id = 1")
    assert json.loads(warned.unexpected_pair_ids[0]) == report.result("chosen_chars_within_bounds").unexpected_pair_ids
    latest = latest_quality_results(store, "bad")
    assert set(latest.quality_run_id) == {2} and len(latest) == len(report.results)


def test_scores_suite_on_the_store_compares_with_the_previous_version(tmp_path):
    store = Store(tmp_path / "scores.duckdb")
    pairs = [PreferencePair(f"prompt {i}", f"good {i}", f"bad {i}", row=i) for i in range(60)]
    for version, (count, shift) in enumerate([(40, 0.0), (60, 1e4)], start=1):
        store.register_dataset("d", f"v{version}", pairs[:count])
        scores = consistent_scores(count, seed=5, shift=shift)
        scores["pair_id"] = [p.pair_id for p in pairs[:count]]
        run_id = store.start_score_run("d", version, "tiny")
        store.write_scores(run_id, "tiny", scores)

    report = run_quality(store, "d", suites="scores")

    drift = {f"{score}_{stat}_drift": [] for score in ("ches", "ln_ches") for stat in ("mean", "quantiles")}
    assert report.failed() == drift and report.success
    stored = store.sql("SELECT model_key, dataset_version, success FROM quality_runs")
    assert stored.values.tolist() == [["tiny", 2, True]]
    with pytest.raises(ChesCurateError, match="no scores from model 'other'.*scored by: tiny"):
        run_quality(store, "d", model_key="other", suites="scores")


def test_cli_runs_the_suites_then_shows_the_stored_results(tmp_path):
    from ches_curate.commands import quality as quality_command

    store = stored_bad_pairs(tmp_path)
    app = typer.Typer()
    app.callback()(lambda: None)
    quality_command.register(app)
    runner = CliRunner()

    failed = runner.invoke(app, ["quality", "--dataset", "bad", "--db", str(store.path)], terminal_width=150)
    shown = runner.invoke(app, ["quality", "--dataset", "bad", "--db", str(store.path), "--show"], terminal_width=150)

    assert failed.exit_code == 1 and "quality suite 'pairs' failed: 50.00% of 10 rows" in str(failed.exception)
    assert "chosen_differs_from_rejected │ error    │ FAIL" in failed.output
    assert shown.exit_code == 0 and "latest quality results for bad: suite pairs, 10 rows, 50.00%" in shown.output
    assert "unique_pair                  │ error    │ FAIL   │          1" in shown.output


def test_stored_ge_result_keeps_every_expectation_and_caps_long_lists():
    frame = pd.DataFrame({"prompt": [f"q{i}" for i in range(30)], "chosen": ["same"] * 30, "rejected": ["same"] * 30})
    extra = [{"expectation": "expect_column_values_to_not_be_null", "column": c} for c in ("row", "pair_id", "prompt")]
    config = QualityConfig.model_validate(dict(BOUNDS.model_dump(), prompt_tokens=(None, 100), expectations=extra))
    report = validate_pairs(frame, config, tokenizer=WhitespaceTokenizer())  # 21 expectations, 30 failing rows

    ge_result = report.suite("pairs").ge_result
    stored_names = sorted(r["expectation_config"]["meta"]["check"] for r in ge_result["results"])
    assert stored_names == sorted(r.name for r in report.results) and len(stored_names) == 21
    failing = report.result("chosen_differs_from_rejected")
    stored = next(r for r in ge_result["results"] if r["expectation_config"]["meta"]["check"] == failing.name)
    assert stored["result"]["unexpected_index_list"] == list(range(20)) + ["... 10 more"]
    assert failing.rows == list(range(30)) and len(set(failing.unexpected_pair_ids)) == 30


def test_cli_token_bounds_use_the_given_tokenizer(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    from ches_curate.commands import quality as quality_command

    store = stored_bad_pairs(tmp_path)
    config = tmp_path / "quality.yaml"
    config.write_text("max_failure_rate: 1.0\nresponse_tokens: [null, 4]\n")
    app = typer.Typer()
    app.callback()(lambda: None)
    quality_command.register(app)

    result = CliRunner().invoke(app, ["quality", "--dataset", "bad", "--db", str(store.path), "--suite", "pairs",
                                      "--config", str(config), "--tokenizer", str(tiny_llama_dir)], terminal_width=150)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pairs = list(store.dataset_pairs("bad"))
    too_long = [p.pair_id for p in pairs if len(tokenizer(p.chosen, add_special_tokens=False)["input_ids"]) > 4]
    assert result.exit_code == 0, result.output
    assert f"chosen_tokens_within_bounds   │ warn     │ warn   │ {len(too_long):>10}" in result.output
    stored = store.sql("SELECT unexpected_pair_ids FROM quality_results WHERE expectation = 'chosen_tokens_within_bounds'")
    assert json.loads(stored.unexpected_pair_ids[0]) == too_long and too_long
    assert "5 failing rows of error expectations recorded in quarantine" in result.output
