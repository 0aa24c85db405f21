"""Options several commands share, declared once so that their names, defaults and help agree.

Two kinds of model option, with distinct names: `--model` is a model to *load* (score,
train, probe, ablate), `--model-key` names the stored scores of a model that already
scored a dataset (filter, quality, report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Db = Annotated[Optional[Path], typer.Option(
    "--db", envvar="CHES_CURATE_DB", help="DuckDB store file (default ./ches_curate.duckdb).")]
Dataset = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name in the store.")]
OptionalDataset = Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name in the store.")]
Version = Annotated[Optional[int], typer.Option("--version", help="Dataset version (default: the latest).")]
ModelKey = Annotated[Optional[str], typer.Option(
    "--model-key", help="Stored model key of the scores to use (default: the only model that scored the version; "
    "`ches-curate sql \"SELECT model_key FROM models\"` lists them).")]
MODEL_HELP = "Model to load: hub id, local model directory, .gguf file, or 'default' (SmolLM2-135M-Instruct)."
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
