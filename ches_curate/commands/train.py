"""`ches-curate train`, `probe` and `ablate`: DPO on stored pairs, the one-pair probe, the ablation."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.commands import options, tables
from ches_curate.configs import PAPER_TRAIN, DesignConfig, ProbeConfig, TrainConfig
from ches_curate.errors import ChesCurateError
from ches_curate.terminal import printable

console = Console()

_DEFAULTS = TrainConfig()
_PROBE = ProbeConfig()
_DESIGN = DesignConfig()

# Options shared by `train` and `ablate`, declared once.
BETA = typer.Option(_DEFAULTS.beta, "--beta", min=0.0, help="DPO beta (the implicit reward is beta * log pi/pi_ref).")
LEARNING_RATE = typer.Option(_DEFAULTS.learning_rate, "--lr", min=0.0, help="Learning rate.")
OPTIMIZER = typer.Option(_DEFAULTS.optimizer, "--optimizer", help="transformers optimizer name: adamw_torch, or rmsprop "
                         "(the paper's).")
EPOCHS = typer.Option(_DEFAULTS.epochs, "--epochs", min=0.0, help="Passes over the training pairs.")
MAX_STEPS = typer.Option(_DEFAULTS.max_steps, "--max-steps", help="Optimizer steps; overrides --epochs when > 0.")
BATCH_SIZE = typer.Option(_DEFAULTS.batch_size, "--batch-size", min=1, help="Pairs per step on each device.")
GRAD_ACCUM = typer.Option(_DEFAULTS.gradient_accumulation, "--grad-accum", min=1, help="Gradient accumulation steps.")
MAX_LENGTH = typer.Option(_DEFAULTS.max_length, "--max-length", min=2, help="Cap on prompt + response tokens.")
SFT_WEIGHT = typer.Option(_DEFAULTS.sft_weight, "--sft-weight", min=0.0, help="Weight of an added SFT term on y+ (0: none).")
LORA = typer.Option(_DEFAULTS.lora, "--lora/--full", help="Train a LoRA adapter (merged afterwards) or all weights.")
SEED = typer.Option(_DEFAULTS.seed, "--train-seed", help="Seed of training (data order, initialisation).")
SAVE = typer.Option(_DEFAULTS.save_model, "--save/--no-save", help="Save the trained model under --output-dir.")
TRACK_EVERY = typer.Option(_DEFAULTS.track_every, "--track-every", min=0, help="Also record pair log-probs every N steps.")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("probe")(probe)
    app.command("ablate")(ablate)


def train(
    dataset: options.Dataset,
    version: options.Version = None,
    selection: Optional[int] = typer.Option(None, "--selection", help="Train only on the pairs this selection kept."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Train on the first N pairs only (a quick check)."),
    model: options.Model = "default",
    output_dir: Path = typer.Option(Path(_DEFAULTS.output_dir), "--output-dir", help="Where the trained model is saved."),
    beta: float = BETA, lr: float = LEARNING_RATE, optimizer: str = OPTIMIZER, epochs: float = EPOCHS,
    max_steps: int = MAX_STEPS, batch_size: int = BATCH_SIZE, grad_accum: int = GRAD_ACCUM,
    max_length: Optional[int] = MAX_LENGTH, sft_weight: float = SFT_WEIGHT, lora: bool = LORA, train_seed: int = SEED,
    save: bool = SAVE, track_every: int = TRACK_EVERY,
    db: options.Db = None,
) -> None:
    """DPO-train MODEL on a stored dataset (or a selection of it), report likelihood displacement and record the
    run in the `train_runs` table."""
    from ches_curate.curation import record_train_run
    from ches_curate.models import load_model
    from ches_curate.store import Store
    from ches_curate.train import train_dpo

    config = _train_config(beta, lr, epochs, max_steps, batch_size, grad_accum, max_length, sft_weight, lora,
                           train_seed, output_dir, save, track_every, optimizer=optimizer)
    store = Store(db, create=False)
    dv = store.dataset_version(dataset, version)
    pairs = list(islice(store.dataset_pairs(dv.name, dv.version, selection_id=selection, distinct=True), limit))
    if not pairs:
        raise ChesCurateError(f"selection {selection} keeps no pairs of dataset '{dv.name}' v{dv.version}")
    loaded = load_model(model)
    console.print(f"training {escape(printable(loaded.key))} on {len(pairs):,} pairs of "
                  f"'{escape(printable(dv.name))}' v{dv.version}")
    scored = store.scored_chat_template(dv.name, dv.version, loaded.key, selection)
    result = train_dpo(loaded, None, pairs, config, chat_template=scored)
    scores = store.scores(dv.name, dv.version, model_key=loaded.key) if loaded.key in store.scoring_models(
        dv.name, dv.version) else None
    summary = result.displacement(scores)
    train_run_id = record_train_run(store, dv, selection, loaded.key, result, summary, config)
    metrics = [("train loss", result.train_loss), ("reward accuracy", result.reward_accuracy),
               *((name.replace("_", " "), value) for name, value in summary.as_dict().items())]
    tables.print_table(console, ["metric", tables.Column("value", numeric=True)],
                       [[name, tables.cell(value)] for name, value in metrics],
                       title=f"DPO: {result.global_step} steps in {result.wall_time_s:.1f} s")
    if result.tokenization_mismatches:
        console.print(f"{result.tokenization_mismatches} pairs were truncated or tokenized by TRL unlike scoring")
    if result.checkpoint_dir:
        console.print(f"saved to {escape(printable(result.checkpoint_dir))}")
    console.print(f"recorded as train run {train_run_id}: ches-curate sql \"SELECT * FROM train_runs WHERE "
                  f"train_run_id = {train_run_id}\"", highlight=False)


def probe(
    prompt: str = typer.Option(..., "--prompt", help="The prompt x."),
    preferred: str = typer.Option(..., "--preferred", help="The preferred response y+ (e.g. 'No')."),
    dispreferred: str = typer.Option(..., "--dispreferred", help="The dispreferred response y- (e.g. 'Never')."),
    mode: str = typer.Option(_PROBE.mode, "--mode", help="paper: single tokens, RMSProp, full batch (Razin et al., "
                             "Section 3); response: TRL DPO on the whole responses, judged on log P of each."),
    steps: int = typer.Option(_PROBE.steps, "--steps", min=1, help="DPO steps on the single pair."),
    lr: float = typer.Option(_PROBE.learning_rate, "--lr", min=0.0, help="Learning rate."),
    beta: float = typer.Option(_PROBE.beta, "--beta", min=0.0, help="DPO beta."),
    seeds: int = typer.Option(len(_PROBE.seeds), "--seeds", min=1, help="Runs (seeds 0..N-1; the paper uses 10)."),
    leading_space: bool = typer.Option(False, "--leading-space", help="Train ' y+' over ' y-' (paper mode)."),
    sweep: bool = typer.Option(False, "--sweep", help="Run every --sweep-lr x seed x (with, without a leading "
                               "space) and print one row per run."),
    sweep_lr: list[float] = typer.Option([1e-7, 1e-6, 1e-5, 1e-4], "--sweep-lr", help="Learning rates of --sweep."),
    top_k: int = typer.Option(_PROBE.top_k, "--top-k", min=1, help="Tokens to list per table."),
    watch: list[str] = typer.Option(list(_PROBE.watch), "--watch", help="Token(s) to report whatever their rank (repeatable)."),
    model: options.Model = "default",
    db: options.Db = None,
) -> None:
    """DPO on one pair: did P(y+) fall (likelihood displacement), which tokens gained, what the theory predicted.

    Razin et al. (Section 3) train y+ = "No" over y- = "Never" as single tokens and report P("No")
    falling while "Yes" rises. Runs are recorded in the `probe_runs` table when --db (or CHES_CURATE_DB) is given.
    """
    from ches_curate.evaluate import probe_sweep, run_probe
    from ches_curate.models import load_model

    if mode not in ("paper", "response"):
        raise typer.BadParameter(f"{mode!r} is not a mode; use paper or response", param_hint="--mode")
    config = ProbeConfig(mode=mode, steps=steps, learning_rate=lr, beta=beta, seeds=tuple(range(seeds)), top_k=top_k,
                         watch=tuple(watch))
    loaded = load_model(model)
    if sweep:
        runs = probe_sweep(loaded, prompt, preferred, dispreferred, config, learning_rates=sweep_lr)
        _sweep_table(runs)
    else:
        runs = run_probe(loaded, prompt, preferred, dispreferred, config, leading_space=leading_space)
        for run in runs:
            _report_run(run)
    if db is not None:
        from ches_curate.store import Store

        store = Store(db)
        ids = [store.record_probe_run(run.row()) for run in runs]
        console.print(f"recorded as probe runs {ids[0]}..{ids[-1]} in the `probe_runs` table", highlight=False)


def _report_run(run) -> None:
    console.print(f"[bold]{run.mode} mode, seed {run.seed}[/]: {run.steps} steps, lr {run.learning_rate:g}, "
                  f"final loss {run.final_loss:.4g}, {run.wall_time_s:.0f} s", highlight=False)
    what = "single token" if run.mode == "paper" else "whole response"
    for label, text, before, after in (("y+", run.preferred, run.p_plus_before, run.p_plus_after),
                                       ("y-", run.dispreferred, run.p_minus_before, run.p_minus_after)):
        console.print(f"P({label} = {escape(repr(text))}, {what}): {before:.4g} -> {after:.4g}", highlight=False)
    if run.mode == "response":
        console.print(f"first token: P(y+) {run.first_token_before[0]:.4g} -> {run.first_token_after[0]:.4g}, "
                      f"P(y-) {run.first_token_before[1]:.4g} -> {run.first_token_after[1]:.4g}", highlight=False)
    else:
        console.print(f"min P(y+) over the run {run.p_plus_min:.4g} at step {run.p_plus_min_step}; the loss "
                      f"{'fell at every step' if run.loss_monotone else 'did NOT fall at every step (unstable run)'}")
    console.print("[bold red]likelihood displacement:[/] P(y+) fell" if run.displaced else "no displacement: P(y+) rose")
    console.print(f"single-token CHES <W+, W-> - ||W+||^2 = {run.single_token_ches:.4g}; ||h||^2 = "
                  f"{run.hidden_norm_sq:.4g}", highlight=False)
    if run.single_token_ches < 0:
        console.print("[yellow]displacement unlikely:[/] the single-token CHES is negative")
    if len(run.risers):
        _token_table("observed top gainers: tokens whose probability rose (p before or after >= 1e-3)", run.risers)
    else:
        console.print("observed top gainers: no other token rose (p before or after >= 1e-3)")
    if len(run.predicted_change):
        _token_table("predicted: largest first-order probability rise of a gradient step", run.predicted_change)
    else:
        console.print("predicted: to first order, no token but y+ rises")
    _token_table("predicted: largest <W_z, W+ - W->", run.predicted)
    if len(run.watched):
        _token_table("watched tokens", run.watched)


def _sweep_table(runs) -> None:
    columns = ["lr", "space", "seed", *(tables.Column(c, numeric=True) for c in (
        "P(y+) before", "P(y+) after", "min P(y+)", "min step", "P(y-) before", "P(y-) after", "final loss")),
        "monotone", "displaced", "top gainer"]
    rows = [[f"{r.learning_rate:g}", "yes" if r.leading_space else "no", str(r.seed),
             *(tables.cell(v) for v in (r.p_plus_before, r.p_plus_after, r.p_plus_min)), tables.cell(r.p_plus_min_step),
             *(tables.cell(v) for v in (r.p_minus_before, r.p_minus_after, r.final_loss)),
             tables.cell(r.loss_monotone), tables.cell(r.displaced),
             # risers hold only tokens whose probability rose: "-" when every other token fell
             repr(r.risers.token.iloc[0]) if len(r.risers) else "-"]
            for r in runs]
    first = runs[0]
    tables.print_table(console, columns, rows, title=f"probe sweep: {first.preferred!r} over {first.dispreferred!r}, "
                       f"{first.mode} mode, {first.steps} steps; single-token CHES {first.single_token_ches:.4g} "
                       f"(no space), ||h||^2 {first.hidden_norm_sq:.4g}")


def _token_table(title: str, frame) -> None:
    columns = ["token", *(tables.Column(c, numeric=True) for c in ("p before", "p after", "change", "rise rank",
                                                                    "<W_z, W+ - W->", "prediction rank", "first-order"))]
    rows = [[repr(row.token), f"{row.prob_before:.3g}", f"{row.prob_after:.3g}", f"{row.prob_change:+.3g}",
             str(row.rise_rank), f"{row.prediction:.3g}", str(row.prediction_rank), f"{row.predicted_change:+.3g}"]
            for row in frame.itertuples()]
    tables.print_table(console, columns, rows, title=title)


def ablate(
    ctx: typer.Context,
    dataset: options.Dataset,
    version: options.Version = None,
    model: options.Model = "default",
    design: str = typer.Option(
        _DESIGN.design, "--design", help="policies: full vs each --policy vs same-size random controls; "
        "quantile-slices: subsets centred on percentiles of each score (Razin et al., Sec. 5, Fig. 2); keep-lowest: "
        "the lowest --keep-fraction by ln-CHES vs full vs random (Sec. 6). The paper designs default to the paper's "
        "DPO settings (RMSProp, batch 32, lr 1e-7 / 5e-6, constant schedule); options given override them."),
    policy: list[str] = typer.Option(
        [], "--policy", help="Policy arm as NAME or NAME:param=value,... e.g. 'percentile:p=90' (repeatable; "
        "design policies)."
    ),
    seed: list[int] = typer.Option([0], "--seed", help="policies: seed of a random control arm per policy; the "
                                   "paper designs: training seeds, each arm trained once per seed (repeatable)."),
    score_column: list[str] = typer.Option(list(_DESIGN.score_columns), "--score-column", help="quantile-slices: "
                                           "scores to slice by (repeatable; a leading '-' negates)."),
    percentile: list[float] = typer.Option(list(_DESIGN.percentiles), "--percentile", min=0, max=100,
                                           help="quantile-slices: percentiles the slices are centred on (repeatable)."),
    slice_size: int = typer.Option(_DESIGN.slice_size, "--slice-size", min=1, help="quantile-slices: pairs per slice."),
    keep_fraction: float = typer.Option(_DESIGN.keep_fraction, "--keep-fraction", min=0.0, max=1.0,
                                        help="keep-lowest: fraction of pairs kept."),
    keep_column: str = typer.Option(_DESIGN.keep_column, "--keep-column", help="keep-lowest: score whose lowest "
                                    "values are kept."),
    eval_dataset: Optional[str] = typer.Option(
        None, "--eval-dataset", help="Stored dataset whose first human turns are the held-out refusal prompts."
    ),
    n_eval: int = typer.Option(32, "--n-eval", min=1, help="Number of refusal prompts."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Greedy tokens generated per prompt."),
    output_dir: Path = typer.Option(Path(_DEFAULTS.output_dir), "--output-dir", help="Checkpoints go under here."),
    beta: float = BETA, lr: float = LEARNING_RATE, optimizer: str = OPTIMIZER, epochs: float = EPOCHS,
    max_steps: int = MAX_STEPS, batch_size: int = BATCH_SIZE, grad_accum: int = GRAD_ACCUM,
    max_length: Optional[int] = MAX_LENGTH, sft_weight: float = SFT_WEIGHT, lora: bool = LORA, train_seed: int = SEED,
    save: bool = SAVE,
    db: options.Db = None,
) -> None:
    """Train from the same start on the arms of a design and compare likelihood displacement (and refusal rates).

    Writes one `ablations` row per arm and training seed, and per-pair `pair_likelihoods`, to the store;
    `ches-curate report` draws the quantile-slices design as the paper's Figure 2.
    """
    from ches_curate.ablation import run_ablation
    from ches_curate.configs import EvalConfig
    from ches_curate.evaluate import harmful_prompts
    from ches_curate.store import Store

    try:
        plan = DesignConfig(design=design, score_columns=tuple(score_column), percentiles=tuple(percentile),
                            slice_size=slice_size, keep_fraction=keep_fraction, keep_column=keep_column)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--design") from None
    if policy and design != "policies":
        raise typer.BadParameter(f"--policy is for --design policies, not {design}", param_hint="--policy")
    policies = [parse_policy(item) for item in policy]
    config = _train_config(beta, lr, epochs, max_steps, batch_size, grad_accum, max_length, sft_weight, lora,
                           train_seed, output_dir, save, optimizer=optimizer)
    config = with_design_defaults(ctx, config, design)
    store = Store(db, create=False)
    prompts = harmful_prompts(list(store.dataset_pairs(eval_dataset)), n_eval) if eval_dataset else []
    if not prompts:
        console.print("no --eval-dataset: refusal rates are left empty")
    rows = run_ablation(store, dataset, model, policies, config, prompts, seed, version=version,
                        eval_config=EvalConfig(max_new_tokens=max_new_tokens), design=plan)
    columns = ("arm", "train_seed", "n_train_pairs", "preferred_logp_change", "preferred_decrease_fraction",
               "ches_logp_corr", "refusal_rate_before", "refusal_rate_after", "reward_accuracy", "wall_time_s")
    headers = [tables.Column(c.replace("_", " "), numeric=c != "arm") for c in columns]
    tables.print_table(console, headers, [[tables.cell(getattr(row, c)) for c in columns] for row in rows.itertuples()],
                       title=f"ablation {rows.ablation_id.iloc[0]} ({design}; table `ablations`)")


_OPTION_OF_FIELD = {"optimizer": "optimizer", "learning_rate": "lr", "batch_size": "batch_size", "beta": "beta",
                    "epochs": "epochs", "lr_scheduler_type": None}


def with_design_defaults(ctx: typer.Context, config: TrainConfig, design: str) -> TrainConfig:
    """`config` with the paper's settings of `design` (`PAPER_TRAIN`) where the user gave no option."""
    import dataclasses

    def given(option: str | None) -> bool:
        # Compared by name: typer vendors its own click, whose ParameterSource is not click's.
        source = ctx.get_parameter_source(option) if option is not None else None
        return source is not None and source.name != "DEFAULT"

    paper = {field: value for field, value in PAPER_TRAIN.get(design, {}).items()
             if not given(_OPTION_OF_FIELD[field])}
    return dataclasses.replace(config, **paper)


def _train_config(beta: float, lr: float, epochs: float, max_steps: int, batch_size: int, grad_accum: int,
                  max_length: int | None, sft_weight: float, lora: bool, seed: int, output_dir: Path, save: bool,
                  track_every: int = _DEFAULTS.track_every, optimizer: str = _DEFAULTS.optimizer) -> TrainConfig:
    """The `TrainConfig` the options of `train` and `ablate` (declared once, above) describe."""
    return TrainConfig(beta=beta, learning_rate=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                       gradient_accumulation=grad_accum, max_length=max_length, sft_weight=sft_weight, lora=lora,
                       seed=seed, output_dir=str(output_dir), save_model=save, track_every=track_every,
                       optimizer=optimizer)


def parse_policy(item: str) -> tuple[str, dict[str, str]]:
    """`'percentile:p=90,score_column=ln_ches'` -> `('percentile', {'p': '90', 'score_column': 'ln_ches'})`."""
    from ches_curate.commands.filter import parse_params

    name, _, params = item.partition(":")
    if not name.strip():
        raise ChesCurateError(f"--policy {item!r} needs a policy name, e.g. --policy percentile:p=90")
    return name.strip(), parse_params([p for p in params.split(",") if p.strip()])
