"""Balancedness of a factor pair and the balancedness-aware regularizer (BAR) of Li, Zhang, He (pure functions).

Li, Zhang, He, "Implicit Regularization of Sharpness-Aware Minimization for Scale-Invariant Problems", NeurIPS 2024,
arXiv 2410.14802. The paper writes LoRA as W + X Y^T with X (d1, r), Y (d2, r) (§5.1); here W' = W0 + s B A, so
X = B (out, r) and Y = A^T (in, r). Its balancedness (§2.2, Frobenius norms for matrices, §1 "Notation"):

    𝓑 = 1/2 (||X||_F^2 - ||Y||_F^2) = 1/2 (||B||_F^2 - ||A||_F^2)

Gradient flow keeps the r x r matrix B^T B - A A^T constant (Theorem 1 for vectors; the matrix identity is the
classical conservation law of Arora et al. 2018 / Du et al. 2018), hence 𝓑 (half its trace) too; SAM drives |𝓑|
down (Theorem 2: d𝓑/dt = rho (||g_X||^2 - ||g_Y||^2) / sqrt(||g_X||^2 + ||g_Y||^2) + O(rho^2)).

BAR makes that pull explicit (§5.2, App. A.6): the regularizer mu_t * sign * (||X||^2 - ||Y||^2), where

    nBAR (non-overparametrized, LoRA):  sign = +1 if ||g_X||^2 < ||g_Y||^2 else -1   (mimics Theorem 2)
    oBAR (overparametrized):            sign = +1 if ||X|| >= ||Y|| else -1           (= mu_t |X^T X - Y^T Y|)

applied "in the same manner as weight decay" in AdamW. The algorithm boxes (Algs. 2, 3) could not be read from the
sources available, so the constant follows AdamW's weight-decay convention: the regularizer is
(mu_t / 2) sign (||B||^2 - ||A||^2), whose gradient is (-mu_t sign A, +mu_t sign B), so a decoupled step multiplies B
by (1 - lr mu_t sign) and A by (1 + lr mu_t sign), as AdamW multiplies a weight by (1 - lr lambda).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .riemannian import check_pair

__all__ = [
    "BAR_SCHEDULES",
    "BAR_VARIANTS",
    "balancedness",
    "bar_coefficient",
    "bar_gradient",
    "bar_regularizer",
    "bar_sign",
    "gram_imbalance",
]

BAR_VARIANTS = ("nbar", "obar")
BAR_SCHEDULES = ("constant", "linear", "cosine")


def balancedness(A: Tensor, B: Tensor) -> Tensor:
    """The paper's balancedness 𝓑 = 1/2 (||B||_F^2 - ||A||_F^2) of W' = W0 + s B A (§2.2, X = B, Y = A^T).

    Positive when B carries more of the product's norm than A; 0 for a balanced pair. LoRA's init (B = 0) has
    𝓑 = -||A||_F^2 / 2.

    Args:
        A: (r, in).
        B: (out, r).

    Returns:
        A 0-dim tensor in float32 at least (float64 for float64 factors): half-precision squares overflow.

    Raises:
        ValueError: shapes that do not form a pair.
    """
    check_pair(A, B)
    work = torch.promote_types(A.dtype, torch.float32)
    return 0.5 * (B.to(work).square().sum() - A.to(work).square().sum())


def gram_imbalance(A: Tensor, B: Tensor) -> Tensor:
    """B^T B - A A^T (r, r): the matrix balancedness, constant under gradient flow on any loss of B A.

    Its trace is 2 𝓑 (`balancedness`); it is 0 exactly when the pair is balanced in the matrix sense (both Gram
    matrices equal), which a refactored (SVD-aligned) pair satisfies. (The negative, A A^T - B^T B, is the same
    conserved quantity with the other sign.)

    Args:
        A: (r, in).
        B: (out, r).

    Returns:
        (r, r) in float32 at least (float64 for float64 factors).

    Raises:
        ValueError: shapes that do not form a pair.
    """
    check_pair(A, B)
    work = torch.promote_types(A.dtype, torch.float32)
    A_, B_ = A.to(work), B.to(work)
    return B_.T @ B_ - A_ @ A_.T  # (r, r)


def bar_sign(variant: str, A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> Tensor:
    """The sign of BAR's regularizer for one pair this step, as a 0-dim tensor (+1 shrinks B and grows A).

    nBAR (§5.2): +1 if ||g_X||^2 < ||g_Y||^2, i.e. ||grad_B||_F^2 < ||grad_A||_F^2, else -1. Theorem 2 says SAM
    then decreases 𝓑 (moves norm from B to A), which the regularizer +(||B||^2 - ||A||^2) does too.
    oBAR (§5.2): +1 if ||X|| >= ||Y||, i.e. ||B||_F >= ||A||_F, else -1: the subgradient of |𝓑|.

    Args:
        variant: "nbar" or "obar".
        A: (r, in).
        B: (out, r).
        grad_A: (r, in), the loss gradient (without the regularizer).
        grad_B: (out, r).

    Raises:
        ValueError: an unknown variant or shapes that do not form a pair.
    """
    check_pair(A, B)
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"grad_A {tuple(grad_A.shape)} and grad_B {tuple(grad_B.shape)} must have the shapes of A "
            f"{tuple(A.shape)} and B {tuple(B.shape)}"
        )
    # squared norms of half-precision tensors overflow
    work = torch.promote_types(A.dtype, torch.float32)
    if variant == "nbar":
        shrink_B = grad_B.to(work).square().sum() < grad_A.to(work).square().sum()
    elif variant == "obar":
        shrink_B = B.to(work).square().sum() >= A.to(work).square().sum()
    else:
        raise ValueError(f"BAR variant must be one of {BAR_VARIANTS}, got {variant!r}")
    one = torch.ones((), dtype=A.dtype, device=A.device)
    return torch.where(shrink_B, one, -one)  # no host sync: the step uses it as a tensor


def bar_regularizer(A: Tensor, B: Tensor, sign: Tensor | float, mu: Tensor | float) -> Tensor:
    """BAR's regularizer (mu / 2) sign (||B||_F^2 - ||A||_F^2) = mu sign 𝓑 (its value; the sign held fixed).

    Args:
        A: (r, in).
        B: (out, r).
        sign: +1 or -1 (`bar_sign`).
        mu: the coefficient mu_t (>= 0).
    """
    return mu * sign * balancedness(A, B)


def bar_gradient(
    A: Tensor, B: Tensor, sign: Tensor | float, mu: Tensor | float
) -> tuple[Tensor, Tensor]:
    """The gradient of `bar_regularizer` in (A, B): (-mu sign A, +mu sign B), shapes (r, in) and (out, r).

    A decoupled step p <- p - lr * gradient is then A <- (1 + lr mu sign) A, B <- (1 - lr mu sign) B.

    Raises:
        ValueError: shapes that do not form a pair.
    """
    check_pair(A, B)
    return -mu * sign * A, mu * sign * B


def bar_coefficient(mu: float, step: int | float, total_steps: int | None, schedule: str) -> float:
    """mu_t for step t (0-based) of T = total_steps: the decreasing schedules of §5.2 ("Schedule of alpha_t").

        constant: mu;   linear: mu (1 - t / T);   cosine: mu (1 + cos(pi t / T)) / 2;   0 once t >= T.

    Args:
        mu: mu_0 (>= 0; the paper tunes it in {0.2, 0.5, 1.0}, App. D.4).
        step: t, the steps already taken.
        total_steps: T (> 0), needed by "linear" and "cosine".
        schedule: "constant", "linear" or "cosine".

    Raises:
        ValueError: an unknown schedule or a missing/bad total_steps.
    """
    if schedule == "constant":
        return mu
    if schedule not in BAR_SCHEDULES:
        raise ValueError(f"BAR schedule must be one of {BAR_SCHEDULES}, got {schedule!r}")
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError(
            f"BAR schedule {schedule!r} needs total_steps, an int > 0, got {total_steps!r}"
        )
    frac = min(float(step) / total_steps, 1.0)
    if schedule == "linear":
        return mu * (1.0 - frac)
    return mu * 0.5 * (1.0 + math.cos(math.pi * frac))
