"""MkDocs hook: the command-line reference, generated from the Typer app at build time.

A page containing the line `<!-- cli-reference -->` gets, in its place, one section per
`ches-curate` command and subcommand: its help text, usage line, options (with defaults) and worked
example, all read from `typer.main.get_command(ches_curate.cli.app)`, so the reference
cannot drift from the code.
"""

from __future__ import annotations

import html

MARKER = "<!-- cli-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    import typer.main

    from ches_curate.cli import app

    root = typer.main.get_command(app)
    root_ctx = root.context_class(root, info_name="ches-curate")
    return "\n\n".join(_commands(root, root_ctx, "ches-curate"))


def _commands(command, ctx, path: str) -> list[str]:
    """The section of `command` and, for a group (`ches-curate scores`), one of each subcommand after it."""
    parts = [_command(command, ctx, path, level=2)]
    for name, sub in getattr(command, "commands", {}).items():
        parts += _commands(sub, sub.context_class(sub, info_name=name, parent=ctx), f"{path} {name}")
    return parts


def _command(command, ctx, name: str, level: int) -> str:
    lines = [f"{'#' * level} `{name}`", ""]
    lines += [_text(command.help or ""), "", "```text", command.get_usage(ctx), "```", ""]
    rows = [record for param in command.get_params(ctx) if (record := param.get_help_record(ctx))]
    if rows:
        lines += ["| argument or option | meaning |", "| --- | --- |"]
        lines += [f"| `{_code(opts)}` | {_cell(help_text)} |" for opts, help_text in rows]
        lines.append("")
    if command.epilog:
        lines += ["```text", command.epilog.replace("\b\n", "").strip(), "```"]
    return "\n".join(lines)


def _text(text: str) -> str:
    """Help text as Markdown paragraphs: click's `\\b` (no-rewrap) markers dropped, HTML escaped."""
    return html.escape(text.replace("\b\n", "").replace("\b", ""), quote=False).strip()


def _cell(text: str) -> str:
    return " ".join(_text(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")
