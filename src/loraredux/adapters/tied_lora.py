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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, accumulate_, initialising, register
from .banks import GROUPINGS, Bank, build_grouped, use_bank

__all__ = ["TiedLoRA", "TiedLoRABank", "TiedLoRAConfig"]


class TiedLoRABank(Bank):
    """The tied pair of one group: A (r, in) Kaiming-uniform, B (out, r) zero, both trainable."""

    def __init__(self, key: str, rank: int, out: int, inp: int, like: Tensor) -> None:
        super().__init__(key)
        kw = {"dtype": like.dtype, "device": like.device}
        self.A = nn.Parameter(torch.empty(rank, inp, **kw))
        self.B = nn.Parameter(torch.zeros(out, rank, **kw))
        if initialising():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @classmethod
    def for_views(cls, key: str, config: TiedLoRAConfig, views: list[BaseView]) -> TiedLoRABank:
        return cls(key, config.rank, views[0].out_features, views[0].in_features, views[0].weight())


class TiedLoRA(Adapter):
    """y = base(x) + s ((dropout(x) A^T) * u) (B * v[:, None])^T."""

    def __init__(
        self, base: nn.Module, config: TiedLoRAConfig, bank: TiedLoRABank | None = None
    ) -> None:
        super().__init__(base, config)
        if bank is None:  # a layer adapted on its own: a pair of its own
            bank = TiedLoRABank(
                config.method, config.rank, self.out_features, self.in_features, self.base_weight()
            )
        if (
            tuple(bank.A.shape) != (config.rank, self.in_features)
            or bank.B.shape[0] != self.out_features
        ):
            raise ValueError(
                f"tied_lora: the bank (A {tuple(bank.A.shape)}, B {tuple(bank.B.shape)}) does not fit a rank-"
                f"{config.rank} layer of out={self.out_features}, in={self.in_features}"
            )
        use_bank(self, bank)
        W0 = self.base_weight()
        self.u = nn.Parameter(torch.ones(config.rank, dtype=W0.dtype, device=W0.device))
        self.v = nn.Parameter(torch.ones(self.out_features, dtype=W0.dtype, device=W0.device))
        self.scale = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @property
    def bank(self) -> TiedLoRABank:
        return self._bank  # type: ignore[attr-defined,no-any-return]

    def shared_modules(self) -> dict[str, nn.Module]:
        return {self.bank.key: self.bank}

    def effective_weight(self) -> Tensor:
        A, B = self.bank.A, self.bank.B
        return self.base_weight() + self.scale * (self.v[:, None] * B) @ (self.u[:, None] * A)

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        return self.u[:, None] * self.bank.A, self.v[:, None] * self.bank.B, self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out), fresh
        h = x if self.dropout is None else self.dropout(x)
        z = self.view.project(h, self.bank.A) * self.u  # (rows, r)
        y = accumulate_(y, z, self.bank.B * self.v[:, None], self.scale)
        return y.reshape(*lead, y.shape[-1])


@register("tied_lora")
@dataclass(frozen=True)
class TiedLoRAConfig(AdapterConfig):
    """Tied-LoRA's hyper-parameters.

    Args:
        rank: r, the rank of the tied pair.
        alpha: the scale numerator: s = alpha / r.
        dropout: dropout on the adapter's input.
        group: "shape" (one tied pair per (out, in) shape) or "kind" (per module name and shape).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    group: str = "shape"

    adapter: ClassVar[type[Adapter]] = TiedLoRA
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"tied_lora: dropout must be in [0, 1), got {self.dropout!r}")
        if self.group not in GROUPINGS:
            raise ValueError(f"tied_lora: group must be one of {GROUPINGS}, got {self.group!r}")

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer (u and v); each bank adds r (in + out) once (`bank_parameter_count`)."""
        return self.rank + out_features

    def bank_parameter_count(self, in_features: int, out_features: int) -> int:
        """The trainable parameters of one bank, shared by the layers of its group: A and B."""
        return self.rank * (in_features + out_features)

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        return build_grouped(
            self,
            layers,
            self.group,
            lambda key, views, _paths: TiedLoRABank.for_views(key, self, views),
            lambda module, bank, _path: TiedLoRA(module, self, bank),  # type: ignore[arg-type]
        )
