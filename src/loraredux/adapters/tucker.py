"""Tucker adaptation with a rank per mode: the stacked updates over (out, in, layer, matrix kind) as one Tucker tensor.

    ΔW = s G ×1 U_out ×2 U_in ×3 U_layer ×4 U_kind,      G (r, r, r_layer, r_kind)
    ΔW[:, :, l, k] = s U_out M_lk U_in^T,  M_lk = Σ_c Σ_d G[:, :, c, d] U_layer[l, c] U_kind[k, d]   (r, r)

U_out (out, r), U_in (in, r), U_layer (layers, r_layer), U_kind (kinds, r_kind) and G are shared by the layers of a
group; s = alpha / r. Marmoret et al., "TensLoRA: Tensor Alternatives for Low-Rank Adaptation", ICASSP 2026,
arXiv 2509.19391: a unified Tucker framework whose point is a separate rank per mode. A layer's place is its parent
module (one block's attention or MLP) and its kind its own name (`banks.coordinates`). A mode's rank above its size
adds nothing (a Tucker rank is at most the mode's size), so each bank uses min(rank, size) and says so in its repr.
Trainable parameters per bank: r (out + in) + r_layer layers + r_kind kinds + r² r_layer r_kind; none per layer.
Only the abstract could be read here, so the initial values are our choice: G = 0 (so W' = W0) and the four factors
with orthonormal columns (QR of Gaussian draws from torch's RNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, initialising, register
from .banks import GroupedAdapter, GroupedBank, GroupedConfig, orthonormal_

__all__ = ["Tucker", "TuckerBank", "TuckerConfig"]


class TuckerBank(GroupedBank):
    """The core and the four factors of one group, and the group's layer and kind lists."""

    def __init__(self, key: str, config: AdapterConfig, view: BaseView, paths: list[str]) -> None:
        super().__init__(key, config, view, paths)
        out, inp = self.shape
        r = config.rank
        r_layer = min(config.layer_rank, len(self.parents))
        r_kind = min(config.kind_rank, len(self.kinds))
        self.U_out = nn.Parameter(torch.empty(out, r, **self.like))
        self.U_in = nn.Parameter(torch.empty(inp, r, **self.like))
        self.U_layer = nn.Parameter(torch.empty(len(self.parents), r_layer, **self.like))
        self.U_kind = nn.Parameter(torch.empty(len(self.kinds), r_kind, **self.like))
        self.G = nn.Parameter(torch.zeros(r, r, r_layer, r_kind, **self.like))
        if initialising():
            for factor in (self.U_out, self.U_in, self.U_layer, self.U_kind):
                orthonormal_(factor)

    def core(self, layer: int, kind: int) -> Tensor:
        """M_lk (r, r): the core contracted with the layer's and the kind's rows."""
        return torch.einsum("abcd,c,d->ab", self.G, self.U_layer[layer], self.U_kind[kind])

    def extra_repr(self) -> str:
        r, _, r_layer, r_kind = self.G.shape
        return (
            f"{super().extra_repr()}, ranks (out, in, layer, kind) = ({r}, {r}, {r_layer}, {r_kind}), "
            f"{len(self.parents)} layers x {len(self.kinds)} kinds"
        )


class Tucker(GroupedAdapter):
    """y = base(x) + s ((dropout(x) U_in) M_lk^T) U_out^T."""

    def effective_weight(self) -> Tensor:
        M = self.bank.core(self.layer, self.kind)
        return self.base_weight() + self.scale * self.bank.U_out @ M @ self.bank.U_in.T

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        M = self.bank.core(self.layer, self.kind)
        return self.bank.U_in.T, self.bank.U_out @ M, self.scale  # A = U_in^T, B = U_out M_lk

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        z = self.view.project(h, self.bank.U_in.T) @ self.bank.core(self.layer, self.kind).T
        return z, self.bank.U_out


@register("tucker")
@dataclass(frozen=True)
class TuckerConfig(GroupedConfig):
    """Tucker adaptation's hyper-parameters: a rank per mode.

    Args:
        rank: r, the Tucker rank of the output and input modes (and alpha, dropout, group as every grouped
            method: s = alpha / r; "shape" makes one tensor per (out, in) shape, its kinds a mode, "kind" one per
            module name and shape, the kind mode of size 1).
        layer_rank: the rank of the layer mode (at most the number of layers in a group).
        kind_rank: the rank of the matrix-kind mode (at most the number of kinds in a group).
    """

    layer_rank: int = 4
    kind_rank: int = 2

    adapter: ClassVar[type[Adapter]] = Tucker
    bank_class: ClassVar[type[GroupedBank]] = TuckerBank

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("layer_rank", "kind_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tucker: {name} must be an integer >= 1, got {value!r}")

    def bank_parameter_count(
        self, in_features: int, out_features: int, layers: int, kinds: int
    ) -> int:
        """The trainable parameters of one bank: r (out + in) + r_layer layers + r_kind kinds + r² r_layer r_kind,
        with the mode ranks capped at the mode sizes."""
        r, r_layer, r_kind = self.rank, min(self.layer_rank, layers), min(self.kind_rank, kinds)
        return (
            r * (out_features + in_features)
            + r_layer * layers
            + r_kind * kinds
            + r * r * r_layer * r_kind
        )
