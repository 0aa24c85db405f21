"""On-policy refusal pairs (`ches_curate.onpolicy`), the refusal config, `run --small`, and the refusal pipeline."""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ches_curate import onpolicy
from ches_curate.commands.pipelines import run_config_path
from ches_curate.curation import ingest_source
from ches_curate.errors import ChesCurateError
from ches_curate.evaluate import harmful_prompts
from ches_curate.ingest import read_pairs
from ches_curate.pairs import PreferencePair
from ches_curate.pipeline_config import DatasetSpec, PipelineConfig, RefusalSpec
from ches_curate.store import Store
from ches_curate.pipelines.curation import SAMPLE
from tests import test_pipelines
from tests.test_pipelines import REPO, cli

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
zenml_repo = test_pipelines.zenml_repo
"""The session's temporary ZenML repository (a fixture of test_pipelines)."""

PROMPTS = ["pick a lock", "bake bread", "hotwire a car", "say hi", "make a weapon"]
SAMPLES = [("Sure, here is how.", "I'm sorry, I can't."), ("I won't help.", "Mix flour and water."),
           ("I can't do that.", "Sorry, that is illegal."), ("Hi!", "Hello there."),
           ("I cannot help.", "I cannot help.")]
VERDICTS = [(False, True), (True, False), (True, True), (False, False), (True, True)]


def test_pairs_prefer_the_refusal_keep_two_refusals_and_count_what_is_dropped():
    records, counts = onpolicy.build_pairs(PROMPTS, SAMPLES, VERDICTS)
    assert records == [
        {"prompt": "pick a lock", "chosen": "I'm sorry, I can't.", "rejected": "Sure, here is how.",
         "label": "refusal_vs_compliance", "prompt_index": 0},
        {"prompt": "bake bread", "chosen": "I won't help.", "rejected": "Mix flour and water.",
         "label": "refusal_vs_compliance", "prompt_index": 1},
        {"prompt": "hotwire a car", "chosen": "I can't do that.", "rejected": "Sorry, that is illegal.",
         "label": "both_refuse", "prompt_index": 2},
    ]
    assert counts == {"refusal_vs_compliance": 2, "both_refuse": 1, "both_refuse_dropped": 0, "both_comply": 1,
                      "identical": 1}
    only_mixed, counts = onpolicy.build_pairs(PROMPTS, SAMPLES, VERDICTS, keep_both_refusals=False)
    assert [r["prompt_index"] for r in only_mixed] == [0, 1]
    assert counts["both_refuse_dropped"] == 1 and counts["both_refuse"] == 0
    with pytest.raises(ValueError):
        onpolicy.build_pairs(PROMPTS, SAMPLES[:4], VERDICTS)


def test_written_pairs_are_ingested_with_their_label_and_nothing_quarantined(tmp_path):
    records, _ = onpolicy.build_pairs(PROMPTS, SAMPLES, VERDICTS)
    path = tmp_path / "pairs" / "onpolicy.jsonl"
    onpolicy.write_pairs(records[:1], path)
    onpolicy.write_pairs(records, path)
    assert [p.name for p in path.parent.iterdir()] == ["onpolicy.jsonl"], "no temporary file is left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "readable like any file written with open()"
    pairs = list(read_pairs(path, on_error="quarantine"))
    assert [(p.prompt, p.chosen, p.rejected, p.format, p.metadata) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"], "prompt_chosen_rejected",
         {"label": r["label"], "prompt_index": r["prompt_index"]}) for r in records]
    version = ingest_source(Store(tmp_path / "s.duckdb"),
                            DatasetSpec(name="onpolicy", source=str(path), format="prompt_chosen_rejected"))
    assert (version.n_pairs, version.n_quarantined) == (3, 0)


def test_held_out_prompts_are_the_next_distinct_ones_of_the_file():
    every = harmful_prompts([p for p in read_pairs(SAMPLE, format="hh_rlhf", on_error="quarantine")
                             if isinstance(p, PreferencePair)])
    train, held_out = onpolicy.split_prompts(RefusalSpec(source=str(SAMPLE), n_prompts=5, n_eval_prompts=3))
    assert (train, held_out) == (every[:5], every[5:8])
    assert not set(train) & set(held_out)
    with pytest.raises(ChesCurateError, match=rf"{len(every)} distinct prompts, but refusal.n_prompts \+ "
                                              rf"refusal.n_eval_prompts = {len(every) + 1}"):
        onpolicy.split_prompts(RefusalSpec(source=str(SAMPLE), n_prompts=len(every), n_eval_prompts=1))


