"""Data-quality checks with Great Expectations 1.x, and quarantine of the rows that fail them.

Two suites: `validate_pairs` (structure and text of preference pairs; raw hh-rlhf
transcripts via `validate_hh_transcripts`) and `validate_scores` (CHES score tables,
with drift against the previous dataset version). Checks GE has no expectation for
(chosen != rejected, UTF-8 validity, the ln_ches identity) are computed here as
boolean columns named after the check and validated with
`expect_column_values_to_be_in_set([True])`, so every finding goes through GE and its
JSON result. `run_quality` validates a stored dataset, records `quality_runs` and
`quality_results`, quarantines the rows failing `error` expectations (stage
`quality`) and fails when the fraction of such rows exceeds `max_failure_rate`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ches_curate.errors import ChesCurateError
from ches_curate.pairs import SCORE_COLUMNS, PreferencePair, pair_id
from ches_curate.ingest import split_hh_transcript
from ches_curate.quality.config import (
    BUILTIN_CHECKS, DRIFT_COLUMNS, FINITE_COLUMNS, SUITES, TEXT_COLUMNS, QualityConfig, Suite,
)
from ches_curate.quality.ge import gx_module, percentiles_class
from ches_curate.quality.results import (
    GE_SEVERITY, Check, QualityReport, escape_surrogates, run_suite, save_suite,
)

TRANSCRIPT_COLUMNS = ("chosen_transcript", "rejected_transcript")
SCORE_REQUIRED = ("pair_id", "ches", "ln_ches", "chosen_tokens", "rejected_tokens")
_INVALID_TEXT = re.compile("[\ud800-\udfff\ufffd]")


# --- frames --------------------------------------------------------------------------------------


def _text_series(values: Iterable[Any]) -> pd.Series:
    """Object dtype: pandas 3's Arrow strings cannot hold the lone surrogates the UTF-8 check must see."""
    return pd.Series(list(values), dtype=object)


def pairs_frame(pairs: Iterable[PreferencePair]) -> pd.DataFrame:
    """The frame `validate_pairs` checks: row, pair_id, prompt (as text), chosen, rejected, format.

    Raw hh-rlhf transcripts kept in a pair's metadata under `chosen_transcript` and
    `rejected_transcript` become columns, which adds the `same_conversation_prefix` check.
    """
    pairs = list(pairs)
    frame = pd.DataFrame({"row": [p.row for p in pairs],
                          "pair_id": [_pair_id_or_none(p.prompt, p.chosen, p.rejected) for p in pairs]})
    frame["prompt"] = _text_series(p.prompt_text for p in pairs)
    frame["chosen"] = _text_series(p.chosen for p in pairs)
    frame["rejected"] = _text_series(p.rejected for p in pairs)
    frame["format"] = [p.format for p in pairs]
    for column in TRANSCRIPT_COLUMNS:
        if any(column in p.metadata for p in pairs):
            frame[column] = _text_series(p.metadata.get(column) for p in pairs)
    return frame


def _prompt_and_response(text: Any) -> tuple[str | None, str | None]:
    """ingest's `split_hh_transcript` of a transcript; Nones for a missing or unsplittable one."""
    split = split_hh_transcript(text) if isinstance(text, str) else None
    return (None, None) if split is None else split


def hh_transcripts_frame(transcripts: pd.DataFrame) -> pd.DataFrame:
    """Raw hh-rlhf rows (full `chosen`/`rejected` transcripts) as a pairs frame; the prompt is chosen's prefix.

    The split follows ingest, so a pair's `pair_id` here equals the one ingest gives it.
    """
    chosen = [_prompt_and_response(t) for t in transcripts["chosen"]]
    rejected = [_prompt_and_response(t) for t in transcripts["rejected"]]
    frame = pd.DataFrame({"row": range(len(transcripts))})
    frame["prompt"] = _text_series(c[0] for c in chosen)
    frame["chosen"] = _text_series(c[1] for c in chosen)
    frame["rejected"] = _text_series(r[1] for r in rejected)
    frame["chosen_transcript"] = _text_series(transcripts["chosen"])
    frame["rejected_transcript"] = _text_series(transcripts["rejected"])
    return frame


