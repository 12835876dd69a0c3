"""AdaLoRA's rank allocator: the cubic budget schedule and the pruning of triplets across the layers of a model.

    b(t) = b0 for t <= t_init;  b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))^3 after;  b_T at the end

and every ΔT steps the triplets whose score is not above the (b0 - b(t))-th smallest score over all layers are
masked (λ = 0). Zhang et al., arXiv 2303.10512 (Sec. 3.3, Algorithm 1); numerically identical to PEFT 0.21.2's
`RankAllocator` (tests/adapters/test_adalora.py). The per-layer maths (importance EMAs, triplet scores, masking)
lives in the layer (`adalora.AdaLoRA`); this object holds the schedule and decides across layers. See the module
docstring of `adalora.py` for how training steps it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .adalora import AdaLoRA, AdaLoRAConfig

__all__ = ["FACTORS", "RankAllocator", "allocator"]

#: The factors of a triplet group, in PEFT's order: A = Q, E = Λ, B = P.
FACTORS = ("A", "E", "B")


class RankAllocator(nn.Module):
    """The budget schedule and the pruning of one group of AdaLoRA layers (PEFT's RankAllocator).

    An `nn.Module` with no parameters or buffers of its own, set on every layer of the group, so `model.modules()`
    yields it once and `lx.train.fit` calls `on_optimizer_step(step)` after each optimizer step. The layers are held
    in a plain list (not submodules); their buffers hold the state.
    """

    def __init__(self, config: AdaLoRAConfig, layers: Mapping[str, AdaLoRA]) -> None:
        super().__init__()
        self.config = config
        self.names = list(layers)  # plain lists: the layers are not submodules of the allocator
        self.layers = list(layers.values())
        self.init_bgt = sum(layer.config.init_r for layer in self.layers)  # b0: all triplets
        self.target_bgt = config.target_r * len(self.layers)  # b_T

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, budget {self.init_bgt} -> {self.target_bgt}"

    def ranks(self) -> dict[str, int]:
        """{layer path: triplets kept}."""
        return {name: layer.rank for name, layer in zip(self.names, self.layers, strict=True)}

    def _total_step(self) -> int:
        if self.config.total_step is None:
            raise ValueError(
                "adalora: total_step is None, but the rank budget schedule runs over the number of training "
                "steps: set it in the config, e.g. lx.config('adalora', ..., total_step=TrainConfig.steps)"
            )
        return self.config.total_step

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total budget b(step), whether to mask at this step): warmup, cubic decrease, final phase."""
        c, total = self.config, self._total_step()
        if step <= c.tinit:
            return self.init_bgt, False
        if step > total - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (total - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def on_optimizer_step(self, step: int) -> None:
        """`lx.train.fit`'s hook, after `optimizer.step()` while the gradients are still there."""
        self.update_and_allocate(step)

    @torch.no_grad()
    def update_and_allocate(self, step: int) -> None:
        """Update the importance EMAs and prune to the budget of `step` (1-based optimizer steps done).

        Call after `optimizer.step()` and before `zero_grad()`. Before T - t_final: update Ī, Ū and mask every
        ΔT steps; at T - t_final: mask to b_T and reset the EMAs; after it: keep the final mask (λ = 0 again).

        Raises:
            ValueError: total_step is None, or a layer's parameter has no gradient.
        """
        end = self._total_step() - self.config.tfinal
        if self.target_bgt > self.init_bgt:
            raise ValueError(
                f"adalora: target_r={self.config.target_r} exceeds init_r={self.config.init_r}: the budget "
                "can only shrink (set target_r <= init_r)"
            )
        if step < end:
            missing = [
                f"{path}.{n}"
                for path, layer in zip(self.names, self.layers, strict=True)
                for n in FACTORS
                if getattr(layer, n).grad is None
            ]
            if missing:
                raise ValueError(
                    f"adalora: no gradient for {missing}; step the allocator after backward() and "
                    "optimizer.step(), before zero_grad()"
                )
            for layer in self.layers:
                layer.update_importance(self.config.beta1, self.config.beta2)
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self._mask_to_budget(budget)
        elif step == end:  # PEFT's force_mask: fix the final pattern, forget the scores
            self._mask_to_budget(self.budget_schedule(step)[0])
            for layer in self.layers:
                layer.reset_importance()
        else:
            for layer in self.layers:
                layer.apply_mask()

    def _mask_to_budget(self, budget: int) -> None:
        scores = [layer.triplet_scores() for layer in self.layers]
        k = self.init_bgt - budget
        if k <= 0:  # the budget holds every triplet (PEFT's kthvalue would fail on k = 0)
            threshold = -math.inf
        else:
            device = scores[0].device
            threshold = torch.kthvalue(torch.cat([s.to(device) for s in scores]), k)[0].item()
        for layer, score in zip(self.layers, scores, strict=True):
            layer.mask.copy_(~(score <= threshold))
            layer.apply_mask()


def allocator(model: nn.Module) -> RankAllocator:
    """The AdaLoRA rank allocator of `model` (for a hand-written loop: `allocator(model).update_and_allocate(step)`).

    Raises:
        ValueError: the model has no AdaLoRA layers, or several groups (one per `adapt_` call).
    """
    found = [m for m in model.modules() if isinstance(m, RankAllocator)]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__} has {len(found)} AdaLoRA rank allocators (one per lx.adapt_ call with "
            "adalora); expected exactly one"
        )
    return found[0]
