"""Scores you can trust (issue 24): one pair, one model, one tokenizer -> one score, whatever the history.

The model key names the tokenizer (an edited chat template is a new key, a store made
before keeps its scores under `/tokenizer-unknown` keys), the recorded tokenization is
the one used, a selection is reused only for the same scored pairs, and unscored pairs
are counted wherever scores are read.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from ches_curate import curation
from ches_curate.cli import app
from ches_curate.errors import ChesCurateError
from ches_curate.export import export_dataset
from ches_curate.models import _weights_hash, key_without_loading
from ches_curate.pairs import PreferencePair
from ches_curate.pipeline_config import PipelineConfig, PolicySpec
from ches_curate.refresh import reselect
from ches_curate.report import build_report
from ches_curate.scoring import ScoringConfig
from ches_curate.scoring.engine import Scorer
from ches_curate.scoring.incremental import score_dataset
from ches_curate.selection import select
from ches_curate.store import Store, migrations
from tests.test_store import fake_scores

TEXT = ["a fox", "a dog", "the lazy dog", "quick brown", "bake bread", "pick a lock"]


def plain_pairs(n: int) -> list[PreferencePair]:
    """`n` pairs with plain prompts (so they tokenize with or without a chat template)."""
    return [PreferencePair(f"{TEXT[i % 6]} {i}?", f"Sure, {TEXT[(i + 1) % 6]}.", f"No. {TEXT[(i + 2) % 6]}", row=i)
            for i in range(n)]


def reference_ches(model_dir, pairs: list[PreferencePair], chat_template: bool | None = None) -> list[float]:
    """CHES of `pairs` from a fresh load of `model_dir`, one pair per pass, outside any store."""
    scorer = Scorer(str(model_dir), ScoringConfig(batch_size=1, device="cpu", chat_template=chat_template))
    frame = pd.concat(scorer.score_batches(pairs), ignore_index=True).sort_values("row")
    return frame.ches.tolist()


def stored_ches(store: Store, model_key: str) -> list[float]:
    return store.sql('SELECT s.ches FROM scores s JOIN dataset_pairs dp USING (pair_id) WHERE s.model_key = ? '
                     'ORDER BY dp."row"', params=[model_key]).ches.tolist()


def test_an_edited_chat_template_is_a_new_model_key_whose_pairs_are_scored_again(tmp_path, tiny_llama_dir):
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    store = Store(tmp_path / "s.duckdb")
    pairs = plain_pairs(6)
    store.register_dataset("toy", None, pairs)
    config = ScoringConfig(batch_size=6, device="cpu")
    before = score_dataset(store, "toy", str(model_dir), config, progress=False)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>{{ message['role'] }}\n",
                                                              "<|im_start|>{{ message['role'] }}: ")
    tokenizer.save_pretrained(model_dir)
    after = score_dataset(store, "toy", str(model_dir), config, progress=False)

    weights = before.model_key.rpartition("/tokenizer-")[0]
    assert after.model_key != before.model_key and after.model_key.rpartition("/tokenizer-")[0] == weights
    assert (after.n_scored, after.n_skipped) == (6, 0)  # not "0 scored, 6 already scored"
    assert key_without_loading(str(model_dir))[0] == after.model_key
    np.testing.assert_allclose(stored_ches(store, after.model_key), reference_ches(model_dir, pairs), rtol=1e-5)
    old = stored_ches(store, before.model_key)
    assert len(old) == 6 and not np.allclose(old, stored_ches(store, after.model_key))  # kept, under its own key
    hashes = store.sql("SELECT model_key, tokenizer_hash FROM models ORDER BY created_at, model_key")
    assert len(set(hashes.tokenizer_hash)) == 2 and all(len(h) == 64 for h in hashes.tokenizer_hash)
    with pytest.raises(ChesCurateError, match="scored by several models"):
        store.scoring_model("toy", 1)  # two known tokenizers: the user picks


def test_a_version_8_store_keeps_its_scores_under_tokenizer_unknown_keys_until_the_model_scores_again(
        tmp_path, tiny_llama_dir):
    path = tmp_path / "v8.duckdb"
    pairs = plain_pairs(4)
    old_key = f"{tiny_llama_dir.name}@{_weights_hash(tiny_llama_dir)[:12]}/float32"  # the key as version 8 made it
    con = duckdb.connect(str(path))
    assert migrations.apply(con, up_to=8) == [1, 2, 3, 4, 5, 6, 7, 8]
    for p in pairs:
        con.execute("INSERT INTO pairs VALUES (?, ?, NULL, ?, ?, ?, NULL)", [p.pair_id, p.prompt, p.chosen, p.rejected,
                                                                              p.format])
        con.execute("INSERT INTO dataset_pairs VALUES ('toy', 1, ?, ?)", [p.row, p.pair_id])
        con.execute("INSERT INTO scores (pair_id, model_key, ches, ln_ches, run_id, tokenization_version) "
                    "VALUES (?, ?, ?, ?, 1, '2')", [p.pair_id, old_key, -float(p.row), p.row / 10])
        con.execute("INSERT INTO selections (selection_id, policy, params, dataset_name, dataset_version, model_key, "
                    "pair_id, kept, rank, score_column, source) VALUES (1, 'top-k', '{\"k\": 1}', 'toy', 1, ?, ?, "
                    "?, ?, 'ches', 'cli')", [old_key, p.pair_id, p.row > 0, p.row + 1])
    con.execute("INSERT INTO datasets (name, version, content_hash, n_pairs, n_quarantined) VALUES ('toy', 1, 'h', 4, 0)")
    con.execute("INSERT INTO models (model_key, name, file_hash, dtype) VALUES (?, ?, ?, 'float32')",
                [old_key, tiny_llama_dir.name, _weights_hash(tiny_llama_dir)])
    con.execute("INSERT INTO score_runs (dataset_name, dataset_version, model_key, status, n_scored) "
                "VALUES ('toy', 1, ?, 'finished', 4)", [old_key])
    con.close()

    store = Store(path)
    unknown = f"{old_key}/tokenizer-unknown"
    assert store.schema_version() == migrations.LATEST_VERSION
    assert store.sql("SELECT DISTINCT model_key FROM scores").model_key.tolist() == [unknown]
    assert stored_ches(store, unknown) == [0.0, -1.0, -2.0, -3.0]  # every score kept, values untouched
    assert store.sql("SELECT model_key, tokenizer_hash FROM models").values.tolist() == [[unknown, None]]
    for table in ("score_runs", "selections"):
        assert store.sql(f"SELECT DISTINCT model_key FROM {table}").model_key.tolist() == [unknown]
    assert store.sql("SELECT DISTINCT scored_pairs_hash AS h FROM selections").h.tolist() == [None]
    assert store.scoring_model("toy", 1) == unknown  # still readable, and says what it is

    rescored = score_dataset(store, "toy", str(tiny_llama_dir), ScoringConfig(batch_size=4, device="cpu"),
                             progress=False)
    assert rescored.model_key.startswith(f"{old_key}/tokenizer-") and rescored.model_key != unknown
    assert (rescored.n_scored, rescored.n_skipped) == (4, 0)
    assert stored_ches(store, unknown) == [0.0, -1.0, -2.0, -3.0]
    assert store.scoring_model("toy", 1) == rescored.model_key  # the known key is read by default


def test_a_model_without_chat_template_is_recorded_raw_and_exported_as_standard_rows(tmp_path, tiny_gpt2_dir):
    store = Store(tmp_path / "s.duckdb")
    pairs = plain_pairs(5)
    store.register_dataset("toy", None, pairs)
    summary = score_dataset(store, "toy", str(tiny_gpt2_dir), ScoringConfig(batch_size=5, device="cpu"),
                            progress=False)
    assert store.tokenization_versions("toy", 1, summary.model_key) == {"2-raw": 5}
    assert summary.tokenization_version == "2-raw"
    assert "(tokenization 2-raw: plain text)" in summary.describe()
    assert store.scored_chat_template("toy", 1, summary.model_key) is False
    np.testing.assert_allclose(stored_ches(store, summary.model_key),
                               reference_ches(tiny_gpt2_dir, pairs, chat_template=False), rtol=1e-5)

    out = export_dataset(store, tmp_path / "out.jsonl", dataset="toy", model_key=summary.model_key)
    rows = [json.loads(line) for line in out.path.read_text().splitlines()]
    assert not out.conversational and out.tokenization_version == "2-raw"
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [(p.prompt, p.chosen, p.rejected) for p in pairs]
    raw = export_dataset(store, tmp_path / "raw.jsonl", dataset="toy", model_key=summary.model_key,
                         chat_template=False)
    assert raw.path.read_text() == out.path.read_text()  # `export --no-chat-template` agrees
    again = score_dataset(store, "toy", str(tiny_gpt2_dir), ScoringConfig(batch_size=5, device="cpu",
                                                                          chat_template=False), progress=False)
    assert (again.n_scored, again.n_skipped) == (0, 5)  # --no-chat-template finds them scored


def scored_store(tmp_path, n_pairs: int = 30, n_scored: int = 20) -> tuple[Store, list[PreferencePair]]:
    """A store whose dataset `toy` has `n_pairs` pairs, the first `n_scored` scored by model `m` (`/models/m`)."""
    store = Store(tmp_path / "s.duckdb")
    pairs = plain_pairs(n_pairs)
    store.register_dataset("toy", None, pairs)
    run_id = store.start_score_run("toy", 1, "m", model_info={"name": "m", "path": "/models/m", "dtype": "float32"})
    store.write_scores(run_id, "m", fake_scores(pairs[:n_scored], seed=3))
    return store, pairs


def test_refresh_does_not_reuse_a_selection_decided_on_fewer_scored_pairs(tmp_path):
    store, pairs = scored_store(tmp_path)
    policy = PolicySpec(name="percentile", params={"p": 80})
    first = select(store, "toy", 1, "m", policy.name, policy.params, source="refresh")
    assert first.n_pairs == 20
    store.write_scores(store.start_score_run("toy", 1, "m"), "m", fake_scores(pairs, seed=3)[20:])

    selection, diff = reselect(store, "toy", 1, "m", policy)
    assert not selection.reused and selection.selection_id != first.selection_id and selection.n_pairs == 30
    assert diff.previous_selection_id == first.selection_id and diff.counts()["diff_added"] == 10
    recorded = store.sql("SELECT DISTINCT scored_pairs_hash AS h, tokenization_version AS v FROM selections "
                         "WHERE selection_id = ?", params=[selection.selection_id])
    expected = hashlib.sha256("\n".join(sorted(p.pair_id for p in pairs)).encode()).hexdigest()
    assert recorded.values.tolist() == [[expected, "2"]]

    again, again_diff = reselect(store, "toy", 1, "m", policy)
    assert again.reused and again.selection_id == selection.selection_id and again_diff.changes.empty


def test_filter_export_and_report_name_the_unscored_pairs_and_the_pipeline_export_refuses_them(tmp_path):
    store, _ = scored_store(tmp_path)
    db = str(store.path)
    runner = CliRunner()
    filtered = runner.invoke(app, ["filter", "--db", db, "--dataset", "toy", "--policy", "percentile", "--param",
                                   "p=80"], env={"COLUMNS": "300"})
    assert filtered.exit_code == 0, filtered.output
    command = f"ches-curate score --dataset toy --version 1 --model /models/m --db {db}"
    note = f"10 of the 30 pairs of 'toy' v1 have no score from m (tokenization 2)"
    printed = " ".join(filtered.output.split())  # the console may wrap long lines wherever the suite left its width
    assert "of 20 pairs" in printed and note in printed and command in printed

    exported = runner.invoke(app, ["export", "--db", db, "--selection", "1", "-o", str(tmp_path / "out.jsonl")],
                             env={"COLUMNS": "300"})
    assert exported.exit_code == 0, exported.output
    printed = " ".join(exported.output.split())
    assert "wrote 16 pairs" in printed and note in printed and command in printed
    html = build_report(store, "toy")
    assert "unscored pairs" in html and f"<code>{command}</code>" in html

    with pytest.raises(ChesCurateError, match="10 of the 30 pairs .* allow_unscored_export: true"):
        curation.export_selection(store, 1, str(tmp_path / "pipeline.jsonl"))
    assert not (tmp_path / "pipeline.jsonl").exists()
    summary, frame = curation.export_selection(store, 1, str(tmp_path / "pipeline.jsonl"), allow_unscored=True)
    assert summary.n_pairs == len(frame) == 16 and summary.unscored.n_unscored == 10
    config = PipelineConfig.model_validate({"dataset": {"name": "toy", "source": "x.jsonl"},
                                            "allow_unscored_export": True})
    assert config.allow_unscored_export is True
    with pytest.raises(ValueError, match="allow_unscored_export"):
        PipelineConfig.model_validate({"dataset": {"name": "toy", "source": "x.jsonl"}, "allow_unscored_export": "x"})
