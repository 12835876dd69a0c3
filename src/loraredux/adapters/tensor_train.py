"""Tensor-train adaptation across layers: the stacked updates, with out and in tensorized, as one tensor train.

Each (out, in) update of a group is reshaped with out = o_1 ... o_p and in = i_1 ... i_q (balanced factors,
`factors` of each), the group's updates are stacked over layers and matrix kinds, and the tensor of modes
(o_1, ..., o_p, layer, kind, i_1, ..., i_q) is a tensor train:

    ΔW[(o_1..o_p), (i_1..i_q), l, k] = s G_1[o_1] ... G_p[o_p] L[l] K[k] H_1[i_1] ... H_q[i_q]

with cores of shape (r_{j-1}, n_j, r_j), r_0 = r_end = 1, every inner rank min(rank, the product of the mode
sizes on either side). So a layer's slice is s O M_lk I: O (out, r_o) the contracted output cores, M_lk = L[:, l, :]
K[:, k, :] (r_o, r_i) and I (r_i, in) the contracted input cores; s = alpha / rank.

TT-LoRA (Anjum et al., arXiv 2408.01008) and LoRETTA (Yang et al., NAACL 2024, arXiv 2402.11417) reshape each
layer's update into a tensor train of its own; this puts the layer and the kind into the same train, so every core
but L and K is shared by the layers of a group (with L = K = 1 it is TT-LoRA's train of one matrix). Only the
abstracts could be read here: the mode order and the initial values are our choice. L starts at zero (so W' = W0)
and the other cores as random orthonormal maps (each core's (r_{j-1} n_j, r_j) unfolding, or its transpose, has
orthonormal columns), so the first steps train L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, initialising, register
from .banks import GroupedAdapter, GroupedBank, GroupedConfig, orthonormal_

__all__ = [
    "TensorTrain",
    "TensorTrainBank",
    "TensorTrainConfig",
    "balanced_factors",
    "train_modes",
    "tt_ranks",
]


def balanced_factors(n: int, count: int) -> list[int]:
    """`count` integers whose product is n, as equal as divisibility allows, largest last (e.g. 576 -> [24, 24],
    192 -> [12, 16], a prime p -> [1, p])."""
    if count == 1:
        return [n]
    target = n ** (1.0 / count)
    first = max(d for d in range(1, int(target + 1e-9) + 1) if n % d == 0)
    return [first, *balanced_factors(n // first, count - 1)]


def train_modes(out: int, inp: int, layers: int, kinds: int, factors: int) -> list[int]:
    """The train's mode sizes: out's balanced factors, the layers, the kinds, in's balanced factors."""
    return [*balanced_factors(out, factors), layers, kinds, *balanced_factors(inp, factors)]


def tt_ranks(sizes: list[int], rank: int) -> list[int]:
    """The bond ranks r_0 .. r_d of a train over modes of these sizes: 1 at the ends, inside min(rank, the product
    of the sizes on the left, the product on the right)."""
    inner = [
        min(rank, math.prod(sizes[: j + 1]), math.prod(sizes[j + 1 :]))
        for j in range(len(sizes) - 1)
    ]
    return [1, *inner, 1]


class TensorTrainBank(GroupedBank):
    """The cores of one group's train: `out_cores`, then `layer_core` and `kind_core`, then `in_cores`."""

    def __init__(self, key: str, config: AdapterConfig, view: BaseView, paths: list[str]) -> None:
        super().__init__(key, config, view, paths)
        out, inp = self.shape
        self.sizes = train_modes(out, inp, len(self.parents), len(self.kinds), config.factors)
        ranks = tt_ranks(self.sizes, config.rank)
        cores = [
            torch.empty(ranks[j], n, ranks[j + 1], **self.like) for j, n in enumerate(self.sizes)
        ]
        p = len(balanced_factors(out, config.factors))
        self.out_cores = nn.ParameterList(cores[:p])
        self.layer_core = nn.Parameter(cores[p].zero_())
        self.kind_core = nn.Parameter(cores[p + 1])
        self.in_cores = nn.ParameterList(cores[p + 2 :])
        if initialising():
            for core in [*self.out_cores, self.kind_core, *self.in_cores]:
                left, n, right = core.shape
                if left * n >= right:  # orthonormal columns of the (left n, right) unfolding
                    orthonormal_(core.data.view(left * n, right))
                else:  # orthonormal rows of the (left, n right) unfolding
                    orthonormal_(core.data.view(left, n * right).T)

    def output_map(self) -> Tensor:
        """O (out, r_o): the output cores contracted, out = (o_1 .. o_p) in row-major order."""
        O = self.out_cores[0].squeeze(0)  # (o_1, r_1)
        for core in list(self.out_cores)[1:]:
            O = torch.einsum("ar,rbs->abs", O, core).reshape(-1, core.shape[-1])
        return O

    def input_map(self) -> Tensor:
        """I (r_i, in): the input cores contracted, in = (i_1 .. i_q) in row-major order."""
        cores = list(self.in_cores)
        I = cores[-1].squeeze(-1)  # (r, i_q)
        for core in reversed(cores[:-1]):
            I = torch.einsum("rbs,sa->rba", core, I).reshape(core.shape[0], -1)
        return I

    def middle(self, layer: int, kind: int) -> Tensor:
        """M_lk (r_o, r_i) = L[:, l, :] K[:, k, :]."""
        return self.layer_core[:, layer, :] @ self.kind_core[:, kind, :]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, modes {self.sizes}"


class TensorTrain(GroupedAdapter):
    """y = base(x) + s ((dropout(x) I^T) M_lk^T) O^T."""

    def effective_weight(self) -> Tensor:
        bank = self.bank
        update = bank.output_map() @ bank.middle(self.layer, self.kind) @ bank.input_map()
        return self.base_weight() + self.scale * update

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        bank = self.bank
        return bank.input_map(), bank.output_map() @ bank.middle(self.layer, self.kind), self.scale

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        bank = self.bank
        z = (
            self.view.project(h, bank.input_map()) @ bank.middle(self.layer, self.kind).T
        )  # (rows, r_o)
        return z, bank.output_map()


@register("tensor_train")
@dataclass(frozen=True)
class TensorTrainConfig(GroupedConfig):
    """Tensor-train adaptation's hyper-parameters.

    Args:
        rank: the train's bond rank (capped inside by the mode sizes, `tt_ranks`); alpha, dropout and group as
            every grouped method (s = alpha / rank; "shape": one train per (out, in) shape, its kinds a mode,
            "kind": one per module name and shape, the kind mode of size 1).
        factors: how many balanced factors out and in are each split into (1: not tensorized).
    """

    factors: int = 2

    adapter: ClassVar[type[Adapter]] = TensorTrain
    bank_class: ClassVar[type[GroupedBank]] = TensorTrainBank

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.factors, bool) or not isinstance(self.factors, int) or self.factors < 1:
            raise ValueError(f"tensor_train: factors must be an integer >= 1, got {self.factors!r}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Any shape: the bond ranks are capped by the mode sizes."""

    def bank_parameter_count(
        self, in_features: int, out_features: int, layers: int, kinds: int
    ) -> int:
        """The trainable parameters of one train: the sum of r_{j-1} n_j r_j over its modes."""
        sizes = train_modes(out_features, in_features, layers, kinds, self.factors)
        ranks = tt_ranks(sizes, self.rank)
        return sum(ranks[j] * n * ranks[j + 1] for j, n in enumerate(sizes))