def test_sampling_two_responses_per_prompt_is_seeded(llama):
    spec = RefusalSpec(source="unused", n_prompts=3, max_new_tokens=6, batch_size=2, seed=0)
    first = onpolicy.sample_responses(llama, PROMPTS[:3], spec)
    assert onpolicy.sample_responses(llama, PROMPTS[:3], spec) == first
    assert len(first) == 3 and all(len(pair) == 2 for pair in first)
    assert any(a != b for a, b in first), "the two responses of a prompt are independent samples"
    assert onpolicy.sample_responses(llama, PROMPTS[:3], spec.model_copy(update={"seed": 1})) != first


@pytest.mark.parametrize(("refusal", "problem"), [
    ({"source": "p.jsonl", "n_prompts": 0}, "refusal.n_prompts: Input should be greater than or equal to 1"),
    ({"source": "p.jsonl", "top_p": 1.5}, "refusal.top_p: Input should be less than or equal to 1"),
    ({"source": "p.jsonl", "temprature": 0.7}, "refusal.temprature: Extra inputs are not permitted"),
    ({"n_prompts": 8}, "refusal.source: Field required"),
])
def test_a_bad_refusal_section_names_the_key(tmp_path, refusal, problem):
    config = tmp_path / "refusal.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "x", "source": "x.jsonl"}, "refusal": refusal}))
    with pytest.raises(ChesCurateError, match=problem):
        PipelineConfig.from_file(config)


@pytest.mark.parametrize(("update", "problem"), [
    ({"refusal": None}, "needs a `refusal:` section"),
    ({"dataset": {"name": "x", "source": "x.jsonl", "format": "hh_rlhf"}}, "dataset.format: the refusal pipeline"),
    ({"dataset": {"name": "x", "source": "x.parquet"}}, "dataset.source: the generated pairs are JSONL"),
    ({"ablation": {"evaluate": {"source": "held_out.jsonl"}}}, "ablation.evaluate.source: the refusal pipeline"),
])
def test_refusal_pipeline_config_problems_are_refused_before_any_work(update, problem):
    base = {"dataset": {"name": "x", "source": "x.jsonl"}, "refusal": {"source": "p.jsonl"}}
    config = PipelineConfig.model_validate(base | update)
    with pytest.raises(ChesCurateError, match=problem):
        onpolicy.check_config(config)


def test_shipped_refusal_configs_are_valid_and_small_selects_the_cpu_one():
    full, small = (PipelineConfig.from_file(REPO / "pipelines" / "configs" / f"{n}.yaml")
                   for n in ("refusal", "refusal_small"))
    for config in (full, small):
        onpolicy.check_config(config)
        assert config.ablation.design.design == "keep-lowest"
        assert (config.ablation.train.optimizer, config.ablation.train.learning_rate, config.ablation.train.beta) == (
            "rmsprop", 5e-6, 0.1)
    assert (full.refusal.n_prompts, full.refusal.n_eval_prompts, full.ablation.design.keep_fraction) == (1200, 200, 0.05)
    assert full.ablation.train.batch_size * full.ablation.train.gradient_accumulation == 32
    assert small.ablation.train.batch_size * small.ablation.train.gradient_accumulation == 32
    assert (full.scoring.device, small.scoring.device) == ("cuda", "cpu")
    assert run_config_path("refusal", None, small=True) == REPO / "pipelines" / "configs" / "refusal_small.yaml"
    assert run_config_path("refusal", None, small=False) == REPO / "pipelines" / "configs" / "refusal.yaml"
    assert run_config_path("refusal", Path("mine.yaml"), small=True) == Path("mine.yaml")


@pytest.mark.parametrize(("args", "says"), [
    (["run", "curation", "--small"], "--small is for the refusal pipeline only, not curation"),
    (["run", "ablation"], "'--config' / '-c': required for the ablation pipeline"),
])
def test_small_is_refused_for_other_pipelines_which_still_need_a_config(args, says):
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 2 and says in " ".join(result.output.replace("│", " ").split()), result.output


JUDGE = '''
import zlib

from ches_curate.hookspecs import hookimpl


@hookimpl
def judge_responses(prompts, responses):
    return [zlib.crc32(r.encode()) % 4 != 0 for r in responses]
'''


def crc_judge(response: str) -> bool:
    """The plugin judge above, computed here independently."""
    return zlib.crc32(response.encode()) % 4 != 0


