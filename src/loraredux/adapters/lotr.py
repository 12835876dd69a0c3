"""LoTR: a Tucker-2 decomposition of the stacked updates, outer factors shared across layers, a core per layer.

    W'_l = W0_l + s U G_l V^T,     U (out, r), V (in, r) shared by the layers of a group,  G_l (r, r) per layer,
                                   s = alpha / r

Stacking the L updates of a group gives the (out, in, L) tensor ΔW = G ×1 U ×2 V (a Tucker-2 decomposition with
the layer mode uncompressed). Bershatsky, Cherniuk, Daulbaev, Mikhalev, Oseledets, "LoTR: Low Tensor Rank Weight
Adaptation", arXiv 2402.01376: r (out + in) + L r² trainable parameters for L layers. Only the abstract could be read
here, so the initial values are our choice: U and V with orthonormal columns (the QR of a Gaussian draw, from torch's
RNG), each core zero, so W' = W0 and the first steps train the cores.

The paper stacks the updates of one matrix kind (every W_q) across depth: `group="kind"` does that, one bank per
module name and shape; `group="shape"` (default) shares one pair among every layer of a shape (q_proj with o_proj).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, initialising, register
from .banks import GroupedAdapter, GroupedBank, GroupedConfig, orthonormal_

__all__ = ["LoTR", "LoTRBank", "LoTRConfig"]


class LoTRBank(GroupedBank):
    """The shared outer factors of one group: U (out, r) and V (in, r), orthonormal columns at the start."""

    def __init__(self, key: str, config: AdapterConfig, view: BaseView, paths: list[str]) -> None:
        super().__init__(key, config, view, paths)
        out, inp = self.shape
        self.U = nn.Parameter(torch.empty(out, config.rank, **self.like))
        self.V = nn.Parameter(torch.empty(inp, config.rank, **self.like))
        if initialising():
            orthonormal_(self.U)
            orthonormal_(self.V)


class LoTR(GroupedAdapter):
    """y = base(x) + s ((dropout(x) V) G^T) U^T."""

    def __init__(
        self, base: nn.Module, config: LoTRConfig, bank: LoTRBank | None = None, path: str = ""
    ) -> None:
        super().__init__(base, config, bank, path)
        W0 = self.base_weight()
        self.G = nn.Parameter(
            torch.zeros(config.rank, config.rank, dtype=W0.dtype, device=W0.device)
        )

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * self.bank.U @ self.G @ self.bank.V.T

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        return self.bank.V.T, self.bank.U @ self.G, self.scale  # A = V^T (r, in), B = U G (out, r)

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.view.project(h, self.bank.V.T) @ self.G.T, self.bank.U


@register("lotr")
@dataclass(frozen=True)
class LoTRConfig(GroupedConfig):
    """LoTR's hyper-parameters: rank r (each layer's core is r x r, U and V have r columns), alpha (s = alpha / r),
    dropout, and group ("shape": one U, V per (out, in) shape; "kind": per module name and shape, as the paper
    stacks one matrix kind across depth)."""

    adapter: ClassVar[type[Adapter]] = LoTR
    bank_class: ClassVar[type[GroupedBank]] = LoTRBank

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer (its core); each bank adds r (out + in) once (`bank_parameter_count`)."""
        return self.rank * self.rank

    def bank_parameter_count(self, in_features: int, out_features: int) -> int:
        """The trainable parameters of one bank, shared by the layers of its group: U and V."""
        return self.rank * (in_features + out_features)
