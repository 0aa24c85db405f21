"""Ablations: does filtering high-CHES pairs reduce likelihood displacement and unalignment?

`run_ablation` trains DPO from the same starting weights on several arms of one
dataset version and records one `ablations` row per arm and training seed (plus
per-pair `pair_likelihoods`) in the store. What the arms are is the design
(`ches_curate.configs.DesignConfig`):

- `policies`: `full` (every pair of the version that has a score from the model), one
  arm per policy (`percentile(p=90)`), trained on the pairs it kept, and per policy and
  seed a size-matched control `random(n=<removed>,seed=<seed>)` removing as many pairs
  at random (arms that would be identical are trained once). Every arm trains with
  `TrainConfig.seed`; the seeds only vary the random controls.
- `quantile-slices` (Razin et al., Section 5): per score column and percentile, the
  `slice_size` pairs centred on that percentile (`quantile-slice` policy), each trained
  once per seed. The mean change of log pi(y+|x) against the percentile, one line per
  score, is the paper's Figure 2: a score that identifies displacing pairs orders the
  slices by it.
- `keep-lowest` (Section 6): per seed, `full`, the lowest `keep_fraction` by
  `keep_column` (`length-normalized` policy) and a random subset of the same size,
  all three trained with that seed.

Each pair is trained on once per run, even if the dataset repeats it. Metrics per arm
are over the arm's own training pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ches_curate.configs import DesignConfig
from ches_curate.errors import ChesCurateError
from ches_curate.evaluate import EvalConfig, refusal_rate
from ches_curate.models import LoadedModel, load_model
from ches_curate.pairs import Prompt
from ches_curate.pipeline_config import PolicySpec
from ches_curate.selection import select, selectable_scores
from ches_curate.store import Store
from ches_curate.train import TrainConfig, clone_model, train_dpo

logger = logging.getLogger(__name__)

ABLATION_COLUMNS = (
    "ablation_id", "arm", "policy", "selection_id", "dataset_name", "dataset_version", "model_key", "n_train_pairs",
    "preferred_logp_change", "dispreferred_logp_change", "preferred_decrease_fraction", "ches_logp_corr",
    "ln_ches_logp_corr", "refusal_rate_before", "refusal_rate_after", "train_loss", "reward_accuracy", "wall_time_s",
    "config", "design", "train_seed", "score_column", "percentile",
)
"""Columns of an `ablations` row as written (`created_at` is filled by the store)."""


@dataclass
class Arm:
    """One training run of an ablation: a name, the policy (None for `full`), the pairs it keeps, the seed."""

    name: str
    pair_ids: list[str]
    policy: str | None = None
    params: dict = field(default_factory=dict)
    selection_id: int | None = None
    train_seed: int = 0
    score_column: str | None = None
    """The score a `quantile-slice` or `keep-lowest` arm ranked by."""
    percentile: float | None = None
    """The percentile a `quantile-slice` arm is centred on."""


def run_ablation(
    store: Store,
    dataset: str,
    model: str | LoadedModel,
    policies: Sequence[tuple[str, dict]],
    train_config: TrainConfig,
    eval_prompts: Sequence[Prompt] = (),
    seeds: Sequence[int] = (0,),
    *,
    version: int | None = None,
    eval_config: EvalConfig | None = None,
    design: DesignConfig | None = None,
) -> pd.DataFrame:
    """Train every arm of `design` (default: `policies`) from `model`'s weights, write its rows, return them.

    Scores of `model` for the dataset must be in the store (`ches-curate score`): the
    policies and the CHES correlations read them. Refusal rates are NULL when no
    `eval_prompts` are given. The returned frame has `ABLATION_COLUMNS` plus the
    Spearman correlations `ches_logp_spearman` and `ln_ches_logp_spearman`.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    dv = store.dataset_version(dataset, version)
    if loaded.key not in store.scoring_models(dv.name, dv.version):
        raise ChesCurateError(
            f"dataset {dv.name!r} v{dv.version} has no scores from model {loaded.key}; "
            f"run `ches-curate score --dataset {dv.name} --model ...` with this model first"
        )
    selectable = selectable_scores(store, dv.name, dv.version, loaded.key)
    scores = selectable[0]
    pairs = {p.pair_id: p for p in store.dataset_pairs(dv.name, dv.version, distinct=True)}
    design = design or DesignConfig()
    arms = plan_arms(store, dv.name, dv.version, loaded.key, policies, seeds, scores=selectable, design=design,
                     train_seed=train_config.seed)
    # Train on the ids that were scored: with or without the chat template, as the scores were made.
    chat_template = store.scored_chat_template(dv.name, dv.version, loaded.key)
    eval_config = eval_config or EvalConfig()
    eval_prompts = list(eval_prompts)
    refusal_before = refusal_rate(loaded, eval_prompts, eval_config).rate if eval_prompts else None
    with store.transaction() as con:
        ablation_id = int(con.execute("SELECT nextval('ablation_id_seq')").fetchone()[0])
    rows = []
    for arm in arms:
        folder = _slug(arm.name) if design.design == "policies" else f"{_slug(arm.name)}-seed{arm.train_seed}"
        arm_config = dataclasses.replace(
            train_config, seed=arm.train_seed,
            output_dir=str(Path(train_config.output_dir) / f"ablation-{ablation_id}" / folder),
        )
        trained = dataclasses.replace(loaded, model=clone_model(loaded.model))
        logger.info("ablation %d: training arm %s (seed %d) on %d pairs", ablation_id, arm.name, arm.train_seed,
                    len(arm.pair_ids))
        result = train_dpo(trained, loaded.model, [pairs[i] for i in arm.pair_ids], arm_config,
                           chat_template=chat_template)
        summary = result.displacement(scores)
        trained = dataclasses.replace(trained, model=result.model)
        refusal_after = refusal_rate(trained, eval_prompts, eval_config).rate if eval_prompts else None
        row = {
            "ablation_id": ablation_id, "arm": arm.name, "policy": arm.policy, "selection_id": arm.selection_id,
            "dataset_name": dv.name, "dataset_version": dv.version, "model_key": loaded.key,
            "n_train_pairs": len(arm.pair_ids),
            "preferred_logp_change": summary.preferred_logp_change,
            "dispreferred_logp_change": summary.dispreferred_logp_change,
            "preferred_decrease_fraction": summary.preferred_decrease_fraction,
            "ches_logp_corr": summary.ches_logp_corr, "ln_ches_logp_corr": summary.ln_ches_logp_corr,
            "refusal_rate_before": refusal_before, "refusal_rate_after": refusal_after,
            "train_loss": result.train_loss, "reward_accuracy": result.reward_accuracy,
            "wall_time_s": result.wall_time_s,
            "config": json.dumps(
                {"train": dataclasses.asdict(arm_config), "eval": dataclasses.asdict(eval_config),
                 "n_eval_prompts": len(eval_prompts), "policy_params": arm.params, "global_step": result.global_step,
                 "checkpoint_dir": result.checkpoint_dir, "tokenization_mismatches": result.tokenization_mismatches,
                 "design": dataclasses.asdict(design)},
                default=str,
            ),
            "design": design.design, "train_seed": arm.train_seed, "score_column": arm.score_column,
            "percentile": arm.percentile,
        }
        write_arm(store, row, result.pair_likelihoods())
        rows.append(row | {"ches_logp_spearman": summary.ches_logp_spearman,
                           "ln_ches_logp_spearman": summary.ln_ches_logp_spearman})
        del trained, result
    return pd.DataFrame(rows).astype({"selection_id": "Int64"})