def _prepare(frame: pd.DataFrame, text_columns: Sequence[str]) -> pd.DataFrame:
    frame = frame.reset_index(drop=True).copy()
    for column in text_columns:
        if column in frame:
            frame[column] = _text_series(frame[column].astype(object))
    if "prompt" in frame and any(isinstance(p, list) for p in frame["prompt"]):
        frame["prompt"] = _text_series(PreferencePair(p, "", "").prompt_text if isinstance(p, list) else p
                                       for p in frame["prompt"])
    return frame


def _pair_id_or_none(prompt: Any, chosen: Any, rejected: Any) -> str | None:
    """The pair's id; None when a text is missing or not valid UTF-8 (then only the row number identifies it)."""
    if not (isinstance(prompt, (str, list)) and isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    try:
        return pair_id(prompt, chosen, rejected)
    except UnicodeEncodeError:
        return None


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _flags(values: Iterable[Any]) -> pd.arrays.BooleanArray:
    """A nullable boolean column; None means not evaluated here (e.g. a null input), which GE skips."""
    return pd.array([None if v is None else bool(v) for v in values], dtype="boolean")


# --- checks --------------------------------------------------------------------------------------


def _expect(config: QualityConfig, name: str, expectation: str, field: str | None, **kwargs: Any) -> Check:
    """Built-in check `name`: GE class `expectation`, tagged with the name and its (configurable) severity."""
    severity = config.severity(name)
    cls = getattr(gx_module().expectations, expectation)
    instance = cls(**kwargs, meta={"check": name}, severity=GE_SEVERITY[severity])
    return Check(name, severity, instance, field, BUILTIN_CHECKS[name][1])


def _flag_check(config: QualityConfig, frame: pd.DataFrame, name: str, field: str | None, flags: Any) -> Check:
    """Store `flags` as column `name` and expect it to be True wherever it was evaluated."""
    frame[name] = flags
    return _expect(config, name, "ExpectColumnValuesToBeInSet", field, column=name, value_set=[True])


def _required(config: QualityConfig, columns: Sequence[str]) -> Check:
    return _expect(config, "required_columns", "ExpectTableColumnsToMatchSet", None,
                   column_set=list(columns), exact_match=False)


def _token_counts(tokenizer: Any, texts: pd.Series) -> pd.arrays.IntegerArray:
    """Tokens per text with a Hugging Face-style tokenizer: `tokenizer(texts, add_special_tokens=False)`."""
    present = [i for i, t in enumerate(texts) if isinstance(t, str)]
    batch = [escape_surrogates(texts.iat[i]) for i in present]
    ids = tokenizer(batch, add_special_tokens=False)["input_ids"] if present else []
    counts: list[int | None] = [None] * len(texts)
    for i, token_ids in zip(present, ids):
        counts[i] = len(token_ids)
    return pd.array(counts, dtype="Int64")


def _text_checks(frame: pd.DataFrame, config: QualityConfig, tokenizer: Any, column: str) -> list[Check]:
    texts = frame[column]
    valid = _flags(None if _missing(t) else isinstance(t, str) and not _INVALID_TEXT.search(t) for t in texts)
    checks = [
        _expect(config, f"{column}_not_null", "ExpectColumnValuesToNotBeNull", column, column=column),
        _expect(config, f"{column}_not_empty", "ExpectColumnValuesToNotMatchRegex", column, column=column,
                regex=r"^\s*$"),
        _flag_check(config, frame, f"{column}_valid_utf8", column, valid),
    ]
    low, high = config.prompt_chars if column == "prompt" else config.response_chars
    if (low, high) != (None, None):
        checks.append(_expect(config, f"{column}_chars_within_bounds", "ExpectColumnValueLengthsToBeBetween",
                              column, column=column, min_value=low, max_value=high))
    low, high = config.prompt_tokens if column == "prompt" else config.response_tokens
    if tokenizer is not None and (low, high) != (None, None):
        frame[f"{column}_tokens"] = _token_counts(tokenizer, texts)
        checks.append(_expect(config, f"{column}_tokens_within_bounds", "ExpectColumnValuesToBeBetween",
                              column, column=f"{column}_tokens", min_value=low, max_value=high))
    return checks


def _pair_checks(frame: pd.DataFrame, config: QualityConfig, tokenizer: Any) -> list[Check]:
    checks = [check for column in TEXT_COLUMNS for check in _text_checks(frame, config, tokenizer, column)]
    complete = frame[list(TEXT_COLUMNS)].map(lambda v: isinstance(v, str)).all(axis=1)
    differs = (c.strip() != r.strip() if ok else None for ok, c, r in zip(complete, frame.chosen, frame.rejected))
    checks.append(_flag_check(config, frame, "chosen_differs_from_rejected", "rejected", _flags(differs)))
    first = ~frame.duplicated(subset=list(TEXT_COLUMNS), keep="first")
    unique = _flags(f if ok else None for ok, f in zip(complete, first))
    checks.append(_flag_check(config, frame, "unique_pair", None, unique))
    if all(c in frame for c in TRANSCRIPT_COLUMNS):
        prefixes = ((_prompt_and_response(c)[0], _prompt_and_response(r)[0])
                    for c, r in zip(frame.chosen_transcript, frame.rejected_transcript))
        same = (None if c is None and r is None else c is not None and c == r for c, r in prefixes)
        checks.append(_flag_check(config, frame, "same_conversation_prefix", "rejected", _flags(same)))
    return checks


def _user_checks(frame: pd.DataFrame, config: QualityConfig, suite: Suite) -> list[Check]:
    checks = []
    for spec in config.user_expectations(suite):
        if spec.column is not None and spec.column not in frame:
            raise ChesCurateError(f"expectation {spec.check_name!r}: no column {spec.column!r} in the {suite} table "
                                  f"(columns: {', '.join(map(str, frame.columns))})")
        expectation = spec.build(meta={"check": spec.check_name}, severity=GE_SEVERITY[spec.severity])
        checks.append(Check(spec.check_name, spec.severity, expectation, spec.column, spec.description))
    return checks


def ln_ches_consistent(frame: pd.DataFrame, rtol: float = 1e-6, atol: float = 1e-6) -> pd.arrays.BooleanArray:
    """Whether each row's ln_ches agrees with its ches and lengths; None where an input is missing or invalid.

    With a = <S+, S->, b = ||S+||^2 >= 0 and n+, n- the response lengths,
    ches = a - b and ln_ches = a / (n+ n-) - b / n+^2, hence

        ln_ches - ches / (n+ n-) = b (n+ - n-) / (n+^2 n-).

    b is not stored, so only the sign is checkable: the residual is 0 for n+ = n-
    (ln_ches = ches / n^2), >= 0 for n+ > n- and <= 0 for n+ < n-, within
    `rtol * max(|ln_ches|, |ches| / (n+ n-)) + atol`.
    """
    def numbers(column: str) -> np.ndarray:
        return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)

    ches, ln_ches, n_pos, n_neg = (numbers(c) for c in ("ches", "ln_ches", "chosen_tokens", "rejected_tokens"))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        evaluable = np.isfinite(ches) & np.isfinite(ln_ches) & (n_pos >= 1) & (n_neg >= 1)
        baseline = ches / (n_pos * n_neg)
        residual = ln_ches - baseline
        tolerance = rtol * np.maximum(np.abs(ln_ches), np.abs(baseline)) + atol
        direction = np.sign(n_pos - n_neg)
        ok = np.where(direction == 0, np.abs(residual) <= tolerance, residual * direction >= -tolerance)
    return _flags(bool(o) if e else None for o, e in zip(ok, evaluable))


