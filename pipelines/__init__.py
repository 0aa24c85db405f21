"""ZenML pipelines over the `ches_curate` library: `curation`, `ablation`, `refresh` and `refusal`.

Steps (`steps.py`) are thin wrappers; every decision lives in `ches_curate`. Run them
with `ches-curate run NAME --config pipelines/configs/dev.yaml`, or from Python with
`run_pipeline`. Importing this package does not import ZenML (the CLI stays fast).
"""

from pipelines.runner import MODEL_NAME, PIPELINES, active_orchestrator, get_pipeline, run_pipeline

__all__ = ["MODEL_NAME", "PIPELINES", "active_orchestrator", "get_pipeline", "run_pipeline"]
