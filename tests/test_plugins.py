"""Plugin discovery and load control: entry points, dist-info de-duplication, disabling, named failures."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import ches_curate
from ches_curate import hookspecs, plugins
from ches_curate.commands import filter as filter_commands
from ches_curate.errors import ChesCurateError
from ches_curate.policies import apply_policy, available_policies
from tests.test_policies import BUILTINS, removed, score_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ches-curate-plugin-example"


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Each test builds its own plugin manager and leaves none behind."""
    monkeypatch.delenv(plugins.DISABLED_PLUGINS_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def clean_modules():
    """Forget plugin modules a test imported, so the next test imports them afresh."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def add_dist_info(site: Path, name: str, entry_points: dict[str, str], monkeypatch) -> None:
    """Make `name` an installed distribution: a .dist-info with its entry points, on sys.path."""
    dist_info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(site))


def install_example(site: Path, monkeypatch) -> None:
    """Install the example plugin without a network or a build: its source dir plus a dist-info."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    monkeypatch.syspath_prepend(str(EXAMPLE))
    add_dist_info(site, project["name"], project["entry-points"]["ches_curate"], monkeypatch)


def write_module(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def failure(call) -> ChesCurateError:
    with pytest.raises(ChesCurateError) as err:
        call()
    return err.value


def test_builtins_are_found_without_any_entry_point_metadata(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(()))  # no installed metadata at all
    assert plugins.plugin_manager().get_plugin("builtin_policies").__name__ == "ches_curate.builtin_plugins.builtin_policies"
    assert set(BUILTINS) <= set(available_policies())
    assert {found.plugin for name, found in available_policies().items() if name in BUILTINS} == {"builtin_policies"}


def test_hookimpl_is_exported_from_the_package():
    assert ches_curate.hookimpl is hookspecs.hookimpl is plugins.hookimpl


def test_example_plugin_is_discovered_listed_and_applied(tmp_path, monkeypatch, clean_modules):
    install_example(tmp_path / "site", monkeypatch)
    found = available_policies()
    assert found["per-prompt-cap"].plugin == "per_prompt_cap"
    assert set(BUILTINS) < set(found)

    app = typer.Typer()
    filter_commands.register(app)
    monkeypatch.setattr(filter_commands.console, "width", 200)
    listing = CliRunner().invoke(app, ["policies"])
    assert listing.exit_code == 0, listing.output
    assert re.search(r"per-prompt-cap\s*│\s*per_prompt_cap", listing.output)
    assert "max_per_prompt: int, default 1 — Most pairs kept for any one prompt." in listing.output

    scores = score_table([1.0, 5.0, 3.0, 5.0, 2.0, 0.5], prompt=["x", "y", "x", "x", "y", "z"])
    # x: p00 (1.0) < p02 (3.0) < p03 (5.0); y: p04 (2.0) < p01 (5.0); z: p05 alone.
    assert removed(apply_policy(scores, "per-prompt-cap", {"max_per_prompt": 1})) == {"p01", "p02", "p03"}
    assert removed(apply_policy(scores, "per-prompt-cap", {"max_per_prompt": 2})) == {"p03"}


def test_a_distribution_visible_twice_on_sys_path_registers_once(tmp_path, monkeypatch, clean_modules):
    install_example(tmp_path / "site_a", monkeypatch)
    install_example(tmp_path / "site_b", monkeypatch)
    dists = [d for d in importlib.metadata.distributions() if d.metadata["Name"] == "ches-curate-plugin-example"]
    assert len(dists) == 2
    assert available_policies()["per-prompt-cap"].plugin == "per_prompt_cap"


def test_disabled_plugins_are_skipped_by_entry_point_or_distribution_name(tmp_path, monkeypatch, clean_modules):
    install_example(tmp_path / "site", monkeypatch)
    monkeypatch.setenv(plugins.DISABLED_PLUGINS_ENV, "builtin_policies")
    assert list(available_policies()) == ["per-prompt-cap"]
    err = failure(lambda: apply_policy(score_table([1.0]), "top-k", {"k": 1}))
    assert str(err) == "unknown policy 'top-k' (available: per-prompt-cap)"

    monkeypatch.setenv(plugins.DISABLED_PLUGINS_ENV, " ches-curate-plugin-example , builtin_policies")
    plugins.reset()
    assert available_policies() == {}
    assert "no policies are registered" in str(failure(lambda: apply_policy(score_table([1.0]), "top-k", {"k": 1})))


def test_a_plugin_failing_on_import_is_named_with_its_cause(tmp_path, monkeypatch, clean_modules):
    write_module(tmp_path, "broken_plugin_mod", "raise RuntimeError('boom')\n")
    add_dist_info(tmp_path, "broken-dist", {"broken": "broken_plugin_mod"}, monkeypatch)
    err = failure(available_policies)
    assert str(err) == (
        "plugin 'broken' failed: RuntimeError: boom (set CHES_CURATE_DISABLED_PLUGINS=broken to skip it)"
    )
    assert isinstance(err.__cause__, RuntimeError)

    monkeypatch.setenv(plugins.DISABLED_PLUGINS_ENV, "broken")
    plugins.reset()
    assert set(available_policies()) == set(BUILTINS)


def test_a_plugin_raising_in_its_hook_is_named(tmp_path):
    path = write_module(
        tmp_path,
        "hook_raises",
        """
        from ches_curate.hookspecs import hookimpl

        @hookimpl
        def register_filter_policies(register):
            raise ValueError("no config file")
        """,
    )
    plugins.load_plugin_module(str(path))
    err = failure(available_policies)
    assert str(err) == f"plugin '{path}' failed: ValueError: no config file"
    assert isinstance(err.__cause__, ValueError)


POLICY_MODULE = """
from ches_curate.hookspecs import hookimpl
from ches_curate.policies import Policy, remove_highest

class Clash(Policy):
    name = {name!r}

    def select(self, scores, params):
        return {select}

@hookimpl
def register_filter_policies(register):
    register({registered})
"""


@pytest.mark.parametrize(
    ("name", "registered", "message"),
    [
        ("top-k", "Clash()", "policy 'top-k' is registered by both plugin 'builtin_policies' and plugin '{plugin}'; "
                             "rename one or disable a plugin with CHES_CURATE_DISABLED_PLUGINS"),
        ("mine", "Clash", "plugin '{plugin}' failed: TypeError: register() got the class Clash; pass an instance: "
                          "register(Clash())"),
    ],
)
def test_bad_registrations_name_the_plugin(tmp_path, name, registered, message):
    path = write_module(tmp_path, "clash", POLICY_MODULE.format(name=name, select="None", registered=registered))
    plugins.load_plugin_module(str(path))
    assert str(failure(available_policies)) == message.format(plugin=path)


def test_the_same_plugin_registering_a_name_twice_is_reported(tmp_path):
    source = POLICY_MODULE.format(name="mine", select="None", registered="Clash())\n    register(Clash()")
    plugins.load_plugin_module(str(write_module(tmp_path, "twice", source)))
    assert "policy 'mine' is registered twice by plugin" in str(failure(available_policies))


@pytest.mark.parametrize(
    ("select", "problem"),
    [
        ("remove_highest(scores.iloc[:1], 'ches', 1)", "returned a selection of 1 pairs for the 2 it was offered: 1 offered "
         "pairs missing (first: p01) (decide each offered pair once, e.g. SelectionResult.from_kept(scores, kept, "
         "score_column))"),
        ("scores['no_such_column']", "failed: KeyError: 'no_such_column'"),
    ],
)
def test_a_policy_failing_in_select_is_named_with_its_plugin(tmp_path, select, problem):
    path = write_module(tmp_path, "bad_select", POLICY_MODULE.format(name="mine", select=select, registered="Clash()"))
    plugins.load_plugin_module(str(path))
    err = failure(lambda: apply_policy(score_table([1.0, 2.0]), "mine", {}))
    assert str(err) == f"policy 'mine' (plugin '{path}') {problem}"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = 1\n", "module '{module}' has no @hookimpl functions (known hooks: judge_responses, register_filter_policies, register_scores)"),
        (
            "from ches_curate.hookspecs import hookimpl\n@hookimpl\ndef register_filter_policy(register):\n    pass\n",
            "unknown hook 'register_filter_policy' (known hooks: judge_responses, register_filter_policies, register_scores)",
        ),
        (
            "from ches_curate.hookspecs import hookimpl\n@hookimpl\ndef register_filter_policies(reg):\n    pass\n",
            "hookimpl definition: register_filter_policies(reg); Argument(s) {{'reg'}} are declared in the hookimpl "
            "but can not be found in the hookspec (known hooks: judge_responses, register_filter_policies, register_scores)",
        ),
    ],
)
def test_modules_without_a_valid_hook_are_rejected(tmp_path, source, message):
    path = write_module(tmp_path, "nohook", source)
    err = failure(lambda: plugins.load_plugin_module(str(path)))
    assert str(err) == f"plugin '{path}' failed: " + message.format(module="ches_curate_plugin_file_nohook")
    assert not plugins.plugin_manager().has_plugin(str(path))