def _score_checks(frame: pd.DataFrame, config: QualityConfig) -> list[Check]:
    scored = frame["every_pair_scored"] if "every_pair_scored" in frame else pd.Series(True, index=frame.index)
    checks = [_expect(config, "one_score_per_pair", "ExpectColumnValuesToBeUnique", "pair_id", column="pair_id")]
    for column in (c for c in FINITE_COLUMNS if c in frame):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        finite = _flags(bool(f) if s else None for f, s in zip(np.isfinite(values), scored))
        checks.append(_flag_check(config, frame, f"{column}_finite", column, finite))
    for side in ("chosen", "rejected"):
        checks.append(_expect(config, f"{side}_tokens_at_least_one", "ExpectColumnValuesToBeBetween",
                              f"{side}_tokens", column=f"{side}_tokens", min_value=1))
    consistent = ln_ches_consistent(frame, config.ln_ches_rtol, config.ln_ches_atol)
    checks.append(_flag_check(config, frame, "ln_ches_consistent_with_ches", "ln_ches", consistent))
    return checks


def _drift_checks(previous: pd.DataFrame, config: QualityConfig) -> list[Check]:
    """Mean and percentiles of each score within `drift_band` standard deviations of the previous version's."""
    checks = []
    for column in (c for c in DRIFT_COLUMNS if c in previous):
        values = pd.to_numeric(previous[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        values = values[np.isfinite(values)]
        if len(values) < 2:
            continue
        band, mean = config.drift_band * float(values.std(ddof=1)), float(values.mean())
        checks.append(_expect(config, f"{column}_mean_drift", "ExpectColumnMeanToBeBetween", column,
                              column=column, min_value=mean - band, max_value=mean + band))
        levels = [float(q) for q in config.drift_quantiles]
        ranges = [[float(q) - band, float(q) + band] for q in np.quantile(values, levels)]
        name = f"{column}_quantiles_drift"
        expectation = percentiles_class()(column=column, quantile_ranges={"quantiles": levels, "value_ranges": ranges},
                                          meta={"check": name}, severity=GE_SEVERITY["warn"])
        checks.append(Check(name, "warn", expectation, column, BUILTIN_CHECKS[name][1]))
    return checks


# --- suites --------------------------------------------------------------------------------------


def validate_pairs(pairs_df: pd.DataFrame, config: QualityConfig | None = None, *,
                   tokenizer: Any = None) -> QualityReport:
    """Run the `pairs` suite on a frame of prompt/chosen/rejected (optional: row, pair_id, transcripts).

    `tokenizer` (Hugging Face) enables the token-length bounds. Missing required
    columns fail `required_columns` and skip the other built-in checks.
    """
    config = config or QualityConfig()
    frame = _prepare(pairs_df, (*TEXT_COLUMNS, *TRANSCRIPT_COLUMNS))
    if "row" not in frame:
        frame["row"] = range(len(frame))
    checks = [_required(config, TEXT_COLUMNS)]
    if all(c in frame for c in TEXT_COLUMNS) and "pair_id" not in frame:
        frame["pair_id"] = [_pair_id_or_none(p, c, r) for p, c, r in zip(frame.prompt, frame.chosen, frame.rejected)]
    raw_columns = list(frame.columns)
    if all(c in frame for c in TEXT_COLUMNS):
        checks += _pair_checks(frame, config, tokenizer)
    checks += _user_checks(frame, config, "pairs")
    return QualityReport([run_suite("pairs", frame, checks, config.max_failure_rate, raw_columns)])


def validate_hh_transcripts(transcripts: pd.DataFrame, config: QualityConfig | None = None, *,
                            tokenizer: Any = None) -> QualityReport:
    """The `pairs` suite on raw hh-rlhf rows, plus `same_conversation_prefix` (see `hh_transcripts_frame`)."""
    return validate_pairs(hh_transcripts_frame(transcripts), config, tokenizer=tokenizer)


def _with_unscored_pairs(frame: pd.DataFrame, pair_ids: Iterable[str]) -> tuple[pd.DataFrame, Any]:
    """`frame` plus one row (pair_id only) per pair without a score, and the has-a-score flags."""
    known = set(frame.pair_id)
    unscored = pd.DataFrame({"pair_id": [p for p in dict.fromkeys(pair_ids) if p not in known]})
    scored = _flags([True] * len(frame) + [False] * len(unscored))
    if len(unscored):
        frame = pd.concat([frame, unscored], ignore_index=True)
        if "row" in frame:
            frame["row"] = frame["row"].astype("Int64")
    return frame, scored


def validate_scores(scores_df: pd.DataFrame, config: QualityConfig | None = None,
                    previous_scores_df: pd.DataFrame | None = None, *,
                    pair_ids: Iterable[str] | None = None) -> QualityReport:
    """Run the `scores` suite on a score table (SCORE_COLUMNS; `prompt` and `metadata` are ignored).

    `pair_ids` (the dataset version's pairs) adds `every_pair_scored`;
    `previous_scores_df` (the previous version's scores) adds the drift checks, which only warn.
    """
    config = config or QualityConfig()
    frame = _prepare(scores_df.drop(columns=["prompt", "metadata"], errors="ignore"), ("chosen", "rejected"))
    complete = all(c in frame for c in SCORE_REQUIRED)
    if complete:  # a pair the dataset repeats repeats its one score: keep one copy
        frame = frame.drop_duplicates([c for c in frame if c in ("pair_id", *SCORE_COLUMNS[2:])], ignore_index=True)
    raw_columns = list(frame.columns)
    checks = [_required(config, SCORE_REQUIRED)]
    if complete:
        if pair_ids is not None:
            frame, scored = _with_unscored_pairs(frame, pair_ids)
            checks.append(_flag_check(config, frame, "every_pair_scored", "pair_id", scored))
        checks += _score_checks(frame, config)
        if previous_scores_df is not None:
            checks += _drift_checks(previous_scores_df, config)
    checks += _user_checks(frame, config, "scores")
    return QualityReport([run_suite("scores", frame, checks, config.max_failure_rate, raw_columns)])


# --- the store -----------------------------------------------------------------------------------


def _previous_scores(store: Any, name: str, version: int, model_key: str) -> pd.DataFrame | None:
    if version <= 1:
        return None
    previous = store.scores(name, version - 1, model_key)
    return previous if len(previous) else None


def run_quality(store: Any, dataset: str, version: int | None = None, model_key: str | None = None,
                suites: str | Sequence[str] = "all", config: QualityConfig | None = None, *,
                tokenizer: Any = None, raise_on_failure: bool = True) -> QualityReport:
    """Validate a stored dataset version, record the results and quarantine the `error` rows.

    `suites` is `pairs`, `scores`, `all` or a list. With `all`, the `scores` suite is
    skipped (with a note) while the version has no scores; `model_key` defaults to the
    one model that scored it. Raises `QualityFailedError` (after recording everything)
    when a suite's error-row fraction exceeds `config.max_failure_rate`.
    """
    config = config or QualityConfig()
    wanted = list(SUITES) if suites == "all" else [suites] if isinstance(suites, str) else list(suites)
    unknown = [s for s in wanted if s not in SUITES]
    if unknown:
        raise ChesCurateError(f"unknown quality suite(s) {unknown}; choose from {', '.join(SUITES)} or all")
    dv = store.dataset_version(dataset, version)
    report = QualityReport([])
    if "pairs" in wanted:
        pairs = validate_pairs(pairs_frame(store.dataset_pairs(dv.name, dv.version)), config, tokenizer=tokenizer)
        save_suite(store, pairs.suites[0], dv.name, dv.version)
        report.suites += pairs.suites
    if "scores" in wanted:
        model_key = store.scoring_model(dv.name, dv.version, model_key, required=suites != "all")
        if model_key is None:
            report.notes.append(f"scores suite skipped: dataset {dv.name!r} v{dv.version} has no scores yet")
        else:
            pair_ids = store.sql("SELECT pair_id FROM dataset_pairs WHERE name = ? AND version = ?",
                                 params=[dv.name, dv.version]).pair_id
            scores = validate_scores(store.scores(dv.name, dv.version, model_key), config,
                                     _previous_scores(store, dv.name, dv.version, model_key), pair_ids=pair_ids)
            save_suite(store, scores.suites[0], dv.name, dv.version, model_key)
            report.suites += scores.suites
    if raise_on_failure:
        report.raise_for_failure_rate()
    return report


def latest_quality_results(store: Any, dataset: str, version: int | None = None) -> pd.DataFrame:
    """The stored results of the latest run of each suite on a dataset version (default: latest version)."""
    dv = store.dataset_version(dataset, version)
    return store.sql(
        """SELECT q.quality_run_id, q.suite, q.model_key, q.finished_at, q.n_rows, q.failure_rate,
                  q.success AS run_success, r.expectation, r.severity, r.success, r.unexpected_count
           FROM quality_results r JOIN quality_runs q USING (quality_run_id)
           WHERE q.quality_run_id IN (SELECT max(quality_run_id) FROM quality_runs
                                      WHERE dataset_name = ? AND dataset_version = ? GROUP BY suite)
           ORDER BY q.suite, r.rowid""",
        params=[dv.name, dv.version],
    )
