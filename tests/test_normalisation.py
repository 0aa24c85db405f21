"""One normalisation: what `pair_id` treats as one text (CRLF as LF, Unicode NFC) is one text everywhere."""

from __future__ import annotations

import json
import unicodedata

import pandas as pd

from ches_curate.ingest import read_pairs
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import ScoringConfig, score_file

CAFE_NFC, CAFE_NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def _write(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_responses_identical_after_normalisation_are_quarantined_as_identical(tmp_path):
    assert CAFE_NFC != CAFE_NFD
    source = _write(tmp_path / "pairs.jsonl", [
        {"prompt": "q", "chosen": CAFE_NFC, "rejected": CAFE_NFD},
        {"prompt": "q", "chosen": "same\r\n", "rejected": "same\n"},
    ])
    items = list(read_pairs(source, on_error="quarantine"))
    assert [(i.line, i.field, i.reason) for i in items] == [(1, "rejected", "is identical to 'chosen'"),
                                                           (2, "rejected", "is identical to 'chosen'")]
    # A conversation whose turns differ only in line endings has one prompt, as pair_id counts it.
    conversation = _write(tmp_path / "conversation.jsonl", [
        {"chosen": [{"role": "user", "content": "q\r\n"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "q\n"}, {"role": "assistant", "content": "b"}]},
    ])
    (pair,) = read_pairs(conversation, on_error="quarantine")
    assert isinstance(pair, PreferencePair) and pair.prompt == [{"role": "user", "content": "q\n"}]


def test_one_pair_id_gets_one_score_in_a_file_run(tmp_path, tiny_llama_dir):
    """Prompts differing only in NFC/NFD once shared a pair_id but scored -173.21 and -172.75."""
    source = _write(tmp_path / "pairs.jsonl", [
        {"prompt": f"Unicode: {CAFE_NFC}, naïve", "chosen": "yes sure", "rejected": "No"},
        {"prompt": f"Unicode: {CAFE_NFD}, naïve", "chosen": "yes sure", "rejected": "No"},
    ])
    output = tmp_path / "scores.parquet"
    score_file(source, output, model=str(tiny_llama_dir), config=ScoringConfig(batch_size=1), progress=False)
    table = pd.read_parquet(output)
    assert table["pair_id"].nunique() == 1 and len(table) == 2
    assert table["ches"].iloc[0] == table["ches"].iloc[1]
    assert table["chosen_tokens"].iloc[0] == table["chosen_tokens"].iloc[1]


def test_a_pair_made_in_python_is_normalised_like_an_ingested_one():
    pair = PreferencePair(f"{CAFE_NFD}\r\n", "same\r\n", CAFE_NFD)
    assert (pair.prompt, pair.chosen, pair.rejected) == (f"{CAFE_NFC}\n", "same\n", CAFE_NFC)
    assert pair.pair_id == PreferencePair(f"{CAFE_NFC}\n", "same\n", CAFE_NFC).pair_id
