"""Configuration of the data-quality suites: bounds, thresholds, severities and user expectations.

A `QualityConfig` is plain data (pydantic), loadable from YAML or JSON, so that a
team can tighten a bound or add a Great Expectations check without writing code:

    max_failure_rate: 0.02
    response_chars: [null, 4000]
    severities: {chosen_chars_within_bounds: error}
    expectations:
      - expectation: expect_column_value_lengths_to_be_between
        column: chosen
        kwargs: {min_value: 2}
        severity: warn

Great Expectations is imported only when a user expectation has to be resolved: the
import alone takes about 4 s, and `ches-curate --help` should not pay it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ches_curate.config_files import load_yaml_model
from ches_curate.errors import ChesCurateError
from ches_curate.quality.ge import gx_module, json_safe_expectation

Severity = Literal["error", "warn"]
Suite = Literal["pairs", "scores"]
SUITES: tuple[Suite, ...] = ("pairs", "scores")
Bounds = tuple[int | None, int | None]

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
FINITE_COLUMNS = ("ches", "ln_ches", "last_hidden_ip")
DRIFT_COLUMNS = ("ches", "ln_ches")

BUILTIN_CHECKS: dict[str, tuple[Severity, str]] = {
    "required_columns": ("error", "the table must have the suite's required columns"),
    **{f"{c}_not_null": ("error", f"'{c}' must be present (not null)") for c in TEXT_COLUMNS},
    **{f"{c}_not_empty": ("error", f"'{c}' must not be empty or blank") for c in TEXT_COLUMNS},
    **{f"{c}_valid_utf8": ("error", f"'{c}' must be a string of valid UTF-8 text (no lone surrogates, no U+FFFD)")
       for c in TEXT_COLUMNS},
    "chosen_differs_from_rejected": ("error", "'chosen' must differ from 'rejected' (ignoring outer whitespace)"),
    "unique_pair": ("error", "(prompt, chosen, rejected) must not repeat an earlier row"),
    "same_conversation_prefix": ("error", "hh-rlhf transcripts must share the conversation before the last "
                                          "assistant turn"),
    **{f"{c}_chars_within_bounds": ("warn", f"'{c}' must have a length in characters within the configured bounds")
       for c in TEXT_COLUMNS},
    **{f"{c}_tokens_within_bounds": ("warn", f"'{c}' must have a length in tokens within the configured bounds")
       for c in TEXT_COLUMNS},
    "one_score_per_pair": ("error", "each pair_id must have exactly one score row"),
    "every_pair_scored": ("warn", "every pair of the dataset version should have a score"),
    **{f"{c}_finite": ("error", f"'{c}' must be finite (not NaN or infinite)") for c in FINITE_COLUMNS},
    **{f"{s}_tokens_at_least_one": ("error", f"'{s}_tokens' must be >= 1") for s in ("chosen", "rejected")},
    "ln_ches_consistent_with_ches": ("error", "ln_ches must agree with ches and the lengths (n+ = n-: ln_ches = "
                                              "ches/n^2; else ln_ches - ches/(n+ n-) has the sign of n+ - n-)"),
    **{f"{c}_mean_drift": ("warn", f"mean of '{c}' should stay within drift_band stds of the previous version")
       for c in DRIFT_COLUMNS},
    **{f"{c}_quantiles_drift": ("warn", f"percentiles of '{c}' should stay within drift_band stds of the previous "
                                        "version") for c in DRIFT_COLUMNS},
}
"""Every built-in expectation by name: its default severity and what it requires (docs/quality.md)."""

SQL_ONLY_EXPECTATIONS = frozenset(
    {"unexpected_rows_expectation", "expect_query_results_to_match_comparison",
     "expect_table_row_count_to_equal_other_table"}
)


class ExpectationSpec(BaseModel):
    """One user expectation: a Great Expectations class by snake_case name, its column and kwargs."""

    model_config = ConfigDict(extra="forbid")

    expectation: str = Field(description="GE expectation type, e.g. expect_column_values_to_be_between.")
    column: str | None = Field(None, description="Column it applies to (omit for table-level expectations).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Other keyword arguments of the GE class.")
    severity: Severity = Field("error", description="error: failing rows are quarantined; warn: recorded only.")
    suite: Suite = Field("pairs", description="The suite it joins: pairs or scores.")
    name: str | None = Field(None, description="Name in results (default: '<expectation>:<column>').")

    @property
    def check_name(self) -> str:
        return self.name or (f"{self.expectation}:{self.column}" if self.column else self.expectation)

    @property
    def description(self) -> str:
        return f"{self.expectation} must hold" + (f" for '{self.column}'" if self.column else "")

    def build(self, **extra: Any) -> Any:
        """The GE expectation instance; a `ChesCurateError` naming the entry when it cannot be built."""
        cls = expectation_class(self.expectation)
        arguments = dict(self.kwargs, **({"column": self.column} if self.column else {}))
        try:
            return cls(**arguments, **extra)
        except (ValueError, TypeError) as err:  # GE raises pydantic (v1) ValidationError, a ValueError
            raise ChesCurateError(f"expectation {self.check_name!r}: invalid arguments {arguments}: {err}") from err


class QualityConfig(BaseModel):
    """Bounds and thresholds of the `pairs` and `scores` suites (one config object for the quality stage).

    Character and token bounds are `(min, max)`, inclusive, either side `None` for
    unbounded; token bounds apply only when a tokenizer is given. `max_failure_rate`
    is the fraction of rows failing any `error` expectation above which a run fails.
    """

    model_config = ConfigDict(extra="forbid")

    max_failure_rate: float = Field(0.05, ge=0.0, le=1.0, description="Fail the run above this error-row fraction.")
    prompt_chars: Bounds = Field((None, 50_000), description="Prompt length bounds in characters.")
    response_chars: Bounds = Field((None, 20_000), description="chosen/rejected length bounds in characters.")
    prompt_tokens: Bounds = Field((None, None), description="Prompt length bounds in tokens.")
    response_tokens: Bounds = Field((None, 4_096), description="chosen/rejected length bounds in tokens.")
    drift_band: float = Field(0.5, gt=0.0, description="Allowed shift of mean/percentiles, in previous-version stds.")
    drift_quantiles: tuple[float, ...] = Field((0.1, 0.5, 0.9), description="Percentiles compared for drift.")
    ln_ches_rtol: float = Field(1e-6, ge=0.0, description="Relative tolerance of the ln_ches/ches identity.")
    ln_ches_atol: float = Field(1e-6, ge=0.0, description="Absolute tolerance of the ln_ches/ches identity.")
    severities: dict[str, Severity] = Field(default_factory=dict, description="Severity overrides by built-in name.")
    expectations: list[ExpectationSpec] = Field(default_factory=list, description="Extra GE expectations.")

    @field_validator("severities")
    @classmethod
    def _known_builtins(cls, value: dict[str, Severity]) -> dict[str, Severity]:
        unknown = sorted(set(value) - set(BUILTIN_CHECKS))
        if unknown:
            raise ValueError(f"unknown built-in expectation(s) {unknown}; known: {', '.join(BUILTIN_CHECKS)}")
        escalated = sorted(name for name, severity in value.items() if name.endswith("_drift") and severity == "error")
        if escalated:
            raise ValueError(f"drift checks only warn (drift is not an error in the data): {escalated}")
        return value

    @model_validator(mode="after")
    def _valid_expectations(self) -> QualityConfig:
        names = [spec.check_name for spec in self.expectations]
        clashes = sorted({n for n in names if names.count(n) > 1 or n in BUILTIN_CHECKS})
        if clashes:
            raise ValueError(f"expectation names must be unique and differ from built-in names: {clashes} "
                             "(set 'name:' on each entry)")
        for spec in self.expectations:
            spec.build()
        return self

    def severity(self, name: str) -> Severity:
        return self.severities.get(name, BUILTIN_CHECKS[name][0])

    def user_expectations(self, suite: Suite) -> list[ExpectationSpec]:
        return [spec for spec in self.expectations if spec.suite == suite]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> QualityConfig:
        """Load a YAML or JSON file; errors name the file and the offending key."""
        return load_yaml_model(cls, path, "quality config")


@functools.cache
def expectation_classes() -> dict[str, type]:
    """GE expectation classes usable on a pandas DataFrame, by snake_case type name."""
    gx = gx_module()
    from great_expectations.expectations.expectation import Expectation

    return {
        cls.expectation_type: cls
        for cls in vars(gx.expectations).values()
        if isinstance(cls, type) and issubclass(cls, Expectation) and getattr(cls, "expectation_type", None)
        and cls.expectation_type not in SQL_ONLY_EXPECTATIONS
    }


def expectation_class(name: str) -> type:
    classes = expectation_classes()
    if name not in classes:
        raise ChesCurateError(f"unknown expectation {name!r}; valid names: {', '.join(sorted(classes))}")
    return json_safe_expectation(classes[name])
