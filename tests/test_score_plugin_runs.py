"""A third-party score plugin end to end: computed in the scoring pass, stored, queried, filtered on; a failure
costs one value; a score added later (or a new version) is computed without running CHES again."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ches_curate import plugins
from ches_curate.cli import app
from ches_curate.ingest import read_pairs
from ches_curate.models import load_model
from ches_curate.scores import available_scores
from ches_curate.scoring import Scorer, ScoringConfig, score_pairs
from ches_curate.scoring.incremental import score_dataset
from ches_curate.store import Store
from ches_curate.tokenization import encode_pair
from tests.test_plugins import add_dist_info, clean_modules, fresh_plugins  # noqa: F401  (fixtures)

PLUGIN = textwrap.dedent('''
    from ches_curate.hookspecs import hookimpl
    from ches_curate.scores import Score


    class LengthRatio(Score):
        name = "length_ratio"
        description = "len(chosen) / len(rejected), in characters"
        needs = frozenset({"texts"})

        def compute(self, batch):
            if any("boom" in p.chosen for p in batch.pairs):
                raise ValueError("cannot score boom")
            return [len(p.chosen) / len(p.rejected) for p in batch.pairs]


    class TokenGap(Score):
        name = "token_gap"
        description = "|y+| - |y-| in tokens as scored"
        needs = frozenset({"tokens"})

        def compute(self, batch):
            return [len(t.chosen_ids) - len(t.rejected_ids) for t in batch.tokens]


    @hookimpl
    def register_scores(register):
        register(LengthRatio())
        register(TokenGap())
''')
ROWS = [
    {"prompt": "how do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Sure, here is how."},
    {"prompt": "The quick bro", "chosen": "wn fox jumps over the lazy dog.", "rejected": "No, never."},
    {"prompt": "x", "chosen": "boom yes", "rejected": "yes sure"},
    {"prompt": "Unicode: café, naïve", "chosen": "日本語 emoji 🙂", "rejected": "Numbers 0 1 2 3"},
]


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    path = tmp_path / "my_scores.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture
def dataset(tmp_path) -> tuple[Store, Path]:
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("d", str(source), read_pairs(source))
    return store, source


def test_a_plugin_file_adds_scores_that_are_stored_queried_and_filtered_on(dataset, plugin_file, tiny_llama_dir):
    store, _ = dataset
    runner = CliRunner()
    db = ["--db", str(store.path)]
    scored = runner.invoke(app, ["score", "--dataset", "d", "--model", str(tiny_llama_dir),
                                 "--plugin", str(plugin_file), *db])
    assert scored.exit_code == 0, scored.output
    wide = store.sql('SELECT "row", ches, length_ratio, token_gap FROM latest_scores_wide ORDER BY "row"')
    ratios = [len(r["chosen"]) / len(r["rejected"]) for r in ROWS]
    assert wide.length_ratio[[0, 1, 3]].tolist() == pytest.approx([ratios[i] for i in (0, 1, 3)])
    assert np.isnan(wide.length_ratio[2]) and wide.ches.notna().all()  # the pair is scored; only this value failed
    loaded = load_model(str(tiny_llama_dir))
    pairs = list(store.dataset_pairs("d"))
    gaps = [len(e.chosen_ids) - len(e.rejected_ids) for e in (encode_pair(loaded.tokenizer, p) for p in pairs)]
    assert wide.token_gap.tolist() == gaps
    failure = store.sql("SELECT pair_id, failure FROM plugin_scores WHERE failure IS NOT NULL")
    assert failure.to_dict("records") == [{"pair_id": pairs[2].pair_id, "failure": f"score 'length_ratio' (plugin "
                                           f"'{plugin_file}') failed: ValueError: cannot score boom"}]
    assert store.sql("SELECT count(*) AS n FROM quarantine").n.iloc[0] == 0
    definitions = store.sql("SELECT score_name, plugin, model_bound FROM score_definitions ORDER BY 1")
    assert definitions.values.tolist() == [["length_ratio", str(plugin_file), False], ["token_gap", str(plugin_file),
                                                                                        True]]

    filtered = runner.invoke(app, ["filter", "--dataset", "d", "--policy", "top-k", "--param", "k=1", "--param",
                                   "score_column=length_ratio", "--plugin", str(plugin_file), *db])
    assert filtered.exit_code == 0, filtered.output
    assert "kept 2, removed 1 of 3 pairs" in filtered.output
    assert "1 pairs have no value of a score the policy ranks by" in " ".join(filtered.output.split())
    selection = store.selection(1).set_index("pair_id")
    assert selection.loc[pairs[int(np.argmax(ratios))].pair_id, "kept"] == False  # noqa: E712
    summary = store.sql("SELECT score_name, n_scored, n_failed FROM plugin_score_summary ORDER BY 1")
    assert summary.values.tolist() == [["length_ratio", 3, 1], ["token_gap", 4, 0]]


def test_an_installed_entry_point_adds_its_scores(tmp_path, monkeypatch, clean_modules, llama):  # noqa: F811
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_scores.py").write_text(PLUGIN)
    add_dist_info(site, "my-scores", {"my_scores": "my_scores"}, monkeypatch)
    plugins.reset()
    found = available_scores()
    assert (found["length_ratio"].plugin, found["token_gap"].plugin) == ("my_scores", "my_scores")
    table = score_pairs([read for read in read_pairs(write(tmp_path, ROWS[:2]))], llama)
    assert table.length_ratio.tolist() == pytest.approx([len(r["chosen"]) / len(r["rejected"]) for r in ROWS[:2]])


def write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def counting_passes(loaded) -> list:
    calls: list = []
    loaded.model.base_model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_score_added_later_is_computed_without_running_ches_again(dataset, plugin_file, tiny_llama_dir,
                                                                   monkeypatch):
    store, _ = dataset
    loaded = load_model(str(tiny_llama_dir))
    first = score_dataset(store, "d", Scorer(loaded), progress=False)
    ches_rows = store.sql("SELECT pair_id, run_id, scored_at FROM scores ORDER BY pair_id")
    assert first.n_scored == 4 and store.sql("SELECT count(*) AS n FROM plugin_scores").n.iloc[0] == 0

    plugins.load_plugin_module(str(plugin_file))
    scorer = Scorer(loaded)  # now with length_ratio and token_gap
    calls = counting_passes(loaded)
    second = score_dataset(store, "d", scorer, progress=False)
    assert calls == [] and (second.n_scored, second.n_backfilled) == (0, 4)  # no forward pass at all
    assert store.sql("SELECT pair_id, run_id, scored_at FROM scores ORDER BY pair_id").equals(ches_rows)
    assert store.sql("SELECT count(*) AS n FROM plugin_scores").n.iloc[0] == 8

    third = score_dataset(store, "d", scorer, progress=False)
    assert calls == [] and third.n_backfilled == 0  # nothing missing: nothing computed

    gap = available_scores()["token_gap"].obj
    monkeypatch.setattr(type(gap), "version", "2")  # a new version re-scores that score only
    ratios = "SELECT score_name, computed_at FROM plugin_scores WHERE score_name = 'length_ratio'"
    before = store.sql(ratios)
    scorer = Scorer(loaded)
    calls.clear()  # the new scorer's one-pair probe of the block mask
    assert score_dataset(store, "d", scorer, progress=False).n_backfilled == 4 and calls == []
    versions = store.sql("SELECT score_version FROM plugin_scores WHERE score_name = 'token_gap'").score_version
    assert set(versions) == {"2"}
    assert store.sql(ratios).equals(before)

    with_logprobs = Scorer(loaded, ScoringConfig(scores=("logp_margin",)))
    calls.clear()
    fourth = score_dataset(store, "d", with_logprobs, progress=False)
    assert fourth.n_backfilled == 4 and len(calls) >= 1  # log-probs need the pass: run for them, CHES not rewritten
    assert store.sql("SELECT pair_id, run_id, scored_at FROM scores ORDER BY pair_id").equals(ches_rows)
    assert store.sql("SELECT logp_margin FROM latest_scores_wide").logp_margin.notna().all()
