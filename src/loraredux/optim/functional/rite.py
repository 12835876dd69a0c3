"""LoRA-RITE's step for one factor pair, as pure functions over tensors.

Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh, Kumar, "LoRA Done RITE: Robust Invariant Transformation Equilibration
for LoRA Optimization", ICLR 2025, arXiv 2410.20625, Algorithm 1 (§3). The paper writes Z = A B^T with A (m, r),
B (n, r); ours is W' = W0 + s B A with B (out, r), A (r, in), so the paper's A is our B and the paper's B is our A^T.
For the paper's A (our B), with A = U_A R_A and B = U_B R_B (QR):

    g_t = grad_A R_B^{-1}                                   the unmagnified gradient (= s G U_B, gauge free)
    P_t = U_{B,t}^T U_{B,t-1}                               carries the state into the new basis
    V_t = b2 P_t V_{t-1} P_t^T + (1 - b2) g_t^T g_t / m     unmagnified second moment (r, r)
    rho_t = b2 (rho_{t-1} + d_lambda(V_{t-1}, P_t V_{t-1} P_t^T))   the mass the projection let escape
    S_t = g_t (V_t + rho_t I)^{-1/2}                        (eps added to the square roots, as Adam)
    M_t = b1 M_{t-1} P_t^T + (1 - b1) S_t                   unmagnified first moment (m, r)
    A <- A - lr (M_t R_B^{-T} + weight_decay A)

and the mirror image for the paper's B (our A) with the roles of the factors swapped. d_lambda(X, Y) =
max_i (lambda_i(X) - lambda_i(Y)) over the eigenvalues in order: P is a contraction, so the transported second
moment can only lose mass, and rho puts the largest loss back on every direction. Algorithm 1 prints the
Adagrad-style sums (V_t = P V P^T + g^T g, rho_t = rho_{t-1} + d_lambda); the exponential averages with b2, the
bias-corrected decays b_t = b (1 - b^{t-1}) / (1 - b^t) (Adafactor §7.1, the same estimates as Adam's bias
correction), the 1 / m normalisation (a constant: it makes the step size comparable to Adam's), eps after the square
root, and the decoupled weight decay are those of the authors' PyTorch code (github.com/gkevinyen5418/LoRA-RITE,
lora_rite.py, `LoRARite(betas=(0.9, 0.999), eps=1e-6)`).

Two computational choices, equal to the paper's in exact arithmetic:
- R is the symmetric root (B^T B + delta I)^{1/2} from an r x r eigendecomposition of the Gram matrix, not QR's
  triangle. Every R with R^T R = B^T B is O R_QR for an orthogonal O, and the recursion is equivariant under
  U -> U O (that is its gauge invariance), so the parameters come out the same; a zero eigenvalue gets a zero
  inverse root (the pseudo-inverse, as the authors' `pinv`), so LoRA's B = 0 gives A a zero step.
- U_{t-1} is not kept: P_t = U_t^T U_{t-1} = R_t^{-1} (B_t^T U_{t-1}), and the r x r overlap K = B_t^T U_{t-1} is
  formed right after step t-1 writes B_t (the authors keep the (n, r) basis). So the state is r x r per factor
  besides the first moment. It assumes the factors change only through these steps between two steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RiteState",
    "corrected_decay",
    "escaped_mass",
    "gram_inverse_root",
    "lora_rite_step",
    "rite_factor_direction",
]


class RiteState(NamedTuple):
    """LoRA-RITE's state of one pair, in the work dtype (float32 at least). `_A` is for our A (r, in), `_B` for our
    B (out, r); the first moments have their factor's shape, everything else is r x r or a scalar.

    Attributes:
        step: () steps taken.
        M_A: (r, in) the unmagnified first moment of A (the paper's M_B transposed).
        M_B: (out, r) the unmagnified first moment of B (the paper's M_A).
        V_A: (r, r) the unmagnified second moment of A.
        V_B: (r, r) the unmagnified second moment of B.
        rho_A: () the escaped mass of A's second moment.
        rho_B: () the escaped mass of B's second moment.
        K_A: (r, r) A_t U_{A,t-1} with U_A = A^T (A A^T)^{-1/2}: the overlap of A's row space across the last step.
        K_B: (r, r) B_t^T U_{B,t-1} with U_B = B (B^T B)^{-1/2}: the overlap of B's column space.
    """

    step: Tensor
    M_A: Tensor
    M_B: Tensor
    V_A: Tensor
    V_B: Tensor
    rho_A: Tensor
    rho_B: Tensor
    K_A: Tensor
    K_B: Tensor

    @staticmethod
    def zeros(A: Tensor, B: Tensor) -> RiteState:
        """The state before the first step (K = 0 makes the first P zero: nothing to carry)."""
        work = torch.promote_types(A.dtype, torch.float32)
        r = A.shape[0]

        def z(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=work, device=A.device)

        return RiteState(
            z(), z(*A.shape), z(*B.shape), z(r, r), z(r, r), z(), z(), z(r, r), z(r, r)
        )


def corrected_decay(beta: float, step: int) -> float:
    """The bias-corrected decay beta (1 - beta^{t-1}) / (1 - beta^t) at step t >= 1 (0 at t = 1): an average with it
    equals Adam's bias-corrected average (Shazeer & Stern, Adafactor, arXiv 1804.04235, §7.1)."""
    return beta * (1.0 - beta ** (step - 1)) / (1.0 - beta**step)


def gram_inverse_root(gram: Tensor, delta: float) -> Tensor:
    """(gram + delta I)^{-1/2} for a symmetric PSD r x r gram, by eigendecomposition; eigenvalues at or below
    r * eps(dtype) * the largest count as zero and get a zero root (the pseudo-inverse: a rank-deficient factor).

    Args:
        gram: (r, r), B^T B or A A^T.
        delta: damping (>= 0) added to the diagonal.

    Returns:
        (r, r) symmetric R^+ with R = (gram + delta I)^{1/2}.
    """
    r = gram.shape[0]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    lam, Q = torch.linalg.eigh(gram + delta * eye)  # (r,), (r, r)
    keep = lam > lam.max() * r * torch.finfo(gram.dtype).eps
    root = torch.where(keep, lam.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)  # (r,)
    return (Q * root) @ Q.T


def escaped_mass(V: Tensor, PVP: Tensor) -> Tensor:
    """d_lambda(V, P V P^T) = max_i (lambda_i(V) - lambda_i(P V P^T)), eigenvalues in ascending order, at least 0
    (it is >= 0 in exact arithmetic for a contraction P; the clamp absorbs rounding). Both (r, r); returns ()."""
    lam = torch.linalg.eigvalsh(torch.stack((V, PVP)))  # (2, r)
    return (lam[0] - lam[1]).max().clamp_min(0.0)


def rite_factor_direction(
    grad: Tensor,
    other_inv_root: Tensor,
    P: Tensor,
    M: Tensor,
    V: Tensor,
    rho: Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
    escape: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One factor's LoRA-RITE recursion (Algorithm 1 for the paper's A), in column form.

    Args:
        grad: (n, r) the factor's gradient (the paper's grad_A).
        other_inv_root: (r, r) R^{-1} of the other factor (symmetric, see `gram_inverse_root`).
        P: (r, r) U_t^T U_{t-1} of the other factor's basis.
        M: (n, r) the previous unmagnified first moment.
        V: (r, r) the previous unmagnified second moment.
        rho: () the previous escaped mass.
        step: t >= 1, this step's number.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the square roots of V + rho I (>= 0).
        escape: accumulate the escaped mass rho (the paper); False keeps rho at 0.

    Returns:
        (direction (n, r) = M_t R^{-T}, M_t, V_t, rho_t); the factor moves by -lr * direction.
    """
    b1, b2 = (corrected_decay(beta, step) for beta in betas)
    n, r = grad.shape
    # g = grad R^{-1} is never formed: g^T g = R^{-1} (grad^T grad) R^{-1} and g C = grad (R^{-1} C), one (n, r)
    # product fewer per factor
    gram = other_inv_root @ (grad.T @ grad) @ other_inv_root  # (r, r) g^T g
    PVP = P @ V @ P.T  # (r, r)
    PVP = (PVP + PVP.T) / 2
    if escape:
        rho = b2 * (rho + escaped_mass(V, PVP))
    V = b2 * PVP + (1 - b2) * gram / n  # (r, r)
    V = (V + V.T) / 2
    lam, Q = torch.linalg.eigh(V)  # (r,), (r, r)
    lam = lam.clamp_min(0.0) + rho
    keep = lam > lam.max() * r * torch.finfo(lam.dtype).eps  # g has no component outside V's range
    inv_root = torch.where(keep, 1.0 / (lam.sqrt() + eps), 0.0)  # (r,)
    S = grad @ (other_inv_root @ (Q * inv_root) @ Q.T)  # (n, r) g (V + rho I)^{-1/2}
    M = b1 * (M @ P.T) + (1 - b1) * S  # (n, r)
    return M @ other_inv_root, M, V, rho  # R symmetric: R^{-T} = R^{-1}


def lora_rite_step(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    state: RiteState,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    delta: float = 0.0,
    escape: bool = True,
) -> tuple[Tensor, Tensor, RiteState]:
    """One LoRA-RITE step of a pair (see the module docstring): the new A, B (their dtype) and the new state.

    With delta = 0 the step of W' = W0 + s B A does not depend on the gauge (A, B) ~ (G A, B G^{-1}), and neither
    does the state up to an orthogonal change of basis (the unmagnified quantities only see U_A, U_B), for every
    betas, eps, escape and weight_decay (the decay scales both factors by 1 - lr wd, which commutes with G).

    Args:
        A: (r, in).
        B: (out, r).
        grad_A: (r, in).
        grad_B: (out, r).
        state: the pair's state (`RiteState.zeros(A, B)` before the first step).
        lr: the step size (>= 0).
        betas: (beta1, beta2) of the first and second moments, each in [0, 1).
        eps: added to the square roots of the second moments' eigenvalues (>= 0; keeps the invariance).
        weight_decay: decoupled, as AdamW (>= 0; keeps the invariance).
        delta: damping of the Gram matrices that define R (>= 0; 0 is the paper and gauge invariant).
        escape: the escaped-mass correction rho (the paper's; False is the authors' code's default).

    Raises:
        ValueError: shapes that do not form a pair.
    """
    r = A.shape[0]
    if A.shape != grad_A.shape or B.shape != grad_B.shape or B.ndim != 2 or B.shape[1] != r:
        raise ValueError(
            f"a factor pair needs A, grad_A (r, in) and B, grad_B (out, r); got A {tuple(A.shape)}, grad_A "
            f"{tuple(grad_A.shape)}, B {tuple(B.shape)}, grad_B {tuple(grad_B.shape)}"
        )
    work = state.V_A.dtype
    A_, B_ = A.detach().to(work), B.detach().to(work)  # (r, in), (out, r)
    t = int(state.step) + 1
    RA = gram_inverse_root(A_ @ A_.T, delta)  # (r, r) R^{-1} of the paper's B = A^T
    RB = gram_inverse_root(B_.T @ B_, delta)  # (r, r) R^{-1} of the paper's A = B
    P_A = RB @ state.K_B  # (r, r) B's basis change drives A's state
    P_B = RA @ state.K_A  # (r, r)
    options = {"step": t, "betas": betas, "eps": eps, "escape": escape}
    dB, M_B, V_B, rho_B = rite_factor_direction(
        grad_B.to(work), RA, P_B, state.M_B, state.V_B, state.rho_B, **options
    )
    dA, M_At, V_A, rho_A = rite_factor_direction(
        grad_A.to(work).T, RB, P_A, state.M_A.T, state.V_A, state.rho_A, **options
    )  # A in column form: (in, r)
    A_new = (A_ - lr * (dA.T + weight_decay * A_)).to(A.dtype)  # (r, in)
    B_new = (B_ - lr * (dB + weight_decay * B_)).to(B.dtype)  # (out, r)
    # the overlaps for the next P, from the factors as stored (after rounding to their dtype)
    K_A = (A_new.to(work) @ A_.T) @ RA  # (r, r) A_{t+1} U_{A,t}, U_{A,t} = A_t^T R^{-1}
    K_B = (B_new.to(work).T @ B_) @ RB  # (r, r) B_{t+1}^T U_{B,t}
    step = state.step + 1
    return A_new, B_new, RiteState(step, M_At.T, M_B, V_A, V_B, rho_A, rho_B, K_A, K_B)
