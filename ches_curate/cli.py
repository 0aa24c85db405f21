"""`ches-curate`: a thin Typer shell over the library.

Each command group lives in `ches_curate/commands/<group>.py` and exposes
`register(app)`; this module only assembles them and turns user-facing errors into
one readable line (tracebacks only with `--debug`).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.errors import ChesCurateError

COMMAND_MODULES = (
    "ches_curate.commands.store",
    "ches_curate.commands.score",
    "ches_curate.commands.report",
    "ches_curate.commands.filter",
    "ches_curate.commands.quality",
    "ches_curate.commands.train",
    "ches_curate.commands.pipelines",
)

err_console = Console(stderr=True)

app = typer.Typer(
    name="ches-curate",
    help="Curate DPO preference data by CHES score (Razin et al., ICLR 2025).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.", envvar="CHES_CURATE_DEBUG"),
) -> None:
    if debug:
        os.environ["CHES_CURATE_DEBUG"] = "1"


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def debug_enabled() -> bool:
    return os.environ.get("CHES_CURATE_DEBUG", "") not in ("", "0", "false")


def main() -> None:
    """Console-script entry point: run the app, print user errors without a traceback."""
    try:
        app(standalone_mode=False)
    except ChesCurateError as err:
        if debug_enabled():
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (typer.Exit, SystemExit) as done:
        code = getattr(done, "exit_code", getattr(done, "code", 0))
        sys.exit(code or 0)
    except KeyboardInterrupt:
        err_console.print("interrupted; everything committed so far is kept")
        sys.exit(130)
    except Exception as err:  # click usage errors and the like
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        if debug_enabled():
            raise
        err_console.print(f"[bold red]internal error:[/] {type(err).__name__}: {escape(str(err))} (rerun with --debug for the traceback)")
        sys.exit(70)


if __name__ == "__main__":
    main()
