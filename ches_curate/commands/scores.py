"""`ches-curate scores list` and `scores import`: the registered scores; values computed elsewhere into the store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from ches_curate.commands import options, tables
from ches_curate.commands.filter import PLUGIN_HELP, load_plugins
from ches_curate.terminal import printable

console = Console()
scores_app = typer.Typer(help="Scores beside CHES: list the registered ones, import external values.",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(scores_app, name="scores")


@scores_app.command("list", epilog="Example: ches-curate scores list --plugin my_scores.py")
def list_scores(plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP)) -> None:
    """List the registered scores: name, version, plugin, what each needs, whether `score` computes it by default."""
    from ches_curate.scores import available_scores

    load_plugins(plugin)
    rows = [[Text(printable(name), style="bold"), printable(entry.obj.version), printable(entry.plugin),
             ", ".join(sorted(entry.obj.needs)), "yes" if getattr(entry.obj, "default", True) else "--scores",
             Text(printable(entry.obj.description))]
            for name, entry in available_scores().items()]
    columns = ["score", "version", "plugin", "needs", "default", tables.Column("description", wrap=True)]
    tables.print_table(console, columns, rows, title="registered scores")


@scores_app.command("import", epilog="Example: ches-curate scores import margins.jsonl --name reward_margin "
                    "--dataset hh --key row")
def import_command(
    source: Path = typer.Argument(..., help="JSONL, CSV or Parquet file: a key column and a value column per row."),
    name: str = typer.Option(..., "--name", help="Score name for the values (lower_snake_case; its SQL column)."),
    key: Optional[str] = typer.Option(None, "--key", help="pair_id or row (default: whichever the first row has)."),
    column: Optional[str] = typer.Option(None, "--column", help="Value column (default: NAME if present, else value)."),
    dataset: options.OptionalDataset = None,
    version: options.Version = None,
    on_error: str = typer.Option("fail", "--on-error", help="fail: import nothing if any row is bad (all are listed); "
                                 "quarantine: import the good rows, record the bad ones."),
    db: options.Db = None,
    plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
) -> None:
    """Import externally computed per-pair values (a reward model's margins, judge labels) as score NAME.

    Keys are pair_ids, or rows of a dataset version (--dataset). The values appear as column
    NAME in `latest_scores_wide`, and policies rank by them (--param score_column=NAME).
    """
    from ches_curate.errors import ChesCurateError
    from ches_curate.scores.imports import import_scores
    from ches_curate.store import Store

    if on_error not in ("fail", "quarantine"):
        raise ChesCurateError(f"--on-error {on_error!r}: choose fail or quarantine")
    load_plugins(plugin)  # an imported name may not be a registered score's
    result = import_scores(Store(db), source, name, key=key, column=column, dataset=dataset, version=version,
                           on_error=on_error)
    console.print(Text(printable(result.describe())))
    for problem in result.problems[:20]:
        console.print(Text(printable(problem), style="yellow"))
