"""ZenML pipelines over the `ches_curate` library: `curation`, `ablation`, `refresh` and `refusal`.

Installed as `ches_curate.pipelines` from the repository's top-level `pipelines/` folder (docs/reference/layout.md).
Steps (`steps.py`) are thin wrappers; every decision lives in `ches_curate`. Run them
with `ches-curate run NAME --config dev` (a shipped config by name, or a YAML file), or from
Python with `run_pipeline`. Importing this package does not import ZenML (the CLI stays fast).
"""

from ches_curate.pipelines.runner import MODEL_NAME, PIPELINES, active_orchestrator, get_pipeline, run_pipeline

__all__ = ["MODEL_NAME", "PIPELINES", "active_orchestrator", "get_pipeline", "run_pipeline"]
