"""LoRA-FA: freeze the projection A, train only B, with B's gradient projected onto A's row space.

    A frozen;   g_B <- (1 / s^2) g_B (A A^T + delta I)^{-1};   AdamW on B

Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning", arXiv
2308.03303: with A frozen the backward needs only the (tokens, r) activations x A^T, not x, so activation memory
no longer grows with the input width. The projection of B's gradient (the least-squares fit of the low-rank update
to the full gradient, min ||s^2 g_B A - G||_F, scaled by 1 / s^2) is the one in PEFT's `create_lorafa_optimizer`
(peft/optimizers/lorafa.py), which these tests match; `project=False` gives plain AdamW on B.

`lx.optim.create("lora_fa", model, lr)` sets requires_grad=False on every A (that is the method: a frozen A keeps
its activations out of autograd), as PEFT's `create_lorafa_optimizer` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import lora_fa_gradient
from .groups import check_options, checked_grad, evaluate, pair_groups, set_group_defaults
from .pairs import Pair

__all__ = ["LoraFA"]


class LoraFA(torch.optim.AdamW):
    """AdamW on the B factors (A frozen) with the LoRA-FA gradient projection; other parameters plain AdamW.

    Args:
        pairs: the factor pairs; their A is frozen here (requires_grad=False).
        others: other trainable parameters.
        lr: learning rate (> 0).
        delta: damping of A A^T (>= 0; PEFT uses 1e-8).
        project: apply the projection (PEFT's LoRA-FA); False trains B with plain AdamW.
        **adamw: `betas`, `eps`, `weight_decay`, ... of `torch.optim.AdamW`.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        delta: float = 1e-8,
        project: bool = True,
        **adamw: Any,
    ) -> None:
        check_options(lr, delta)
        groups = pair_groups(pairs, others, lambda pair: [pair.B])  # checks every pair first
        self._frozen: dict[str, tuple[Tensor, float]] = {}
        for pair in pairs:
            pair.A.requires_grad_(False)
            pair.A.grad = None
            self._frozen[pair.name] = (pair.A, pair.scale)
        super().__init__(groups, lr=lr, **adamw)
        set_group_defaults(self, delta=delta, project=project)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Project the B gradients (all checked first), then AdamW's step."""
        loss = evaluate(closure)
        projected: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    checked_grad(p, group["pair"] or "a parameter")
            if group["pair"] is None or not group["project"]:
                continue
            (B,) = group["params"]
            if B.grad is None:
                continue
            A, scale = self._frozen[group["pair"]]
            projected.append((B, lora_fa_gradient(B.grad, A, scale, group["delta"])))
        for B, g in projected:
            B.grad.copy_(g)
        super().step()
        return loss
