"""The CLI is a thin shell: `--help`, `--version` and `sql` never import torch, every command has an example."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ches_curate.cli import EXAMPLES, app
from ches_curate.store import Store
from tests.reliability_helpers import QUIET_ENV, REPO, run_cli
from tests.test_incremental import toy_pairs

HEAVY = ("torch", "transformers", "zenml", "great_expectations", "trl", "datasets")
PROBE = """
import sys
from ches_curate import cli
sys.argv = ["ches-curate", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as done:
    code = done.code
print("\\nIMPORTED", *sorted(m for m in {heavy} if m in sys.modules), "CODE", code)
"""


def imported_by(*args: str) -> tuple[list[str], int]:
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120).stdout
    words = out.rsplit("IMPORTED", 1)[1].split()
    return words[: words.index("CODE")], int(words[-1])


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("score", "--help"), ("filter", "--help"),
                                  ("train", "--help"), ("run", "--help")])
def test_help_imports_no_heavy_library(args):
    assert imported_by(*args) == ([], 0)


def test_sql_imports_no_heavy_library(tmp_path):
    store = Store(tmp_path / "s.duckdb")
    store.register_dataset("toy", None, toy_pairs(3))
    assert imported_by("sql", "SELECT count(*) AS n FROM pairs", "--db", str(store.path)) == ([], 0)


def test_every_command_ends_its_help_with_an_example():
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert names == set(EXAMPLES)
    for name in names:
        run = run_cli(name, "--help")
        assert run.code == 0 and f"Example: {EXAMPLES[name].split()[0]} {name}" in " ".join(run.stdout.split())


def test_version_prints_the_package_version():
    from ches_curate import __version__

    assert run_cli("--version").stdout.strip() == f"ches-curate {__version__}"
