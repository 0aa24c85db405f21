"""DPO fine-tuning with TRL's `DPOTrainer`, with per-pair likelihood tracking.

`train_dpo(model, ref_model, pairs, config)` trains `model` in place and records
log pi(y+|x), log pi(y-|x) of every training pair before and after (and every
`track_every` steps), so likelihood displacement is measured on the tokens that
were trained on (up to truncation, below).

TRL receives the pairs in its standard (text) format: the prompt rendered with the
chat template, responses as plain text. TRL then appends EOS to each response and
tokenizes prompt + response, which reproduces our tokenization contract
(`ches_curate.tokenization`) token for token. TRL's conversational format does
not: it renders the assistant turn through the template, which adds the template's
turn suffix after EOS (`<|im_end|>` then `\\n` for ChatML), one extra trained token
per response. Pairs longer than `max_length` are truncated by TRL from the end
(`truncation_mode="keep_start"`: the prompt is kept whole, the responses lose their
end, and a pair whose prompt alone fills `max_length` is dropped), whereas the
contract keeps the prompt's end when the prompt is longer than `max_length // 2`.
Pairs where TRL's token ids differ from ours are counted in
`TrainResult.tokenization_mismatches`; the likelihoods are always measured under the
contract.
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
from ches_curate.tokenization import encode_pair

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

    def displacement(self, scores: pd.DataFrame | None = None) -> DisplacementSummary:
        """Likelihood-displacement summary of this run, correlated with CHES when `scores` is given."""
        return displacement_summary(self.before, self.after, scores)

    def pair_likelihoods(self) -> pd.DataFrame:
        return pair_likelihoods(self.before, self.after)


def train_dpo(model, ref_model, pairs: Iterable[PreferencePair], config: TrainConfig | None = None) -> TrainResult:
    """Run DPO on `pairs` with TRL and measure per-pair likelihoods before and after.

    `model` is a `LoadedModel` (`ches_curate.models.load_model`); its weights are
    trained in place. `ref_model` is the frozen reference pi_ref (a `PreTrainedModel`
    or a `LoadedModel`); None uses a copy of the starting weights. Either way TRL gets
    it explicitly, so it never tries to fetch a reference model from the hub.
    """
    config = config or TrainConfig()
    pairs = list(pairs)
    if not pairs:
        raise ChesCurateError("no pairs to train on (is the selection empty?)")
    policy, tokenizer = model.model, model.tokenizer
    ref = ref_model.model if isinstance(ref_model, LoadedModel) else ref_model
    ref = clone_model(policy) if ref is None else ref
    if ref is policy:
        raise ChesCurateError("the reference model must be a separate copy of the weights, not the model being trained")

    tracker = _LikelihoodTracker(tokenizer, pairs, config)
    before = tracker.record(policy, step=0)
    with warnings.catch_warnings():
        # transformers 5 renamed gradient checkpointing; TRL still reads the old names.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        trainer = _trainer(policy, ref.eval(), tokenizer, pairs, config, tracker)
        if len(trainer.train_dataset) == 0:
            raise ChesCurateError(
                f"every prompt fills max_length={config.max_length} tokens, so TRL has nothing to train on; "
                "raise max_length"
            )
        mismatches = count_tokenization_mismatches(trainer.train_dataset, pairs, tokenizer, config.max_length)
        if mismatches:
            logger.warning("%d of %d pairs are tokenized by TRL unlike scoring (see ches_curate.train)", mismatches, len(pairs))
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
    )


def _trainer(policy, ref, tokenizer, pairs: list[PreferencePair], config: TrainConfig, tracker):
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=_dpo_config(config, policy),
        train_dataset=trl_dataset(pairs, tokenizer),
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


def trl_dataset(pairs: Iterable[PreferencePair], tokenizer):
    """TRL's standard preference format: `prompt` (chat template rendered as text), `chosen`, `rejected`, `pair_id`."""
    from datasets import Dataset

    records = [
        {"pair_id": p.pair_id, "prompt": prompt_text(tokenizer, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
        for p in pairs
    ]
    return Dataset.from_list(records)


def prompt_text(tokenizer, prompt) -> str:
    """The prompt as TRL should see it: tokenizing this text gives `encode_prompt`'s ids.

    The chat template renders special tokens such as BOS as text; a tokenizer that
    also adds BOS itself would double it, so the rendered one is dropped then.
    """
    if not getattr(tokenizer, "chat_template", None):
        if not isinstance(prompt, str):
            raise ChesCurateError("a conversational prompt needs a tokenizer with a chat template; this model has none")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


def count_tokenization_mismatches(trl_train_dataset, pairs, tokenizer, max_length: int | None) -> int:
    """Pairs that TRL dropped or tokenized differently from `encode_pair` (e.g. truncated differently)."""
    trl_ids = {
        row["pair_id"]: (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trl_train_dataset
    }
    mismatches = 0
    for pair in pairs:
        ours = encode_pair(tokenizer, pair, max_length)
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

    def __init__(self, tokenizer, pairs: list[PreferencePair], config: TrainConfig):
        self.tokenizer, self.pairs, self.config = tokenizer, pairs, config
        self.snapshots: list[pd.DataFrame] = []

    def record(self, model, step: int) -> pd.DataFrame:
        frame = pair_logps(
            model, self.tokenizer, self.pairs, batch_size=self.config.track_batch_size, max_length=self.config.max_length
        )
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
