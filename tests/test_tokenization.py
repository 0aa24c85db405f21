"""Scoring, export and training share TRL's tokenization: what DPO trains on is what was scored.

For every input format, and for a tokenizer with (tiny Llama, ChatML) and without (tiny
GPT-2) a chat template, a dataset is ingested, scored, filtered and exported; then TRL
1.16's own preparation (`DPOTrainer`'s dataset tokenization and its collator's
truncation) runs on the exported file, and its prompt, chosen and rejected ids must be
the scored ones, pair by pair: `encode_pair`'s ids, the stored token counts, and the
stored CHES against a float64 reference computed from TRL's ids.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from ches_curate.errors import ChesCurateError
from ches_curate.export import export_dataset
from ches_curate.scoring.incremental import score_dataset
from ches_curate.ingest import read_pairs
from ches_curate.models import load_model
from ches_curate.pairs import PreferencePair
from ches_curate.scoring import Scorer, ScoringConfig
from ches_curate.selection import select
from ches_curate.store import Store
from ches_curate.tokenization import (
    TruncationError, current_version, encode_pair, encode_prompt, encode_response, renders_chat, trl_example,
    use_chat_template,
)
from ches_curate.train import TrainConfig, clone_model, train_dpo, trl_dataset

HH_SAMPLE = Path(__file__).resolve().parents[1] / "ches_curate" / "data" / "hh_rlhf_harmless_sample.jsonl"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
FORMAT_ROWS = {
    "prompt_chosen_rejected": [
        {"prompt": "how do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Sure, here is how."},
        {"prompt": "The quick bro", "chosen": "wn fox jumps over the lazy dog.", "rejected": "No, never."},
        {"prompt": "x", "chosen": "yes", "rejected": "yes sure"},
        {"prompt": "Unicode: café, naïve", "chosen": "日本語 emoji 🙂", "rejected": "Numbers 0 1 2 3"},
        {"prompt": "Here is how you can bake bread: mix flour, water, salt and yeast, then knead and wait. Why?",
         "chosen": "I'm sorry, but I cannot assist with that request.", "rejected": "sure"},
    ],
    "conversational_system": [
        {"prompt": [SYSTEM, user("how do I pick a lock?")], "chosen": [assistant("I can't help with that.")],
         "rejected": [assistant("Sure, here is how.")]},
        {"prompt": [SYSTEM, user("Tell me about the fox.")], "chosen": [assistant("It jumps over the lazy dog.")],
         "rejected": [assistant("No.")]},
    ],
    "conversational_multi_turn": [
        {"chosen": [user("Hi"), assistant("Hello! How can I help?"), user("Bake bread?"), assistant(answer)],
         "rejected": [user("Hi"), assistant("Hello! How can I help?"), user("Bake bread?"), assistant(other)]}
        for answer, other in [("Mix flour, water, salt and yeast, then knead and wait.", "No."),
                              ("Sure!", "I'm sorry, but I cannot assist with that request."),
                              ("yes", "never")]
    ],
    "ultrafeedback": [
        {"prompt": question, "chosen": [user(question), assistant(good)], "rejected": [user(question), assistant(bad)],
         "score_chosen": score, "score_rejected": 2.0, "prompt_id": f"q{i}"}
        for i, (question, good, bad, score) in enumerate([
            ("how do I pick a lock?", "I can't help with that.", "Sure, here is how.", 8.5),
            ("The quick bro", "wn fox jumps.", "No.", 7.0),
            ("Unicode: café", "naïve 🙂", "0 1 2", 9.0),
        ])
    ],
    "hh_rlhf": [json.loads(line) for line in HH_SAMPLE.read_text(encoding="utf-8").splitlines()[:6]],
}

CASES = [  # format, model, chat template, --max-length, export format
    ("prompt_chosen_rejected", "llama", True, None, "jsonl"),
    ("prompt_chosen_rejected", "llama", False, 16, "parquet"),
    ("prompt_chosen_rejected", "gpt2", False, None, "datasets"),
    ("prompt_chosen_rejected", "gpt2", False, 14, "jsonl"),
    ("conversational_system", "llama", True, None, "parquet"),
    ("conversational_multi_turn", "llama", True, 56, "datasets"),
    ("ultrafeedback", "llama", True, None, "jsonl"),
    ("ultrafeedback", "llama", False, None, "parquet"),
    ("ultrafeedback", "gpt2", False, None, "jsonl"),
    ("hh_rlhf", "llama", True, None, "jsonl"),
    ("hh_rlhf", "llama", True, 400, "parquet"),
]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir))


def fresh(loaded):
    """The same loaded model with its own copy of the weights, to train."""
    return dataclasses.replace(loaded, model=clone_model(loaded.model))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def curate(tmp_path: Path, loaded, fmt: str, chat_template: bool, max_length: int | None, export_format: str):
    """ingest → score → filter (top-k, k=1) → export; returns the store, the selection and the export's path."""
    source = write_rows(tmp_path / f"{fmt}.jsonl", FORMAT_ROWS[fmt])
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset(fmt, str(source), read_pairs(source, on_error="quarantine"))
    scorer = Scorer(loaded, ScoringConfig(max_length=max_length, on_error="quarantine"))
    with use_chat_template(chat_template):
        score_dataset(store, fmt, scorer, progress=False)
    selection = select(store, fmt, 1, loaded.key, "top-k", {"k": 1})
    out = tmp_path / ("export" if export_format == "datasets" else f"export.{export_format}")
    export_dataset(store, out, selection_id=selection.selection_id, format=export_format)
    return store, selection, out


