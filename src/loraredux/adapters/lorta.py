"""LoRTA: a CP (CANDECOMP/PARAFAC) decomposition of the stacked updates over (out, in, layer, matrix kind).

    ΔW[:, :, l, k] = s Σ_j C[l, j] D[k, j] a_j b_j^T = s A diag(C[l] ⊙ D[k]) B^T,   s = alpha / r
    A (out, r), B (in, r), C (layers, r), D (kinds, r): all shared by the layers of a group

Hounie, Kanatsoulis, Tandon, Ribeiro, "LoRTA: Low Rank Tensor Adaptation of Large Language Models", arXiv 2410.04060.
The paper's tensor has a fifth mode, the attention heads (the output split into heads); this is the 4-way model over
(out, in, layer, kind) that issue 7 asks for, so it also covers MLP projections, which have no heads. A layer's
place is its parent module (one block's attention or MLP) and its kind its own name (`banks.coordinates`).
Trainable parameters: r (out + in + layers + kinds) per bank, none per layer. Only the abstract could be read here,
so the initial values are our choice: A = 0 (so W' = W0), B with orthonormal columns (the QR of a Gaussian draw
from torch's RNG), C = D = 1, so every layer starts with the same LoRA-like update A B^T and C, D then tell them
apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, accumulate_, initialising, register
from .banks import GROUPINGS, Bank, build_grouped, coordinates, orthonormal_, use_bank

__all__ = ["LoRTA", "LoRTABank", "LoRTAConfig"]


class LoRTABank(Bank):
    """The four CP factors of one group, and the group's layer and kind lists."""

    def __init__(self, key: str, rank: int, view: BaseView, paths: list[str]) -> None:
        super().__init__(key)
        self.parents, self.kinds, self.place = coordinates(paths)
        W0 = view.weight()
        kw = {"dtype": W0.dtype, "device": W0.device}
        self.A = nn.Parameter(torch.zeros(view.out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(view.in_features, rank, **kw))
        self.C = nn.Parameter(torch.ones(len(self.parents), rank, **kw))
        self.D = nn.Parameter(torch.ones(len(self.kinds), rank, **kw))
        if initialising():
            orthonormal_(self.B)

    def weights(self, layer: int, kind: int) -> Tensor:
        """C[l] ⊙ D[k] (r,): the diagonal of a layer's slice."""
        return self.C[layer] * self.D[kind]


class LoRTA(Adapter):
    """y = base(x) + s ((dropout(x) B) * (C[l] ⊙ D[k])) A^T."""

    def __init__(
        self, base: nn.Module, config: LoRTAConfig, bank: LoRTABank | None = None, path: str = ""
    ) -> None:
        super().__init__(base, config)
        if bank is None:  # a layer adapted on its own: a bank of one layer and one kind
            bank = LoRTABank(config.method, config.rank, self.view, [path])
        if bank.A.shape[0] != self.out_features or bank.B.shape[0] != self.in_features:
            raise ValueError(
                f"lorta: the bank (A {tuple(bank.A.shape)}, B {tuple(bank.B.shape)}) does not fit a layer of "
                f"out={self.out_features}, in={self.in_features}"
            )
        use_bank(self, bank)
        self.layer, self.kind = bank.place[path]
        self.scale = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @property
    def bank(self) -> LoRTABank:
        return self._bank  # type: ignore[attr-defined,no-any-return]

    def shared_modules(self) -> dict[str, nn.Module]:
        return {self.bank.key: self.bank}

    def effective_weight(self) -> Tensor:
        w = self.bank.weights(self.layer, self.kind)
        return self.base_weight() + self.scale * (self.bank.A * w) @ self.bank.B.T

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        w = self.bank.weights(self.layer, self.kind)
        return w[:, None] * self.bank.B.T, self.bank.A, self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out), fresh
        h = x if self.dropout is None else self.dropout(x)
        z = self.view.project(h, self.bank.B.T) * self.bank.weights(
            self.layer, self.kind
        )  # (rows, r)
        y = accumulate_(y, z, self.bank.A, self.scale)
        return y.reshape(*lead, y.shape[-1])


@register("lorta")
@dataclass(frozen=True)
class LoRTAConfig(AdapterConfig):
    """LoRTA's hyper-parameters.

    Args:
        rank: r, the CP rank of the stacked update tensor.
        alpha: the scale numerator: s = alpha / r.
        dropout: dropout on the adapter's input.
        group: "shape" (one tensor per (out, in) shape, its kinds a mode) or "kind" (one per module name and
            shape: the kind mode has size 1).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    group: str = "shape"

    adapter: ClassVar[type[Adapter]] = LoRTA
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lorta: dropout must be in [0, 1), got {self.dropout!r}")
        if self.group not in GROUPINGS:
            raise ValueError(f"lorta: group must be one of {GROUPINGS}, got {self.group!r}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Any shape: a CP rank may exceed a mode's size."""

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer: none, every factor is shared (`bank_parameter_count`)."""
        return 0

    def bank_parameter_count(
        self, in_features: int, out_features: int, layers: int, kinds: int
    ) -> int:
        """The trainable parameters of one bank: r (out + in + layers + kinds)."""
        return self.rank * (out_features + in_features + layers + kinds)

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        return build_grouped(
            self,
            layers,
            self.group,
            lambda key, views, paths: LoRTABank(key, self.rank, views[0], paths),
            lambda module, bank, path: LoRTA(module, self, bank, path),  # type: ignore[arg-type]
        )
