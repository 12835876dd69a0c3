"""Refactoring a factor pair into an equivalent, balanced one (RefLoRA, RefLoRA-S, BaLoRA), as pure functions.

For W' = W0 + s B A (A (r, in), B (out, r)) every invertible r x r P gives the same W' from (P^T A, B P^{-T}).
Among these equivalent pairs the balanced ones (A A^T = B^T B) have the best-conditioned loss landscape; the
methods here move the pair to one of them without changing B A.

RefLoRA (Zhang, Li, Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of Large
Models", NeurIPS 2025, arXiv 2505.18877). The closed form, read from the authors' code
(github.com/zhangyilang/RefLoRA, `reflora/reflora.py`, `Refactorer.step` and `Refactorer.dummy_step`):

    A A^T = V_A Sigma_A^2 V_A^T,     M = Sigma_A V_A^T B^T B V_A Sigma_A = V_M Sigma_M^2 V_M^T
    P = V_A Sigma_A^{-1} V_M Sigma_M^{1/2},     P^{-T} = V_A Sigma_A V_M Sigma_M^{-1/2}
    refactor:      A <- P^T A,   B <- B P^{-T}       (then A A^T = B^T B = Sigma_M, the singular values of B A)
    precondition:  grad_A <- S^{-1} grad_A,  grad_B <- grad_B S,   S = P P^T = (A A^T)^{-1} # (B^T B)

(# the matrix geometric mean). For gradient descent the two are the same step of W' (refactor, then step at the
refactored pair = step with the preconditioned gradients); the authors' training runs use the preconditioning form.

RefLoRA-S (same paper, the scalar variant; `Refactorer(use_scalar=True)` in the same file): s = ||B||_F / ||A||_F,
A <- sqrt(s) A, B <- B / sqrt(s), which equalises the two Frobenius norms.

BaLoRA (Castin, Nadjahi, Ablin, Peyre, "Balanced LoRA: Removing Parameter Invariance to Accelerate Convergence",
ICML 2026, arXiv 2605.31484; authors' code github.com/vcastin/balora, `callbacks.py` `ProjectionCallback`, the
`"old"` projection their BaLoRA runs use): after each optimizer step the pair becomes the balanced pair of the SVD
of its product, B A = U Sigma V^T -> (A, B) = (Sigma^{1/2} V^T, U Sigma^{1/2}); their code gets it from the polar
decompositions A = S_A R_A, B = R_B S_B and the SVD of the r x r S_B S_A. That is RefLoRA's refactored pair (both
are the balanced pair aligned with the singular vectors), so `balanced_transform` reuses `reflora_transform`. Their
`BestProjectionCallback` (`"best"`) picks instead, among all balanced pairs with the same product
(O^T Sigma^{1/2} V^T, U Sigma^{1/2} O), O orthogonal, the one nearest to the current pair: O is the orthogonal
polar factor of K = Sigma^{1/2} (V^T A^T + U^T B) (orthogonal Procrustes; they approximate it by Newton-Schulz, we
take it exactly from an r x r SVD).

Degenerate pairs. Every refactor needs both factors of full rank r (Sigma_A and Sigma_M invertible); LoRA's B = 0
at initialisation is the common case that fails. The `*_transform` functions report it in `ok` and then return the
identity (no refactor), so an optimizer can skip that pair without a device sync; the public one-shot functions
raise ValueError instead. `delta` damps both Gram matrices (A A^T + delta I, B^T B + delta I): S is then the
geometric mean of the damped metrics, always defined; the refactored pair is balanced only up to delta.

Everything is computed in float32 at least (float64 for float64 factors): two r x r eigendecompositions and a few
(out, r) / (r, in) products per pair.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .riemannian import check_pair

__all__ = [
    "balanced_from_grams",
    "balanced_projection",
    "balanced_transform",
    "grams",
    "reflora_precondition",
    "reflora_refactor",
    "reflora_s_factor",
    "reflora_transform",
    "transform_from_grams",
]


def _work(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    work = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    return A.detach().to(work), B.detach().to(work)


def _well_posed(lam: Tensor) -> Tensor:
    """Whether the eigenvalues of an r x r Gram matrix are all above its noise floor r * eps * largest (a 0-dim
    bool tensor; no device sync)."""
    floor = lam.shape[0] * torch.finfo(lam.dtype).eps * lam.max()
    return (lam.min() > floor) & (lam.max() > 0) & lam.isfinite().all()


def reflora_transform(A: Tensor, B: Tensor, delta: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """RefLoRA's refactoring matrix P and P^{-T}: the refactored pair is (P^T A, B P^{-T}).

        A A^T + delta I = V_A Sigma_A^2 V_A^T,    M = Sigma_A V_A^T (B^T B + delta I) V_A Sigma_A = V_M Sigma_M^2 V_M^T
        P = V_A Sigma_A^{-1} V_M Sigma_M^{1/2},   P^{-T} = V_A Sigma_A V_M Sigma_M^{-1/2}

    Zhang, Li, Giannakis, arXiv 2505.18877 (RefLoRA's optimal refactoring; the eigendecomposition form of the
    authors' `Refactorer.step`). With delta = 0, P^T A A^T P = P^{-1} B^T B P^{-T} = Sigma_M, the singular values of
    B A (ascending, as `eigh` orders them); the signs of the columns of V_M are eigh's.

    Args:
        A: (r, in).
        B: (out, r).
        delta: damping of both Gram matrices (>= 0).

    Returns:
        P (r, r), P^{-T} (r, r) in float32 at least, and ok (0-dim bool): False when A A^T + delta I or M is
        singular to working precision (a rank-deficient factor with delta = 0); then P = P^{-T} = I.

    Raises:
        ValueError: shapes that do not form a pair, or delta < 0.
    """
    check_pair(A, B)
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0, got {delta!r}")
    return transform_from_grams(*grams(A, B), delta)


def grams(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A A^T and B^T B (r x r, float32 at least): everything the refactoring needs from the pair."""
    A_, B_ = _work(A, B)
    return A_ @ A_.T, B_.T @ B_


def transform_from_grams(
    gram_A: Tensor, gram_B: Tensor, delta: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """`reflora_transform` from the Gram matrices A A^T and B^T B alone (r x r work only: an optimizer computes
    the Grams once per pair and reuses them).

    Returns:
        P, P^{-T}, ok as `reflora_transform`.
    """
    r = gram_A.shape[0]
    eye = torch.eye(r, dtype=gram_A.dtype, device=gram_A.device)
    lam_A, V_A = torch.linalg.eigh(gram_A + delta * eye)  # A A^T + delta I = V_A Sigma_A^2 V_A^T
    sigma_A = lam_A.clamp_min(0).sqrt()  # (r,)
    C = V_A * sigma_A  # (r, r): V_A Sigma_A
    M = C.T @ (gram_B + delta * eye) @ C  # Sigma_A V_A^T (B^T B + delta I) V_A Sigma_A
    lam_M, V_M = torch.linalg.eigh(
        (M + M.T) / 2
    )  # M = V_M Sigma_M^2 V_M^T (symmetrised against rounding)
    root_M = lam_M.clamp_min(0).pow(0.25)  # Sigma_M^{1/2}, (r,)
    ok = _well_posed(lam_A) & _well_posed(lam_M)
    P = (V_A / sigma_A) @ (V_M * root_M)  # (r, r)
    P_inv_T = C @ (V_M / root_M)  # (r, r)
    # where degenerate, the quotients above are inf/nan: `where` keeps only the identity
    return torch.where(ok, P, eye), torch.where(ok, P_inv_T, eye), ok


def _raise_unless(ok: Tensor, what: str, fix: str) -> None:
    if not bool(ok):
        raise ValueError(
            f"{what}: a factor is rank deficient to working precision (e.g. B = 0 at LoRA's initialisation), so no "
            f"equivalent balanced pair of full rank exists; {fix}"
        )


def reflora_refactor(A: Tensor, B: Tensor, delta: float = 0.0) -> tuple[Tensor, Tensor]:
    """RefLoRA's refactored pair (P^T A, B P^{-T}) (see `reflora_transform`): the same B A, balanced.

    Args:
        A: (r, in).
        B: (out, r).
        delta: damping (>= 0); with 0 the result has A A^T = B^T B = diag of B A's singular values.

    Returns:
        A (r, in), B (out, r) in the inputs' dtypes.

    Raises:
        ValueError: a bad pair or delta, or a rank-deficient factor (with delta = 0).
    """
    P, P_inv_T, ok = reflora_transform(A, B, delta)
    _raise_unless(ok, "reflora_refactor", f"use delta > 0 (got {delta})")
    A_, B_ = _work(A, B)
    return (P.T @ A_).to(A.dtype), (B_ @ P_inv_T).to(B.dtype)


def reflora_precondition(
    grad_A: Tensor, grad_B: Tensor, A: Tensor, B: Tensor, delta: float = 0.0
) -> tuple[Tensor, Tensor]:
    """RefLoRA as preconditioning: S^{-1} grad_A and grad_B S with S = P P^T = (A A^T)^{-1} # B^T B.

    S^{-1} = P^{-T} P^{-1}. The gradients at the refactored pair are P^{-1} grad_A and grad_B P (chain rule), and a
    gradient step there moves B A exactly as this preconditioned step at the original pair (arXiv 2505.18877; the
    authors' `Refactorer.dummy_step`, which their training runs use as an optimizer pre-step hook).

    Args:
        grad_A: (r, in).
        grad_B: (out, r).
        A: (r, in).
        B: (out, r).
        delta: damping of both Gram matrices (>= 0).

    Returns:
        The preconditioned (r, in) and (out, r) gradients in the gradients' dtypes.

    Raises:
        ValueError: shapes that do not match, a bad delta, or a rank-deficient factor (with delta = 0).
    """
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradients must match their factors: grad_A {tuple(grad_A.shape)} vs A {tuple(A.shape)}, grad_B "
            f"{tuple(grad_B.shape)} vs B {tuple(B.shape)}"
        )
    P, P_inv_T, ok = reflora_transform(A, B, delta)
    _raise_unless(ok, "reflora_precondition", f"use delta > 0 (got {delta})")
    gA, gB = grad_A.to(P.dtype), grad_B.to(P.dtype)
    return (P_inv_T @ (P_inv_T.T @ gA)).to(grad_A.dtype), ((gB @ P) @ P.T).to(grad_B.dtype)


def reflora_s_factor(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """RefLoRA-S's factor sqrt(s), s = ||B||_F / ||A||_F: (sqrt(s) A, B / sqrt(s)) has equal Frobenius norms.

    arXiv 2505.18877, the scalar variant (authors' `Refactorer(use_scalar=True)`); Adam's moments are rescaled with
    it (first moments by 1/sqrt(s) for A and sqrt(s) for B, second moments by 1/s and s).

    Args:
        A: (r, in).
        B: (out, r).

    Returns:
        sqrt(s) (0-dim, float32 at least) and ok (0-dim bool): False when a factor is zero (s = 0 or inf, e.g. LoRA's
        B = 0 at initialisation); then the factor is 1 (no refactor).

    Raises:
        ValueError: shapes that do not form a pair.
    """
    check_pair(A, B)
    A_, B_ = _work(A, B)
    norm_A, norm_B = torch.linalg.vector_norm(A_), torch.linalg.vector_norm(B_)
    s = norm_B / norm_A
    ok = (norm_A > 0) & (norm_B > 0) & s.isfinite()
    return torch.where(ok, s, torch.ones_like(s)).sqrt(), ok


def balanced_transform(
    A: Tensor, B: Tensor, closest: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """BaLoRA's projection as an equivalent-pair transform: the projected pair is (P^T A, B P^{-T}).

    closest=False (the authors' BaLoRA): the balanced pair of the SVD, B A = U Sigma V^T -> (Sigma^{1/2} V^T,
    U Sigma^{1/2}), singular values descending (`callbacks.ProjectionCallback`). The SVD leaves the sign of each
    singular pair (u_i, v_i) free; we take, for each i, the sign that puts the new pair nearer the current one, so
    that repeated projections do not flip rows of A (and columns of B) against the optimizer's moments.
    closest=True (`callbacks.BestProjectionCallback`): the balanced pair with the same product nearest to (A, B) in
    Frobenius norm, (O^T A_svd, B_svd O) with O the orthogonal polar factor of K = A_svd A^T + B_svd^T B.

    Castin, Nadjahi, Ablin, Peyre, arXiv 2605.31484. Computed through `reflora_transform` (delta = 0), whose pair is
    this SVD pair up to order and signs.

    Args:
        A: (r, in).
        B: (out, r).
        closest: the nearest balanced pair instead of the SVD-aligned one.

    Returns:
        P (r, r), P^{-T} (r, r) (float32 at least) and ok (0-dim bool): False when B A has rank < r to working
        precision (its balanced pairs then have zero rows in A and zero columns in B, directions that no gradient
        can revive); then P = P^{-T} = I (no projection).

    Raises:
        ValueError: shapes that do not form a pair.
    """
    check_pair(A, B)
    return balanced_from_grams(*grams(A, B), closest)


def balanced_from_grams(
    gram_A: Tensor, gram_B: Tensor, closest: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """`balanced_transform` from the Gram matrices A A^T and B^T B alone (r x r work only).

    Returns:
        P, P^{-T}, ok as `balanced_transform`.
    """
    P, P_inv_T, ok = transform_from_grams(gram_A, gram_B, 0.0)
    P, P_inv_T = P.flip(1), P_inv_T.flip(1)  # singular values descending, as the SVD orders them
    eye = torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    # K = A_new A^T + B_new^T B: <(O^T A_new, B_new O), (A, B)> = <O, K>, maximal at O = polar factor of K
    K = P.T @ gram_A + P_inv_T.T @ gram_B  # (r, r)
    if closest:
        U, _, Vh = torch.linalg.svd(K)
        O = U @ Vh  # (r, r), orthogonal
    else:
        O = torch.diag(torch.where(K.diagonal() < 0, -1.0, 1.0).to(K.dtype))  # the nearest signs
    # (O^T P^T A, B P^{-T} O): P O and P^{-T} O; O orthogonal keeps the pair balanced
    return torch.where(ok, P @ O, eye), torch.where(ok, P_inv_T @ O, eye), ok


def balanced_projection(A: Tensor, B: Tensor, closest: bool = False) -> tuple[Tensor, Tensor]:
    """BaLoRA's projection of (A, B) onto the balanced manifold {A A^T = B^T B} with B A unchanged (see
    `balanced_transform` for which balanced pair, arXiv 2605.31484).

    Args:
        A: (r, in).
        B: (out, r).
        closest: the balanced pair nearest to (A, B) instead of the SVD-aligned one.

    Returns:
        A (r, in), B (out, r) in the inputs' dtypes.

    Raises:
        ValueError: a bad pair, or B A of rank < r (see `balanced_transform`).
    """
    P, P_inv_T, ok = balanced_transform(A, B, closest)
    _raise_unless(ok, "balanced_projection", "take a plain step first")
    A_, B_ = _work(A, B)
    return (P.T @ A_).to(A.dtype), (B_ @ P_inv_T).to(B.dtype)
