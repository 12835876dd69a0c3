"""Scaled (Riemannian-preconditioned) SGD and AdamW on LoRA factor pairs.

    scaled_sgd:    A <- A - lr (B^T B + delta I)^{-1} grad_A,      B <- B - lr grad_B (A A^T + delta I)^{-1}
    scaled_adamw:  AdamW on the preconditioned gradients (its moments are those of the scaled gradients)

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024, arXiv 2402.02347
(their scaled GD; the r x r preconditioners come from the metric of Mishra et al.); ScaledGD for low-rank matrix
estimation: Tong, Ma, Chi, JMLR 2021. With delta = 0 a step does not depend on the gauge (A, B) ~ (G A, B G^{-1}),
so the iteration count does not grow with the factors' conditioning (tests/optim). The maths is
`functional.riemannian_precondition`; this class only holds the groups.

scaled_adamw follows the authors' code and PEFT's `create_riemannian_optimizer` (peft/optimizers/riemannian.py):
precondition, then the base optimizer's step; tests check parity with PEFT. `delta` defaults to PEFT's 1e-2, so
that the first step from LoRA's B = 0 is defined; delta = 0 gives the exact gauge invariance.

Each pair is its own parameter group (`{"params": [A, B], "pair": layer path, "lr", "delta"}`), built from the
model's explicit pairs (`pairs.find_pairs`); other trainable tensors (a classifier head, DoRA's magnitude) form one
group with `"pair": None` and take plain SGD steps. Options may be changed per group (`param_groups[i]["lr"]`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import riemannian_precondition
from .groups import check_options, checked_grad, evaluate, pair_groups, set_group_defaults
from .pairs import Pair

__all__ = ["DEFAULT_DELTA", "ScaledAdamW", "ScaledSGD"]

DEFAULT_DELTA = 1e-2


def _scaled_gradients(param_groups: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
    """(parameter, gradient to use) for every parameter with a gradient: the pairs' preconditioned, the others'
    as they are. Every gradient is checked (finite) before anything is returned."""
    out: list[tuple[Tensor, Tensor]] = []
    for group in param_groups:
        if group["pair"] is None:
            out += [
                (p, checked_grad(p, "a parameter")) for p in group["params"] if p.grad is not None
            ]
            continue
        A, B = group["params"]
        if A.grad is None and B.grad is None:
            continue  # the pair took no part in the loss: nothing to do
        name = group["pair"]
        gA, gB = riemannian_precondition(
            checked_grad(A, f"{name}.A"), checked_grad(B, f"{name}.B"), A, B, group["delta"]
        )
        out += [(A, gA), (B, gB)]
    return out


class ScaledSGD(torch.optim.Optimizer):
    """Scaled gradient descent: Riemannian-preconditioned SGD on each factor pair (see the module docstring).

    Args:
        pairs: the model's factor pairs (`pairs.find_pairs(model)`).
        others: other trainable parameters (plain SGD).
        lr: learning rate (> 0).
        delta: the damping of the r x r preconditioners (>= 0; 0 is exactly gauge invariant).

    Raises:
        ValueError: no parameters, a bad lr or delta, or a pair whose shapes do not match.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        delta: float = DEFAULT_DELTA,
    ) -> None:
        check_options(lr, delta)
        super().__init__(pair_groups(pairs, others), {"lr": lr, "delta": delta})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; every gradient is checked before any parameter changes."""
        loss = evaluate(closure)
        lr_of = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        for p, g in _scaled_gradients(self.param_groups):
            p.add_(g, alpha=-lr_of[id(p)])
        return loss


class ScaledAdamW(torch.optim.AdamW):
    """AdamW on Riemannian-preconditioned gradients (see the module docstring); the groups are ScaledSGD's.

    Args:
        pairs: the model's factor pairs.
        others: other trainable parameters (plain AdamW).
        lr: learning rate (> 0).
        delta: the damping of the r x r preconditioners (>= 0).
        **adamw: `betas`, `eps`, `weight_decay`, ... of `torch.optim.AdamW`.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        delta: float = DEFAULT_DELTA,
        **adamw: Any,
    ) -> None:
        check_options(lr, delta)
        super().__init__(pair_groups(pairs, others), lr=lr, **adamw)
        set_group_defaults(self, delta=delta)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Precondition the pairs' gradients (all checked first), then AdamW's step on them."""
        loss = evaluate(closure)  # here, so that AdamW's own step sees the preconditioned gradients
        for p, g in _scaled_gradients(self.param_groups):
            if p.grad is not g:
                p.grad.copy_(g)
        super().step()
        return loss
