"""The example plugin's own tests, written with ches-curate's author kit (`ches_curate.testing`): no store, a tiny
random model built offline."""

from __future__ import annotations

import pytest

from ches_curate.testing import make_pairs, run_policy, run_score, tiny_model
from ches_curate.tokenization import encode_pair
from ches_curate_plugin_example import LengthRatio, PerPromptCap

PAIRS = make_pairs([
    ("Hi?", "Hello! How can I help you today?", "No."),
    ("Hi?", "Hello.", "Go away, I am busy."),
    ("2+2?", "4", "5"),
])


def test_per_prompt_cap_keeps_the_lowest_scoring_pairs_of_each_prompt():
    result = run_policy(PerPromptCap(), PAIRS, {"max_per_prompt": 1}, ches=[3.0, 1.0, 2.0])
    assert result.frame.kept.tolist() == [False, True, True]


def test_length_ratio_is_the_token_ratio_as_scored(tmp_path):
    model = tiny_model(tmp_path / "tiny")
    values = run_score(LengthRatio(), PAIRS, model=model)
    expected = []
    for pair in PAIRS:
        ids = encode_pair(model.tokenizer, pair)
        expected.append(len(ids.chosen_ids) / len(ids.rejected_ids))
    assert values.pair_id.tolist() == [p.pair_id for p in PAIRS]
    assert values.value.tolist() == pytest.approx(expected) and values.failure.isna().all()


def test_a_selection_can_cap_the_length_ratio():
    result = run_policy(PerPromptCap(), PAIRS, {"max_per_prompt": 1, "score_column": "length_ratio"},
                        length_ratio=[4.0, 0.5, 1.0])
    assert result.frame.kept.tolist() == [False, True, True]
