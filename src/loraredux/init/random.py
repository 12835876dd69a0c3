"""Random initialisers that keep B A = 0: `kaiming` (LoRA's default), `gaussian` and `orthogonal`.

All three draw from torch's global random generator (seed it with `torch.manual_seed`), as PEFT does, so that a
seeded run gives the same factors in both libraries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .registry import Factors, register_init

__all__ = ["gaussian", "kaiming", "orthogonal"]


def _empty(W0: Tensor, rows: int, cols: int) -> Tensor:
    return torch.empty(rows, cols, dtype=W0.dtype, device=W0.device)


@register_init("kaiming", kinds=("linear", "conv1d", "embedding"))
def kaiming(W0: Tensor, rank: int, scale: float) -> Factors:
    """A Kaiming-uniform (a = sqrt(5), nn.Linear's default), B = 0: LoRA's and PEFT's default.

    Hu et al., arXiv 2106.09685, §4.1 ("random Gaussian for A and zero for B"; PEFT and the reference code use
    nn.Linear's Kaiming-uniform). For an embedding base the adapter swaps the roles (A = 0, B ~ N(0, 1)), as PEFT.

    Args:
        W0: (out, in) base weight (its shape, dtype and device are used).
        rank: r.
        scale: s (unused: B A = 0).
    """
    out_features, in_features = W0.shape
    A = nn.init.kaiming_uniform_(_empty(W0, rank, in_features), a=math.sqrt(5))
    return Factors(A=A, B=torch.zeros_like(_empty(W0, out_features, rank)))


@register_init("gaussian", kinds=("linear", "conv1d", "embedding"))
def gaussian(W0: Tensor, rank: int, scale: float) -> Factors:
    """A ~ N(0, 1/r^2), B = 0 (PEFT's `init_lora_weights="gaussian"`).

    Args:
        W0: (out, in) base weight (shape, dtype and device are used).
        rank: r.
        scale: s (unused: B A = 0).
    """
    out_features, in_features = W0.shape
    A = nn.init.normal_(_empty(W0, rank, in_features), std=1.0 / rank)
    return Factors(A=A, B=torch.zeros_like(_empty(W0, out_features, rank)))


@register_init("orthogonal")
def orthogonal(W0: Tensor, rank: int, scale: float) -> Factors:
    """Both factors non-zero and B A = 0, through complementary rows of one random orthogonal matrix.

    With Q (r, r) orthogonal, A = (G_A Q_odd)^T / 10 and B = G_B^T Q_even / 10 for Gaussian G_A (in, r/2) and
    G_B (r/2, out); B A = G_B^T Q_even Q_odd^T G_A^T / 100 = 0 because distinct rows of Q are orthogonal. Both
    factors then receive a gradient from the first step, unlike B = 0. PEFT's `init_lora_weights="orthogonal"`
    (after https://datta0.github.io/posts/rethink-lora-init/), same draws in the same order.

    Args:
        W0: (out, in) base weight.
        rank: r, which must be even.
        scale: s (unused: B A = 0).

    Raises:
        ValueError: an odd rank.
    """
    if rank % 2:
        raise ValueError(
            f"init 'orthogonal' needs an even rank (it splits r into two halves), got {rank}"
        )
    out_features, in_features = W0.shape
    # PEFT's draws (float32, CPU, in this order); the algebra runs in float64 for a float64 base, so that
    # B A = 0 holds to that precision rather than to float32's.
    work = torch.float64 if W0.dtype == torch.float64 else torch.float32
    Q, _ = torch.linalg.qr(torch.randn(rank, rank).to(work))  # (r, r)
    q_odd, q_even = Q[0::2, :], Q[1::2, :]  # (r/2, r) each; rows of one orthogonal matrix
    A = torch.randn(in_features, rank // 2).to(work).mm(q_odd).T / 10.0  # (r, in)
    B = torch.randn(rank // 2, out_features).T.to(work).mm(q_even) / 10.0  # (out, r)
    return Factors(
        A=A.contiguous().to(W0.device, W0.dtype), B=B.contiguous().to(W0.device, W0.dtype)
    )
