"""PoLAR: a low-rank update with orthonormal direction factors, trained with the retraction-free landing field.

    W' = W0 + s * X Θ Y^T,     X ∈ St(out, r), Y ∈ St(in, r) (X^T X = Y^T Y = I_r),  Θ: (r, r) free,  s = alpha / r

Lion, Zhang, Li, He, "PoLAR: Polar-Decomposed Low-Rank Adapter Representation", arXiv 2506.03133. The
parameterisation is inspired by the polar decomposition; it targets LoRA's low stable rank
sr(ΔW) = ||ΔW||_F^2 / ||ΔW||_2^2 (`stable_rank`), which PoLAR raises.

Training (the paper's "landing" optimizer, after Ablin & Peyré, AISTATS 2022): X and Y are not kept on the Stiefel
manifold by retractions; instead their Euclidean gradients are replaced by the landing field

    Λ(X) = ψ(X) X + λ ∇N(X),    ψ(X) = Skew(∇_X L X^T),    N(X) = 1/4 ||X^T X - I||_F^2,  ∇N(X) = X (X^T X - I)

with Skew(A) = (A - A^T) / 2 (the landing literature's definition; the paper text we could read names Skew without
spelling it out), and the usual optimizer steps along it (Y likewise). ψ(X) X is the Riemannian
gradient for X on the manifold (X^T ψ(X) X is skew, so it is tangent there) and λ ∇N(X) pulls X back to the manifold.
Θ is unconstrained and keeps its plain gradient.

How to train it:
1. With `lx.train.fit`: nothing to do. `fit` calls `PoLAR.before_optimizer_step(step)` on every PoLAR layer after
   gradient clipping and before `optimizer.step()`, which puts the landing field into `X.grad` and `Y.grad`.
2. In your own loop: call `loraredux.adapters.polar.landing_(model)` between `loss.backward()` (and any gradient
   clipping) and `optimizer.step()`:

       loss.backward()
       torch.nn.utils.clip_grad_norm_(params, 1.0)   # optional, before the landing field as in the authors' code
       landing_(model)
       optimizer.step()

Either way the optimizer is yours: the authors step with AdamW on the landing field (HF Trainer, `adamw_torch`,
weight decay 0; weight decay on X and Y would fight the constraint); plain SGD on the landing field is the landing
algorithm of the theory. Do not call `landing_` yourself inside `fit` (the field would be applied twice).

Confirmed from the paper's abstract and its review (themoonlight.io: ΔW = X Θ Y^T, St(m, r), St(n, r), the landing
field Γ = ψ(X) X + λ ∇N(X), ψ = Skew(∇_X L X^T)) and the authors' code (github.com/kcc-lion/polar):
`peft/src/peft/tuners/polar/layer.py` (X = `lora_B.weight` (out, r) and Y^T = `lora_A.weight` (r, in), both
`nn.init.orthogonal_`; Θ = `lora_S` (r, r) initialised to zero, so W' = W0 at init; scale `lora_alpha / r`) and
`callbacks/landing_callback.py` (the field applied in `on_pre_optimizer_step`, i.e. after clipping and before the
optimizer step, to X and Y oriented tall; `regularization_lambda` defaults to 1.0 in `finetune_commonsense.py`, the
README's example runs use 5e-3). One difference: that callback forms G X^T - X G^T without the 1/2 of Skew, so its
field with `lambda_regul = c` is exactly twice ours with `landing_lambda = c / 2`; under Adam (scale-free up to eps)
it steps as ours with `landing_lambda = c / 2`, under SGD as ours with `landing_lambda = c / 2` at twice the lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, accumulate_, register
from .factor_init import FactorInit, check_init_fields

__all__ = [
    "PoLAR",
    "PoLARConfig",
    "landing_",
    "landing_field",
    "landing_potential",
    "skew",
    "stable_rank",
]


# ----------------------------------------------------------------------------------------------- pure maths


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def skew(A: Tensor) -> Tensor:
    """Skew(A) = (A - A^T) / 2 for a square A."""
    return 0.5 * (A - A.mT)


def landing_potential(X: Tensor) -> Tensor:
    """N(X) = 1/4 ||X^T X - I||_F^2, the distance of X (n, p) to the Stiefel manifold that the field reduces."""
    D = X.mT @ X - torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)  # (p, p)
    return 0.25 * D.square().sum()


def landing_field(X: Tensor, grad: Tensor, lam: float) -> Tensor:
    """The landing field Λ(X) = Skew(G X^T) X + λ X (X^T X - I) of one Stiefel factor.

    Computed with (p, p) and (n, p) products only: Skew(G X^T) X = (G (X^T X) - X (G^T X)) / 2, so the (n, n)
    matrix G X^T is never formed.

    Args:
        X: (n, p), p <= n, the factor (orthonormal columns on the manifold).
        grad: (n, p), the Euclidean gradient ∇_X L.
        lam: λ >= 0, the weight of the pull back to the manifold.

    Returns:
        (n, p), in X's dtype.
    """
    if X.ndim != 2 or grad.shape != X.shape or X.shape[1] > X.shape[0]:
        raise ValueError(
            f"landing_field needs X (n, p) with p <= n and a gradient of the same shape, got X "
            f"{tuple(X.shape)} and grad {tuple(grad.shape)}"
        )
    Xw, Gw = X.to(_work_dtype(X)), grad.to(_work_dtype(X))  # half precision is computed in float32
    XtX = Xw.T @ Xw  # (p, p)
    tangent = 0.5 * (Gw @ XtX - Xw @ (Gw.T @ Xw))  # Skew(G X^T) X, (n, p)
    normal = Xw @ (XtX - torch.eye(XtX.shape[0], dtype=XtX.dtype, device=XtX.device))  # ∇N(X)
    return (tangent + lam * normal).to(X.dtype)


def stable_rank(M: Tensor) -> float:
    """sr(M) = ||M||_F^2 / ||M||_2^2 (1 <= sr <= rank M): how much of the rank is used (PoLAR); 0 for M = 0."""
    s = torch.linalg.svdvals(M.detach().double())
    return 0.0 if s[0] == 0 else float(s.square().sum() / s[0].square())


# ----------------------------------------------------------------------------------------------- the layer


class PoLAR(FactorInit):
    """y = base(x) + s * ((dropout(x) Y) Θ^T) X^T with X (out, r), Y (in, r) trained by the landing field."""

    def __init__(self, base: nn.Module, config: PoLARConfig) -> None:
        super().__init__(base, config)
        W0 = self.base_weight()
        r = config.rank
        factory = {"dtype": W0.dtype, "device": W0.device}
        self.X = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.Theta = nn.Parameter(torch.empty(r, r, **factory))
        self.Y = nn.Parameter(torch.empty(self.in_features, r, **factory))
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.setup_init(r)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """X, Y random with orthonormal columns (`nn.init.orthogonal_`, as the authors), Θ = 0: W' = W0 at init;
        a named `config.init` then sets them (see `set_lora_form_`)."""
        for factor in (self.X, self.Y):
            # QR has no half-precision kernels: draw in float32 (or float64), then cast.
            work = torch.empty(factor.shape, dtype=_work_dtype(factor), device=factor.device)
            factor.copy_(nn.init.orthogonal_(work))
        nn.init.zeros_(self.Theta)
        self.init_factors_(self.config.rank)

    @torch.no_grad()
    def set_lora_form_(self, A: Tensor, B: Tensor) -> None:
        """X = an orthonormal basis of B's columns, Y = one of A's rows (each kept random where that factor is
        zero), Θ = X^T B A Y, so that X Θ Y^T = B A and X, Y start on the Stiefel manifold."""
        work = _work_dtype(A)
        A, B = A.to(work), B.to(work)
        if torch.count_nonzero(B):
            self.X.copy_(torch.linalg.qr(B).Q)  # (out, r)
        if torch.count_nonzero(A):
            self.Y.copy_(torch.linalg.qr(A.T).Q)  # (in, r)
        X, Y = self.X.to(work), self.Y.to(work)
        self.Theta.copy_((X.T @ B) @ (A @ Y))  # (r, r)

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * (self.X @ self.Theta @ self.Y.T)  # (out, in)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        """(Θ Y^T, X, s): W' = W0 + s X (Θ Y^T), a rank-r LoRA for serving, merging and export."""
        return self.Theta @ self.Y.T, self.X, self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (tokens, out)
        h = x if self.dropout is None or not self.view.input_is_dense else self.dropout(x)
        z = self.view.project(h, self.Y.T) @ self.Theta.T  # (tokens, r)
        y = accumulate_(y, z, self.X, self.scale)
        return y.reshape(*lead, y.shape[-1])

    # -- training ------------------------------------------------------------------------------------
    @torch.no_grad()
    def landing_(self) -> None:
        """Replace X.grad and Y.grad by their landing fields (a factor without a gradient is left alone)."""
        lam = self.config.landing_lambda
        for factor in (self.X, self.Y):
            if factor.grad is not None:
                factor.grad.copy_(landing_field(factor, factor.grad, lam))

    def before_optimizer_step(self, step: int) -> None:
        """`lx.train.fit`'s hook (after clipping, before `optimizer.step()`): apply the landing field."""
        self.landing_()

    def orthogonality_error(self) -> tuple[float, float]:
        """(||X^T X - I||_F, ||Y^T Y - I||_F): how far the factors are from the Stiefel manifold."""
        return tuple(  # type: ignore[return-value]
            float((4 * landing_potential(f.detach().double())).sqrt()) for f in (self.X, self.Y)
        )

    @torch.no_grad()
    def stable_rank(self) -> float:
        """sr(ΔW) of this layer, from r x r matrices only: with X = Q_x R_x and Y = Q_y R_y (QR),
        ΔW = s Q_x (R_x Θ R_y^T) Q_y^T has the singular values of s R_x Θ R_y^T (exact even off the manifold)."""
        Rx = torch.linalg.qr(self.X.double())[1]  # (r, r)
        Ry = torch.linalg.qr(self.Y.double())[1]  # (r, r)
        return stable_rank(Rx @ self.Theta.double() @ Ry.T)


