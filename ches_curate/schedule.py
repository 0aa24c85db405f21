"""Scheduling a pipeline: a ZenML `Schedule` where the orchestrator runs schedules, cron or systemd elsewhere.

ZenML's local orchestrator cannot run schedules. There the same command is run by the
machine's scheduler: a crontab entry (installed with `--local`, marked so that
reinstalling replaces it) or a systemd user timer (printed, with the commands that
install it). Nothing here imports ZenML: the caller passes the orchestrator flavor.

A scheduler starts the command with almost no environment, so each entry carries what
a run needs (`scheduled_environment`): offline hub access, analytics off, idle threads
that sleep, logs without colour codes, and the ZenML store, repository and caches the
person scheduling it uses.

The crontab program is `$CHES_CURATE_CRONTAB` or `crontab`, so tests run a fake one
and never touch a real crontab.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ches_curate.errors import ChesCurateError
from ches_curate.models import home_dir

SCHEDULABLE_FLAVORS = frozenset({"kubernetes", "kubeflow", "vertex", "sagemaker", "azureml", "airflow", "databricks"})
"""ZenML orchestrator flavors that run cron schedules themselves."""
CRONTAB_ENV = "CHES_CURATE_CRONTAB"
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_PART = re.compile(r"^(\*|(\d+)(-(\d+))?)(/(\d+))?$")
_DAY_NAMES = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
SCHEDULED_ENV = {
    "HF_HUB_OFFLINE": "1",  # the model is already cached; a scheduled run never waits on the hub
    "ZENML_ANALYTICS_OPT_IN": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "OMP_WAIT_POLICY": "PASSIVE",  # idle torch threads sleep instead of spinning against other jobs
    "NO_COLOR": "1",
    "TERM": "dumb",
    "ZENML_LOGGING_COLORS_DISABLED": "true",
}
"""Set for every scheduled run: the log file gets plain text and nothing phones home."""
FORWARDED_ENV = ("CHES_CURATE_HOME", "CHES_CURATE_DB", "ZENML_CONFIG_PATH", "ZENML_REPOSITORY_PATH", "HF_HOME",
                 "HF_HUB_CACHE")
"""Copied from the scheduling shell when set, so the run uses the same store, ZenML config and caches."""


def scheduled_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a scheduled run gets: `SCHEDULED_ENV`, plus `FORWARDED_ENV` as set in `environ`."""
    environ = os.environ if environ is None else environ
    forwarded = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    return {**SCHEDULED_ENV, **forwarded}


def supports_schedules(flavor: str, declared: bool = False) -> bool:
    """Whether an orchestrator runs schedules: a known flavor, or one whose config declares `is_schedulable`."""
    return flavor in SCHEDULABLE_FLAVORS or declared


def validate_cron(expression: str) -> str:
    """The five-field cron expression, normalized to single spaces; a `ChesCurateError` naming the bad field."""
    fields = expression.split()
    if len(fields) != 5:
        raise ChesCurateError(f"cron {expression!r} needs 5 fields (minute hour day-of-month month day-of-week), "
                              f"got {len(fields)}; e.g. \"0 3 * * *\" runs daily at 03:00")
    for value, (name, low, high) in zip(fields, _FIELDS):
        for part in value.split(","):
            match = _PART.match(part)
            numbers = [int(n) for n in (match.group(2), match.group(4)) if n is not None] if match else []
            if not match or any(not low <= n <= high for n in numbers) or match.group(6) == "0":
                raise ChesCurateError(f"cron {expression!r}: {name} field {value!r} is not valid "
                                      f"(use *, N, N-M, */S or lists of them, N in {low}-{high})")
    return " ".join(fields)


def ches_curate_command(pipeline: str, config: Path, store: Path | None = None) -> list[str]:
    """The command a scheduler runs: this installation's `ches-curate run PIPELINE --config ABS [--db ABS]`."""
    script = Path(sys.executable).with_name("ches-curate")
    program = [str(script)] if script.exists() else [sys.executable, "-m", "ches_curate.cli"]
    command = [*program, "run", pipeline, "--config", str(Path(config).resolve())]
    return command + (["--db", str(Path(store).resolve())] if store is not None else [])


def log_path(pipeline: str) -> Path:
    """Where scheduled runs append their output: `$CHES_CURATE_HOME/logs/<pipeline>.log`."""
    return home_dir() / "logs" / f"{pipeline}.log"


def marker(pipeline: str) -> str:
    return f"# ches-curate:{pipeline}"


def crontab_command(command: list[str], workdir: Path, log: Path, env: dict[str, str] | None = None) -> str:
    """The shell command of a crontab entry: `cd WORKDIR && VAR=value ... COMMAND >> LOG 2>&1`."""
    env = scheduled_environment() if env is None else env
    assignments = "".join(f"{name}={shlex.quote(value)} " for name, value in env.items())
    return f"cd {shlex.quote(str(workdir))} && {assignments}{shlex.join(command)} >> {shlex.quote(str(log))} 2>&1"


def crontab_line(cron: str, command: list[str], workdir: Path, log: Path, pipeline: str,
                 env: dict[str, str] | None = None) -> str:
    """One crontab entry: run `command` in `workdir` on `cron` with `env` (default `scheduled_environment()`),
    output appended to `log`, tagged with a marker.

    `%` is escaped: cron would turn it into a newline.
    """
    escaped = crontab_command(command, workdir, log, env).replace("%", r"\%")
    return f"{validate_cron(cron)} {escaped} {marker(pipeline)}"


