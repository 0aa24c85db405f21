"""DPO fine-tuning with TRL's `DPOTrainer`, with per-pair likelihood tracking.

`train_dpo(model, ref_model, pairs, config)` trains `model` in place and records
log pi(y+|x), log pi(y-|x) of every training pair before and after (and every
`track_every` steps), so likelihood displacement is measured on the tokens that
were trained on.

TRL receives each pair as the example `export` writes (`tokenization.trl_example`:
conversational through the chat template, or standard text with `chat_template=False`
or a tokenizer without one), so the ids it trains on are the ids `encode_pair` gives,
the ones scoring and likelihood tracking use, truncation (TRL's `keep_start`) included.
Pairs TRL would drop (a prompt of `max_length` tokens or more) are left out before
training and counted in `TrainResult.n_dropped`. `TrainResult.tokenization_mismatches`
counts pairs whose ids in TRL's prepared dataset differ from `encode_pair`'s: a check
that the two tokenizations still agree (0 unless TRL changed).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ches_curate.configs import TrainConfig
from ches_curate.errors import ChesCurateError
from ches_curate.likelihood import DisplacementSummary, displacement_summary, pair_likelihoods, pair_logps
from ches_curate.models import LoadedModel
from ches_curate.pairs import PreferencePair
from ches_curate import tokenization
from ches_curate.tokenization import TruncationError, encode_pair, trl_example

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a DPO run produced: the trained model, its checkpoint and the likelihood record.

    `before`/`after` are `pair_logps` frames of the training pairs; `snapshots` holds
    the same columns plus `step` for step 0, every `track_every` steps and the end.
    `reward_accuracy` is the share of training pairs whose implicit reward margin
    (change of log pi(y+) minus change of log pi(y-), relative to the starting
    weights) is positive after training; `train_loss` is TRL's mean training loss.
    """

    model: object
    checkpoint_dir: str | None
    train_loss: float
    reward_accuracy: float
    global_step: int
    wall_time_s: float
    before: pd.DataFrame
    after: pd.DataFrame
    snapshots: pd.DataFrame
    tokenization_mismatches: int
    log_history: list[dict] = field(default_factory=list)
    n_dropped: int = 0
    """Pairs left out because TRL would drop them (their prompt fills `max_length`)."""

    def displacement(self, scores: pd.DataFrame | None = None) -> DisplacementSummary:
        """Likelihood-displacement summary of this run, correlated with CHES when `scores` is given."""
        return displacement_summary(self.before, self.after, scores)

    def pair_likelihoods(self) -> pd.DataFrame:
        return pair_likelihoods(self.before, self.after)


def train_dpo(model, ref_model, pairs: Iterable[PreferencePair], config: TrainConfig | None = None,
              chat_template: bool | None = None) -> TrainResult:
    """Run DPO on `pairs` with TRL and measure per-pair likelihoods before and after.

    `model` is a `LoadedModel` (`ches_curate.models.load_model`); its weights are
    trained in place. `ref_model` is the frozen reference pi_ref (a `PreTrainedModel`
    or a `LoadedModel`); None uses a copy of the starting weights. Either way TRL gets
    it explicitly, so it never tries to fetch a reference model from the hub.
    `chat_template` is as for `encode_pair` (None: `tokenization.use_chat_template`'s
    setting); train with the tokenization the pairs were scored with.
    """
    config = config or TrainConfig()
    pairs = list(pairs)
    if not pairs:
        raise ChesCurateError("no pairs to train on (is the selection empty?)")
    policy, tokenizer = model.model, model.tokenizer
    chat_template = tokenization.renders_chat(tokenizer, chat_template)
    trainable = _trainable(tokenizer, pairs, config.max_length, chat_template)
    n_dropped, pairs = len(pairs) - len(trainable), trainable
    ref = ref_model.model if isinstance(ref_model, LoadedModel) else ref_model
    ref = clone_model(policy) if ref is None else ref
    if ref is policy:
        raise ChesCurateError("the reference model must be a separate copy of the weights, not the model being trained")

    tracker = _LikelihoodTracker(tokenizer, pairs, config, chat_template)
    before = tracker.record(policy, step=0)
    with warnings.catch_warnings():
        # transformers 5 renamed gradient checkpointing; TRL still reads the old names.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        trainer = _trainer(policy, ref.eval(), tokenizer, pairs, config, tracker, chat_template)
        mismatches = count_tokenization_mismatches(trainer.train_dataset, pairs, tokenizer, config.max_length,
                                                   chat_template)
        if mismatches:
            logger.warning("%d of %d pairs are tokenized by TRL unlike scoring (see ches_curate.train)", mismatches,
                           len(pairs))
        started = time.perf_counter()
        output = trainer.train()
        wall_time_s = time.perf_counter() - started
    checkpoint_dir = None
    if config.save_model:
        trainer.save_model(config.output_dir)
        checkpoint_dir = str(Path(config.output_dir).resolve())
    trained = trainer.model.merge_and_unload() if config.lora else trainer.model
    for module in (trained, ref):
        _drop_fused_head(module)
    after = tracker.record(trained, step=output.global_step)
    return TrainResult(
        model=trained,
        checkpoint_dir=checkpoint_dir,
        train_loss=float(output.training_loss),
        reward_accuracy=_reward_accuracy(before, after),
        global_step=int(output.global_step),
        wall_time_s=wall_time_s,
        before=before,
        after=after,
        snapshots=pd.concat(tracker.snapshots, ignore_index=True),
        tokenization_mismatches=mismatches,
        log_history=list(trainer.state.log_history),
        n_dropped=n_dropped,
    )


