"""`ches-curate quality`: run the Great Expectations suites on a stored dataset, or show the latest results."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ches_curate.commands import options, tables
from ches_curate.errors import ChesCurateError
from ches_curate.terminal import printable

console = Console()

_STATUS = {(True, "error"): Text("pass", style="green"), (True, "warn"): Text("pass", style="green"),
           (False, "error"): Text("FAIL", style="bold red"), (False, "warn"): Text("warn", style="yellow")}


def print_results(frame: pd.DataFrame, title: str) -> None:
    """One table per suite (columns of `QualityReport.to_frame` / `latest_quality_results`)."""
    columns = ["expectation", "severity", "status", tables.Column("unexpected", numeric=True)]
    for suite, rows in frame.groupby("suite", sort=False):
        first = rows.iloc[0]
        verdict = "passed" if first.run_success else "failed"
        cells = [[row.expectation, row.severity, _STATUS[(bool(row.success), row.severity)],
                  "-" if pd.isna(row.unexpected_count) else f"{int(row.unexpected_count):,}"]
                 for row in rows.itertuples()]
        tables.print_table(console, columns, cells, title=f"{title}: suite {suite}, {first.n_rows} rows, "
                                                          f"{first.failure_rate:.2%} failing error checks: {verdict}")


def _load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        # False, not transformers' default None, which asks on the terminal whether to run a tokenizer's own code.
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ChesCurateError(f"tokenizer {name!r} needs its own Python code (auto_map in its config), which "
                                  "quality never runs; use a tokenizer without custom code") from err
        raise ChesCurateError(f"cannot load tokenizer {name!r}: {err}") from err


def register(app: typer.Typer) -> None:
    @app.command()
    def quality(
        dataset: options.Dataset,
        version: options.Version = None,
        model_key: options.ModelKey = None,
        suite: str = typer.Option("all", "--suite", help="pairs, scores or all (all skips scores if none exist)."),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON quality config: bounds, "
                                              "thresholds, severities, extra GE expectations."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer (local dir or hub id) for the "
                                                "token-length bounds of the pairs suite."),
        show: bool = typer.Option(False, "--show", help="Only show the latest stored results; run nothing."),
        db: options.Db = None,
    ) -> None:
        """Check a stored dataset with Great Expectations; quarantine the rows failing error expectations.

        Writes quality_runs and quality_results; error rows go to quarantine (stage 'quality').
        Exits non-zero when a suite's fraction of failing rows exceeds max_failure_rate.
        """
        from ches_curate.quality import QualityConfig, QualityFailedError, latest_quality_results, run_quality
        from ches_curate.store import Store

        store = Store(db, create=False)
        if show:
            frame = latest_quality_results(store, dataset, version)
            if frame.empty:
                hint = f"no quality runs yet for {dataset!r}; run `ches-curate quality --dataset {dataset}`"
                console.print(Text(printable(hint)))
                return
            print_results(frame, f"latest quality results for {dataset}")
            return
        if suite not in ("pairs", "scores", "all"):
            raise ChesCurateError(f"--suite must be pairs, scores or all, got {suite!r}")
        settings = QualityConfig.from_file(config) if config else QualityConfig()
        loaded_tokenizer = _load_tokenizer(tokenizer) if tokenizer else None
        try:
            report = run_quality(store, dataset, version, model_key, suite, settings, tokenizer=loaded_tokenizer)
        except QualityFailedError as failed:
            print_results(failed.report.to_frame(), dataset)
            raise ChesCurateError(failed.headline) from None
        print_results(report.to_frame(), dataset)
        for note in report.notes:
            console.print(f"[dim]{escape(printable(note))}[/]")
        quarantined = sum(len(s.quarantine) for s in report.suites)
        if quarantined:
            console.print(f"[yellow]{quarantined} failing rows of error expectations recorded in quarantine[/] "
                          "(stage 'quality')")
