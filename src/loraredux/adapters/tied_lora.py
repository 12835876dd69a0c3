"""Tied-LoRA: one LoRA pair tied across layers, with two trainable scaling vectors per layer.

    W'_l = W0_l + s Λ_v,l B Λ_u,l A,     A (r, in), B (out, r) shared by the layers of a group,
                                          u_l (r,), v_l (out,) per layer,  s = alpha / r

Renduchintala, Konuk, Kuchaiev, "Tied-LoRA: Enhancing parameter efficiency of LoRA with weight tying", NAACL 2024,
arXiv 2311.09578. The paper studies which of A, B, u, v to train; this is its configuration with all four trained
and tied across layers (the one it recommends, "vBuA"). Only the abstract could be read here, so the initial
values are LoRA's: A Kaiming-uniform, B = 0 (so W' = W0), and u = v = 1.

Layers share a pair only where their shapes agree: one bank per (out, in) shape by default (`group="shape"`), or per
module name and shape (`group="kind"`). Trainable parameters: r (in + out) per bank, r + out per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, initialising, register
from .banks import GroupedAdapter, GroupedBank, GroupedConfig

__all__ = ["TiedLoRA", "TiedLoRABank", "TiedLoRAConfig"]


class TiedLoRABank(GroupedBank):
    """The tied pair of one group: A (r, in) Kaiming-uniform, B (out, r) zero, both trainable."""

    def __init__(self, key: str, config: AdapterConfig, view: BaseView, paths: list[str]) -> None:
        super().__init__(key, config, view, paths)
        out, inp = self.shape
        self.A = nn.Parameter(torch.empty(config.rank, inp, **self.like))
        self.B = nn.Parameter(torch.zeros(out, config.rank, **self.like))
        if initialising():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class TiedLoRA(GroupedAdapter):
    """y = base(x) + s ((dropout(x) A^T) * u) (B * v[:, None])^T."""

    def __init__(
        self,
        base: nn.Module,
        config: TiedLoRAConfig,
        bank: TiedLoRABank | None = None,
        path: str = "",
    ) -> None:
        super().__init__(base, config, bank, path)
        W0 = self.base_weight()
        self.u = nn.Parameter(torch.ones(config.rank, dtype=W0.dtype, device=W0.device))
        self.v = nn.Parameter(torch.ones(self.out_features, dtype=W0.dtype, device=W0.device))

    def effective_weight(self) -> Tensor:
        A, B = self.bank.A, self.bank.B
        return self.base_weight() + self.scale * (self.v[:, None] * B) @ (self.u[:, None] * A)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        return self.u[:, None] * self.bank.A, self.v[:, None] * self.bank.B, self.scale

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.view.project(h, self.bank.A) * self.u, self.bank.B * self.v[:, None]


@register("tied_lora")
@dataclass(frozen=True)
class TiedLoRAConfig(GroupedConfig):
    """Tied-LoRA's hyper-parameters: rank r of the tied pair, alpha (s = alpha / r), dropout, and group ("shape":
    one tied pair per (out, in) shape; "kind": per module name and shape)."""

    adapter: ClassVar[type[Adapter]] = TiedLoRA
    bank_class: ClassVar[type[GroupedBank]] = TiedLoRABank

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer (u and v); each bank adds r (in + out) once (`bank_parameter_count`)."""
        return self.rank + out_features

    def bank_parameter_count(self, in_features: int, out_features: int) -> int:
        """The trainable parameters of one bank, shared by the layers of its group: A and B."""
        return self.rank * (in_features + out_features)
