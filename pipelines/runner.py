"""Running the pipelines: `run_pipeline` with a validated config, step failures as one line, the orchestrator.

The pipeline modules are imported only when a pipeline runs (`get_pipeline`), so
importing this module does not import ZenML and the CLI stays fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from ches_curate.errors import ChesCurateError
from ches_curate.pipeline_config import PipelineConfig

PIPELINES = ("curation", "ablation", "refresh", "refusal")
MODEL_NAME = "ches_curate"
"""The ZenML Model that links every run of these pipelines and their artifacts."""


def get_pipeline(name: str) -> Any:
    """The ZenML pipeline object called `name`."""
    if name not in PIPELINES:
        raise ChesCurateError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")
    module = importlib.import_module(f"ches_curate.pipelines.{name}")
    return getattr(module, f"{name}_pipeline")


def run_pipeline(name: str, config: PipelineConfig, schedule: Any = None) -> Any:
    """Run (or, with a ZenML `Schedule`, schedule) pipeline `name`; the finished run on a local orchestrator.

    `config.zenml` is handed to ZenML as a run-configuration file, so any key ZenML
    accepts there (`settings`, `steps`, `enable_cache`, `run_name`, ...) works.
    """
    pipeline = get_pipeline(name)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="zenml_run_config_") as run_config:
        yaml.safe_dump(config.zenml, run_config)
        run_config.flush()
        try:
            with _step_tracebacks_only_in_debug():
                return pipeline.with_options(config_path=run_config.name, schedule=schedule)(config=config)
        except RuntimeError as err:
            failure = _step_failure(pipeline.name)
            if failure is None:
                raise
            raise ChesCurateError(f"the {name} pipeline failed: {failure}") from err


def _step_failure(pipeline_name: str) -> str | None:
    """'run R, step S: <the step's error message>' for the latest run's failed step, if there is one."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    run = Client().get_pipeline(pipeline_name).last_run
    for step_name, step_run in run.steps.items():
        if step_run.status == ExecutionStatus.FAILED and step_run.exception_info is not None:
            message = step_run.exception_info.message or step_run.exception_info.traceback.strip().splitlines()[-1]
            return f"run {run.name}, step {step_name}: {message}"
    return None


class _DropTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _step_tracebacks_only_in_debug() -> Iterator[None]:
    """ZenML's local orchestrator logs a failed step's traceback; a user error needs one line (`--debug` shows it)."""
    logger = logging.getLogger("zenml.orchestrators.local.local_orchestrator")
    quiet = _DropTraceback()
    if os.environ.get("CHES_CURATE_DEBUG", "") in ("", "0", "false"):
        logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def active_orchestrator() -> tuple[str, str, bool]:
    """The active stack's name, its orchestrator's flavor, and whether that orchestrator declares schedule support."""
    from zenml.client import Client

    stack = Client().active_stack
    orchestrator = stack.orchestrator
    return stack.name, orchestrator.flavor, bool(getattr(orchestrator.config, "is_schedulable", False))
