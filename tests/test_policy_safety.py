"""What a policy plugin cannot break, what repeated pairs count as, and what reaches the terminal and the disk."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from ches_curate import plugins
from ches_curate.commands import filter as filter_commands
from ches_curate.commands import quality as quality_commands
from ches_curate.errors import ChesCurateError
from ches_curate.export import export_dataset
from ches_curate.pairs import PreferencePair
from ches_curate.policies import apply_policy
from ches_curate.store import Store
from ches_curate.terminal import printable
from tests.test_filter_cli import copy_of
from tests.test_policies import score_table

MODEL_KEY = "tiny@sha256:0000/float32"

PLUGIN = '''
from ches_curate import hookimpl
from ches_curate.policies import Policy, PolicyParams, SelectionResult, remove_highest


class Sly(Policy):
    name = "sly"
    description = {description!r}

    class Params(PolicyParams):
        pass

    def select(self, scores, params):
{body}


@hookimpl
def register_filter_policies(register):
    register(Sly())
'''


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv(plugins.DISABLED_PLUGINS_ENV, raising=False)
    monkeypatch.setattr(filter_commands.console, "width", 250)
    plugins.reset()
    yield
    plugins.reset()


def load_policy(tmp_path: Path, body: str, description: str = "A policy under test.") -> str:
    """Write and load a plugin registering policy 'sly' whose `select` runs `body`; returns the module's path."""
    source = PLUGIN.format(description=description, body=textwrap.indent(textwrap.dedent(body).strip(), " " * 8))
    path = tmp_path / "sly_policy.py"
    path.write_text(source)
    plugins.load_plugin_module(str(path))
    return str(path)


def build_store(path: Path, texts: list[tuple[str, float]]) -> tuple[Store, list[PreferencePair]]:
    """A store with dataset 'toy' v1 holding one row per (prompt, ches) item (ln_ches the same); equal prompts make
    equal pairs."""
    store = Store(path)
    pairs = [PreferencePair(prompt, f"answer to {prompt}", f"refusal of {prompt}", row=i)
             for i, (prompt, _) in enumerate(texts)]
    store.register_dataset("toy", "toy.jsonl", pairs)
    store.register_model(MODEL_KEY, {"name": "tiny", "dtype": "float32"})
    ches = dict(zip((p.pair_id for p in pairs), (c for _, c in texts)))
    run_id = store.start_score_run("toy", 1, MODEL_KEY)
    store.write_scores(run_id, MODEL_KEY, pd.DataFrame({
        "row": range(len(ches)), "pair_id": list(ches), "ches": list(ches.values()), "ln_ches": list(ches.values()),
        "chosen_tokens": 3, "rejected_tokens": 3, "last_hidden_ip": 0.5, "edit_distance": 4.0, "truncated": False,
    }))
    store.finish_score_run(run_id, "finished")
    return store, pairs


@pytest.fixture(scope="module")
def sixty_db(tmp_path_factory) -> Path:
    store, _ = build_store(tmp_path_factory.mktemp("sixty") / "curate.duckdb",
                           [(f"question {i}", float(i)) for i in range(60)])
    return store.path


@pytest.fixture
def sixty(sixty_db, tmp_path) -> Store:
    return copy_of(sixty_db, tmp_path)


def filter_cli(store: Store, *args: str):
    app = typer.Typer()
    filter_commands.register(app)
    return CliRunner().invoke(app, ["filter", "--db", str(store.path), "--dataset", "toy", *args])


def n_selection_rows(store: Store) -> int:
    return int(store.sql("SELECT count(*) AS n FROM selections").n.iloc[0])


SELECTION_FIX = "(decide each offered pair once, e.g. SelectionResult.from_kept(scores, kept, score_column))"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            "scores['pair_id'] = 'forged'\nreturn remove_highest(scores, 'ches', 1)",
            "a selection of 60 pairs for the 60 it was offered: 60 offered pairs missing (first: {first}); "
            "1 pair_ids it was not offered (first: forged)",
        ),
        (
            "scores.drop(scores.index[1:], inplace=True)\nreturn remove_highest(scores, 'ches', 1)",
            "a selection of 1 pairs for the 60 it was offered: 59 offered pairs missing (first: {second})",
        ),
    ],
)
def test_a_plugin_mutating_its_scores_is_refused_and_nothing_is_stored(sixty, tmp_path, body, problem):
    path = load_policy(tmp_path, body)
    ids = sixty.scores("toy")["pair_id"].tolist()
    result = filter_cli(sixty, "--policy", "sly")
    assert isinstance(result.exception, ChesCurateError), result.output
    expected = problem.format(first=", ".join(i[:16] for i in ids[:3]), second=", ".join(i[:16] for i in ids[1:4]))
    assert str(result.exception) == f"policy 'sly' (plugin '{path}') returned {expected} {SELECTION_FIX}"
    assert n_selection_rows(sixty) == 0


