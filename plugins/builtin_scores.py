"""The built-in scores: CHES, ln-CHES, the paper's two baselines, and the response log-probs.

Registered through the `register_scores` hook, exactly as a third-party plugin would be;
`ches_curate.plugins.DEFAULT_PLUGINS` names this module, so it is found without the
package's entry-point metadata. The first four are the `scores` table's columns
(`ches_curate.scores.spec.COLUMN_SCORES`); the log-probs (`ches_curate.scores.logprobs`)
are computed from the same forward pass when asked for (`score --scores ...`), since the
LM head they need costs extra (bench/RESULTS.md).
Nothing here imports torch until a score computes.
"""

from __future__ import annotations

from typing import ClassVar

from ches_curate.hookspecs import hookimpl
from ches_curate.scores.spec import Score, ScoreBatch


class Ches(Score):
    """CHES (`ches`) or its length-normalised form (`ln_ches`), by name."""

    needs = frozenset({"hidden_states", "tokens"})

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description

    def compute(self, batch: ScoreBatch):
        return _ches(batch)[("ches", "ln_ches").index(self.name)]


class LastHiddenIp(Score):
    name = "last_hidden_ip"
    description = "The paper's baseline: <h+, h-> at the last predicting position of each response."
    needs = frozenset({"hidden_states"})

    def compute(self, batch: ScoreBatch):
        from ches_curate.scoring.ches import last_hidden_inner_product

        hidden = batch.hidden
        return last_hidden_inner_product(hidden.chosen_last.cpu().double(), hidden.rejected_last.cpu().double())


class EditDistance(Score):
    name = "edit_distance"
    description = "The paper's baseline: token-level Levenshtein distance of y+ and y- over the longer length."
    needs = frozenset({"tokens"})

    def compute(self, batch: ScoreBatch):
        from ches_curate.scoring.engine import normalized_edit_distance

        return [normalized_edit_distance(t.chosen_ids, t.rejected_ids) for t in batch.tokens]


class LogProb(Score):
    """One of the log-prob scores of `ches_curate.scores.logprobs.logprob_scores`, by name."""

    needs = frozenset({"logprobs"})
    default: ClassVar[bool] = False

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description

    def compute(self, batch: ScoreBatch):
        from ches_curate.scores.logprobs import logprob_scores

        lp = batch.logprobs
        return logprob_scores(lp.chosen_sum, lp.rejected_sum, lp.chosen_tokens, lp.rejected_tokens)[self.name].cpu()


LOGPROB_SCORES = {
    "chosen_logp": "log pi(y+|x): the chosen response's log-probability under the scoring model (TRL's reference).",
    "rejected_logp": "log pi(y-|x): the rejected response's log-probability under the scoring model.",
    "chosen_logp_mean": "log pi(y+|x) / |y+|: the chosen response's mean log-probability per token.",
    "rejected_logp_mean": "log pi(y-|x) / |y-|: the rejected response's mean log-probability per token.",
    "logp_margin": "log pi(y+|x) - log pi(y-|x): the reference margin DPO's loss starts from.",
}


def _ches(batch: ScoreBatch):
    import torch

    from ches_curate.scoring.ches import ches_scores

    hidden = batch.hidden
    chosen_len = torch.tensor([len(t.chosen_ids) for t in batch.tokens], dtype=torch.float64)
    rejected_len = torch.tensor([len(t.rejected_ids) for t in batch.tokens], dtype=torch.float64)
    return ches_scores(hidden.chosen_sum.cpu(), hidden.rejected_sum.cpu(), chosen_len, rejected_len)


@hookimpl
def register_scores(register):
    register(Ches("ches", "CHES: <S+, S-> - ||S+||^2 of the summed hidden states (Razin et al., Definition 2)."))
    register(Ches("ln_ches", "Length-normalised CHES: <S+, S->/(|y+||y-|) - ||S+||^2/|y+|^2."))
    register(LastHiddenIp())
    register(EditDistance())
    for name, description in LOGPROB_SCORES.items():
        register(LogProb(name, description))
