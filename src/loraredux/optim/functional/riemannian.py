"""Riemannian / scaled preconditioning of a factor pair and LoRA-FA's projected gradient (pure functions).

Scaled preconditioning (Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
ICML 2024, arXiv 2402.02347; the ScaledGD of Tong, Ma, Chi for low-rank matrix estimation):

    grad_A <- (B^T B + delta I)^{-1} grad_A        grad_B <- grad_B (A A^T + delta I)^{-1}

With delta = 0 one step is invariant to the gauge (A, B) -> (G A, B G^{-1}) for any invertible G: the gradients
transform as grad_A -> G^{-T} grad_A and grad_B -> grad_B G^T, and the r x r metrics as (B^T B)^{-1} ->
G (B^T B)^{-1} G^T, so the new pair is (G A', B' G^{-1}) and B' A' is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_pair", "lora_fa_gradient", "riemannian_precondition", "solve_spd", "spd_inverse"]


def check_pair(A: Tensor, B: Tensor) -> None:
    """Raises ValueError unless A is (r, in) and B is (out, r) with the same r (the shared check of every
    function over a factor pair)."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"a factor pair needs A (r, in) and B (out, r) with the same r, got A {tuple(A.shape)} and B "
            f"{tuple(B.shape)}"
        )


def spd_inverse(M: Tensor, delta: float, what: str) -> Tensor:
    """(M + delta I)^{-1} of a symmetric positive semi-definite r x r M, from its Cholesky factor.

    The r x r inverse costs r^3 and turns the (r, n) solves of the optimizers into one GEMM each, 3-4x faster on a
    CPU than triangular solves (`cholesky_solve`) at r = 64 (benchmarks/optim_speed.py), with the same forward error
    bound for an SPD matrix (about cond(M) eps).

    Raises:
        ValueError: M + delta I is singular (delta = 0 with a rank-deficient factor): name it and the fix.
    """
    r = M.shape[0]
    K = M + delta * torch.eye(r, dtype=M.dtype, device=M.device) if delta else M
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        raise ValueError(
            f"the {r} x {r} metric {what} is singular (a rank-deficient factor, e.g. B = 0 at LoRA's init): use "
            f"delta > 0 (got {delta})"
        )
    return torch.cholesky_inverse(L)


def solve_spd(M: Tensor, rhs: Tensor, delta: float, what: str) -> Tensor:
    """(M + delta I)^{-1} rhs for a symmetric positive semi-definite r x r M (see `spd_inverse`).

    Raises:
        ValueError: M + delta I is singular (delta = 0 with a rank-deficient factor): name it and the fix.
    """
    return spd_inverse(M, delta, what) @ rhs


def riemannian_precondition(
    grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, delta: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(B^T B + delta I)^{-1} grad_A and grad_B (A A^T + delta I)^{-1}, the scaled gradients of the pair.

    Computed in float32 at least (float64 for float64 factors) and returned in the gradients' dtype.

    Args:
        grad_A: (r, in).
        grad_B: (out, r).
        A: (r, in).
        B: (out, r).
        delta: the damping (>= 0); 0 is exactly gauge invariant but needs both factors of full rank r.

    Raises:
        ValueError: shapes that do not form a pair, a negative delta, or a singular metric.
    """
    r = A.shape[0]
    if A.shape != grad_A.shape or B.shape != grad_B.shape or B.shape[1] != r:
        raise ValueError(
            f"a factor pair needs A, grad_A (r, in) and B, grad_B (out, r); got A {tuple(A.shape)}, grad_A "
            f"{tuple(grad_A.shape)}, B {tuple(B.shape)}, grad_B {tuple(grad_B.shape)}"
        )
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")
    work = torch.promote_types(A.dtype, torch.float32)
    A_, B_ = A.detach().to(work), B.detach().to(work)
    gA = solve_spd(B_.T @ B_, grad_A.to(work), delta, "B^T B")  # (r, in)
    gB = grad_B.to(work) @ spd_inverse(A_ @ A_.T, delta, "A A^T")  # (out, r)
    return gA.to(grad_A.dtype), gB.to(grad_B.dtype)


def lora_fa_gradient(grad_B: Tensor, A: Tensor, scale: float, delta: float = 1e-8) -> Tensor:
    """LoRA-FA's projected gradient of B with A frozen: (1 / s^2) grad_B (A A^T + delta I)^{-1}.

    For W' = W0 + s B A the gradient of B is s G A^T (G the full-weight gradient), and a step g on B moves W' by
    s g A. The g that makes s g A closest to G is g = (1 / s) G A^T (A A^T)^{-1} = (1 / s^2) grad_B (A A^T)^{-1},
    so that s g A = G A^T (A A^T)^{-1} A, the projection of G onto A's row space (PEFT's `LoraFAOptimizer`,
    arXiv 2308.03303).

    Args:
        grad_B: (out, r).
        A: (r, in), frozen.
        scale: s (> 0).
        delta: damping of A A^T (>= 0).

    Raises:
        ValueError: shapes that do not form a pair, a bad scale or delta, or a singular A A^T with delta = 0.
    """
    if grad_B.ndim != 2 or A.ndim != 2 or grad_B.shape[1] != A.shape[0]:
        raise ValueError(
            f"LoRA-FA needs grad_B (out, r) and A (r, in); got {tuple(grad_B.shape)} and {tuple(A.shape)}"
        )
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")
    work = torch.promote_types(A.dtype, torch.float32)
    A_ = A.detach().to(work)
    g = grad_B.to(work) @ spd_inverse(A_ @ A_.T, delta, "A A^T")  # (out, r)
    return (g / scale**2).to(grad_B.dtype)
