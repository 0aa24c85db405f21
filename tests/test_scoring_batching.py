"""How the engine groups pairs into passes, when it falls back to the KV cache, and what it reports.

Score values are checked against the float64 reference in test_ches.py; these tests
check the batching itself, the fallback choice and the progress lines.
"""

from __future__ import annotations

import copy
import functools
import logging

import pandas as pd
import pytest

from ches_curate.models import LoadedModel, load_model
from ches_curate.pairs import PreferencePair
from ches_curate.scoring.progress import track_frames
from ches_curate.scoring import Scorer, ScoringConfig
from ches_curate.tokenization import encode_pair
from tests.test_ches import assert_matches_reference, make_pairs, reference_scores

LONG = PreferencePair("a long prompt " * 20, "a long answer " * 10, "no", row=5)


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)))


def fed_tokens(loaded, pair):
    """P + |y+| - 1 + |y-| - 1, counted from the tokenization contract."""
    e = encode_pair(loaded.tokenizer, pair)
    return len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) - 2


def passes(scorer, pairs):
    """(the `row`s of each forward pass, the score table sorted by row), recording `_score_batch`."""
    seen = []
    score_batch = scorer._score_batch
    scorer._score_batch = lambda batch: (seen.append([e.pair.row for e in batch]), score_batch(batch))[1]
    table = pd.concat(list(scorer.score_batches(pairs))).sort_values("row", ignore_index=True)
    return seen, table


def row_length(loaded, pair, mode):
    """Tokens in each of a pair's rows: one row P + |y+| + |y-| - 2 (block mask), else two of P + max|y| - 1."""
    e = encode_pair(loaded.tokenizer, pair)
    if mode == "block":
        return fed_tokens(loaded, pair)
    return len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) - 1


@pytest.mark.parametrize("budget", [1, 40, 64, 150, 10_000])
@pytest.mark.parametrize("feed", [{"prompt_sharing": "block"}, {"prompt_sharing": "cache"}, {"share_prompt": False}])
def test_each_pass_fits_the_token_budget_padding_included(loaded, budget, feed):
    pairs = make_pairs() + [LONG]
    scorer = Scorer(loaded, ScoringConfig(max_batch_tokens=budget, **feed))
    lengths = {p.row: row_length(loaded, p, scorer.mode) for p in pairs}
    rows_per_pair = 1 if scorer.mode == "block" else 2
    batches, _ = passes(scorer, pairs)
    assert sorted(row for batch in batches for row in batch) == sorted(lengths)
    for batch in batches:
        padded = rows_per_pair * len(batch) * max(lengths[row] for row in batch)
        assert len(batch) == 1 or padded <= budget
    # Greedy over length-sorted pairs: a pass ends only when the next pair would not fit.
    expected, size = 0, 0
    for length in sorted(lengths.values()):
        if size and rows_per_pair * (size + 1) * length > budget:
            expected, size = expected + 1, 0
        size += 1
    assert len(batches) == expected + 1


def test_batch_size_caps_pairs_per_pass_under_a_large_budget(loaded):
    scorer = Scorer(loaded, ScoringConfig(max_batch_tokens=10_000, batch_size=2))
    assert [len(b) for b in passes(scorer, make_pairs())[0]] == [2, 2, 1]


def test_default_budget_depends_on_the_device(loaded):
    assert Scorer(loaded).max_batch_tokens == 512  # the tiny models load on CPU here
    assert Scorer(loaded, ScoringConfig(max_batch_tokens=99)).max_batch_tokens == 99


def test_pair_longer_than_the_budget_runs_alone_and_stays_exact(loaded):
    pairs = make_pairs() + [LONG]
    assert fed_tokens(loaded, LONG) > 64
    batches, table = passes(Scorer(loaded, ScoringConfig(max_batch_tokens=64)), pairs)
    assert [5] in batches
    assert_matches_reference(table, pairs, [reference_scores(loaded, p) for p in pairs])


def test_tiny_llama_and_gpt2_take_the_block_mask(loaded):
    assert Scorer(loaded).mode == "block"
    assert Scorer(loaded, ScoringConfig(share_prompt=False)).mode == "unshared"


def _with_model(loaded: LoadedModel, model) -> LoadedModel:
    return LoadedModel(model, loaded.tokenizer, loaded.device, loaded.key, loaded.info)


def test_sliding_window_model_falls_back_to_the_kv_cache(loaded):
    model = copy.deepcopy(loaded.model)
    model.config.sliding_window = 2  # a block mask would have to window itself; the model's own masks do
    assert Scorer(_with_model(loaded, model)).mode == "cache"


def test_model_that_misreads_the_block_mask_falls_back_and_stays_exact(loaded):
    """A model whose forward drops a 4D mask (as ALiBi or remote code might) fails the probe."""
    model = copy.deepcopy(loaded.model)
    forward = model.base_model.forward

    @functools.wraps(forward)
    def drops_4d_masks(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return forward(*args, attention_mask=attention_mask, **kwargs)

    model.base_model.forward = drops_4d_masks
    scorer = Scorer(_with_model(loaded, model), ScoringConfig(batch_size=2))
    assert scorer.mode == "cache"
    pairs = make_pairs()
    assert_matches_reference(passes(scorer, pairs)[1], pairs, [reference_scores(loaded, p) for p in pairs])


@pytest.mark.parametrize("share_prompt", [True, False])
def test_progress_lines_report_pairs_tokens_and_eta(loaded, caplog, share_prompt):
    pairs = make_pairs()
    scorer = Scorer(loaded, ScoringConfig(batch_size=2, progress_every_s=0, share_prompt=share_prompt))
    with caplog.at_level(logging.INFO, logger="ches_curate.scoring"):
        frames = list(scorer.score_batches(pairs, total=len(pairs)))
    fed = [fed_tokens(loaded, p) + (0 if share_prompt else len(encode_pair(loaded.tokenizer, p).prompt_ids))
           for p in pairs]
    assert sum(f.attrs["tokens"] for f in frames) == sum(fed)
    messages = [r.getMessage() for r in caplog.records if r.name == "ches_curate.scoring"]
    assert messages[0].startswith("scoring: 2/5 pairs, ")
    assert "tokens/s" in messages[0] and "ETA" in messages[0]
    assert messages[-1].startswith(f"scored 5/5 pairs, {sum(fed):,} tokens in ")


def test_progress_lines_reach_stderr_when_not_a_terminal(loaded, capsys):
    scorer = Scorer(loaded, ScoringConfig(batch_size=2, progress_every_s=0))
    frames = list(track_frames(scorer.score_batches(make_pairs(), total=5), "scoring"))
    err = capsys.readouterr().err
    assert [len(f) for f in frames] == [2, 2, 1]
    assert "scoring: 2/5 pairs, " in err and "scoring: 4/5 pairs, " in err and "scored 5/5 pairs, " in err
    assert logging.getLogger("ches_curate.scoring").handlers == []  # the stderr handler was only for the run
