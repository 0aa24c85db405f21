"""Response log-probabilities from the hidden states CHES already computed, and nothing else.

For a prompt x and response y, log pi(y|x) = sum_k log softmax(W h(x, y<k))[y_k], where
h(x, y<k) is the final hidden state at the position that predicts y_k (the vector CHES
sums) and W the LM head. This is what TRL's DPOTrainer computes as the reference model's
log-probs (`compute_ref_log_probs`: the per-token log-probs of the completion, summed).
The LM head runs only at those positions, a few rows at a time, so no (tokens x vocab)
logits tensor for the whole pass is ever held.

Per pair the built-in scores are

    chosen_logp       = log pi(y+|x)          rejected_logp       = log pi(y-|x)
    chosen_logp_mean  = log pi(y+|x) / |y+|   rejected_logp_mean  = log pi(y-|x) / |y-|
    logp_margin       = log pi(y+|x) - log pi(y-|x)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOGIT_ELEMENTS = 1 << 24
"""Logits (rows x vocab) computed at once: 64 MB in float32."""


def token_logprobs(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None = None) -> torch.Tensor:
    """log softmax(lm_head(hidden[i]))[targets[i]] for each row i, in float32 (shape (rows,)).

    `hidden` is (rows, hidden_size): the states that predict `targets`. `softcap` applies a
    final logit soft-capping (`softcap * tanh(logits / softcap)`, Gemma-2) as the model does.
    """
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    if not len(targets):
        return out
    vocab = lm_head(hidden[:1]).shape[-1]
    step = max(1, LOGIT_ELEMENTS // vocab)
    for start in range(0, len(targets), step):
        logits = lm_head(hidden[start:start + step]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        picked = logits.gather(-1, targets[start:start + step, None].to(logits.device)).squeeze(-1)
        out[start:start + step] = picked - logits.logsumexp(-1)
    return out


def summed_logprobs(token_logps: torch.Tensor, owners: torch.Tensor, n_out: int) -> torch.Tensor:
    """float64 sums of `token_logps` into `n_out` rows by `owners` (the response each token belongs to)."""
    sums = torch.zeros(n_out, dtype=torch.float64, device=token_logps.device)
    return sums.index_add_(0, owners.to(token_logps.device), token_logps.double())


def logprob_scores(chosen_sum: torch.Tensor, rejected_sum: torch.Tensor, chosen_tokens: torch.Tensor,
                   rejected_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The built-in log-prob scores per pair (see the module docstring), float64."""
    chosen_sum, rejected_sum = chosen_sum.double(), rejected_sum.double()
    return {
        "chosen_logp": chosen_sum,
        "rejected_logp": rejected_sum,
        "chosen_logp_mean": chosen_sum / chosen_tokens.double(),
        "rejected_logp_mean": rejected_sum / rejected_tokens.double(),
        "logp_margin": chosen_sum - rejected_sum,
    }