@dataclass(frozen=True)
class CrontabChange:
    before: str
    after: str
    replaced: int
    """Entries with the same marker that the new one replaced."""


def install_crontab_line(line: str, pipeline: str, crontab: str | None = None) -> CrontabChange:
    """Add `line` to the user's crontab, replacing any entry with the same pipeline marker; other entries stay."""
    program = crontab or os.environ.get(CRONTAB_ENV) or "crontab"
    if shutil.which(program) is None:
        raise ChesCurateError(f"no `{program}` program on this machine: install cron, or print a systemd timer "
                              "with --systemd")
    listed = subprocess.run([program, "-l"], capture_output=True, text=True)
    if listed.returncode != 0 and "no crontab" not in listed.stderr.lower():
        raise ChesCurateError(f"`{program} -l` failed ({listed.stderr.strip()}); nothing was installed")
    before = listed.stdout if listed.returncode == 0 else ""
    kept = [entry for entry in before.splitlines() if not entry.rstrip().endswith(marker(pipeline))]
    after = "\n".join([*kept, line]) + "\n"
    written = subprocess.run([program, "-"], input=after, capture_output=True, text=True)
    if written.returncode != 0:
        raise ChesCurateError(f"`{program} -` failed ({written.stderr.strip()}); the crontab is unchanged")
    return CrontabChange(before, after, len(before.splitlines()) - len(kept))


def on_calendar(cron: str) -> str:
    """The systemd `OnCalendar=` value of a cron expression (`0 3 * * 1-5` → `Mon..Fri *-*-* 03:00:00`).

    Cron runs when day-of-month OR day-of-week matches, systemd when both do, so an
    expression restricting both is refused rather than translated wrongly.
    """
    minute, hour, dom, month, dow = validate_cron(cron).split()
    if dom != "*" and dow != "*":
        raise ChesCurateError(f"cron {cron!r} restricts both day of month and day of week; systemd would need both "
                              "to match where cron needs either: schedule two timers instead")
    days = "" if dow == "*" else ",".join(_systemd_days(part) for part in dow.split(",")) + " "
    date = f"*-{_systemd_field(month, 1)}-{_systemd_field(dom, 1)}"
    return f"{days}{date} {_systemd_field(hour, 0, 2)}:{_systemd_field(minute, 0, 2)}:00"


def _systemd_field(value: str, first: int, width: int = 1) -> str:
    def one(part: str) -> str:
        base, _, step = part.partition("/")
        if base == "*":
            return f"{first:0{width}d}/{step}" if step else "*"
        start, _, end = base.partition("-")
        text = f"{int(start):0{width}d}" + (f"..{int(end):0{width}d}" if end else "")
        return f"{text}/{step}" if step else text

    return ",".join(one(part) for part in value.split(","))


def _systemd_days(part: str) -> str:
    base, _, step = part.partition("/")
    if step or base == "*":
        raise ChesCurateError(f"day-of-week step {part!r} has no systemd equivalent; list the days instead")
    start, _, end = base.partition("-")
    return _DAY_NAMES[int(start)] + (f"..{_DAY_NAMES[int(end)]}" if end else "")


def systemd_units(cron: str, command: list[str], workdir: Path, pipeline: str, log: Path | None = None,
                  env: dict[str, str] | None = None) -> dict[str, str]:
    """A systemd user service and timer running `command` in `workdir` on `cron`, by unit file name.

    The service sets `env` (default `scheduled_environment()`) and, with `log`, appends its output there.
    """
    env = scheduled_environment() if env is None else env
    unit = f"ches-curate-{pipeline}"
    environment = "".join(f"Environment={_systemd_quote(f'{name}={value}')}\n" for name, value in env.items())
    output = f"StandardOutput=append:{log}\nStandardError=append:{log}\n" if log is not None else ""
    service = (
        f"[Unit]\nDescription=ches-curate {pipeline} pipeline\n\n"
        f"[Service]\nType=oneshot\nWorkingDirectory={workdir}\n{environment}{output}"
        f"ExecStart={shlex.join(command)}\n"
    )
    timer = (
        f"[Unit]\nDescription=Run ches-curate {pipeline} on cron \"{validate_cron(cron)}\"\n\n"
        f"[Timer]\nOnCalendar={on_calendar(cron)}\nPersistent=true\nUnit={unit}.service\n\n"
        "[Install]\nWantedBy=timers.target\n"
    )
    return {f"{unit}.service": service, f"{unit}.timer": timer}


def _systemd_quote(assignment: str) -> str:
    """`"NAME=value"` with what systemd would interpret escaped: backslashes, double quotes, `%` specifiers."""
    return '"' + assignment.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def systemd_user_dir() -> Path:
    """Where systemd looks for a user's units: `$XDG_CONFIG_HOME/systemd/user` (default `~/.config/...`)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"


def write_systemd_units(units: dict[str, str], directory: Path | None = None) -> list[Path]:
    """Write `units` into `directory` (default `systemd_user_dir()`), replacing earlier copies; returns the paths."""
    directory = systemd_user_dir() if directory is None else directory
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in units.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def systemd_install_commands(units: dict[str, str]) -> list[str]:
    """The commands that load the written `units` for the current user and start the timer."""
    timer = next(name for name in units if name.endswith(".timer"))
    return ["systemctl --user daemon-reload", f"systemctl --user enable --now {timer}"]
