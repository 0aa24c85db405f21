"""CHES arithmetic (Razin et al., ICLR 2025, Definition 2) on tensors, and nothing else.

For a prompt x and response y, S(y) = sum_k h(x, y_<k) sums the final-layer hidden
states (after the final norm: the vectors the unembedding multiplies) at the |y|
positions that predict y's tokens. With S+ = S(y+), S- = S(y-):

    ches    = <S+, S-> - ||S+||^2
    ln_ches = <S+, S-> / (|y+| |y-|) - ||S+||^2 / |y+|^2

Inputs are float64 so that the large, nearly cancelling terms keep their digits.
"""

from __future__ import annotations

import torch


def ches_scores(
    chosen_sum: torch.Tensor, rejected_sum: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ches, ln_ches) per row for summed hidden states of shape (batch, hidden) and lengths of shape (batch,)."""
    cross = (chosen_sum * rejected_sum).sum(dim=-1)
    chosen_sq = (chosen_sum * chosen_sum).sum(dim=-1)
    chosen_len = chosen_len.to(cross.dtype)
    rejected_len = rejected_len.to(cross.dtype)
    ches = cross - chosen_sq
    ln_ches = cross / (chosen_len * rejected_len) - chosen_sq / (chosen_len * chosen_len)
    return ches, ln_ches


def last_hidden_inner_product(chosen_last: torch.Tensor, rejected_last: torch.Tensor) -> torch.Tensor:
    """The paper's baseline: <h+, h-> at the last predicting position of each response."""
    return (chosen_last * rejected_last).sum(dim=-1)
