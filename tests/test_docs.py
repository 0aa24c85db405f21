"""The documentation builds and its examples run (README.md and docs/**/*.md).

- `mkdocs build --strict` passes (a broken link, anchor, API reference or nav entry fails it);
- every Python block runs, the blocks of one page in order in one namespace, in a folder
  holding `pairs.jsonl` and a store with dataset `hh` scored and filtered; the tiny random
  Llama stands in for `model="default"` (blocks in a "Not run by the tests: <reason>"
  admonition only have their imports checked);
- every `ches-curate` command names a real command and only options it has, in code blocks,
  inline code and the `--help` examples; blocks after `<!-- docs-test: run -->` are run;
- every `ches_curate.…` dotted name in inline code imports;
- the README's relative links reach a file and, with `#anchor`, one of its headings (the strict build
  checks the pages' own links).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from ches_curate.cli import EXAMPLES, app
from tests import docs_examples as docs

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted(p for p in (REPO / "docs").rglob("*.md"))
ROOT = typer.main.get_command(app)

EXAMPLE_README = REPO / "examples" / "ches-curate-plugin-example" / "README.md"
MARKDOWN = [README, EXAMPLE_README, *PAGES]
DOC_PAIRS = [
    {"prompt": f"How do I water plant number {i}?", "chosen": f"Water plant {i} once a week, in the morning.",
     "rejected": "Never water it." if i % 3 else f"Water plant {i} every hour."}
    for i in range(12)
]


def page_id(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def with_tiny_model(text: str, model_dir: Path) -> str:
    """The example with the tiny test model where it names the default model (SmolLM2, minutes on a CPU)."""
    text = re.sub(r'(model=|load_model\()"default"', lambda m: f"{m.group(1)}{str(model_dir)!r}", text)
    return re.sub(r"--model default\b", f"--model {model_dir}", text)


def static_problems(path: Path) -> list[str]:
    """Unknown commands, options and import paths a Markdown file names (nothing is run)."""
    options = docs.all_options(ROOT)
    problems = []
    for block in docs.blocks(path):
        if block.lang in docs.COMMAND_LANGS:
            problems += [p for rest in docs.command_lines(block.code) for p in docs.command_problems(rest, ROOT)]
        elif block.lang == "python":
            problems += docs.import_problems(block.code)
    for _, span in docs.inline_code(path):
        problems += [p for rest in docs.command_lines(span) for p in docs.command_problems(rest, ROOT)]
        head, *tail = span.split() or [""]
        if head.startswith("--") and not set(head.split("=")[0].split("/")) <= options | set(docs.FOREIGN_OPTIONS):
            problems.append(f"no command has the option {head}")
        if head in ROOT.commands and tail and tail[0].startswith("-"):
            problems += docs.command_problems(span, ROOT)
        problems += [p for match in docs.DOTTED.finditer(span) if (p := docs.dotted_problem(match.group(0)))]
    return problems


@pytest.mark.parametrize("path", MARKDOWN, ids=page_id)
def test_docs_name_only_real_commands_options_and_imports(path):
    assert static_problems(path) == []


LINK = re.compile(r"\]\((?!https?:|#)([^)#\s]+)(?:#([^)\s]*))?\)")


@pytest.mark.parametrize("readme", [README, EXAMPLE_README], ids=page_id)
def test_readme_links_reach_files_and_headings(readme):
    """READMEs are read on GitHub and PyPI, outside the strict site build: their links are checked here."""
    broken = []
    for target, anchor in LINK.findall(readme.read_text(encoding="utf-8")):
        path = readme.parent / target
        if not path.exists():
            broken.append(target)
        elif anchor and anchor not in docs.heading_anchors(path):
            broken.append(f"{target}#{anchor}")
    assert broken == []


def test_help_examples_name_only_real_commands_and_options():
    problems = {name: docs.command_problems(rest, ROOT) for name, example in EXAMPLES.items()
                for rest in docs.command_lines(example)}
    assert {name: found for name, found in problems.items() if found} == {}


def test_command_checks_find_a_wrong_command_and_a_wrong_option():
    assert docs.command_problems("score pairs.jsonl --model default --shards 4", ROOT) == []
    assert docs.command_problems("score pairs.jsonl --modle default", ROOT) == ["'ches-curate score' has no option --modle"]
    assert docs.command_problems("scroe pairs.jsonl", ROOT) == ["unknown command 'ches-curate scroe'"]
    assert docs.command_problems("scores lst", ROOT) == ["unknown command 'ches-curate scores lst'"]  # a group's
    assert docs.command_lines("torchrun --nproc-per-node 8 --no-python ches-curate score p.jsonl \\\n  --dtype bfloat16 # x") \
        == ["score p.jsonl --dtype bfloat16 # x"]
    assert docs.words("sql \"SELECT 1 -- c\" --format csv | head # note") == ["sql", "SELECT 1 -- c", "--format", "csv"]
    assert docs.dotted_problem("ches_curate.scoring.sharded.shard_of") is None
    assert docs.dotted_problem("ches_curate.sharding") == "ches_curate.sharding: ches_curate has no 'sharding'"
    assert docs.import_problems("from steps.data import load\nfrom ches_curate.incremental import score_dataset") == [
        "ches_curate.incremental.score_dataset: ches_curate has no 'incremental'"]  # the reader's own `steps` is not ours


@pytest.fixture(scope="module")
def docs_workdir(tmp_path_factory, tiny_llama_dir) -> Path:
    """`pairs.jsonl`, and `ches_curate.duckdb` holding dataset `hh` scored by the tiny Llama and selection 1."""
    from ches_curate.ingest import read_pairs
    from ches_curate.scoring.incremental import score_dataset
    from ches_curate.selection import select
    from ches_curate.store import Store

    work = tmp_path_factory.mktemp("docs_base")
    (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in DOC_PAIRS), encoding="utf-8")
    store = Store(work / "ches_curate.duckdb")
    store.register_dataset("hh", "pairs.jsonl", read_pairs(work / "pairs.jsonl"))
    summary = score_dataset(store, "hh", model=str(tiny_llama_dir))
    assert select(store, "hh", 1, summary.model_key, "percentile", {"p": 90}).selection_id == 1
    return work


def fresh_copy(base: Path, tmp_path: Path, keep_store: bool = True) -> Path:
    work = tmp_path / "work"
    shutil.copytree(base, work, ignore=None if keep_store else shutil.ignore_patterns("*.duckdb"))
    return work


PYTHON_PAGES = [p for p in MARKDOWN if any(
    b.lang == "python" and b.skip_reason is None for b in docs.blocks(p))]


@pytest.mark.parametrize("path", PYTHON_PAGES, ids=page_id)
def test_python_examples_run(path, docs_workdir, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(fresh_copy(docs_workdir, tmp_path))
    namespace = {"__name__": "docs_example"}
    for block in docs.blocks(path):
        if block.lang == "python" and block.skip_reason is None:
            code = compile(with_tiny_model(block.code, tiny_llama_dir), block.where, "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own example


def test_skipped_examples_say_why():
    skipped = [b for p in MARKDOWN for b in docs.blocks(p) if b.skip_reason]
    assert skipped, "the pipelines page has examples that need minutes of ZenML; they must be marked"
    assert all(len(b.skip_reason.split()) >= 4 for b in skipped)


RUN_BLOCKS = [b for p in MARKDOWN for b in docs.blocks(p) if b.run]


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=lambda b: b.where)
def test_marked_command_blocks_run(block, docs_workdir, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(fresh_copy(docs_workdir, tmp_path, keep_store=False))
    for rest in docs.command_lines(with_tiny_model(block.code, tiny_llama_dir)):
        result = CliRunner().invoke(app, docs.words(rest))
        assert result.exit_code == 0, f"ches-curate {rest}\n{result.output}\n{result.exception!r}"


def command_paths(command, path: str = "ches-curate") -> list[str]:
    return [path, *(p for name, sub in getattr(command, "commands", {}).items() for p in command_paths(sub, f"{path} {name}"))]


def test_the_docs_site_builds_strictly_offline(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    cli_page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for path in command_paths(ROOT):  # the generated reference has every command and subcommand
        assert f'id="{path.replace(" ", "-")}"' in cli_page, path
    remote = [(page.name, m.group(0)) for page in (tmp_path / "site").rglob("*.html")
              for m in re.finditer(r'<(?:link|script|img)[^>]+(?:href|src)="(?:https?:)?//[^"]+', page.read_text())]
    assert remote == []  # the site loads no font, script or style from the network
