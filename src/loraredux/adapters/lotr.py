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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, accumulate_, initialising, register
from .banks import GROUPINGS, Bank, build_grouped, orthonormal_, use_bank

__all__ = ["LoTR", "LoTRBank", "LoTRConfig"]


class LoTRBank(Bank):
    """The shared outer factors of one group: U (out, r) and V (in, r), orthonormal columns at the start."""

    def __init__(self, key: str, rank: int, out: int, inp: int, like: Tensor) -> None:
        super().__init__(key)
        kw = {"dtype": like.dtype, "device": like.device}
        self.U = nn.Parameter(torch.empty(out, rank, **kw))
        self.V = nn.Parameter(torch.empty(inp, rank, **kw))
        if initialising():
            orthonormal_(self.U)
            orthonormal_(self.V)

    @classmethod
    def for_views(cls, key: str, config: LoTRConfig, views: list[BaseView]) -> LoTRBank:
        return cls(key, config.rank, views[0].out_features, views[0].in_features, views[0].weight())


class LoTR(Adapter):
    """y = base(x) + s ((dropout(x) V) G^T) U^T."""

    def __init__(self, base: nn.Module, config: LoTRConfig, bank: LoTRBank | None = None) -> None:
        super().__init__(base, config)
        if bank is None:  # a layer adapted on its own: factors of its own
            bank = LoTRBank(
                config.method, config.rank, self.out_features, self.in_features, self.base_weight()
            )
        r = config.rank
        if tuple(bank.U.shape) != (self.out_features, r) or tuple(bank.V.shape) != (
            self.in_features,
            r,
        ):
            raise ValueError(
                f"lotr: the bank (U {tuple(bank.U.shape)}, V {tuple(bank.V.shape)}) does not fit a rank-{r} "
                f"layer of out={self.out_features}, in={self.in_features}"
            )
        use_bank(self, bank)
        W0 = self.base_weight()
        self.G = nn.Parameter(torch.zeros(r, r, dtype=W0.dtype, device=W0.device))
        self.scale = config.alpha / r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @property
    def bank(self) -> LoTRBank:
        return self._bank  # type: ignore[attr-defined,no-any-return]

    def shared_modules(self) -> dict[str, nn.Module]:
        return {self.bank.key: self.bank}

    def effective_weight(self) -> Tensor:
        return self.base_weight() + self.scale * self.bank.U @ self.G @ self.bank.V.T

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        return self.bank.V.T, self.bank.U @ self.G, self.scale  # A = V^T (r, in), B = U G (out, r)

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out), fresh
        h = x if self.dropout is None else self.dropout(x)
        z = self.view.project(h, self.bank.V.T) @ self.G.T  # (rows, r)
        y = accumulate_(y, z, self.bank.U, self.scale)
        return y.reshape(*lead, y.shape[-1])


@register("lotr")
@dataclass(frozen=True)
class LoTRConfig(AdapterConfig):
    """LoTR's hyper-parameters.

    Args:
        rank: r, the size of each layer's core (and the columns of U and V).
        alpha: the scale numerator: s = alpha / r.
        dropout: dropout on the adapter's input.
        group: "shape" (one U, V per (out, in) shape) or "kind" (per module name and shape, as the paper stacks
            one matrix kind across depth).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    group: str = "shape"

    adapter: ClassVar[type[Adapter]] = LoTR
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lotr: dropout must be in [0, 1), got {self.dropout!r}")
        if self.group not in GROUPINGS:
            raise ValueError(f"lotr: group must be one of {GROUPINGS}, got {self.group!r}")

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer (its core); each bank adds r (out + in) once (`bank_parameter_count`)."""
        return self.rank * self.rank

    def bank_parameter_count(self, in_features: int, out_features: int) -> int:
        """The trainable parameters of one bank, shared by the layers of its group: U and V."""
        return self.rank * (in_features + out_features)

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        return build_grouped(
            self,
            layers,
            self.group,
            lambda key, views, _paths: LoTRBank.for_views(key, self, views),
            lambda module, bank, _path: LoTR(module, self, bank),  # type: ignore[arg-type]
        )
