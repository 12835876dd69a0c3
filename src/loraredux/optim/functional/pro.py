"""LoRA-Pro: the equivalent gradient of a factor pair and the factor gradients that make it the best fit (pure).

Wang, Liang, He, Wang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025, arXiv 2407.18242
(§2; code https://github.com/mrflogs/LoRA-Pro, `peta/optim.py`). Notation of the paper: W' = W0 + s B A with
B (m, r) = (out, r), A (r, n) = (r, in); g the full gradient dL/dW (out, in); the LoRA gradients are
grad_A = s B^T g and grad_B = s g A^T.

- Equivalent gradient (Definition 2.1): a step (g^A, g^B) on the factors moves W' to first order by -lr g~ with
  g~ = s (B g^A + g^B A).
- Theorem 2.1: the (g^A, g^B) minimising ||g~ - g||_F are, for any r x r matrix X,
  g^A = (1/s^2) (B^T B)^{-1} grad_A + X A,
  g^B = (1/s^2) [I - B (B^T B)^{-1} B^T] grad_B (A A^T)^{-1} - B X,
  (the paper writes them with g: (1/s) (B^T B)^{-1} B^T g = (1/s^2) (B^T B)^{-1} grad_A, and likewise for B), so
  g~ = P_B g + (I - P_B) g P_A with P_B = B (B^T B)^{-1} B^T, P_A = A^T (A A^T)^{-1} A, whatever X is: the LoRA
  gradients suffice, the full g is never needed.
- Theorem 2.3: the X that keeps (g^A, g^B) closest to the LoRA gradients, min_X ||g^A - grad_A||^2 +
  ||g^B - grad_B||^2, solves the Sylvester equation
  B^T B X + X A A^T = -(1/s^2) (B^T B)^{-1} grad_A A^T,
  unique because B^T B and A A^T are positive definite (no eigenvalue of one is minus one of the other).
  The authors' code also offers X = 0 (`X_mode="zero"`): the same equivalent gradient, other factor steps.

The r x r inverses are damped: (B^T B + delta I)^{-1}, (A A^T + delta I)^{-1}; the Sylvester equation is solved with
the same damped matrices, so it stays solvable whenever the inverses exist (the authors' code solves it with the
undamped ones: an O(delta) difference). Everything r x r goes through one `eigh` per Gram matrix; the work is in
float32 at least (float64 for float64 factors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .riemannian import check_pair

__all__ = [
    "LoraProGrams",
    "adam_direction",
    "equivalent_gradient",
    "lora_pro_adam",
    "lora_pro_gradients",
    "lora_pro_grams",
    "lora_pro_x",
]

X_CHOICES = ("sylvester", "zero")


class LoraProGrams(NamedTuple):
    """A pair's factors and the eigendecompositions of its damped Gram matrices (see `lora_pro_grams`)."""

    A: Tensor  # (r, in)
    B: Tensor  # (out, r)
    UB: Tensor  # (r, r): B^T B + delta I = UB diag(aB) UB^T
    aB: Tensor  # (r,)
    UA: Tensor  # (r, r): A A^T + delta I = UA diag(aA) UA^T
    aA: Tensor  # (r,)


def _damped_eigh(M: Tensor, delta: float, what: str) -> tuple[Tensor, Tensor]:
    """(U, a) with M + delta I = U diag(a) U^T for a symmetric PSD r x r M.

    Raises:
        ValueError: M + delta I is numerically singular (smallest eigenvalue at most eps * r * the largest).
    """
    a, U = torch.linalg.eigh(M)  # ascending
    a = a + delta
    r = M.shape[0]
    tol = torch.finfo(a.dtype).eps * r * a.abs().max()
    if not bool(a[0] > tol):
        raise ValueError(
            f"LoRA-Pro: the {r} x {r} matrix {what} + delta I is singular (a rank-deficient factor, e.g. B = 0 at "
            f"LoRA's init): use delta > 0 (got delta={delta})"
        )
    return U, a


def lora_pro_grams(A: Tensor, B: Tensor, delta: float = 0.0) -> LoraProGrams:
    """The r x r work of a LoRA-Pro step, done once: eigh of B^T B + delta I and of A A^T + delta I.

    A step over many pairs computes these for every pair first, so that a singular pair is refused before any
    parameter or moment changes.

    Args:
        A: (r, in).
        B: (out, r).
        delta: damping (>= 0).

    Raises:
        ValueError: shapes that do not form a pair, a negative delta, a singular damped Gram matrix.
    """
    check_pair(A, B)
    if not delta >= 0:
        raise ValueError(f"LoRA-Pro: delta must be >= 0, got {delta!r}")
    work = torch.promote_types(A.dtype, torch.float32)
    A_, B_ = A.detach().to(work), B.detach().to(work)
    UB, aB = _damped_eigh(B_.T @ B_, delta, "B^T B")
    UA, aA = _damped_eigh(A_ @ A_.T, delta, "A A^T")
    return LoraProGrams(A_, B_, UB, aB, UA, aA)