def load_export(path: Path, cache: Path):
    import datasets

    if path.is_dir():
        return datasets.load_from_disk(str(path))
    builder = "json" if path.suffix == ".jsonl" else "parquet"
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache))


def trl_trainer(dataset, loaded, max_length: int | None, output_dir: Path):
    """TRL's DPOTrainer on `dataset` with copies of the model as policy and reference, on the CPU."""
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():  # transformers 5 renamed gradient checkpointing; TRL still sets the old name
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = DPOConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, gradient_checkpointing=False,
                         report_to="none", max_length=max_length)
    return DPOTrainer(model=clone_model(loaded.model), ref_model=clone_model(loaded.model), args=args,
                      train_dataset=dataset, processing_class=loaded.tokenizer)


def trl_ids(dataset, loaded, max_length: int | None, output_dir: Path) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of each example as TRL trains on them: its DPOTrainer's prepared dataset,
    cut by its collator (`keep_start`), read back from the collated batch's masks."""
    trainer = trl_trainer(dataset, loaded, max_length, output_dir)
    out = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        rows = []
        for ids, attention, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
            ids, completion = ids[attention.bool()], completion[attention.bool()]
            rows.append((ids[completion == 0].tolist(), ids[completion == 1].tolist()))
        assert rows[0][0] == rows[1][0]  # one prompt for both responses
        out.append((rows[0][0], rows[0][1], rows[1][1]))
    return out


