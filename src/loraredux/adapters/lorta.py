"""LoRTA: a CP (CANDECOMP/PARAFAC) decomposition of the stacked updates over (out, in, layer, matrix kind).

    ΔW[:, :, l, k] = s Σ_j C[l, j] D[k, j] a_j b_j^T = s A diag(C[l] ⊙ D[k]) B^T,   s = alpha / r
    A (out, r), B (in, r), C (layers, r), D (kinds, r): all shared by the layers of a group

Hounie, Kanatsoulis, Tandon, Ribeiro, "LoRTA: Low Rank Tensor Adaptation of Large Language Models", arXiv 2410.04060.
The paper's tensor has a fifth mode, the attention heads (the output split into heads); this is the 4-way model over
(out, in, layer, kind), so it also covers MLP projections, which have no heads. A layer's
place is its parent module (one block's attention or MLP) and its kind its own name (`banks.coordinates`).
Trainable parameters: r (out + in + layers + kinds) per bank, none per layer. Only the abstract could be read here,
so the initial values are our choice: A = 0 (so W' = W0), B with orthonormal columns (the QR of a Gaussian draw
from torch's RNG), C = D = 1, so every layer starts with the same LoRA-like update A B^T and C, D then tell them
apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, initialising, register
from .banks import GroupedAdapter, GroupedBank, GroupedConfig, orthonormal_

__all__ = ["LoRTA", "LoRTABank", "LoRTAConfig"]


class LoRTABank(GroupedBank):
    """The four CP factors of one group, and the group's layer and kind lists."""

    def __init__(self, key: str, config: AdapterConfig, view: BaseView, paths: list[str]) -> None:
        super().__init__(key, config, view, paths)
        out, inp = self.shape
        rank = config.rank
        self.A = nn.Parameter(torch.zeros(out, rank, **self.like))
        self.B = nn.Parameter(torch.empty(inp, rank, **self.like))
        self.C = nn.Parameter(torch.ones(len(self.parents), rank, **self.like))
        self.D = nn.Parameter(torch.ones(len(self.kinds), rank, **self.like))
        if initialising():
            orthonormal_(self.B)

    def weights(self, layer: int, kind: int) -> Tensor:
        """C[l] ⊙ D[k] (r,): the diagonal of a layer's slice."""
        return self.C[layer] * self.D[kind]


class LoRTA(GroupedAdapter):
    """y = base(x) + s ((dropout(x) B) * (C[l] ⊙ D[k])) A^T."""

    def effective_weight(self) -> Tensor:
        w = self.bank.weights(self.layer, self.kind)
        return self.base_weight() + self.scale * (self.bank.A * w) @ self.bank.B.T

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        w = self.bank.weights(self.layer, self.kind)
        return w[:, None] * self.bank.B.T, self.bank.A, self.scale

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        w = self.bank.weights(self.layer, self.kind)
        return self.view.project(h, self.bank.B.T) * w, self.bank.A


@register("lorta")
@dataclass(frozen=True)
class LoRTAConfig(GroupedConfig):
    """LoRTA's hyper-parameters: rank r (the CP rank of the stacked update tensor), alpha (s = alpha / r), dropout,
    and group ("shape": one tensor per (out, in) shape, its kinds a mode; "kind": one per module name and shape,
    the kind mode of size 1)."""

    adapter: ClassVar[type[Adapter]] = LoRTA
    bank_class: ClassVar[type[GroupedBank]] = LoRTABank

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Any shape: a CP rank may exceed a mode's size."""

    def bank_parameter_count(
        self, in_features: int, out_features: int, layers: int, kinds: int
    ) -> int:
        """The trainable parameters of one bank: r (out + in + layers + kinds)."""
        return self.rank * (out_features + in_features + layers + kinds)
