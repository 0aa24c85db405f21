"""MkDocs hook: publish bench/'s results (`bench/*.md`, `bench/data/*.png`) as pages under benchmarks/.

The measured numbers have one home, the files the bench scripts' runs update in bench/; the
site renders those same files instead of a copy, and their relative links keep working.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

BENCH = Path(__file__).resolve().parents[2] / "bench"


def on_files(files: Files, config) -> Files:
    for path in sorted([*BENCH.glob("*.md"), *(BENCH / "data").glob("*.png")]):
        files.append(File.generated(config, f"benchmarks/{path.relative_to(BENCH).as_posix()}", abs_src_path=str(path)))
    return files
