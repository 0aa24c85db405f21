"""On-policy refusal pairs (Razin et al., Section 6): the model's own responses to harmful prompts, refusal preferred.

The model samples two responses to each training prompt; the refusal judge
(`evaluate.judge`: the `judge_responses` hook, else the phrase classifier) labels
each one, and the prompt becomes a pair by how the two were judged:

- exactly one refuses: the refusal is preferred (`label` = `refusal_vs_compliance`);
- both refuse: kept with the first sample preferred (`both_refuse`). The two are
  i.i.d. samples, so which one is y+ is arbitrary. In the paper most pairs (> 70%)
  are of this kind, and their two similar refusals (high CHES) are what displaces
  the likelihood of refusing;
- neither refuses: dropped, counted in `n_both_comply`;
- both refuse word for word: dropped, counted in `n_identical` (a pair needs two
  different responses; ingest would quarantine it).

The pairs go to a JSONL file in the `prompt_chosen_rejected` format that `ingest`
reads. The held-out evaluation prompts are the next distinct prompts of the same file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ches_curate.atomic_files import replace_atomically
from ches_curate.configs import EvalConfig
from ches_curate.errors import ChesCurateError
from ches_curate.ingest import read_pairs
from ches_curate.pairs import PreferencePair
from ches_curate.pipeline_config import PipelineConfig, RefusalSpec, ScoringSpec

LABELS = ("refusal_vs_compliance", "both_refuse")
"""The `label` column of the pairs written."""


@dataclass
class OnPolicyPairs:
    """What `generate_pairs` wrote: counts per outcome (they add up to `n_prompts`) and the held-out prompts."""

    path: str
    n_prompts: int
    n_pairs: int
    n_refusal_vs_compliance: int
    n_both_refuse: int
    """Both-refusal pairs written (0 when `keep_both_refusals` is false)."""
    n_both_refuse_dropped: int
    n_both_comply: int
    n_identical: int
    sample_refusal_rate: float
    """Refusals among the 2 * n_prompts sampled responses: the starting model's refusal rate under sampling."""
    wall_time_s: float = 0.0
    eval_prompts: list[str] = field(default_factory=list, repr=False)

    @property
    def both_refuse_share(self) -> float:
        """Both-refusal pairs among the pairs written (the paper: > 70%)."""
        return self.n_both_refuse / self.n_pairs if self.n_pairs else float("nan")

    def metadata(self) -> dict:
        """The counts as JSON-ready metadata (the prompts left out)."""
        counts = {k: v for k, v in asdict(self).items() if k != "eval_prompts"}
        return counts | {"both_refuse_share": self.both_refuse_share, "n_eval_prompts": len(self.eval_prompts)}


def split_prompts(spec: RefusalSpec) -> tuple[list[str], list[str]]:
    """The first `n_prompts` distinct first human turns of `spec.source` (training) and the next `n_eval_prompts`."""
    from ches_curate.evaluate import harmful_prompts

    wanted = spec.n_prompts + spec.n_eval_prompts
    pairs = (item for item in read_pairs(spec.source, format=spec.format, on_error="quarantine")
             if isinstance(item, PreferencePair))
    prompts = harmful_prompts(pairs, wanted)
    if len(prompts) < wanted:
        raise ChesCurateError(
            f"{spec.source}: {len(prompts)} distinct prompts, but refusal.n_prompts + refusal.n_eval_prompts = "
            f"{wanted}; lower them or use a larger prompt file")
    return prompts[: spec.n_prompts], prompts[spec.n_prompts:]


def sample_responses(model, prompts: Sequence[str], spec: RefusalSpec) -> list[tuple[str, str]]:
    """Two sampled responses per prompt from `model` (has `.model`, `.tokenizer`), chat template as in scoring.

    Temperature and nucleus sampling (`spec.temperature`, `spec.top_p`; top-k off), seeded
    with `spec.seed` before the first batch: the same prompts, settings and device give the same responses.
    A U+FFFD left at the end by the token limit (a split character) is removed.
    """
    import torch

    from ches_curate.evaluate import generate

    torch.manual_seed(spec.seed)
    config = EvalConfig(max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size,
                        max_prompt_tokens=spec.max_prompt_tokens)
    sampling = {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0,
                "num_return_sequences": 2}
    texts = generate(model.model, model.tokenizer, list(prompts), config, sampling=sampling)
    # A response cut at max_new_tokens can end inside a multi-byte character, decoded as U+FFFD, which the
    # quality suite refuses; the cut-off bytes carry nothing, so they go.
    texts = [text.rstrip("\ufffd") for text in texts]
    return list(zip(texts[0::2], texts[1::2]))