def test_a_plugin_gets_a_copy_so_its_mutations_never_reach_the_caller(tmp_path):
    load_policy(tmp_path, """
        scores.sort_values('ches', inplace=True)
        scores['metadata'].iloc[0]['touched'] = True
        scores['prompt'] = 'rewritten'
        return remove_highest(scores, 'ches', 1)
    """)
    scores = score_table([1.0, 3.0, 2.0])
    before = scores.copy(deep=True)
    result = apply_policy(scores, "sly")
    pd.testing.assert_frame_equal(scores, before)
    assert scores["metadata"].tolist() == [{}, {}, {}]
    assert result.frame.to_dict("list") == {"pair_id": ["p00", "p01", "p02"], "kept": [True, False, True],
                                            "rank": [3, 1, 2]}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("return SelectionResult.from_kept(scores.head(2), [True, False], 'ches')",
         "a selection of 2 pairs for the 4 it was offered: 2 offered pairs missing (first: p02, p03) " + SELECTION_FIX),
        ("frame = remove_highest(scores, 'ches', 1).frame.assign(pair_id=['p00', 'p01', 'zz', 'yy'])\n"
         "return SelectionResult(frame, 'ches')",
         "a selection of 4 pairs for the 4 it was offered: 2 offered pairs missing (first: p02, p03); "
         "2 pair_ids it was not offered (first: zz, yy) " + SELECTION_FIX),
        ("frame = remove_highest(scores, 'ches', 1).frame\n"
         "return SelectionResult(pd.concat([frame, frame.head(1)]), 'ches')",
         "a selection of 5 pairs for the 4 it was offered: 1 pairs listed more than once (first: p00) " + SELECTION_FIX),
        ("frame = remove_highest(scores, 'ches', 1).frame\n"
         "return SelectionResult(frame.assign(kept=frame['kept'].astype(int)), 'ches')",
         "a bad selection: kept has dtype int64, expected bool"),
        ("frame = remove_highest(scores, 'ches', 1).frame\n"
         "return SelectionResult(frame.assign(rank=[1, 1, 2, 3]), 'ches')",
         "a bad selection: rank is not a permutation of 1..4"),
        ("frame = remove_highest(scores, 'ches', 1).frame\n"
         "return SelectionResult(frame.assign(rank=frame['rank'] + 0.5), 'ches')",
         "a bad selection: rank is not a permutation of 1..4"),
        ("return None", "a bad selection: expected a SelectionResult, got NoneType"),
    ],
)
def test_a_selection_not_deciding_each_offered_pair_once_is_an_error_naming_the_plugin(tmp_path, body, problem):
    path = load_policy(tmp_path, "import pandas as pd\n" + body)
    with pytest.raises(ChesCurateError) as err:
        apply_policy(score_table([1.0, 4.0, 3.0, 2.0]), "sly")
    assert str(err.value) == f"policy 'sly' (plugin '{path}') returned {problem}"


def test_a_selection_in_another_order_is_accepted_and_returned_in_the_offered_order(tmp_path):
    load_policy(tmp_path, "return SelectionResult(remove_highest(scores, 'ches', 1).frame.iloc[::-1], 'ches')")
    result = apply_policy(score_table([1.0, 4.0, 3.0]), "sly")
    assert result.frame.to_dict("list") == {"pair_id": ["p00", "p01", "p02"], "kept": [True, False, True],
                                            "rank": [3, 1, 2]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ten_thousand_copies_of_one_pair_count_as_one_pair_in_filter_and_export(tmp_path):
    store, pairs = build_store(tmp_path / "curate.duckdb", [("same question", 2.0)] * 10_000)
    assert len({p.pair_id for p in pairs}) == 1
    result = filter_cli(store, "--policy", "top-k", "--param", "k=1")
    assert result.exit_code == 0, result.output
    assert ("kept 0, removed 1 of 1 distinct pairs (100.0% removed); they stand for 10,000 input rows "
            "(9,999 duplicates)") in result.output
    assert store.selection(1)[["pair_id", "kept", "rank"]].to_dict("list") == {
        "pair_id": [pairs[0].pair_id], "kept": [False], "rank": [1]}
    summary = export_dataset(store, tmp_path / "out.jsonl", selection_id=1)
    assert summary.n_pairs == 0 and read_jsonl(tmp_path / "out.jsonl") == []


def test_repeated_pairs_are_decided_once_and_export_writes_exactly_the_kept_ones(tmp_path):
    items = [("common", 1.0)] * 4_000 + [("highest", 9.0)] + [("common", 1.0)] * 5_998 + [("middle", 5.0)]
    store, pairs = build_store(tmp_path / "curate.duckdb", items)
    result = filter_cli(store, "--policy", "top-k", "--param", "k=1")
    assert result.exit_code == 0, result.output
    assert ("kept 2, removed 1 of 3 distinct pairs (33.3% removed); they stand for 10,000 input rows "
            "(9,997 duplicates)") in result.output
    assert result.output.count("answer to highest") == 1 and "common" not in result.output
    export_dataset(store, tmp_path / "out.jsonl", selection_id=1)
    assert read_jsonl(tmp_path / "out.jsonl") == [  # scored through the chat template: conversational rows
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": f"answer to {p}"}],
         "rejected": [{"role": "assistant", "content": f"refusal of {p}"}], "ches_model_key": MODEL_KEY,
         "ches_tokenization_version": "2"} for p in ("common", "middle")]


