"""Example ches-curate plugin: a policy, `per-prompt-cap`, and a score, `length_ratio`.

Datasets often hold many pairs for one prompt; a DPO step then pulls hard on that
prompt. The policy keeps the N lowest-scoring pairs of each prompt and removes the
rest, highest score first.

Preference labels often favour the longer response; DPO then learns length. The score
`length_ratio` is |y+| / |y-| in tokens as scored, so a selection can cap it
(`--then 'threshold value=2 score_column=length_ratio'`).
"""

from __future__ import annotations

import json

import pandas as pd
from pydantic import Field

from ches_curate import hookimpl
from ches_curate.policies import Policy, PolicyParams, SelectionResult, removal_order
from ches_curate.scores import Score, ScoreBatch


class PerPromptCap(Policy):
    name = "per-prompt-cap"
    description = "Keep at most max_per_prompt pairs per prompt, removing the highest-scoring ones."

    class Params(PolicyParams):
        max_per_prompt: int = Field(1, ge=1, description="Most pairs kept for any one prompt.")

    def select(self, scores: pd.DataFrame, params: Params) -> SelectionResult:
        order = removal_order(scores, params.score_column)
        prompts = scores["prompt"].map(_prompt_key).to_numpy()[order]
        # Counting from the end of the removal order, the first N of each prompt are its lowest scores.
        from_lowest = pd.Series(prompts).groupby(prompts).cumcount(ascending=False).to_numpy()
        kept = pd.Series(from_lowest < params.max_per_prompt, index=order).sort_index().to_numpy()
        return SelectionResult.from_kept(scores, kept, params.score_column)


def _prompt_key(prompt: str | list) -> str:
    """Chat prompts (message lists) are compared by their JSON text."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class LengthRatio(Score):
    name = "length_ratio"
    version = "1"
    description = "|y+| / |y-|: the chosen response's length over the rejected one's, in tokens as scored."
    needs = frozenset({"tokens"})

    def compute(self, batch: ScoreBatch) -> list[float]:
        return [len(t.chosen_ids) / len(t.rejected_ids) for t in batch.tokens]


@hookimpl
def register_filter_policies(register):
    register(PerPromptCap())


@hookimpl
def register_scores(register):
    register(LengthRatio())