def build_pairs(prompts: Sequence[str], samples: Sequence[tuple[str, str]], refusals: Sequence[tuple[bool, bool]],
                keep_both_refusals: bool = True) -> tuple[list[dict], dict[str, int]]:
    """The pair records (prompt, chosen, rejected, label, prompt_index) and the count of each outcome.

    Outcomes (see the module docstring): `refusal_vs_compliance`, `both_refuse`, `both_refuse_dropped`
    (two refusals with `keep_both_refusals` false), `both_comply`, `identical`.
    """
    records, counts = [], dict.fromkeys(("refusal_vs_compliance", "both_refuse", "both_refuse_dropped",
                                         "both_comply", "identical"), 0)
    for index, (prompt, (first, second), (first_refuses, second_refuses)) in enumerate(
            zip(prompts, samples, refusals, strict=True)):
        if first_refuses != second_refuses:
            outcome = "refusal_vs_compliance"
            chosen, rejected = (first, second) if first_refuses else (second, first)
        elif not first_refuses:
            outcome = "both_comply"
        elif first.strip() == second.strip():
            outcome = "identical"
        elif keep_both_refusals:
            outcome, chosen, rejected = "both_refuse", first, second
        else:
            outcome = "both_refuse_dropped"
        counts[outcome] += 1
        if outcome in LABELS:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "label": outcome,
                            "prompt_index": index})
    return records, counts


def write_pairs(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write `records` as JSONL to `path` atomically (`atomic_files.replace_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        with open(staging, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    replace_atomically(path, write)
    return path


def generate_pairs(spec: RefusalSpec, scoring: ScoringSpec, output: str | os.PathLike) -> OnPolicyPairs:
    """Sample, judge and pair the training prompts with the scoring model; write the pairs to `output`."""
    from ches_curate.evaluate import judge
    from ches_curate.models import load_model

    started = time.perf_counter()
    train_prompts, eval_prompts = split_prompts(spec)
    model = load_model(scoring.model, scoring.device, scoring.dtype)
    samples = sample_responses(model, train_prompts, spec)
    verdicts = judge([p for p in train_prompts for _ in range(2)], [text for pair in samples for text in pair])
    records, counts = build_pairs(train_prompts, samples, list(zip(verdicts[0::2], verdicts[1::2])),
                                  spec.keep_both_refusals)
    if not records:
        raise ChesCurateError(f"none of the {len(train_prompts)} prompts gave a pair with a refusal "
                              f"({counts['both_comply']} with two compliant responses); check the judge or the model")
    path = write_pairs(records, output)
    return OnPolicyPairs(
        path=str(path.resolve()), n_prompts=len(train_prompts), n_pairs=len(records),
        n_refusal_vs_compliance=counts["refusal_vs_compliance"], n_both_refuse=counts["both_refuse"],
        n_both_refuse_dropped=counts["both_refuse_dropped"], n_both_comply=counts["both_comply"],
        n_identical=counts["identical"], sample_refusal_rate=sum(verdicts) / len(verdicts),
        wall_time_s=time.perf_counter() - started, eval_prompts=eval_prompts,
    )


def check_config(config: PipelineConfig) -> None:
    """Fail before any work when `config` cannot drive the refusal pipeline (a clear message per problem)."""
    if config.refusal is None:
        raise ChesCurateError("the refusal pipeline needs a `refusal:` section (like the shipped `refusal` config)")
    if config.ablation.evaluate.source is not None:
        raise ChesCurateError("ablation.evaluate.source: the refusal pipeline evaluates on refusal's held-out prompts "
                              "(refusal.n_eval_prompts); remove it")
    if config.dataset.format not in ("auto", "prompt_chosen_rejected"):
        raise ChesCurateError(f"dataset.format: the refusal pipeline writes prompt_chosen_rejected pairs to "
                              f"dataset.source, not {config.dataset.format}; set it to auto or prompt_chosen_rejected")
    if Path(config.dataset.source).suffix not in (".jsonl", ".ndjson"):
        raise ChesCurateError(f"dataset.source: the generated pairs are JSONL; name the file *.jsonl, not "
                              f"{config.dataset.source}")
