"""Every attention variant the engine accepts scores as two plain float64 batch-1 passes, or is refused with a reason.

Tiny random models of each family (ches_curate/testing/tiny_models.py): full attention with GQA (Llama),
absolute positions (GPT-2), a parallel block (GPT-NeoX), ALiBi from the mask (BLOOM) and from
column indices (MPT), one 4-token sliding window on every layer (Mistral), windows on the
upper layers (Qwen2 `max_window_layers`) and alternating sliding/full layers (Gemma-2, Gemma-3).
Every test pair is longer than the windows. The reference is test_ches.reference_scores.
"""

from __future__ import annotations

import pytest

from ches_curate.errors import ChesCurateError
from ches_curate.models import load_model
from ches_curate.scoring import Scorer, ScoringConfig, score_pairs
from tests.test_ches import PAIRS, PROMPT_FEEDS, assert_matches_reference, make_pairs, reference_scores
from ches_curate.testing.tiny_models import build_tiny_model

FULL_ATTENTION = ("llama", "gpt2", "gpt_neox")
NO_BLOCK_MASK = ("bloom", "mpt", "mistral", "qwen2", "gemma2", "gemma3")
BATCH_SIZES = {"batch-1": {"batch_size": 1}, "batch-3": {"batch_size": 3}, "default": {}}


@pytest.fixture(scope="module", params=FULL_ATTENTION + NO_BLOCK_MASK)
def variant(request, session_tmp):
    arch = request.param
    loaded = load_model(str(build_tiny_model(session_tmp / f"tiny_{arch}", arch=arch, chat_template=arch != "gpt2")))
    pairs = make_pairs(PAIRS[1:])  # 4 pairs of 9-40 tokens
    return arch, loaded, pairs, [reference_scores(loaded, p) for p in pairs]


@pytest.mark.parametrize("batching", BATCH_SIZES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("prompt_feed", ["auto", *PROMPT_FEEDS])
def test_every_attention_variant_matches_plain_float64_passes(variant, batching, padding_side, prompt_feed):
    arch, loaded, pairs, reference = variant
    feed = PROMPT_FEEDS.get(prompt_feed, {})
    config = {"padding_side": padding_side, **BATCH_SIZES[batching], **feed}
    if prompt_feed == "block-mask" and arch in NO_BLOCK_MASK:
        with pytest.raises(ChesCurateError, match="^prompt_sharing=block: .* use prompt_sharing auto or cache$"):
            score_pairs(pairs, loaded, **config)
        return
    table = score_pairs(pairs, loaded, **config)
    assert_matches_reference(table, pairs, reference)


@pytest.mark.parametrize("arch", ["mistral", "gpt_neo"])
def test_windowed_models_share_the_prompt_through_the_kv_cache(session_tmp, arch):
    """Mistral's `sliding_window` and GPT-Neo's local layers (`window_size`) both rule the block mask out."""
    loaded = load_model(str(build_tiny_model(session_tmp / f"tiny_{arch}", arch=arch)))
    assert Scorer(loaded).mode == "cache"
    with pytest.raises(ChesCurateError, match=r"has windowed attention \((sliding_window|window_size)=4\)"):
        Scorer(loaded, ScoringConfig(prompt_sharing="block"))
