"""`ches-curate score`: score a file into Parquet, or a stored dataset incrementally."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ches_curate.commands import options
from ches_curate.commands.filter import PLUGIN_HELP, load_plugins
from ches_curate.errors import ChesCurateError
from ches_curate.scoring.config import ScoringConfig
from ches_curate.terminal import printable

console = Console()


def print_summary(summary: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("score", "mean", "p5", "p50", "p95", "max"):
        table.add_column(column, justify="right" if column != "score" else "left")
    for score in ("ches", "ln_ches"):
        if score in summary:
            stats = summary[score]
            table.add_row(score, *(f"{stats[k]:.4g}" for k in ("mean", "p5", "p50", "p95", "max")))
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command()
    def score(
        ctx: typer.Context,
        input: Optional[str] = typer.Argument(None, help="Preference file (JSONL, Parquet, CSV), HF datasets dir or hub id."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the score table here (.parquet)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Score a stored dataset incrementally instead of a file."),
        version: options.Version = None,
        db: options.Db = None,
        model: options.Model = "default",
        format: str = typer.Option("auto", "--format", help="auto, prompt_chosen_rejected, conversational or hh_rlhf."),
        split: Optional[str] = typer.Option(None, "--split", help="Split of a hub dataset or a datasets directory."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score only the first N input rows (with --dataset: N of the unscored pairs); a quick look before the whole run."),
        max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=1, help="Tokens per forward pass, padding included (default by device: cpu 512, cuda 16384)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Optional cap on pairs per forward pass."),
        max_length: Optional[int] = typer.Option(None, "--max-length", min=2, help="Cap on prompt + response tokens (TRL's keep_start)."),
        device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 (sums are float64)."),
        on_error: str = typer.Option("fail", "--on-error", help="fail: stop at the first bad row; quarantine: record it and go on."),
        share_prompt: bool = typer.Option(True, "--share-prompt/--no-share-prompt", help="Feed each prompt once for both responses (--no-share-prompt: the paper's two passes, for checking)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code to run."),
        no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Tokenize plain prompts as text (TRL's standard format), not through the chat template; recorded with the scores, so export writes standard rows."),
        shards: Optional[int] = typer.Option(None, "--shards", min=1, help="Score in N shards by pair_id hash (part files, then merge); under torchrun N defaults to WORLD_SIZE."),
        rank: Optional[list[int]] = typer.Option(None, "--rank", help="With --shards: score only this shard (repeatable), e.g. one whose process crashed."),
        work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="With --shards: folder for the part files (default OUT.shards/ beside --output)."),
        scores: Optional[str] = typer.Option(None, "--scores", help="Registered scores to compute beside CHES in the same pass, comma-separated (`ches-curate scores list`; `all` for every one); default: those registered as default. Stored scored pairs get the ones they lack."),
        plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
    ) -> None:
        """Compute CHES, ln-CHES and the paper's baselines for every pair.

        File mode writes one row per input pair: row, pair_id, ches, ln_ches, chosen_tokens,
        rejected_tokens, last_hidden_ip, edit_distance, truncated, then one column per plugin score
        (--scores; `ches-curate scores list`), all from one forward pass. Dataset mode scores only the
        pairs of a stored dataset that have no score for this model yet, committing every batch.
        With --shards (or under torchrun) each shard is scored into its own part file and the
        parts are merged into the same table; a crashed shard is re-run alone with --rank.
        """
        load_plugins(plugin)
        config = ScoringConfig(max_batch_tokens=max_batch_tokens, batch_size=batch_size, max_length=max_length,
                               device=device, dtype=dtype, on_error=on_error, share_prompt=share_prompt,
                               trust_remote_code=trust_remote_code, chat_template=not no_chat_template,
                               scores=tuple(n.strip() for n in scores.split(",") if n.strip()) if scores else None)
        from ches_curate.tokenization import use_chat_template

        ctx.with_resource(use_chat_template(not no_chat_template))  # the tokenization version the store records
        from ches_curate.scoring.distributed import launch_from_env

        if (shards is not None or rank or launch_from_env() is not None) and limit is not None:
            raise ChesCurateError("--limit does not combine with --shards or torchrun; score a --limit sample in "
                                  "one process first")
        if shards is not None or rank or launch_from_env() is not None:
            from ches_curate.scoring.shard_job import ShardedJob, run_sharded

            job = ShardedJob(input, output, dataset, version, db, model, format, config, shards, rank or [], work_dir)
            outcome = run_sharded(job, say=lambda line: console.print(escape(printable(line)), highlight=False,
                                                                       soft_wrap=True))
            if outcome.summary is not None:
                print_summary(outcome.summary, outcome.title)
            return
        if dataset is not None:
            _score_dataset(dataset, version, db, model, config, limit)
            return
        if input is None or output is None:
            raise ChesCurateError("give INPUT and --output OUT.parquet, or --dataset NAME to score a stored dataset")
        from ches_curate.scoring.file_run import score_file
        from ches_curate.tokenization import describe_tokenization

        result = score_file(input, output, model=model, config=config, format=format, split=split, limit=limit)
        print_summary(result.summary, f"{result.n_scored} pairs scored with {result.model_key} "
                                      f"({describe_tokenization(result.tokenization_version)})")
        console.print(f"wrote [bold]{escape(printable(result.output))}[/] in {result.seconds:.1f} s")
        if result.rejected_path:
            console.print(f"[yellow]{result.n_rejected} rows rejected[/], with reasons, in "
                          f"{escape(printable(result.rejected_path))}")


def _score_dataset(dataset: str, version: int | None, db: Path | None, model: str, config: ScoringConfig,
                   limit: int | None) -> None:
    from ches_curate.scoring.incremental import score_dataset
    from ches_curate.store import Store

    store = Store(db)
    summary = score_dataset(store, dataset, model, config, version=version, limit=limit)
    console.print(summary.describe())
