"""`ches-curate`: a thin Typer shell over the library.

Each command group lives in `ches_curate/commands/<group>.py` and exposes
`register(app)`; this module only assembles them and turns user-facing errors into
one readable line (tracebacks only with `--debug`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from ches_curate.errors import ChesCurateError, Interrupted
from ches_curate.terminal import printable

COMMAND_MODULES = (
    "ches_curate.commands.store",
    "ches_curate.commands.score",
    "ches_curate.commands.report",
    "ches_curate.commands.filter",
    "ches_curate.commands.scores",
    "ches_curate.commands.quality",
    "ches_curate.commands.train",
    "ches_curate.commands.pipelines",
    "ches_curate.commands.check",
)

err_console = Console(stderr=True)

app = typer.Typer(
    name="ches-curate",
    help="Curate DPO preference data by CHES score (Razin et al., ICLR 2025).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from ches_curate import __version__

        typer.echo(f"ches-curate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.", envvar="CHES_CURATE_DEBUG"),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    if debug:
        os.environ["CHES_CURATE_DEBUG"] = "1"


EXAMPLES = {
    "ingest": "ches-curate ingest pairs.jsonl --dataset hh --on-error quarantine",
    "datasets": "ches-curate datasets --db curate.duckdb",
    "sql": "ches-curate sql \"SELECT model_key, median(ln_ches) FROM latest_scores GROUP BY 1\" --format csv",
    "export": "ches-curate export --selection 3 -o curated.jsonl",
    "score": "ches-curate score --dataset hh --model default",
    "report": "ches-curate report --dataset hh -o report.html",
    "policies": "ches-curate policies",
    "filter": "ches-curate filter --dataset hh --policy percentile --param p=90",
    "selections": "ches-curate selections --dataset hh   # or: ches-curate selections --diff 3 7",
    "quality": "ches-curate quality --dataset hh --suite pairs",
    "train": "ches-curate train --dataset hh --selection 3 --max-steps 50",
    "probe": "ches-curate probe --prompt \"Is the sky blue? Answer yes or no.\" --preferred No --dispreferred Never",
    "ablate": "ches-curate ablate --dataset hh --policy percentile:p=90 --seed 0 --seed 1\n"
              "  ches-curate ablate --dataset hh --design quantile-slices --slice-size 64 --seed 0 --seed 1 --seed 2",
    "run": "ches-curate run curation --config demo   # a shipped config by name, or a YAML file",
    "runs": "ches-curate runs --pipeline refresh -n 5   # one run in full: ches-curate runs RUN_NAME",
    "schedule": "ches-curate schedule --cron \"0 3 * * *\" --pipeline refresh --local",
    "check-ches": "ches-curate check-ches --dataset hh --sample 200 --model default",
}
"""One worked example per command, shown at the end of its --help."""

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)
for _command in app.registered_commands:
    _command.epilog = f"Example: {EXAMPLES[_command.name or _command.callback.__name__]}"


def debug_enabled() -> bool:
    return os.environ.get("CHES_CURATE_DEBUG", "") not in ("", "0", "false")


def main() -> None:
    """Console-script entry point: run the app and exit with a status scripts can rely on.

    0 success; 1 a user error (one red line, a traceback only with --debug); 2 a usage
    error or bad input data; 3 the store is locked; 70 a bug; 128 + N when signal N
    stopped the command (130 Ctrl-C, 143 SIGTERM), after saying what was kept.
    """
    try:
        with _stop_signals_raise():
            code = app(standalone_mode=False, prog_name="ches-curate")
    except ChesCurateError as err:
        if debug_enabled():
            raise
        err_console.print(f"[bold red]error:[/] {escape(printable(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except Interrupted as stop:
        _report_interrupted(stop.signame, stop.kept, stop.resume)
        sys.exit(stop.exit_code)
    except typer.TyperException as err:  # Typer's own click: usage errors (exit 2), bad parameters
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        sys.exit(1)
    except (Exception, GeneratorExit) as err:  # GeneratorExit: a BaseException that no code of ours raises
        if debug_enabled():
            raise
        err_console.print(f"[bold red]internal error:[/] {type(err).__name__}: {escape(printable(err))} "
                          "(rerun with --debug for the traceback)", highlight=False)
        sys.exit(70)
    # Without standalone mode Typer returns the code of a `typer.Exit` instead of exiting, and
    # turns a KeyboardInterrupt that is not ours (a plugin's, say) into 130.
    if code == 130:
        _report_interrupted("KeyboardInterrupt", None, None)
    sys.exit(code if isinstance(code, int) else 0)


@contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """While the command runs, SIGINT and SIGTERM raise `Interrupted`, so transactions roll
    back and score runs are closed on the way out; the previous handlers come back after."""

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum, signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _report_interrupted(signame: str, kept: str | None, resume: str | None) -> None:
    kept = kept or "everything committed before it is kept"
    resume = resume or "rerun the same command to continue"
    err_console.print(f"[bold yellow]interrupted ({signame}):[/] {escape(kept)}; {escape(resume)}",
                      highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