def landing_(model: nn.Module) -> int:
    """Apply the landing field to the gradients of every PoLAR layer of `model`; call it between backward (and
    clipping) and `optimizer.step()` in a hand-written loop (`lx.train.fit` does it by itself).

    Returns:
        The number of PoLAR layers treated.

    Raises:
        ValueError: the model has no PoLAR layer (calling this is then a mistake, not a no-op).
    """
    layers = [m for m in model.modules() if isinstance(m, PoLAR)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no PoLAR layer to apply the landing field to")
    for layer in layers:
        layer.landing_()
    return len(layers)


@register("polar")
@dataclass(frozen=True)
class PoLARConfig(AdapterConfig):
    """PoLAR's hyper-parameters (defaults as the authors' `finetune_commonsense.py`: r = 8, alpha = 16, λ = 1).

    Args:
        rank: r, the number of orthonormal directions on each side (r <= min(in, out)).
        alpha: the scale numerator, s = alpha / r (the authors' scripts use alpha = 32).
        dropout: dropout on the adapter's input (not on the base path).
        landing_lambda: λ, the weight of ∇N(X) in the landing field (the pull back to the manifold).
        init: None (the paper's: X, Y random orthonormal, Θ = 0) or an `lx.init` name: its pair B A becomes
            X Θ Y^T with X, Y orthonormal bases of B's columns and A's rows (PiSSA: W0's top singular vectors).
        init_options: the initialiser's options.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    landing_lambda: float = 1.0
    init: str | None = None
    init_options: dict[str, Any] = field(default_factory=dict)

    adapter: ClassVar[type[Adapter]] = PoLAR

    def __post_init__(self) -> None:
        super().__post_init__()
        check_init_fields(self.method, self.init, self.init_options)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"polar: dropout must be in [0, 1), got {self.dropout!r}")
        lam = self.landing_lambda
        if (
            isinstance(lam, bool)
            or not isinstance(lam, (int, float))
            or not math.isfinite(lam)
            or lam < 0
        ):
            raise ValueError(f"polar: landing_lambda must be a finite number >= 0, got {lam!r}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        if self.rank > min(in_features, out_features):
            raise ValueError(
                f"rank {self.rank} needs r <= out = {out_features} (X in St(out, r)) and r <= in = "
                f"{in_features} (Y in St(in, r)): r orthonormal columns cannot exceed the dimension"
            )

    def parameter_count(self, in_features: int, out_features: int) -> int:
        return self.rank * (in_features + out_features) + self.rank**2

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