def plan_arms(
    store: Store, name: str, version: int, model_key: str, policies: Sequence[tuple[str, dict]], seeds: Sequence[int],
    *, scores: tuple[pd.DataFrame, int] | None = None, design: DesignConfig | None = None, train_seed: int = 0,
) -> list[Arm]:
    """The training runs of `design` (see the module docstring), their selections saved to the store.

    Every arm, `full` included, leaves quarantined pairs out (`selection.select`);
    `scores` is `selectable_scores(...)` when the caller already read it. `policies` is
    read by the `policies` design only, where every arm trains with `train_seed`.
    """
    design = design or DesignConfig()
    scores = scores if scores is not None else selectable_scores(store, name, version, model_key)
    full = Arm("full", list(dict.fromkeys(scores[0]["pair_id"])))

    def arm(policy: str, params: dict) -> tuple[Arm, int]:
        return _selected_arm(store, name, version, model_key, scores, policy, params)

    runs: dict[tuple[str, int], Arm] = {}

    def add(planned: Arm, seed: int, **fields) -> None:
        runs.setdefault((planned.name, seed), dataclasses.replace(planned, train_seed=seed, **fields))

    if design.design == "policies":
        add(full, train_seed)
        for policy, params in policies:
            selected, n_removed = arm(policy, params)
            add(selected, train_seed)
            for seed in seeds:
                add(arm("random", {"n": n_removed, "seed": seed})[0], train_seed)
    elif design.design == "keep-lowest":
        kept, n_removed = arm("length-normalized", {"fraction": design.keep_fraction,
                                                     "score_column": design.keep_column})
        for seed in seeds:
            add(full, seed)
            add(kept, seed, score_column=design.keep_column)
            add(arm("random", {"n": n_removed, "seed": seed})[0], seed)
    else:
        n_pairs = len(full.pair_ids)
        if design.slice_size * len(design.percentiles) > n_pairs:
            logger.warning("%d slices of %d pairs from %d pairs overlap", len(design.percentiles), design.slice_size,
                           n_pairs)
        for column in design.score_columns:
            for percentile in design.percentiles:
                sliced, _ = arm("quantile-slice", {"percentile": float(percentile), "n": design.slice_size,
                                                   "score_column": column})
                for seed in seeds:
                    add(sliced, seed, score_column=column, percentile=float(percentile))
    return list(runs.values())


def _selected_arm(store: Store, name: str, version: int, model_key: str, scores: tuple[pd.DataFrame, int],
                  policy: str, params: dict) -> tuple[Arm, int]:
    label = PolicySpec(name=policy, params=params).label()
    selection = select(store, name, version, model_key, policy, params, scores=scores, source="ablation")
    if not selection.n_kept:
        raise ChesCurateError(f"arm {label} keeps no pairs; loosen the policy's parameters")
    return Arm(label, selection.kept_pair_ids, policy, dict(params), selection.selection_id), (
        selection.n_pairs - selection.n_kept)


def write_arm(store: Store, row: dict, likelihoods: pd.DataFrame) -> None:
    """Append one `ablations` row and its `pair_likelihoods` in one transaction."""
    ablation = pd.DataFrame([row], columns=list(ABLATION_COLUMNS))
    per_pair = likelihoods.assign(ablation_id=row["ablation_id"], arm=row["arm"], train_seed=row["train_seed"])
    columns = ", ".join(ABLATION_COLUMNS)
    pair_columns = ", ".join(["ablation_id", "arm", "train_seed", *likelihoods.columns])
    with store.transaction() as con:
        con.register("new_ablation", ablation)
        con.register("new_pair_likelihoods", per_pair)
        con.execute(f"INSERT INTO ablations ({columns}) SELECT {columns} FROM new_ablation")
        con.execute(f"INSERT INTO pair_likelihoods ({pair_columns}) SELECT {pair_columns} FROM new_pair_likelihoods")


def _slug(arm: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in arm)
