"""LoRA-RITE: transformation-invariant adaptive matrix preconditioning of each factor pair.

    g = grad R_other^{-1}  (the unmagnified gradient; R from B = U_B R_B, A^T = U_A R_A)
    V <- b2 P V P^T + (1 - b2) g^T g / n,   rho <- b2 (rho + d_lambda(V, P V P^T)),   P = U_t^T U_{t-1}
    M <- b1 M P^T + (1 - b1) g (V + rho I)^{-1/2},   factor <- factor - lr (M R_other^{-T} + weight_decay factor)

Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA Optimization", ICLR 2025,
arXiv 2410.20625, Algorithm 1; the maths, the mapping of the paper's Z = A B^T onto our W' = W0 + s B A (the
paper's A is our B, its B our A^T) and where each detail was confirmed are in `functional/rite.py`. Sources: the
recursion (unmagnified gradient, P, V, rho with d_lambda, S, M, the R^{-T} step) as Algorithm 1 is reproduced at
https://junaidaliop.github.io/zij/math/lorarite/ (the paper's own text could be read only as far as its abstract);
b2, the bias-corrected decays, the 1 / n normalisation, eps after the square root, decoupled weight decay and the
pseudo-inverse of a rank-deficient R from the authors' PyTorch code (github.com/gkevinyen5418/LoRA-RITE,
lora_rite.py).

Options (per group): `betas` (0.9, 0.999), `eps` 1e-6 (the authors' defaults), `weight_decay` 0, `escape` True (the
escaped mass rho of Algorithm 1; the authors' PyTorch default is off), and `delta` 0: the damping of the Gram matrices
B^T B and A A^T whose roots are R (the same place as scaled GD's delta). The preconditioner (V + rho I)^{-1/2} is
damped by the paper's own terms, rho (automatic) and eps; both are spectral, so they keep the invariance. One step
(and the whole trajectory, the state moving along) does not depend on the gauge (A, B) ~ (G A, B G^{-1}) when
delta = 0, for every betas, eps, escape and weight_decay (decoupled decay scales both factors by 1 - lr wd, which
commutes with G) (tests/optim/test_rite.py); delta > 0 breaks it.

Deviations from the authors' code, on purpose: they clip the global norm of the unmagnified gradients at 1 and skip
a factor's step when its unmagnified gradient's RMS exceeds 1 (heuristics outside Algorithm 1, not implemented; for
exact invariance also leave transformers' `max_grad_norm` clipping of the raw gradients off, as their script does);
the basis U_{t-1} is replaced by an r x r overlap (`functional/rite.py`), so the state is r x r per factor besides
the first moment. Other trainable tensors (a head, DoRA's magnitude) take torch's AdamW step with the same betas, eps
and weight_decay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import RiteState, lora_rite_step
from .groups import check_finite, check_options, evaluate, pair_groups, set_group_defaults
from .pairs import Pair, split_model

__all__ = ["LoraRite"]

# state keys of a pair's factor -> (RiteState field of A, of B)
_FIELDS = {
    "first_moment": ("M_A", "M_B"),
    "second_moment": ("V_A", "V_B"),
    "escaped_mass": ("rho_A", "rho_B"),
    "basis_overlap": ("K_A", "K_B"),
}


def _check_rite_options(betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class LoraRite(torch.optim.AdamW):
    """LoRA-RITE on each factor pair (see the module docstring); other trainable parameters take AdamW steps.

    Args:
        pairs: the model's factor pairs (`pairs.find_pairs(model)`).
        others: other trainable parameters (AdamW).
        lr: learning rate (> 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the square roots of the second moments' eigenvalues (>= 0).
        weight_decay: decoupled weight decay (>= 0).
        delta: damping of the factors' Gram matrices (>= 0; 0 is the paper and gauge invariant).
        escape: the escaped-mass correction (Algorithm 1's rho).

    Raises:
        ValueError: no parameters, a bad option, or a pair whose shapes do not match.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        delta: float = 0.0,
        escape: bool = True,
    ) -> None:
        check_options(lr, delta)
        _check_rite_options(betas, eps, weight_decay)
        super().__init__(
            pair_groups(pairs, others), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        set_group_defaults(self, delta=delta, escape=bool(escape))

    def _pair_state(self, A: Tensor, B: Tensor) -> RiteState:
        if not self.state[A]:
            zeros = RiteState.zeros(A, B)
            for key, (fa, fb) in _FIELDS.items():
                self.state[A][key], self.state[B][key] = getattr(zeros, fa), getattr(zeros, fb)
            self.state[A]["step"], self.state[B]["step"] = zeros.step, zeros.step.clone()
        sA, sB = self.state[A], self.state[B]
        fields = {f: (sA if f.endswith("_A") else sB)[k] for k, fs in _FIELDS.items() for f in fs}
        return RiteState(step=sA["step"], **fields)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step: every gradient checked finite first, then LoRA-RITE on the pairs and AdamW on the others."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        hidden: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            if group["pair"] is None:
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue  # the pair took no part in the loss
            gA = A.grad if A.grad is not None else torch.zeros_like(A)
            gB = B.grad if B.grad is not None else torch.zeros_like(B)
            A_new, B_new, new = lora_rite_step(
                A,
                B,
                gA,
                gB,
                self._pair_state(A, B),
                lr=group["lr"],
                betas=tuple(group["betas"]),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                delta=group["delta"],
                escape=group["escape"],
            )
            A.copy_(A_new)
            B.copy_(B_new)
            for p, side in ((A, 0), (B, 1)):
                self.state[p]["step"].copy_(new.step)
                for key, fields in _FIELDS.items():
                    self.state[p][key].copy_(getattr(new, fields[side]))
                if p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None  # so that AdamW's step below moves only the other parameters
        try:
            super().step()
        finally:
            for p, g in hidden:
                p.grad = g
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then the pair state back in its own dtype: torch casts every floating state tensor to its
        parameter's dtype, and LoRA-RITE keeps the pair state in float32 at least (for bf16 factors)."""
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved, params, strict=True):
            entry = state_dict["state"].get(i, {})
            if "second_moment" in entry:
                self.state[p] = {k: v.detach().to(p.device, copy=True) for k, v in entry.items()}


def _lora_rite(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    delta: float = 0.0,
    escape: bool = True,
) -> torch.optim.Optimizer:
    """LoRA-RITE (Yen et al., arXiv 2410.20625): transformation-invariant matrix-Adam on each factor pair."""
    pairs, others = split_model(model, "lora_rite")
    return LoraRite(
        pairs,
        others,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        escape=escape,
    )
