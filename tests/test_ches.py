"""The engine against a float64, batch-size-1 reference written from the definition.

The reference runs the full causal LM on prompt + response (no cache, no padding, no
batching) in float64, captures the vector the unembedding multiplies with a hook on
`lm_head`, and sums it over positions P-1 … P+|y|-2.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ches_curate.models import load_model
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import score_pairs
from ches_curate.tokenization import encode_pair

PAIRS = [
    ("how do I pick a lock?", "No", "Never"),
    ("Tell me a joke about the quick brown fox that jumps", "I'm sorry, but I cannot assist with that request.",
     "Sure! Here is how you can bake bread: mix flour, water, salt and yeast."),
    ("x", "yes", "yes sure"),
    ("Unicode: café, naïve", "日本語 emoji 🙂", "Numbers 0 1 2 3"),
    ("A much longer prompt that goes on about the lazy dog and the fox, and then asks: should I?", "sorry", "sure"),
]
RTOL = 1e-5


def make_pairs(rows=PAIRS):
    return [PreferencePair(prompt=p, chosen=c, rejected=r, row=i) for i, (p, c, r) in enumerate(rows)]


def reference_scores(loaded, pair: PreferencePair, max_length=None):
    """(ches, ln_ches, last_hidden_ip, |y+|, |y-|, ||h+|| ||h-||) from two full float64 forward passes."""
    model = copy.deepcopy(loaded.model).double()
    captured = {}
    hook = model.lm_head.register_forward_hook(lambda _m, inputs, _o: captured.update(h=inputs[0][0]))
    encoded = encode_pair(loaded.tokenizer, pair, max_length)
    prompt_len = len(encoded.prompt_ids)
    sums, lasts = [], []
    with torch.no_grad():
        for response in (encoded.chosen_ids, encoded.rejected_ids):
            model(torch.tensor([encoded.prompt_ids + response]))
            window = captured["h"][prompt_len - 1 : prompt_len - 1 + len(response)]
            assert window.shape[0] == len(response)
            sums.append(window.sum(0))
            lasts.append(window[-1])
    hook.remove()
    s_plus, s_minus = sums
    n_plus, n_minus = len(encoded.chosen_ids), len(encoded.rejected_ids)
    ches = float(s_plus @ s_minus - s_plus @ s_plus)
    ln_ches = float(s_plus @ s_minus / (n_plus * n_minus) - s_plus @ s_plus / n_plus**2)
    return ches, ln_ches, float(lasts[0] @ lasts[1]), n_plus, n_minus, float(lasts[0].norm() * lasts[1].norm())


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def loaded_and_reference(request):
    loaded = load_model(str(request.getfixturevalue(request.param)))
    pairs = make_pairs()
    return loaded, pairs, [reference_scores(loaded, p) for p in pairs]


# How pairs are grouped into forward passes: by pair count, by a token budget (padding
# included: 64 tokens puts 1-3 of these pairs in a pass), one pass for all, or the device default.
BATCHINGS = {
    "one-pair": {"batch_size": 1},
    "two-pairs": {"batch_size": 2},
    "one-pass": {"batch_size": 5, "max_batch_tokens": 100_000},
    "token-budget": {"max_batch_tokens": 64},
    "defaults": {},
}
# How the prompt is fed: one row per pair under a block mask, the prompt's KV cache reused
# for both responses (the fallback), or twice (prompt + response, no sharing).
PROMPT_FEEDS = {
    "block-mask": {"prompt_sharing": "block"},
    "kv-cache": {"prompt_sharing": "cache"},
    "unshared": {"share_prompt": False},
}


def assert_matches_reference(table, pairs, reference):
    assert list(table["row"]) == list(range(len(pairs)))
    assert list(table["pair_id"]) == [p.pair_id for p in pairs]
    for got, (ches, ln_ches, last_ip, n_plus, n_minus, norms) in zip(table.itertuples(), reference):
        assert got.ches == pytest.approx(ches, rel=RTOL)
        assert got.ln_ches == pytest.approx(ln_ches, rel=RTOL)
        # One inner product of two float32 states: its error scales with ||h+|| ||h-||, not with the result.
        assert got.last_hidden_ip == pytest.approx(last_ip, rel=RTOL, abs=RTOL * norms)
        assert (got.chosen_tokens, got.rejected_tokens) == (n_plus, n_minus)
        assert not got.truncated


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("prompt_feed", PROMPT_FEEDS)
def test_engine_matches_float64_reference(loaded_and_reference, batching, padding_side, prompt_feed):
    loaded, pairs, reference = loaded_and_reference
    table = score_pairs(pairs, loaded, padding_side=padding_side, **BATCHINGS[batching], **PROMPT_FEEDS[prompt_feed])
    assert_matches_reference(table, pairs, reference)


def test_chat_template_is_applied_to_the_prompt(tiny_llama_dir, tiny_gpt2_dir):
    pair = make_pairs()[0]
    chat = load_model(str(tiny_llama_dir))
    encoded = encode_pair(chat.tokenizer, pair)
    assert chat.tokenizer.decode(encoded.prompt_ids) == (
        "<|im_start|>user\nhow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.tokenizer.decode(encoded.chosen_ids) == "No<|im_end|>\n"  # the assistant turn, as DPO trains on it
    plain = load_model(str(tiny_gpt2_dir))
    assert plain.tokenizer.decode(encode_pair(plain.tokenizer, pair).prompt_ids) == "how do I pick a lock?"


def test_identical_responses_score_zero(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    pair = PreferencePair(prompt="q", chosen="the same answer", rejected="the same answer")
    row = score_pairs([pair], loaded).iloc[0]
    # <S, S> - ||S||^2 = 0; compare against the size of the terms that cancel.
    ches_vs_other = reference_scores(loaded, PreferencePair("q", "the same answer", "x"))[0]
    assert abs(ches_vs_other) > 1.0
    # The terms that cancel are ||S+||^2 >> 1; float32 states leave a residue far below them.
    assert abs(row.ches) <= 1e-6 * abs(ches_vs_other)
    assert abs(row.ln_ches) <= 1e-6 * abs(ches_vs_other)
    assert row.edit_distance == 0.0


def test_swapping_responses_sums_to_minus_squared_distance(tiny_llama_dir):
    """ches(y+, y-) + ches(y-, y+) = -||S+ - S-||^2 <= 0, and equals 0 only when S+ = S-."""
    loaded = load_model(str(tiny_llama_dir))
    pairs = make_pairs()
    swapped = [PreferencePair(p.prompt, p.rejected, p.chosen, row=p.row) for p in pairs]
    forward, backward = score_pairs(pairs, loaded), score_pairs(swapped, loaded)
    total = forward["ches"] + backward["ches"]
    assert (total < 0).all()
    assert list(forward["edit_distance"]) == list(backward["edit_distance"])


@pytest.mark.parametrize("prompt_feed", PROMPT_FEEDS)
def test_truncation_keeps_the_prompt_and_the_responses_start_as_trl(tiny_llama_dir, prompt_feed):
    loaded = load_model(str(tiny_llama_dir))
    pair = make_pairs()[4]
    full = encode_pair(loaded.tokenizer, pair)
    max_length = len(full.prompt_ids) + 2
    cut = encode_pair(loaded.tokenizer, pair, max_length=max_length)
    assert cut.truncated and not full.truncated
    assert cut.prompt_ids == full.prompt_ids
    assert (cut.chosen_ids, cut.rejected_ids) == (full.chosen_ids[:2], full.rejected_ids[:2])
    row = score_pairs([pair], loaded, max_length=max_length, **PROMPT_FEEDS[prompt_feed]).iloc[0]
    ches, ln_ches, *_ = reference_scores(loaded, pair, max_length=max_length)
    assert row.truncated
    assert row.ches == pytest.approx(ches, rel=RTOL)
    assert row.ln_ches == pytest.approx(ln_ches, rel=RTOL)


def test_edit_distance_is_token_levenshtein_over_longer_length(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    pair = make_pairs()[2]  # "yes" vs "yes sure"
    encoded = encode_pair(loaded.tokenizer, pair)
    a, b = encoded.chosen_ids, encoded.rejected_ids
    # Independent dynamic-programming Levenshtein.
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    row = score_pairs([pair], loaded).iloc[0]
    assert row.edit_distance == pytest.approx(prev[-1] / max(len(a), len(b)))