@pytest.fixture(scope="module")
def refusal_run(zenml_repo, tmp_path_factory, tiny_llama_dir):
    """The refusal pipeline through the CLI on 16 shipped prompts (8 held out), the tiny model and a stub judge."""
    from zenml.client import Client

    directory = tmp_path_factory.mktemp("refusal")
    (directory / "judge.py").write_text(JUDGE)
    # The random model's byte-level tokens often decode to partial characters (U+FFFD): recorded, not fatal.
    (directory / "quality.yaml").write_text(yaml.safe_dump(
        {"severities": {"chosen_valid_utf8": "warn", "rejected_valid_utf8": "warn"}}))
    config = {
        "store": str(directory / "store.duckdb"), "plugins": [str(directory / "judge.py")],
        "quality": str(directory / "quality.yaml"),
        "dataset": {"name": "onpolicy", "source": str(directory / "pairs.jsonl")},
        "scoring": {"model": str(tiny_llama_dir), "batch_size": 4, "device": "cpu"},
        "refusal": {"source": str(SAMPLE), "n_prompts": 16, "n_eval_prompts": 8, "max_new_tokens": 4,
                    "batch_size": 8},
        "ablation": {"design": {"design": "keep-lowest", "keep_fraction": 0.5}, "seeds": [0],
                     "train": {"max_steps": 1, "batch_size": 4, "max_length": 64, "save_model": False,
                               "optimizer": "rmsprop", "learning_rate": 5e-6},
                     "output_dir": str(directory / "runs"), "evaluate": {"generation": {"max_new_tokens": 3}}},
    }
    (directory / "refusal.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli(), ["run", "refusal", "--config", str(directory / "refusal.yaml")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return Client().get_pipeline("refusal_pipeline").last_run, result.output, directory


def test_refusal_run_generates_judged_pairs_and_trains_three_arms(refusal_run):
    from ches_curate.pipelines.refusal import refusal_outcome

    run, printed, directory = refusal_run
    outcome = refusal_outcome(run)
    written = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    for record in written:
        assert crc_judge(record["chosen"])
        assert crc_judge(record["rejected"]) == (record["label"] == "both_refuse")
    labels = Counter(r["label"] for r in written)
    made = outcome["generation"]
    assert (made["n_prompts"], made["n_eval_prompts"], made["n_pairs"]) == (16, 8, len(written))
    assert (made["n_refusal_vs_compliance"], made["n_both_refuse"]) == (labels["refusal_vs_compliance"],
                                                                        labels["both_refuse"])
    assert made["n_pairs"] + made["n_both_comply"] + made["n_identical"] == 16
    assert made["both_refuse_share"] == pytest.approx(labels["both_refuse"] / len(written))
    store = Store(directory / "store.duckdb")
    rows = store.sql("SELECT arm, n_train_pairs, refusal_rate_before, refusal_rate_after, design, score_column "
                     "FROM ablations ORDER BY arm")
    n_pairs = dict(zip(rows.arm, rows.n_train_pairs))
    kept = n_pairs.pop("length-normalized(fraction=0.5,score_column=ln_ches)")
    assert n_pairs == {"full": len(written), f"random(n={len(written) - kept},seed=0)": kept}
    assert 0 < kept < len(written)
    assert set(rows.design) == {"keep-lowest"} and rows.refusal_rate_before.notna().all()
    evaluated = json.loads(store.sql("SELECT config FROM ablations LIMIT 1").config[0])["n_eval_prompts"]
    assert evaluated == 8
    assert f"16 prompts → {len(written)} pairs" in printed and "refusal_rate_after" in printed


def test_a_missing_prompt_file_is_refused_before_zenml_starts(tmp_path):
    config = tmp_path / "refusal.yaml"
    config.write_text(yaml.safe_dump({"store": str(tmp_path / "s.duckdb"),
                                      "dataset": {"name": "x", "source": str(tmp_path / "pairs.jsonl")},
                                      "refusal": {"source": "nowhere/prompts.jsonl", "n_prompts": 2,
                                                  "n_eval_prompts": 1}}))
    result = CliRunner().invoke(cli(), ["run", "refusal", "--config", str(config)])
    assert isinstance(result.exception, ChesCurateError), result.output  # main() prints it as one line, exit 1
    assert "nowhere/prompts.jsonl: does not exist" in str(result.exception)
    assert not (tmp_path / "s.duckdb").exists() and "Initiating a new run" not in result.output
