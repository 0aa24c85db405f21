"""`ches-curate policies` and `ches-curate filter`: list filter policies, apply one to stored scores."""

from __future__ import annotations

import json
import shlex
from typing import Any, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ches_curate import plugins
from ches_curate.commands import options, tables
from ches_curate.errors import ChesCurateError
from ches_curate.policies import (
    PolicyParams,
    SelectionResult,
    available_policies,
    get_policy,
    score_values,
    validate_params,
)
from ches_curate.terminal import printable

console = Console()

PLUGIN_HELP = "Load a plugin module by import name or .py path (repeatable), besides installed entry points."
EXCERPT_CHARS = 60


def register(app: typer.Typer) -> None:
    app.command("policies")(policies)
    app.command("filter")(filter_pairs)
    app.command("selections")(selections)


def policies(
    plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
) -> None:
    """List the filter policies from every plugin, with their parameters, defaults and help."""
    load_plugins(plugin)
    rows = []
    for name, entry in available_policies().items():
        details = Text(printable(entry.obj.description))
        details.append("\n" + printable(_params_help(entry.obj.Params)), style="cyan")
        rows.append([Text(printable(name), style="bold"), entry.plugin, details])
    columns = ["policy", "plugin", tables.Column("description, then params (--param name=value)", wrap=True)]
    tables.print_table(console, columns, rows, title="filter policies")
    shared = PolicyParams.model_fields["score_column"]
    console.print(Text(f"Every policy also takes score_column (default {shared.default!r}): {shared.description}"))
    disabled = plugins.disabled_plugins()
    if disabled:
        console.print(Text(printable(f"disabled by {plugins.DISABLED_PLUGINS_ENV}: {', '.join(sorted(disabled))}")))


