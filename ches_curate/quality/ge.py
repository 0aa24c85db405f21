"""The Great Expectations engine: one ephemeral context per process, a throwaway suite per run.

Importing `great_expectations` costs about 4 s and creating a context about 20 ms, so
both happen once, lazily (`ches-curate --help` never pays them). Each suite run adds a
throwaway `ExpectationSuite` and `ValidationDefinition`, runs them with result format
COMPLETE (every unexpected row index) and removes them again.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
import warnings
from typing import Any

import pandas as pd


@functools.cache
def gx_module() -> Any:
    """`great_expectations`, imported once with analytics off and its logging quiet.

    Its import logs ~200 INFO lines ("Skipping registering function ...") and each suite run
    hundreds more, which a ZenML step's log (INFO) would show. So GE's logger is set to
    WARNING before the import, unless the user set a level on it: theirs is kept.
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():  # GE 1.24 imports the deprecated sre_constants/sre_parse
        warnings.simplefilter("ignore", DeprecationWarning)
        import great_expectations as gx
    return gx


@functools.cache
def _context() -> tuple[Any, Any]:
    """The process's ephemeral context (progress bars off) and its whole-DataFrame batch definition."""
    gx = gx_module()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("ches_curate").add_dataframe_asset("frame")
    return context, asset.add_batch_definition_whole_dataframe("whole")


@functools.cache
def percentiles_class() -> type:
    gx = gx_module()

    class ExpectColumnPercentilesToBeBetween(gx.expectations.ExpectColumnQuantileValuesToBeBetween):
        """GE's quantile expectation with plain-bool results: GE 1.24 returns numpy bools there, which its own
        result store cannot serialize ("Object of type bool is not JSON serializable")."""

        def _validate(self, metrics, runtime_configuration=None, execution_engine=None):
            outcome = super()._validate(metrics, runtime_configuration, execution_engine)
            details = outcome["result"]["details"]
            details["success_details"] = [bool(ok) for ok in details["success_details"]]
            return dict(outcome, success=bool(outcome["success"]))

    return ExpectColumnPercentilesToBeBetween


def json_safe_expectation(cls: type) -> type:
    """`cls`, or its JSON-safe replacement where GE's own class breaks result serialization."""
    return percentiles_class() if cls is gx_module().expectations.ExpectColumnQuantileValuesToBeBetween else cls


def run_ge(suite: str, frame: pd.DataFrame, expectations: list[Any]) -> dict[str, Any]:
    """Validate `frame` with a throwaway suite and validation definition; GE's result as a JSON dict."""
    gx = gx_module()
    context, batch_definition = _context()
    name = f"{suite}-{uuid.uuid4().hex}"
    expectation_suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=expectation_suite)
    )
    try:
        result = definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})
    finally:
        context.validation_definitions.delete(name)
        context.suites.delete(name)
        for key in context.validation_results_store.list_keys():  # keep the cached context's memory flat
            context.validation_results_store.remove_key(key)
    return result.to_json_dict()
