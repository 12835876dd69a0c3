"""Scaled (Riemannian-preconditioned) gradient descent on LoRA factor pairs.

    A <- A - lr (B^T B + delta I)^{-1} grad_A,      B <- B - lr grad_B (A A^T + delta I)^{-1}

Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024, arXiv 2402.02347
(their scaled GD; the r x r preconditioners come from the metric of Mishra et al.); ScaledGD for low-rank matrix
estimation: Tong, Ma, Chi, JMLR 2021. With delta = 0 a step does not depend on the gauge (A, B) ~ (G A, B G^{-1}),
so the iteration count does not grow with the factors' conditioning (tests/optim). The maths is
`functional.riemannian_precondition`; this class only holds the groups.

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
from .pairs import Pair

__all__ = ["ScaledSGD"]


def _grad(p: Tensor, name: str) -> Tensor:
    g = p.grad if p.grad is not None else torch.zeros_like(p)
    if not torch.isfinite(g).all():
        raise FloatingPointError(
            f"{name}: the gradient has non-finite entries; no parameter was changed"
        )
    return g


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
        self, pairs: Sequence[Pair], others: Sequence[nn.Parameter], lr: float, delta: float = 0.0
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not delta >= 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        groups: list[dict[str, Any]] = []
        for pair in pairs:
            pair.check()
            groups.append({"params": [pair.A, pair.B], "pair": pair.name})
        if others:
            groups.append({"params": list(others), "pair": None})
        if not groups:
            raise ValueError("ScaledSGD got no parameters (is the model adapted?)")
        super().__init__(groups, {"lr": lr, "delta": delta})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; every gradient is checked before any parameter changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates: list[tuple[Tensor, Tensor, float]] = []
        for group in self.param_groups:
            lr = group["lr"]
            if group["pair"] is None:
                for p in group["params"]:
                    if p.grad is not None:
                        updates.append((p, _grad(p, "a parameter"), lr))
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue  # the pair took no part in the loss: nothing to do
            name = group["pair"]
            gA, gB = riemannian_precondition(
                _grad(A, f"{name}.A"), _grad(B, f"{name}.B"), A, B, group["delta"]
            )
            updates += [(A, gA, lr), (B, gB, lr)]
        for p, g, lr in updates:
            p.add_(g, alpha=-lr)
        return loss