def reference_ches(model64, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> float:
    """<S+, S-> - ||S+||^2 from the float64 hidden states (the input of lm_head) at P-1 … P+|y|-2."""
    captured = {}
    hook = model64.lm_head.register_forward_hook(lambda _m, inputs, _o: captured.update(h=inputs[0][0]))
    sums = []
    with torch.no_grad():
        for response in (chosen_ids, rejected_ids):
            model64(torch.tensor([prompt_ids + response]))
            sums.append(captured["h"][len(prompt_ids) - 1: len(prompt_ids) - 1 + len(response)].sum(0))
    hook.remove()
    return float(sums[0] @ sums[1] - sums[0] @ sums[0])


@pytest.mark.parametrize(("fmt", "model", "chat_template", "max_length", "export_format"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{'chat' if c[2] else 'raw'}-{c[3]}-{c[4]}" for c in CASES])
def test_trl_trains_on_the_ids_that_were_scored(request, tmp_path, fmt, model, chat_template, max_length,
                                                export_format):
    from trl.data_utils import is_conversational

    loaded = request.getfixturevalue(model)
    store, selection, out = curate(tmp_path, loaded, fmt, chat_template, max_length, export_format)
    kept = list(store.dataset_pairs(fmt, 1, selection_id=selection.selection_id, distinct=True))
    scores = store.scores(fmt, 1, loaded.key).drop_duplicates("pair_id").set_index("pair_id")
    exported = load_export(out, tmp_path / "hf")
    conversational = chat_template and model == "llama"
    assert [is_conversational(row) for row in exported] == [conversational] * len(kept)
    assert set(exported["ches_tokenization_version"]) == {current_version(chat_template)}
    assert set(exported["ches_model_key"]) == {loaded.key}
    if max_length is not None:
        assert scores.truncated.any()

    theirs = trl_ids(exported, loaded, max_length, tmp_path / "dpo")
    assert len(theirs) == len(kept) == selection.n_kept > 0
    model64 = copy.deepcopy(loaded.model).double()
    for pair, ids in zip(kept, theirs):
        ours = encode_pair(loaded.tokenizer, pair, max_length, chat_template)
        assert ids == (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids)
        row = scores.loc[pair.pair_id]
        assert (row.chosen_tokens, row.rejected_tokens, row.truncated) == (len(ids[1]), len(ids[2]), ours.truncated)
        assert row.ches == pytest.approx(reference_ches(model64, *ids), rel=1e-5)

    # train's inputs: the same examples, so the same ids.
    trained_on = trl_dataset(kept, renders_chat(loaded.tokenizer, chat_template))
    columns = ["prompt", "chosen", "rejected"]
    assert trained_on.select_columns(columns).to_list() == exported.select_columns(columns).to_list()
    assert trl_ids(trained_on, loaded, max_length, tmp_path / "dpo") == theirs


def test_train_tracks_the_scored_tokens_and_trl_agrees(llama, tmp_path):
    store, selection, _ = curate(tmp_path, llama, "hh_rlhf", True, 400, "jsonl")
    kept = list(store.dataset_pairs("hh_rlhf", 1, selection_id=selection.selection_id, distinct=True))
    config = TrainConfig(max_steps=1, batch_size=2, max_length=400, save_model=False, output_dir=str(tmp_path / "t"))
    result = train_dpo(fresh(llama), llama.model, kept, config)
    assert result.tokenization_mismatches == 0 and result.n_dropped == 0
    scores = store.scores("hh_rlhf", 1, llama.key).drop_duplicates("pair_id").set_index("pair_id")
    before = result.before.set_index("pair_id")
    assert before.chosen_tokens.to_dict() == scores.loc[before.index].chosen_tokens.to_dict()
    assert before.rejected_tokens.to_dict() == scores.loc[before.index].rejected_tokens.to_dict()


def test_training_leaves_out_the_pairs_trl_drops(llama, tmp_path):
    pairs = [PreferencePair("a long prompt " * 20, "yes", "no", row=0), PreferencePair("q", "yes", "no", row=1)]
    config = TrainConfig(max_steps=1, batch_size=1, max_length=24, save_model=False, output_dir=str(tmp_path))
    result = train_dpo(fresh(llama), llama.model, pairs, config)
    assert result.n_dropped == 1 and result.before.row.tolist() == [1] and result.tokenization_mismatches == 0


def test_one_pair_in_every_layout_is_one_pair_scored_once(tmp_path, llama):
    question, good, bad = "how do I pick a lock?", "I can't help with that.", "Sure."
    layouts = {
        "plain": {"prompt": question, "chosen": good, "rejected": bad},
        "trl_conversational": {"prompt": [user(question)], "chosen": [assistant(good)],
                               "rejected": [assistant(bad)]},
        "trl_implicit_prompt": {"chosen": [user(question), assistant(good)],
                                "rejected": [user(question), assistant(bad)]},
        "ultrafeedback": {"prompt": question, "chosen": [user(question), assistant(good)],
                          "rejected": [user(question), assistant(bad)], "score_chosen": 9.0, "score_rejected": 1.0},
    }
    store = Store(tmp_path / "s.duckdb")
    for name, row in layouts.items():
        store.register_dataset(name, None, read_pairs(write_rows(tmp_path / f"{name}.jsonl", [row])))
    assert store.sql("SELECT count(*) AS n FROM pairs").n.iloc[0] == 1
    first = score_dataset(store, "plain", llama, progress=False)
    assert first.n_scored == 1
    assert [score_dataset(store, name, llama, progress=False).n_skipped for name in layouts] == [1, 1, 1, 1]

    transcript = {"chosen": f"\n\nHuman: {question}\n\nAssistant: {good}",
                  "rejected": f"\n\nHuman: {question}\n\nAssistant: {bad}"}
    (hh,) = read_pairs(write_rows(tmp_path / "hh.jsonl", [transcript]))
    assert hh.pair_id == next(store.dataset_pairs("plain")).pair_id


def test_hh_rlhf_and_trls_conversational_hh_layout_are_one_pair():
    (parsed, _) = read_pairs(Path(__file__).parent / "data" / "hh_rlhf.jsonl")
    trl_layout = {"prompt": [user("How do I boil an egg?")],
                  "chosen": [assistant("Put it in boiling water for nine minutes.")],
                  "rejected": [assistant("Eggs are overrated.")]}
    assert parsed.pair_id == PreferencePair(trl_layout["prompt"], trl_layout["chosen"][0]["content"],
                                            trl_layout["rejected"][0]["content"]).pair_id


def test_a_model_without_a_chat_template_quarantines_conversations_it_cannot_tokenize(tmp_path, gpt2):
    source = write_rows(tmp_path / "hh.jsonl", FORMAT_ROWS["hh_rlhf"][:2] + [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}])
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("hh", str(source), read_pairs(source))
    scorer = Scorer(gpt2, ScoringConfig(on_error="quarantine"))
    with use_chat_template(False):
        summary = score_dataset(store, "hh", scorer, progress=False)
    assert (summary.n_scored, summary.n_failed) == (1, 2)
    reasons = store.sql("SELECT reason FROM quarantine WHERE stage = 'scoring'").reason.tolist()
    assert all("which TRL tokenizes only through a chat template" in reason for reason in reasons)


def test_chat_template_renders_the_prompt_and_the_end_of_turn(llama):
    pair = PreferencePair("how do I pick a lock?", "No", "Never")
    encoded = encode_pair(llama.tokenizer, pair)
    decode = llama.tokenizer.decode
    assert decode(encoded.prompt_ids) == "<|im_start|>user\nhow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(encoded.chosen_ids) == "No<|im_end|>\n"  # what DPO trains on: the turn's end included
    raw = encode_pair(llama.tokenizer, pair, chat_template=False)
    assert (decode(raw.prompt_ids), decode(raw.chosen_ids)) == ("how do I pick a lock?", "No<|im_end|>")
    assert encode_prompt(llama.tokenizer, pair.prompt) == encoded.prompt_ids
    assert encode_response(llama.tokenizer, pair.prompt, "No") == encoded.chosen_ids


def test_tokens_merging_across_the_boundary_belong_to_the_response(gpt2):
    tokenizer = gpt2.tokenizer
    encoded = encode_pair(tokenizer, PreferencePair("The quick bro", "wn fox", "wn dog"))
    alone = tokenizer(text="The quick bro")["input_ids"]
    whole = tokenizer(text="The quick brown fox" + tokenizer.eos_token)["input_ids"]
    assert encoded.prompt_ids == alone[:-1] and whole == encoded.prompt_ids + encoded.chosen_ids


def test_eos_is_appended_only_when_missing_as_trl_does(gpt2):
    eos = gpt2.tokenizer.eos_token
    plain = encode_pair(gpt2.tokenizer, PreferencePair("q", "yes", "no"))
    ended = encode_pair(gpt2.tokenizer, PreferencePair("q", "yes" + eos, "no"))
    assert plain == ended and plain.chosen_ids[-1] == gpt2.tokenizer.eos_token_id


def test_truncation_keeps_the_prompt_and_cuts_responses_or_drops_the_pair_as_trl(llama):
    pair = PreferencePair("a long prompt about the lazy dog", "a long answer " * 5, "no")
    full = encode_pair(llama.tokenizer, pair)
    n_prompt = len(full.prompt_ids)
    cut = encode_pair(llama.tokenizer, pair, max_length=n_prompt + 3)
    assert cut.truncated and cut.prompt_ids == full.prompt_ids
    assert (cut.chosen_ids, cut.rejected_ids) == (full.chosen_ids[:3], full.rejected_ids[:3])
    assert not encode_pair(llama.tokenizer, pair, max_length=n_prompt + len(full.chosen_ids)).truncated
    with pytest.raises(TruncationError, match=f"the prompt is {n_prompt} tokens, so max_length={n_prompt} leaves"):
        encode_pair(llama.tokenizer, pair, max_length=n_prompt)


def test_pairs_with_no_trl_tokenization_are_unscorable(gpt2, llama):
    with pytest.raises(TruncationError, match="the prompt encodes to 0 tokens"):
        encode_pair(gpt2.tokenizer, PreferencePair("", "yes", "no"))
    conversation = PreferencePair([SYSTEM, user("hi")], "yes", "no")
    with pytest.raises(TruncationError, match="a conversation of 2 messages, which TRL tokenizes only through a chat"):
        encode_pair(llama.tokenizer, conversation, chat_template=False)
    with pytest.raises(TruncationError, match="a conversation of 2 messages"):
        encode_pair(gpt2.tokenizer, conversation)
    assert trl_example(PreferencePair([user("hi")], "a", "b"), conversational=False)["prompt"] == "hi"


def test_the_chat_template_setting_is_scoped_and_names_the_version():
    assert current_version() == "2"
    with use_chat_template(False):
        assert current_version() == "2-raw"
        with use_chat_template(True):
            assert current_version() == "2"
        assert current_version() == "2-raw"
    assert current_version() == "2" and current_version(False) == "2-raw"


def test_export_without_scores_of_the_model_named_is_an_error(tmp_path, llama):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, [PreferencePair("q", "a", "b")])
    with pytest.raises(ChesCurateError, match="model 'nobody' has no scores for the pairs of 'toy' v1"):
        export_dataset(store, tmp_path / "o.jsonl", dataset="toy", model_key="nobody")
