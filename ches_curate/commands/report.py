"""`ches-curate report`: write the self-contained HTML curation report of a stored dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.commands import options
from ches_curate.terminal import printable

console = Console()


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    dataset: options.Dataset,
    output: Path = typer.Option(..., "--output", "-o", help="HTML file to write (parent folders are created)."),
    version: options.Version = None,
    model_key: options.ModelKey = None,
    selection: Optional[int] = typer.Option(
        None, "--selection", help="Selection whose cut line is drawn (default: the latest for this dataset and model)."
    ),
    top: int = typer.Option(20, "--top", min=0, help="How many of the highest-CHES pairs to show with their text."),
    db: options.Db = None,
) -> None:
    """Write one HTML file (plots embedded, no network) with the score distributions and the policy's cut,
    the highest-CHES pairs, kept/removed counts per selection, quality findings and ablation results."""
    from ches_curate.report import ReportConfig, write_report
    from ches_curate.store import Store

    store = Store(db, create=False)
    path = write_report(store, dataset, version, model_key, selection, output=output, config=ReportConfig(top_pairs=top))
    size_kb = path.stat().st_size / 1024
    console.print(f"wrote [bold]{escape(printable(path))}[/] ({size_kb:,.0f} KiB); open it in a browser",
                  highlight=False)
