"""`ches-curate check-ches`: does CHES rank a sample of pairs like the gradient quantity it approximates?"""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.commands import options, tables
from ches_curate.errors import ChesCurateError
from ches_curate.terminal import printable

console = Console()


def register(app: typer.Typer) -> None:
    app.command("check-ches")(check_ches)


def check_ches(
    input: Optional[str] = typer.Argument(None, help="Preference file (JSONL, Parquet, CSV), HF datasets dir or hub id."),
    dataset: options.OptionalDataset = None,
    version: options.Version = None,
    db: options.Db = None,
    model: options.Model = "default",
    sample: int = typer.Option(200, "--sample", "-n", min=2, help="Pairs to check, drawn at random (seeded)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    format: str = typer.Option("auto", "--format", help="auto, prompt_chosen_rejected, conversational or hh_rlhf."),
    max_length: Optional[int] = typer.Option(None, "--max-length", min=2, help="Cap on prompt + response tokens (TRL's keep_start)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps."),
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Tokenize plain prompts as text, as `score --no-chat-template` does."),
) -> None:
    """Compare CHES, ln-CHES and the baselines with gradient_ches = <g+, g-> - ||g+||^2 on a sample of pairs.

    g± is the gradient of log pi(y±|x) over all parameters: to first order a DPO step on the
    pair lowers log pi(y+|x) by an amount proportional to gradient_ches. Prints each score's
    Spearman correlation with it and its top-decile precision. Costs about three forward
    passes per response, so keep --sample small on a CPU.
    """
    from ches_curate.gradient_check import check_ches as run_check, sample_pairs, verdict
    from ches_curate.models import load_model

    pairs = sample_pairs(_read(input, dataset, version, db, format), sample, seed)
    started = time.perf_counter()
    loaded = load_model(model, device=device, dtype="float32")
    frame, agreement = run_check(loaded, pairs, max_length=max_length, chat_template=not no_chat_template)
    columns, rows = tables.frame_rows(agreement[["score", "n_pairs", "spearman", "top_decile_precision"]])
    tables.print_table(console, columns, rows,
                       title=f"rank agreement with gradient_ches, {len(frame)} pairs, {loaded.key}")
    console.print("edit_distance is negated (more similar = higher).", style="dim")
    console.print(f"{escape(printable(verdict(agreement)))} ({time.perf_counter() - started:.0f} s)", highlight=False)


def _read(input: str | None, dataset: str | None, version: int | None, db, format: str) -> list:
    if (input is None) == (dataset is None):
        raise ChesCurateError("give an INPUT file or --dataset NAME (not both)")
    if dataset is not None:
        from ches_curate.store import Store

        return list(Store(db, create=False).dataset_pairs(dataset, version, distinct=True))
    from ches_curate.ingest import read_pairs

    return list(read_pairs(input, format=format))
