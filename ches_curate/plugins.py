"""The one plugin manager: entry-point discovery, explicit loading, and registries.

Plugins are modules that implement hooks from `ches_curate.hookspecs`. The built-in
policies and scores are listed in `DEFAULT_PLUGINS` and registered first, through the same
`_register` and the same hooks as any other plugin, so they are found even where the
package's installed metadata is missing (a copied source tree, a zipapp). Third-party
plugins are found through the `ches_curate` entry-point group, or loaded explicitly by
module name or file path (`--plugin`).

- `CHES_CURATE_DISABLED_PLUGINS=a,b` skips default plugins and entry points by plugin
  name, module name or distribution name.
- A distribution visible twice on `sys.path` (an `.egg-info` in the working directory
  next to the installed `.dist-info`) is loaded once.
- A plugin that raises while importing or inside its hook is reported as
  `plugin 'x' failed: <error>`; the original exception is chained as `__cause__`, so
  `--debug` shows its traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pluggy

from ches_curate import hookspecs
from ches_curate.errors import ChesCurateError
from ches_curate.hookspecs import hookimpl

__all__ = [
    "ENTRY_POINT_GROUP",
    "DISABLED_PLUGINS_ENV",
    "Registered",
    "hookimpl",
    "plugin_manager",
    "load_plugin_module",
    "disabled_plugins",
    "registered",
    "reset",
]

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
DEFAULT_PLUGINS = {"builtin_policies": "ches_curate.builtin_plugins.builtin_policies",
                   "builtin_scores": "ches_curate.builtin_plugins.builtin_scores"}
"""Plugins that ship with ches_curate, by plugin name: registered like any plugin, without entry-point metadata."""
DISABLED_PLUGINS_ENV = "CHES_CURATE_DISABLED_PLUGINS"
logger = logging.getLogger(__name__)

_pm: pluggy.PluginManager | None = None
_registries: dict[str, dict[str, Registered]] = {}


@dataclass(frozen=True)
class Registered:
    """One object registered through a `register_*` hook, with the plugin that registered it."""

    obj: Any
    plugin: str


def disabled_plugins() -> set[str]:
    """Names listed in `CHES_CURATE_DISABLED_PLUGINS` (comma-separated)."""
    raw = os.environ.get(DISABLED_PLUGINS_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use with every enabled entry point."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        disabled = disabled_plugins()
        known = _load_defaults(pm, disabled) | _load_entry_points(pm, disabled)
        if unknown := sorted(name for name in disabled if name not in known and _dist_key(name) not in known):
            logger.warning("%s names no installed plugin: %s (known: %s)", DISABLED_PLUGINS_ENV, ", ".join(unknown),
                           ", ".join(sorted(known)))
        _pm = pm
    return _pm


def reset() -> None:
    """Forget the plugin manager and every registry (tests, or after changing the environment)."""
    global _pm
    _pm = None
    _registries.clear()


def load_plugin_module(name: str) -> None:
    """Register a plugin module by import name (`my_policies`) or file path (`./my_policies.py`).

    Explicit loading ignores `CHES_CURATE_DISABLED_PLUGINS`; loading a module twice is a no-op.
    """
    pm = plugin_manager()
    module = call_plugin(name, lambda: _import(name))
    if pm.is_registered(module):
        return
    _register(pm, module, name)
    _registries.clear()


def registered(hook_name: str, *, kind: str, check: Callable[[Any], None]) -> dict[str, Registered]:
    """Everything the plugins register through hook `hook_name`, by `.name`, sorted (cached).

    Each plugin's hook gets its own `register(obj)` callback, which runs `check(obj)`
    (raise to reject it), so every object is attributed to the plugin that registered
    it and a name registered by two plugins is reported with both.
    """
    if hook_name not in _registries:
        _registries[hook_name] = _collect(plugin_manager(), hook_name, kind, check)
    return _registries[hook_name]


def _collect(pm: pluggy.PluginManager, hook_name: str, kind: str, check: Callable[[Any], None]) -> dict[str, Registered]:
    found: dict[str, Registered] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        objects: list[Any] = []

        def register(obj: Any) -> None:
            check(obj)
            objects.append(obj)

        call_plugin(impl.plugin_name, lambda: impl.function(**{arg: register for arg in impl.argnames}))
        for obj in objects:
            prior = found.get(obj.name)
            if prior is not None:
                by = f"twice by plugin '{prior.plugin}'" if prior.plugin == impl.plugin_name else (
                    f"by both plugin '{prior.plugin}' and plugin '{impl.plugin_name}'"
                )
                raise ChesCurateError(
                    f"{kind} '{obj.name}' is registered {by}; rename one or disable a plugin with {DISABLED_PLUGINS_ENV}"
                )
            found[obj.name] = Registered(obj, impl.plugin_name)
    return dict(sorted(found.items()))


def _load_defaults(pm: pluggy.PluginManager, disabled: set[str]) -> set[str]:
    """Register the default plugins not `disabled`; returns the names each answers to (plugin and module)."""
    for name, module_name in DEFAULT_PLUGINS.items():
        if name not in disabled and module_name not in disabled:
            _register(pm, call_plugin(name, lambda: importlib.import_module(module_name)), name)
    return set(DEFAULT_PLUGINS) | set(DEFAULT_PLUGINS.values())


def _load_entry_points(pm: pluggy.PluginManager, disabled: set[str]) -> set[str]:
    """Register the installed entry points not `disabled`; returns the names each answers to (entry point,
    module, distribution)."""
    seen_dists: set[str] = set()
    known: set[str] = set()
    disabled_dists = {_dist_key(name) for name in disabled}
    for dist in importlib.metadata.distributions():
        dist_key = _dist_key(dist.metadata["Name"] or "")
        if dist_key in seen_dists:
            continue
        seen_dists.add(dist_key)
        for ep in dist.entry_points.select(group=ENTRY_POINT_GROUP):
            known.update((ep.name, ep.module, dist_key))
            if ep.name in disabled or ep.module in disabled or dist_key in disabled_dists:
                continue
            module = call_plugin(ep.name, ep.load, hint=f"set {DISABLED_PLUGINS_ENV}={ep.name} to skip it")
            if not pm.is_registered(module):  # a default plugin still declared as an entry point by an old install
                _register(pm, module, ep.name)
    return known


def _register(pm: pluggy.PluginManager, module: ModuleType, name: str) -> None:
    def register_checked() -> None:
        pm.register(module, name=name)
        pm.check_pending()
        if not pm.get_hookcallers(module):
            raise ChesCurateError(f"module '{module.__name__}' has no @hookimpl functions (known hooks: {_hook_names()})")

    try:
        call_plugin(name, register_checked)
    except ChesCurateError:
        if pm.is_registered(module):
            pm.unregister(module)
        raise


def call_plugin(plugin: str, call: Callable[[], Any], hint: str | None = None) -> Any:
    """Run plugin code; turn any exception into one line naming the plugin (cause chained)."""
    try:
        return call()
    except (Exception, SystemExit, GeneratorExit) as err:  # a plugin's sys.exit() must not end the command as a success
        detail = str(err) if isinstance(err, ChesCurateError) else describe_failure(err)
        if isinstance(err, pluggy.PluginValidationError):
            lines = re.sub(r" in plugin <.*>$", "", str(err), flags=re.S).splitlines()
            detail = "; ".join(lines[1:] if lines[0].startswith("Plugin ") else lines) + f" (known hooks: {_hook_names()})"
        suffix = f" ({hint})" if hint else ""
        raise ChesCurateError(f"plugin '{plugin}' failed: {detail}{suffix}") from err


def describe_failure(err: BaseException) -> str:
    """What plugin code raised, for one line: `KeyError: 'x'`, or `called sys.exit(0)`."""
    if isinstance(err, SystemExit):
        return f"called sys.exit({err.code!r}) (a plugin must raise an exception, not exit)"
    return f"{type(err).__name__}: {err}"


def _hook_names() -> str:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return ", ".join(sorted(name for name, value in vars(hookspecs).items() if hasattr(value, marker)))


def _import(name: str) -> ModuleType:
    path = Path(name)
    if path.suffix != ".py":
        return importlib.import_module(name)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {name}")
    module_name = f"ches_curate_plugin_file_{path.stem}"
    loaded = sys.modules.get(module_name)
    if loaded is not None and Path(loaded.__file__).resolve() == path.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
