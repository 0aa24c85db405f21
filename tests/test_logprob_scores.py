"""The built-in log-prob scores come from CHES's own forward pass and equal TRL's reference log-probs.

For every way the engine feeds a pair (block mask, KV cache, two plain passes), both
padding sides and several batchings, the scores match a float64 reference computed from
the whole model's logits; and for the rows `export` writes in every layout, with and
without a chat template, they match what TRL's DPOTrainer computes as the reference
model's log-probs (`compute_ref_log_probs`), to 1e-4 relative.
"""

from __future__ import annotations

import copy

import pytest

from ches_curate.export import export_dataset
from ches_curate.ingest import read_pairs
from ches_curate.models import load_model
from ches_curate.scoring import Scorer, ScoringConfig, score_pairs
from ches_curate.scoring.incremental import score_dataset
from ches_curate.selection import select
from ches_curate.store import Store
from ches_curate.tokenization import encode_pair, use_chat_template
from tests.test_ches import make_pairs
from tests.test_score_plugins import reference_logprobs
from tests.test_tokenization import FORMAT_ROWS, load_export, trl_trainer, write_rows

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
LOGPROB_SCORES = ("chosen_logp", "rejected_logp", "chosen_logp_mean", "rejected_logp_mean", "logp_margin")
FEEDS = [
    {"prompt_sharing": "block"}, {"prompt_sharing": "block", "padding_side": "left", "batch_size": 3},
    {"prompt_sharing": "cache", "max_batch_tokens": 64}, {"prompt_sharing": "cache", "batch_size": 1},
    {"share_prompt": False}, {"share_prompt": False, "padding_side": "left", "max_batch_tokens": 10_000},
]


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir"])
def loaded(request):
    return load_model(str(request.getfixturevalue(request.param)))


def expected_logprobs(loaded, pairs, chat_template: bool = True, max_length: int | None = None) -> list[dict]:
    model64 = copy.deepcopy(loaded.model).double()
    out = []
    for pair in pairs:
        ids = encode_pair(loaded.tokenizer, pair, max_length, chat_template)
        chosen = reference_logprobs(model64, ids.prompt_ids, ids.chosen_ids)
        rejected = reference_logprobs(model64, ids.prompt_ids, ids.rejected_ids)
        out.append({"chosen_logp": chosen, "rejected_logp": rejected, "chosen_logp_mean": chosen / len(ids.chosen_ids),
                    "rejected_logp_mean": rejected / len(ids.rejected_ids), "logp_margin": chosen - rejected})
    return out


@pytest.mark.parametrize("feed", FEEDS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_logprob_scores_match_a_float64_reference_however_the_pass_is_fed(loaded, feed):
    pairs = make_pairs()
    table = score_pairs(pairs, loaded, scores=LOGPROB_SCORES, **feed)
    assert list(table.columns[-5:]) == list(LOGPROB_SCORES)  # in the order asked for
    for got, want in zip(table.to_dict("records"), expected_logprobs(loaded, pairs)):
        sums = [k for k in LOGPROB_SCORES if k != "logp_margin"]
        assert {k: got[k] for k in sums} == pytest.approx({k: want[k] for k in sums}, rel=1e-5)
        # A difference of two close sums: its float32 error scales with the sums, not with the margin.
        scale = max(abs(want["chosen_logp"]), abs(want["rejected_logp"]))
        assert got["logp_margin"] == pytest.approx(want["logp_margin"], rel=1e-5, abs=1e-5 * scale)


def test_ches_is_the_same_with_and_without_the_logprob_scores(loaded):
    pairs = make_pairs()
    plain = score_pairs(pairs, loaded)
    both = score_pairs(pairs, loaded, scores=LOGPROB_SCORES)
    assert list(plain.columns) == list(both.columns[:len(plain.columns)])
    assert plain.equals(both[plain.columns])


def trl_reference_logprobs(dataset, loaded, max_length: int | None, output_dir) -> list[tuple[float, float]]:
    """(log pi(y+|x), log pi(y-|x)) per exported row, from TRL's DPOTrainer.compute_ref_log_probs."""
    trainer = trl_trainer(dataset, loaded, max_length, output_dir)
    out = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        out.append((float(chosen[0]), float(rejected[0])))
    return out


TRL_CASES = [  # format, model, chat template, --max-length
    ("prompt_chosen_rejected", "llama", True, None),
    ("prompt_chosen_rejected", "llama", False, 16),
    ("prompt_chosen_rejected", "gpt2", False, None),
    ("conversational_system", "llama", True, None),
    ("conversational_multi_turn", "llama", True, 56),
    ("ultrafeedback", "gpt2", False, None),
    ("hh_rlhf", "llama", True, None),
]


@pytest.mark.parametrize(("fmt", "arch", "chat_template", "max_length"), TRL_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'chat' if c[2] else 'raw'}-{c[3]}" for c in TRL_CASES])
def test_stored_logprob_scores_equal_trls_reference_logprobs_of_the_exported_rows(
        tmp_path, tiny_llama_dir, tiny_gpt2_dir, fmt, arch, chat_template, max_length):
    loaded = load_model(str(tiny_llama_dir if arch == "llama" else tiny_gpt2_dir))
    source = write_rows(tmp_path / f"{fmt}.jsonl", FORMAT_ROWS[fmt])
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset(fmt, str(source), read_pairs(source, on_error="quarantine"))
    scorer = Scorer(loaded, ScoringConfig(max_length=max_length, on_error="quarantine", scores=LOGPROB_SCORES))
    with use_chat_template(chat_template):
        score_dataset(store, fmt, scorer, progress=False)
        selection = select(store, fmt, 1, loaded.key, "top-k", {"k": 0})
    out = tmp_path / "export.jsonl"
    export_dataset(store, out, selection_id=selection.selection_id)
    exported = load_export(out, tmp_path / "hf")
    kept = list(store.dataset_pairs(fmt, 1, selection_id=selection.selection_id, distinct=True))
    stored = store.sql(f"SELECT pair_id, {', '.join(LOGPROB_SCORES)} FROM latest_scores_wide").drop_duplicates(
        "pair_id").set_index("pair_id")
    theirs = trl_reference_logprobs(exported, loaded, max_length, tmp_path / "dpo")
    assert len(theirs) == len(kept) == len(exported) > 0
    for pair, (chosen, rejected) in zip(kept, theirs):
        row = stored.loc[pair.pair_id]
        assert (row.chosen_logp, row.rejected_logp) == pytest.approx((chosen, rejected), rel=1e-4)
        scale = max(abs(chosen), abs(rejected))
        assert row.logp_margin == pytest.approx(chosen - rejected, rel=1e-4, abs=1e-4 * scale)
    summary = store.sql("SELECT score_name, n_scored, model_key FROM plugin_score_summary ORDER BY 1")
    assert summary.score_name.tolist() == sorted(LOGPROB_SCORES) and set(summary.model_key) == {loaded.key}


def test_the_logprob_scores_need_no_second_forward_pass(loaded):
    pairs = make_pairs()
    calls = []
    hook = loaded.model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        scorer = Scorer(loaded, ScoringConfig(prompt_sharing="block", max_batch_tokens=10_000))
        probe_calls = len(calls)
        list(scorer.score_batches(pairs))
        plain = len(calls) - probe_calls
        with_logprobs = Scorer(loaded, ScoringConfig(prompt_sharing="block", max_batch_tokens=10_000,
                                                     scores=LOGPROB_SCORES))
        before = len(calls)
        list(with_logprobs.score_batches(pairs))
    finally:
        hook.remove()
    assert plain == len(calls) - before == 1  # one block-mask pass for all the pairs, either way
