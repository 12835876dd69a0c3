"""Alternating solvers for a factor pair W' = W0 + s B A (pure functions): AltLoRA's projected momentum step,
the classical alternating least squares of low-rank matrix sensing, and a guarded conjugate-gradient solver.

AltLoRA (Yu, Wang, Chen, Xue, "AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with
Alternating Projections", NeurIPS 2025, arXiv 2505.12455, §3): one factor is updated at a time. With B fixed,
the A step is the least-squares fit of the low-rank update to the full gradient G = dL/dW',

    A~ = argmin_X || s B X - G ||_F = (1 / s) (B^T B)^{-1} B^T G = (1 / s^2) (B^T B)^{-1} grad_A,

(grad_A = s B^T G), and symmetrically with A fixed, B~ = (1 / s^2) grad_B (A A^T)^{-1}. The momentum stays in
the low-rank space, (r, in) for A and (out, r) for B; before it is mixed with the new A~ it is carried into the
current subspace by the same least-squares fit: the old momentum acted through the old B' as B' M_A, and the
closest matrix of the form B X is X = (B^T B)^{-1} B^T B' M_A, so

    M_A <- beta (B^T B + delta I)^{-1} B^T B' M_A + (1 - beta) A~,        A <- A - lr M_A,
    M_B <- beta M_B A' A^T (A A^T + delta I)^{-1} + (1 - beta) B~,        B <- B - lr M_B,

with B' (A') the opposite factor at the previous update of A (B). With delta = 0 a step does not depend on the
gauge (A, B) -> (G A, B G^{-1}): A~, M_A -> G A~, G M_A and B~, M_B -> B~ G^{-1}, M_B G^{-1}, so B A moves the
same way (the paper's transformation invariance, for AltLoRA with first moment only; its AltLoRA+ with an Adam
second moment is not invariant, the paper's own Appendix D.2).

Alternating least squares for low-rank matrix sensing y_i = <X_i, s B A> (the classical alternating minimization,
e.g. Jain, Netrapalli, Sanghavi, "Low-rank Matrix Completion using Alternating Minimization", STOC 2013): with one
factor fixed the measurements are linear in the other, so each half-sweep is an ordinary least-squares problem,
solved exactly here by `torch.linalg.lstsq`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .riemannian import check_pair, solve_spd

__all__ = [
    "CGResult",
    "als_block_solve",
    "als_matrix_sensing",
    "altlora_momentum",
    "conjugate_gradient",
]

Factor = Literal["A", "B"]


def altlora_momentum(
    factor: Factor,
    grad: Tensor,
    A: Tensor,
    B: Tensor,
    momentum: Tensor,
    basis: Tensor,
    scale: float,
    beta: float,
    delta: float = 0.0,
) -> Tensor:
    """AltLoRA's new low-rank momentum of one factor (arXiv 2505.12455, §3; see the module docstring).

    factor "A":  M_A = (B^T B + delta I)^{-1} (beta B^T B' M_A + (1 - beta) grad_A / s^2)
    factor "B":  M_B = (beta M_B A' A^T + (1 - beta) grad_B / s^2) (A A^T + delta I)^{-1}

    The step is then `factor <- factor - lr M`. Both terms share one r x r Cholesky solve. Computed in float32 at
    least (float64 for float64 factors) and returned in the gradient's dtype.

    Args:
        factor: which factor is updated ("A" or "B").
        grad: the gradient of that factor, (r, in) for A or (out, r) for B.
        A: (r, in), the current A.
        B: (out, r), the current B.
        momentum: the factor's previous momentum, shaped like `grad` (zeros at the first update).
        basis: the opposite factor at the previous update of this factor: B' (out, r) for "A", A' (r, in) for "B".
        scale: s in W' = W0 + s B A (> 0).
        beta: the momentum coefficient in [0, 1).
        delta: damping of the r x r metric (>= 0); 0 is exactly gauge invariant but needs a full-rank opposite
            factor.

    Raises:
        ValueError: shapes that do not fit, a bad factor, scale, beta or delta, or a singular metric.
    """
    check_pair(A, B)
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    own, other = (A, B) if factor == "A" else (B, A)
    if grad.shape != own.shape or momentum.shape != own.shape or basis.shape != other.shape:
        raise ValueError(
            f"AltLoRA {factor} step: grad and momentum must be {tuple(own.shape)} and basis "
            f"{tuple(other.shape)}; got {tuple(grad.shape)}, {tuple(momentum.shape)}, {tuple(basis.shape)}"
        )
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")
    work = torch.promote_types(A.dtype, torch.float32)
    A_, B_ = A.detach().to(work), B.detach().to(work)
    g, M, P = grad.to(work), momentum.to(work), basis.to(work)
    if factor == "A":
        rhs = beta * ((B_.T @ P) @ M) + ((1 - beta) / scale**2) * g  # (r, in); B^T B' is (r, r)
        out = solve_spd(B_.T @ B_, rhs, delta, "B^T B")  # (r, in)
    else:
        rhs = beta * (M @ (P @ A_.T)) + ((1 - beta) / scale**2) * g  # (out, r); A' A^T is (r, r)
        out = solve_spd(A_ @ A_.T, rhs.T, delta, "A A^T").T  # (out, r); A A^T is symmetric
    return out.to(grad.dtype)


def _sensing_check(X: Tensor, y: Tensor, A: Tensor, B: Tensor) -> None:
    check_pair(A, B)
    if X.ndim != 3 or X.shape[1:] != (B.shape[0], A.shape[1]) or y.shape != X.shape[:1]:
        raise ValueError(
            f"matrix sensing needs X (m, out, in) = (m, {B.shape[0]}, {A.shape[1]}) and y (m,); got X "
            f"{tuple(X.shape)} and y {tuple(y.shape)}"
        )


def als_block_solve(
    X: Tensor, y: Tensor, A: Tensor, B: Tensor, factor: Factor, scale: float = 1.0
) -> Tensor:
    """The exact minimizer of sum_i (<X_i, s B A> - y_i)^2 over one factor, the other fixed (least squares).

    <X_i, s B A> = <s B^T X_i, A> = <s X_i A^T, B>, so with B fixed the design matrix has rows vec(s B^T X_i)
    (length r in), and with A fixed rows vec(s X_i A^T) (length out r); `torch.linalg.lstsq` gives the
    minimum-norm solution (gelsd on CPU) when the system is rank-deficient.

    Args:
        X: (m, out, in), the measurement matrices.
        y: (m,), the measurements.
        A: (r, in).
        B: (out, r).
        factor: the factor to solve for ("A" or "B").
        scale: s (> 0).

    Returns:
        The new factor, (r, in) for "A" or (out, r) for "B".

    Raises:
        ValueError: shapes that do not fit, or a bad factor or scale.
    """
    _sensing_check(X, y, A, B)
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    m = X.shape[0]
    if factor == "A":
        design = (scale * B.T @ X).reshape(m, -1)  # (m, r * in): rows vec(s B^T X_i)
        shape = A.shape
    else:
        design = (scale * X @ A.T).reshape(m, -1)  # (m, out * r): rows vec(s X_i A^T)
        shape = B.shape
    driver = "gelsd" if design.device.type == "cpu" else None
    solution = torch.linalg.lstsq(design, y.unsqueeze(-1), driver=driver).solution  # (n, 1)
    return solution.reshape(shape)


def als_matrix_sensing(
    X: Tensor,
    y: Tensor,
    A: Tensor,
    B: Tensor,
    sweeps: int,
    first: Factor = "A",
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Alternating least squares for y_i = <X_i, s B A>: `sweeps` full sweeps, each two exact block solves
    (`als_block_solve`), starting with the factor `first`.

    Args:
        X: (m, out, in).
        y: (m,).
        A: (r, in), the starting A.
        B: (out, r), the starting B.
        sweeps: the number of full sweeps (>= 0).
        first: the factor solved first in each sweep.
        scale: s (> 0).

    Returns:
        (A, B) after the sweeps.

    Raises:
        ValueError: as `als_block_solve`, or a negative sweep count.
    """
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps!r}")
    order: tuple[Factor, Factor] = ("A", "B") if first == "A" else ("B", "A")
    for _ in range(sweeps):
        for factor in order:
            new = als_block_solve(X, y, A, B, factor, scale)
            A, B = (new, B) if factor == "A" else (A, new)
    return A, B


class CGResult(NamedTuple):
    """What `conjugate_gradient` returns."""

    solution: Tensor  # (n,)
    iterations: int  # Hessian-vector products used
    negative_curvature: bool  # whether a direction of non-positive curvature stopped it


def conjugate_gradient(
    hvp: Callable[[Tensor], Tensor],
    g: Tensor,
    tol: float,
    max_iters: int,
    damping: float = 0.0,
) -> CGResult:
    """Solve (H + damping I) d = -g by conjugate gradients from d = 0, with a guard for non-positive curvature.

    Hestenes & Stiefel (1952); the guard is the truncated CG of Steihaug (1983) without the trust region: when a
    search direction p has p^T (H + damping I) p <= 0 the quadratic model is not convex along p, so CG stops and
    returns the current iterate, or -g itself if that happens at the first iteration (steepest descent). Each
    iterate of CG from 0 on a positive-definite system is a descent direction (g^T d < 0).

    Args:
        hvp: v -> H v for a flat (n,) v.
        g: (n,), the gradient.
        tol: stop when ||r|| <= tol ||g|| (relative residual).
        max_iters: at most this many Hessian-vector products (>= 1).
        damping: added to H (>= 0).

    Returns:
        CGResult(solution (n,), iterations used, whether non-positive curvature stopped it).
    """
    d = torch.zeros_like(g)
    r = -g  # residual of (H + damping I) d = -g at d = 0
    p = r.clone()
    rr = r @ r
    stop = (tol * torch.linalg.vector_norm(g)) ** 2
    for k in range(max_iters):
        if rr <= stop:
            return CGResult(d, k, False)
        Hp = hvp(p) + damping * p  # (n,)
        curvature = p @ Hp
        if not curvature > 0:
            return CGResult(-g if k == 0 else d, k + 1, True)
        alpha = rr / curvature
        d = d + alpha * p
        r = r - alpha * Hp
        rr_next = r @ r
        p = r + (rr_next / rr) * p
        rr = rr_next
    return CGResult(d, max_iters, False)