def _trainable(tokenizer, pairs: list[PreferencePair], max_length: int | None,
               chat_template: bool) -> list[PreferencePair]:
    """The pairs TRL keeps: not those whose prompt fills `max_length`. A pair TRL cannot tokenize is an error."""
    kept = []
    for pair in pairs:
        try:
            prompt_ids = encode_pair(tokenizer, pair, None, chat_template).prompt_ids
        except TruncationError as err:
            raise ChesCurateError(f"row {pair.row} (pair {pair.pair_id[:12]}) cannot be trained on: {err}") from None
        if max_length is None or len(prompt_ids) < max_length:
            kept.append(pair)
    if not kept:
        raise ChesCurateError(f"every prompt fills max_length={max_length} tokens, so TRL has nothing to train on; "
                              "raise max_length")
    if len(kept) < len(pairs):
        logger.warning("%d of %d pairs left out: their prompt fills max_length=%s tokens, so TRL would drop them",
                       len(pairs) - len(kept), len(pairs), max_length)
    return kept


def _trainer(policy, ref, tokenizer, pairs: list[PreferencePair], config: TrainConfig, tracker, chat_template: bool):
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=_dpo_config(config, policy),
        train_dataset=trl_dataset(pairs, chat_template),
        processing_class=tokenizer,
        callbacks=[_every_n_steps(tracker, config.track_every)] if config.track_every > 0 else None,
        peft_config=_lora_config(config) if config.lora else None,
    )
    # With tqdm disabled, transformers prints every log dict to stdout; the CLI reports its own summary.
    trainer.remove_callback(PrinterCallback)
    return trainer


def clone_model(model):
    """An independent copy of `model`'s weights (e.g. a reference model, or a fresh start per ablation arm)."""
    clone = copy.deepcopy(model)
    _drop_fused_head(clone)
    return clone


def _drop_fused_head(model) -> None:
    # TRL replaces `model.forward` by an instance attribute wrapping the *original* object's bound forward; a
    # deep copy would keep calling the original's weights, so the override is removed once TRL is done.
    model.__dict__.pop("forward", None)


def trl_dataset(pairs: Iterable[PreferencePair], chat_template: bool):
    """The pairs as TRL examples (`tokenization.trl_example`, as `export` writes them) plus a `pair_id` column."""
    from datasets import Dataset

    return Dataset.from_list([{"pair_id": p.pair_id, **trl_example(p, chat_template)} for p in pairs])


def count_tokenization_mismatches(trl_train_dataset, pairs, tokenizer, max_length: int | None,
                                  chat_template: bool) -> int:
    """Pairs that TRL dropped or tokenized differently from `encode_pair` (0 while the two agree)."""
    trl_ids = {
        row["pair_id"]: (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trl_train_dataset
    }
    mismatches = 0
    for pair in pairs:
        ours = encode_pair(tokenizer, pair, max_length, chat_template)
        # TRL's collator cuts prompt + response to max_length after this point (keep_start).
        theirs = trl_ids.get(pair.pair_id)
        if theirs is not None and max_length is not None:
            room = max(max_length - len(theirs[0]), 0)
            theirs = (theirs[0], theirs[1][:room], theirs[2][:room])
        if theirs != (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids):
            mismatches += 1
    return mismatches


def _dpo_config(config: TrainConfig, policy):
    from trl import DPOConfig

    from transformers.training_args import OptimizerNames

    if config.optimizer not in {name.value for name in OptimizerNames}:
        raise ChesCurateError(f"unknown optimizer {config.optimizer!r}; use adamw_torch, rmsprop or another name of "
                              "transformers' OptimizerNames")
    on_cpu = next(policy.parameters()).device.type == "cpu"
    sft = config.sft_weight > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        return DPOConfig(
            output_dir=config.output_dir,
            beta=config.beta,
            learning_rate=config.learning_rate,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation,
            max_length=config.max_length,
            loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
            loss_weights=[1.0, config.sft_weight] if sft else None,
            lr_scheduler_type=config.lr_scheduler_type,
            optim=config.optimizer,
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=on_cpu,
            bf16=False,
            gradient_checkpointing=False,
            dataloader_pin_memory=not on_cpu,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=config.lora_target_modules, task_type="CAUSAL_LM"
    )


def _reward_accuracy(before: pd.DataFrame, after: pd.DataFrame) -> float:
    frame = pair_likelihoods(before, after)
    margin = (frame["preferred_logp_after"] - frame["preferred_logp_before"]) - (
        frame["dispreferred_logp_after"] - frame["dispreferred_logp_before"]
    )
    return float((margin > 0).mean())


class _LikelihoodTracker:
    """Records `pair_logps` of the training pairs at step 0, every `track_every` steps and at the end."""

    def __init__(self, tokenizer, pairs: list[PreferencePair], config: TrainConfig, chat_template: bool):
        self.tokenizer, self.pairs, self.config, self.chat_template = tokenizer, pairs, config, chat_template
        self.snapshots: list[pd.DataFrame] = []

    def record(self, model, step: int) -> pd.DataFrame:
        frame = pair_logps(model, self.tokenizer, self.pairs, batch_size=self.config.track_batch_size,
                           max_length=self.config.max_length, chat_template=self.chat_template)
        if not self.snapshots or self.snapshots[-1]["step"].iat[0] != step:
            self.snapshots.append(frame.assign(step=step))
        return frame


def _every_n_steps(tracker: _LikelihoodTracker, every: int):
    """A TrainerCallback recording likelihoods every `every` optimizer steps (transformers imported lazily)."""
    from transformers import TrainerCallback

    class LikelihoodCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                tracker.record(model, state.global_step)

    return LikelihoodCallback()