def test_without_repeats_the_summary_counts_pairs_only(sixty):
    result = filter_cli(sixty, "--policy", "top-k", "--param", "k=6", "--show", "0")
    assert result.exit_code == 0, result.output
    assert "kept 54, removed 6 of 60 pairs (10.0% removed)\n" in result.output
    assert "distinct" not in result.output and "duplicates" not in result.output


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_exported_files_get_the_mode_the_umask_allows(sixty, tmp_path, umask, mode, suffix):
    previous = os.umask(umask)
    try:
        summary = export_dataset(sixty, tmp_path / f"out{suffix}", dataset="toy")
    finally:
        os.umask(previous)
    assert summary.n_pairs == 60
    assert stat.S_IMODE((tmp_path / f"out{suffix}").stat().st_mode) == mode


HOSTILE = "red \x1b[31mALERT\x1b[0m, title \x1b]0;owned\x07, csi \x9b2J, \u202eevil, del \x7f end"
SHOWN = "red \\x1b[31mALERT\\x1b[0m, title \\x1b]0;owned\\x07, csi \\x9b2J, \\u202eevil, del \\x7f end"


def test_printable_escapes_control_characters_but_keeps_newlines_tabs_and_text():
    assert printable(HOSTILE) == SHOWN
    assert printable("line\n\ttab, café 中文 \\x1b") == "line\n\ttab, café 中文 \\x1b"
    assert printable("lone \udcff surrogate") == "lone \\udcff surrogate"
    assert printable(Path("/tmp/a\x1bb")) == "/tmp/a\\x1bb"


def test_filter_prints_pair_texts_and_plugin_strings_with_escapes_never_raw(tmp_path):
    store, _ = build_store(tmp_path / "curate.duckdb", [("calm", 1.0), ("short \x1b[2J\x1b]0;t\x07 \x9b1m", 9.0)])
    load_policy(tmp_path, "return remove_highest(scores, 'ches', 1)", description="sly \x1b[5mblink")
    result = filter_cli(store, "--policy", "sly")
    assert result.exit_code == 0, result.output
    assert "short \\x1b[2J\\x1b]0;t\\x07 \\x9b1m" in result.output
    app = typer.Typer()
    filter_commands.register(app)
    listing = CliRunner().invoke(app, ["policies"])
    assert listing.exit_code == 0, listing.output
    assert "sly \\x1b[5mblink" in listing.output
    for output in (result.output, listing.output):
        assert not any(ch in output for ch in "\x1b\x07\x9b"), output


def test_quality_tables_escape_expectation_names(monkeypatch, capsys):
    monkeypatch.setattr(quality_commands.console, "width", 250)
    frame = pd.DataFrame({"suite": ["pairs"], "run_success": [True], "n_rows": [3], "failure_rate": [0.0],
                          "expectation": ["custom \x1b[31mcheck"], "severity": ["warn"], "success": [True],
                          "unexpected_count": [0]})
    quality_commands.print_results(frame, "toy \x1b]0;t\x07")
    out = capsys.readouterr().out
    assert "custom \\x1b[31mcheck" in out and "toy \\x1b]0;t\\x07" in out
    assert "\x1b" not in out and "\x07" not in out


def test_sql_tables_ingest_lines_and_errors_escape_control_codes(tmp_path, monkeypatch):
    from ches_curate.commands import store as store_commands
    from tests.reliability_helpers import run_cli

    monkeypatch.setattr(store_commands.console, "width", 250)
    pairs = tmp_path / "hostile.jsonl"
    pairs.write_text(json.dumps({"prompt": HOSTILE, "chosen": "yes", "rejected": "no"}) + "\n"
                     + json.dumps({"prompt": "p", "chosen": HOSTILE, "rejected": ""}) + "\n")
    db = tmp_path / "s.duckdb"
    ingested = run_cli("ingest", pairs, "--dataset", "name \x1b[2J", "--on-error", "quarantine", "--db", db)
    table = run_cli("sql", "SELECT prompt FROM pairs", "--format", "table", "--db", db)
    failed = run_cli("ingest", pairs, "--dataset", "x", "--db", db)
    missing = run_cli("sql", "SELECT \"\x1b[31mred\" FROM pairs", "--db", db)  # the error quotes the query
    assert "name \\x1b[2J" in ingested.stdout and SHOWN in table.stdout
    assert failed.code == 2 and missing.code == 1 and "\\x1b[31mred" in missing.stderr
    for run in (ingested, table, failed, missing):
        assert not any(ch in run.output for ch in "\x1b\x07\x9b\u202e"), run.output
