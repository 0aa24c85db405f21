"""The hooks a ches_curate plugin can implement.

A plugin is a module with functions marked `@hookimpl` whose names match the
specifications below (pluggy, project name `ches_curate`); it may implement any subset.
The built-in policies and scores (`plugins/builtin_policies.py`, `plugins/builtin_scores.py`)
use exactly these hooks and are found through the same entry-point group as third-party plugins.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pluggy

PROJECT_NAME = "ches_curate"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_filter_policies(register: Callable[[Any], None]) -> None:
    """Register filter policies by calling `register(policy)` once per policy.

    `policy` is an instance of a `ches_curate.policies.Policy` subclass (or any object
    with the same attributes): a unique `name`, a `description`, a `Params` pydantic
    model derived from `PolicyParams`, and `select(scores, params) -> SelectionResult`.
    One plugin module may register several policies; two plugins registering the same
    name is an error that names both.
    """


@hookspec
def register_scores(register: Callable[[Any], None]) -> None:
    """Register per-pair scores by calling `register(score)` once per score.

    `score` is an instance of a `ches_curate.scores.Score` subclass (or any object with
    the same attributes): a unique lower_snake_case `name` (its SQL column), a `version`
    (change it to re-score), a `description`, what it `needs` (a subset of `texts`,
    `tokens`, `hidden_states`, `logprobs`, `own_model`) and `compute(batch)`, which
    returns one float per pair of a `ScoreBatch`. The built-in scores (CHES, ln-CHES,
    the paper's baselines and the response log-probs) are registered this way too.
    """


@hookspec(firstresult=True)
def judge_responses(prompts: Sequence[Any], responses: Sequence[str]) -> list[bool] | None:
    """Judge refusals: return one bool per response (True = the response refuses), or None to pass.

    `prompts[i]` is the prompt (a string or a message list) that produced `responses[i]`.
    The first plugin that returns a list decides (the most recently registered is asked
    first); when none does, `ches_curate.evaluate` uses its refusal-phrase heuristic.
    """