def test_an_unimportable_plugin_module_is_named():
    err = failure(lambda: plugins.load_plugin_module("no_such_policy_module"))
    assert str(err) == "plugin 'no_such_policy_module' failed: ModuleNotFoundError: No module named 'no_such_policy_module'"


def docs_example_code() -> str:
    """The first python block of docs/plugins.md, the filter-plugin tutorial."""
    heading = re.compile(r"^# Writing plugins\s*$", re.M)
    text = (REPO / "docs" / "plugins.md").read_text()
    block = re.search(r"```python\n(.*?)```", text[heading.search(text).end():], re.S)
    return block.group(1)


def test_the_documented_plugin_example_runs(monkeypatch):
    code = docs_example_code()
    assert len(code.strip().splitlines()) <= 25
    module = types.ModuleType("docs_plugin_example")
    exec(compile(code, "docs_plugin_example", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "docs_plugin_example", module)
    plugins.load_plugin_module("docs_plugin_example")

    values = np.array([0.0, 1.0, 1.0, 2.0, 9.0, 1.0, 0.5, 1.5])
    result = apply_policy(score_table(values), "z-score", {"z": 1.5})
    cut = values.mean() + 1.5 * values.std()  # 5.34: only the 9.0 lies above it
    assert removed(result) == {f"p{i:02d}" for i in np.flatnonzero(values > cut)} == {"p04"}
    assert available_policies()["z-score"].plugin == "docs_plugin_example"


def test_a_plugin_may_implement_only_the_judge_hook(tmp_path):
    path = write_module(
        tmp_path,
        "judge_only",
        """
        from ches_curate.hookspecs import hookimpl

        @hookimpl
        def judge_responses(prompts, responses):
            return [response.startswith("No") for response in responses]
        """,
    )
    plugins.load_plugin_module(str(path))
    verdicts = plugins.plugin_manager().hook.judge_responses(prompts=["p", "q"], responses=["No way.", "Sure."])
    assert verdicts == [True, False]
    assert set(available_policies()) == set(BUILTINS)