def _inv(U: Tensor, a: Tensor, rhs: Tensor) -> Tensor:
    """(U diag(a) U^T)^{-1} rhs, rhs (r, k)."""
    return U @ ((U.T @ rhs) / a[:, None])


def _check_grads(grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor) -> None:
    check_pair(A, B)
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"LoRA-Pro: grad_A must be shaped as A {tuple(A.shape)} and grad_B as B {tuple(B.shape)}; got "
            f"{tuple(grad_A.shape)} and {tuple(grad_B.shape)}"
        )


def _scale(scale: float) -> float:
    if not scale > 0:
        raise ValueError(f"LoRA-Pro: scale must be > 0, got {scale!r}")
    return float(scale)


def _theorem_2_1_x0(
    grad_A: Tensor, grad_B: Tensor, k: LoraProGrams, s: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(g^A, g^B) of Theorem 2.1 with X = 0, and (B^T B)^{-1} grad_A (reused by the Sylvester right-hand side)."""
    inv_gA = _inv(k.UB, k.aB, grad_A)  # (r, in): (B^T B)^{-1} grad_A
    # [I - B (B^T B)^{-1} B^T] grad_B without the (out, out) projector: grad_B - B ((B^T B)^{-1} (B^T grad_B))
    resid = grad_B - k.B @ _inv(k.UB, k.aB, k.B.T @ grad_B)  # (out, r)
    gB = _inv(k.UA, k.aA, resid.T).T / s**2  # (out, r); A A^T symmetric
    return inv_gA / s**2, gB, inv_gA


def _sylvester_x(inv_gA: Tensor, k: LoraProGrams, s: float) -> Tensor:
    """X with (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^{-1} grad_A A^T, by the two eigendecompositions: in the
    eigenbases the equation is diagonal, Y_ij (aB_i + aA_j) = (UB^T C UA)_ij."""
    C = -(inv_gA @ k.A.T) / s**2  # (r, r)
    Y = (k.UB.T @ C @ k.UA) / (k.aB[:, None] + k.aA[None, :])  # (r, r)
    return k.UB @ Y @ k.UA.T


def equivalent_gradient(
    grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, scale: float, delta: float = 0.0
) -> Tensor:
    """The equivalent gradient g~ = s (B g^A + g^B A) of the best-fitting factor gradients (Theorem 2.1).

    With delta = 0, g~ = P_B g + (I - P_B) g P_A, the closest point to the full gradient g that a factor step can
    reach (the same for every X of Theorem 2.1, so X = 0 here); computed from the LoRA gradients alone.

    Args:
        grad_A: (r, in), the LoRA gradient of A (s B^T g).
        grad_B: (out, r), the LoRA gradient of B (s g A^T).
        A: (r, in).
        B: (out, r).
        scale: s (> 0) in W' = W0 + s B A.
        delta: damping of the r x r inverses (>= 0).

    Returns:
        (out, in), in the work dtype (float32 at least).

    Raises:
        ValueError: shapes that do not form a pair, a bad scale or delta, a singular r x r matrix.
    """
    _check_grads(grad_A, grad_B, A, B)
    s = _scale(scale)
    k = lora_pro_grams(A, B, delta)
    gA, gB, _ = _theorem_2_1_x0(grad_A.to(k.A.dtype), grad_B.to(k.A.dtype), k, s)
    return s * torch.addmm(k.B @ gA, gB, k.A)  # (out, in)


def _check_x(x: str) -> None:
    if x not in X_CHOICES:
        raise ValueError(f"LoRA-Pro: x must be one of {X_CHOICES}, got {x!r}")


def _gradients(
    grad_A: Tensor, grad_B: Tensor, k: LoraProGrams, s: float, x: str
) -> tuple[Tensor, Tensor, Tensor]:
    gA, gB, inv_gA = _theorem_2_1_x0(grad_A, grad_B, k, s)
    if x == "zero":
        return gA, gB, torch.zeros(k.UB.shape, dtype=k.UB.dtype, device=k.UB.device)
    X = _sylvester_x(inv_gA, k, s)  # (r, r)
    return gA + X @ k.A, gB - k.B @ X, X


def lora_pro_x(
    grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, scale: float, delta: float = 0.0
) -> Tensor:
    """The X of Theorem 2.3: B^T B X + X A A^T = -(1/s^2) (B^T B)^{-1} grad_A A^T (damped by delta).

    Args: as `equivalent_gradient`.

    Returns:
        (r, r), in the work dtype.
    """
    return lora_pro_gradients(grad_A, grad_B, A, B, scale, delta, return_x=True)[2]


def lora_pro_gradients(
    grad_A: Tensor,
    grad_B: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    delta: float = 0.0,
    x: str = "sylvester",
    return_x: bool = False,
) -> tuple[Tensor, ...]:
    """LoRA-Pro's factor gradients (g^A, g^B): Theorem 2.1 with the X of Theorem 2.3 (the SGD rule of the paper).

        g^A = (1/s^2) (B^T B)^{-1} grad_A + X A,   g^B = (1/s^2) [I - B (B^T B)^{-1} B^T] grad_B (A A^T)^{-1} - B X

    Args:
        grad_A: (r, in), the LoRA gradient of A (or, in the Adam rule, s B^T of the Adam direction).
        grad_B: (out, r), likewise for B.
        A: (r, in).
        B: (out, r).
        scale: s (> 0).
        delta: damping of the r x r inverses (>= 0).
        x: "sylvester" (Theorem 2.3, the paper's choice) or "zero" (X = 0; the authors' `X_mode="zero"`).
        return_x: also return X (r, r).

    Returns:
        (g^A (r, in), g^B (out, r)) in the gradients' dtypes, then X (work dtype) if asked.

    Raises:
        ValueError: shapes that do not form a pair, a bad scale or delta, a singular r x r matrix.
    """
    _check_grads(grad_A, grad_B, A, B)
    _check_x(x)
    s = _scale(scale)
    k = lora_pro_grams(A, B, delta)
    gA, gB, X = _gradients(grad_A.to(k.A.dtype), grad_B.to(k.A.dtype), k, s, x)
    out = (gA.to(grad_A.dtype), gB.to(grad_B.dtype))
    return (*out, X) if return_x else out


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    betas: Sequence[float],
    eps: float,
) -> Tensor:
    """Adam's direction m^ / (sqrt(v^) + eps) after updating the moments in place (Kingma & Ba, Algorithm 1).

    m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) g^2, m^ = m / (1 - beta1^t), v^ = v / (1 - beta2^t);
    the same arithmetic as torch's single-tensor AdamW.

    Args:
        grad: any shape; exp_avg, exp_avg_sq: the moments (same shape, updated in place in their own dtype).
        step: t >= 1, this step's count.
        betas: (beta1, beta2).
        eps: added to sqrt(v^).

    Returns:
        The direction, shaped as grad, in the dtype of grad.
    """
    beta1, beta2 = betas
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.to(grad.dtype).sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return (exp_avg.to(grad.dtype) / (1 - beta1**step)) / denom


def lora_pro_adam(
    grad_A: Tensor,
    grad_B: Tensor,
    A: Tensor,
    B: Tensor,
    scale: float,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    delta: float = 0.0,
    x: str = "sylvester",
    precomputed: LoraProGrams | None = None,
) -> tuple[Tensor, Tensor]:
    """One LoRA-Pro Adam step's factor directions (the paper's Algorithm 1, the authors' `step_full`).

    1. g~ = equivalent gradient of the LoRA gradients (Theorem 2.1); the full-size moments of g~ are updated in
       place and give the Adam direction g^ = m^ / (sqrt(v^) + eps), (out, in).
    2. g^ is mapped back as though it were the full gradient: grad_A <- s B^T g^, grad_B <- s g^ A^T, and the
       factor directions are Theorem 2.1 with the X of Theorem 2.3 on those. The caller steps A -= lr g^A,
       B -= lr g^B; to first order W' moves by -lr (P_B g^ + (I - P_B) g^ P_A).

    Args:
        grad_A: (r, in), the LoRA gradient of A.
        grad_B: (out, r), the LoRA gradient of B.
        A: (r, in).
        B: (out, r).
        scale: s (> 0).
        exp_avg: (out, in), Adam's first moment of g~ (updated in place).
        exp_avg_sq: (out, in), the second moment (updated in place).
        step: t >= 1.
        betas: (beta1, beta2).
        eps: Adam's epsilon.
        delta: damping of the r x r inverses (>= 0).
        x: the X of Theorem 2.1: "sylvester" (Theorem 2.3) or "zero" (see `lora_pro_gradients`).
        precomputed: `lora_pro_grams(A, B, delta)` if already computed.

    Returns:
        (g^A (r, in), g^B (out, r)) in the dtypes of A and B.

    Raises:
        ValueError: shapes that do not form a pair or moments not (out, in), a bad scale or delta, a singular r x r
            matrix (raised before the moments change).
    """
    _check_grads(grad_A, grad_B, A, B)
    size = (B.shape[0], A.shape[1])
    if exp_avg.shape != size or exp_avg_sq.shape != size:
        raise ValueError(
            f"LoRA-Pro: the moments must be (out, in) = {size}; got {tuple(exp_avg.shape)} and "
            f"{tuple(exp_avg_sq.shape)}"
        )
    _check_x(x)
    s = _scale(scale)
    k = (
        precomputed if precomputed is not None else lora_pro_grams(A, B, delta)
    )  # raises before the moments change
    gA, gB, _ = _theorem_2_1_x0(grad_A.to(k.A.dtype), grad_B.to(k.A.dtype), k, s)
    equivalent = s * torch.addmm(k.B @ gA, gB, k.A)  # (out, in)
    direction = adam_direction(equivalent, exp_avg, exp_avg_sq, step, betas, eps)  # (out, in)
    dA, dB, _ = _gradients(s * k.B.T @ direction, s * direction @ k.A.T, k, s, x)
    return dA.to(A.dtype), dB.to(B.dtype)