def filter_pairs(
    dataset: options.Dataset,
    version: options.Version = None,
    model_key: options.ModelKey = None,
    policy: str = typer.Option(..., "--policy", help="Policy name; `ches-curate policies` lists them."),
    param: list[str] = typer.Option([], "--param", help="Policy parameter as name=value (repeatable)."),
    then: list[str] = typer.Option(
        [], "--then", help="Then apply another policy to the pairs kept so far: 'POLICY name=value ...' (repeatable; "
        "recorded as one `chain` selection with its steps).", metavar="'POLICY [NAME=VALUE ...]'",
    ),
    match_selection: Optional[int] = typer.Option(
        None, "--match-selection", help="Set param n to the number of pairs selection ID removed (the random control)."
    ),
    show: int = typer.Option(5, "--show", min=0, help="How many of the first removed pairs to print."),
    db: options.Db = None,
    plugin: list[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
) -> None:
    """Apply a filter policy to a dataset's scores and record the decision in the `selections` table."""
    from ches_curate.selection import select, selectable_scores
    from ches_curate.store import Store

    load_plugins(plugin)
    params = parse_params(param)
    if then:
        if match_selection is not None:
            raise ChesCurateError("--match-selection sets n of one policy; it cannot be combined with --then")
        policy, params = chained(policy, params, then)
    if match_selection is None:
        validate_params(get_policy(policy).obj, params)  # fail fast, before opening the store
    store = Store(db)
    if match_selection is not None:
        params = _matched(params, policy, store, match_selection)
    dv = store.dataset_version(dataset, version)
    model_key = store.scoring_model(dv.name, dv.version, model_key)
    scores = selectable_scores(store, dv.name, dv.version, model_key)
    selection = select(store, dv.name, dv.version, model_key, policy, params, scores=scores, source="cli")
    result = selection.result
    _print_result(selection.selection_id, result, f"dataset '{dv.name}' v{dv.version}, model {model_key}",
                  selection.n_excluded)
    print_response_lengths(scores[0], result)
    if selection.n_without_score:
        console.print(f"{selection.n_without_score:,} pairs have no value of a score the policy ranks by (it failed on "
                      "them or was not computed: see plugin_scores) and were left out before the policy",
                      highlight=False)
    if selection.unscored and (note := selection.unscored.note()):
        console.print(Text(printable(note), style="yellow"))
    if selection.reused:
        console.print(f"the same decisions were already recorded as selection {selection.selection_id}: reused it, "
                      "nothing new was written", highlight=False)
    if show and result.n_removed:
        print_removed(scores[0], result, show)


def selections(
    dataset: options.OptionalDataset = None,
    version: options.Version = None,
    diff: Optional[tuple[int, int]] = typer.Option(
        None, "--diff", help="Compare selection A (before) with B (after), pair by pair.", metavar="A B"
    ),
    arms: bool = typer.Option(False, "--ablation-arms", help="Also list the selections ablation arms made."),
    show: int = typer.Option(20, "--show", min=0, help="With --diff: how many changed pairs to list."),
    db: options.Db = None,
) -> None:
    """List recorded selections, newest first, with where each came from; or diff two of them."""
    from ches_curate.store import Store

    store = Store(db, create=False)
    if diff is not None:
        _print_diff(store, *diff, show)
        return
    frame = store.selections(dataset, version, include_ablation=arms)
    if frame.empty:
        console.print(Text(printable(f"no selections yet{f' for {dataset!r}' if dataset else ''}; "
                                     "make one with `ches-curate filter`")))
        return
    columns = ["selection_id", "source", "dataset_name", "dataset_version", "model_key", "policy", "params",
               "n_kept", "n_removed", "created_at"]
    headers, rows = tables.frame_rows(frame.loc[:, columns])
    tables.print_table(console, headers, rows, title="selections (newest first; `export --selection ID`)")


def _print_diff(store: Any, before: int, after: int, show: int) -> None:
    from ches_curate.refresh import CHANGES, diff_selections

    for selection_id in (before, after):
        store.selection(selection_id)  # an unknown id is an error listing the known ones
    diff = diff_selections(store, before, after)
    counts = diff.counts()
    summary = ", ".join(f"{counts[f'diff_{c}']:,} {c.replace('_', ' ')}" for c in CHANGES)
    console.print(f"selection {before} -> {after}: {summary}, {counts['diff_unchanged']:,} unchanged", highlight=False)
    if show and len(diff.changes):
        headers, rows = tables.frame_rows(diff.changes.head(show))
        title = f"first {min(show, len(diff.changes))} of {len(diff.changes):,} changed pairs"
        tables.print_table(console, headers, rows, title=title)


def _print_result(selection_id: int, result: SelectionResult, where: str, n_excluded: int = 0) -> None:
    total = result.n_kept + result.n_removed
    console.print(
        f"selection [bold]{selection_id}[/]: {escape(printable(result.policy))} "
        f"{escape(json.dumps(result.params))} on {escape(printable(where))}",
        highlight=False,
    )
    counts = f"kept [bold green]{result.n_kept:,}[/], removed [bold red]{result.n_removed:,}[/] of {total:,}"
    if result.n_duplicate_rows:
        console.print(
            f"{counts} distinct pairs ({result.n_removed / total:.1%} removed); they stand for "
            f"{result.n_input_rows:,} input rows ({result.n_duplicate_rows:,} duplicates)",
            highlight=False,
        )
    else:
        console.print(f"{counts} pairs ({result.n_removed / total:.1%} removed)", highlight=False)
    if n_excluded:
        console.print(f"{n_excluded:,} quarantined pairs were left out before the policy (see the quarantine table)",
                      highlight=False)


def parse_params(items: list[str]) -> dict[str, str]:
    """`["k=5", "score_column=ln_ches"]` -> `{"k": "5", ...}`; the policy's Params model converts the values."""
    params: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ChesCurateError(f"--param {item!r} must look like name=value, e.g. --param k=100")
        if name in params:
            raise ChesCurateError(f"--param {name} is given twice")
        params[name] = value.strip()
    return params


def chained(policy: str, params: dict[str, Any], then: list[str]) -> tuple[str, dict[str, Any]]:
    """`--policy P --param ... --then 'Q name=value ...'` as the `chain` policy and its steps."""
    steps = [{"policy": policy, "params": params}]
    for item in then:
        words = shlex.split(item)
        if not words or "=" in words[0]:
            raise ChesCurateError(f"--then {item!r} must start with a policy name, e.g. --then 'threshold value=1'")
        steps.append({"policy": words[0], "params": parse_params(words[1:])})
    return "chain", {"steps": steps}


def print_response_lengths(scores: pd.DataFrame, result: SelectionResult) -> None:
    """The mean response tokens (|y+| + |y-|) of the kept and of the removed pairs, so that a cut that removes
    mostly long pairs shows (raw CHES grows with the square of the response lengths)."""
    kept = result.frame["kept"].to_numpy()
    if kept.all() or not kept.any():
        return
    lengths = scores.drop_duplicates("pair_id").set_index("pair_id")
    tokens = result.frame["pair_id"].map(lengths["chosen_tokens"] + lengths["rejected_tokens"]).to_numpy()
    console.print(f"response tokens (chosen + rejected): {tokens[kept].mean():,.1f} on average in the kept pairs, "
                  f"{tokens[~kept].mean():,.1f} in the removed", highlight=False)


def print_removed(scores: pd.DataFrame, result: SelectionResult, limit: int) -> None:
    """The first `limit` removed pairs with their score, response tokens and text excerpts (plain text, control
    codes escaped)."""
    first = result.frame[~result.frame["kept"]].sort_values("rank").head(limit)
    pairs = scores.drop_duplicates("pair_id").set_index("pair_id").loc[first["pair_id"]].reset_index()
    values = score_values(pairs, result.score_column)
    columns = [tables.Column("rank", True), "pair_id", tables.Column(result.score_column, True),
               tables.Column("tokens y+/y-", True),
               *(tables.Column(text, wrap=True) for text in ("prompt", "chosen", "rejected"))]
    rows = [[str(rank), pair["pair_id"][:12], f"{value:.4g}", f"{pair['chosen_tokens']}/{pair['rejected_tokens']}",
             *(_excerpt(pair[c]) for c in ("prompt", "chosen", "rejected"))]
            for rank, value, (_, pair) in zip(first["rank"], values, pairs.iterrows())]
    tables.print_table(console, columns, rows, title=f"first {len(first)} removed pairs (by rank)")


def _excerpt(value: Any) -> str:
    """The text on one line, control codes escaped, cut to EXCERPT_CHARS."""
    if isinstance(value, list):
        value = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    text = printable(" ".join(str(value).split()))
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _params_help(params_model: Any) -> str:
    """One line per param; score_column only where a policy changes its default."""
    lines = []
    for name, field in params_model.model_fields.items():
        if name == "score_column" and field.default == PolicyParams.model_fields[name].default:
            continue
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"{name}: {_type_name(field.annotation)}, {default} — {field.description or ''}".rstrip(" —"))
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def load_plugins(modules: list[str]) -> None:
    """Register each `--plugin` module (import name or .py path)."""
    for module in modules:
        plugins.load_plugin_module(module)


def _matched(params: dict[str, str], policy: str, store: Any, selection_id: int) -> dict[str, Any]:
    if "n" not in get_policy(policy).obj.Params.model_fields:
        raise ChesCurateError(f"--match-selection sets param n, which policy '{policy}' does not take")
    if "n" in params or "fraction" in params:
        raise ChesCurateError("--match-selection sets n; drop --param n / --param fraction")
    kept = store.selection(selection_id)["kept"].astype(bool)
    return {**params, "n": int((~kept).sum())}
