"""Scores as plugins: any per-pair signal beside CHES, computed in the scoring pass, stored and queried alike.

- `spec`: the `Score` interface, `ScoreBatch` (what a score is given), the registry (`register_scores`);
- `compute`: running scores on a batch, a failing plugin costing only its own value for that pair;
- `logprobs`: response log-probs from the hidden states of the scoring pass (pure tensor math);
- `imports`: externally computed values read from a file (`ches-curate scores import`).

The built-in scores (CHES, ln-CHES, the paper's baselines, the log-probs) live in
`plugins/builtin_scores.py` and are registered through the hook like any plugin's.
Importing this package does not import torch.
"""

from __future__ import annotations

from ches_curate.scores.spec import (
    NEEDS, HiddenStates, ResponseLogProbs, Score, ScoreBatch, available_scores, get_score, model_bound, needs_forward,
    selected_scores,
)

__all__ = ["NEEDS", "HiddenStates", "ResponseLogProbs", "Score", "ScoreBatch", "available_scores", "get_score",
           "model_bound", "needs_forward", "selected_scores"]
