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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView
from ..core import Adapter, AdapterConfig, accumulate_, initialising, register
from .banks import GROUPINGS, Bank, build_grouped, coordinates, orthonormal_, use_bank

__all__ = ["TensorTrain", "TensorTrainBank", "TensorTrainConfig", "balanced_factors", "tt_ranks"]


def balanced_factors(n: int, count: int) -> list[int]:
    """`count` integers whose product is n, as equal as divisibility allows, largest last (e.g. 576 -> [24, 24],
    192 -> [12, 16], a prime p -> [1, p])."""
    if count == 1:
        return [n]
    target = n ** (1.0 / count)
    first = max(d for d in range(1, int(target + 1e-9) + 1) if n % d == 0)
    return [first, *balanced_factors(n // first, count - 1)]


def tt_ranks(sizes: list[int], rank: int) -> list[int]:
    """The bond ranks r_0 .. r_d of a train over modes of these sizes: 1 at the ends, inside min(rank, the product
    of the sizes on the left, the product on the right)."""
    inner = [
        min(rank, math.prod(sizes[: j + 1]), math.prod(sizes[j + 1 :]))
        for j in range(len(sizes) - 1)
    ]
    return [1, *inner, 1]


class TensorTrainBank(Bank):
    """The cores of one group's train: `out_cores`, then `layer_core` and `kind_core`, then `in_cores`."""

    def __init__(
        self, key: str, config: TensorTrainConfig, view: BaseView, paths: list[str]
    ) -> None:
        super().__init__(key)
        self.parents, self.kinds, self.place = coordinates(paths)
        out_sizes = balanced_factors(view.out_features, config.factors)
        in_sizes = balanced_factors(view.in_features, config.factors)
        self.sizes = [*out_sizes, len(self.parents), len(self.kinds), *in_sizes]
        ranks = tt_ranks(self.sizes, config.rank)
        W0 = view.weight()
        kw = {"dtype": W0.dtype, "device": W0.device}
        cores = [torch.empty(ranks[j], n, ranks[j + 1], **kw) for j, n in enumerate(self.sizes)]
        p = len(out_sizes)
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


class TensorTrain(Adapter):
    """y = base(x) + s ((dropout(x) I^T) M_lk^T) O^T."""

    def __init__(
        self,
        base: nn.Module,
        config: TensorTrainConfig,
        bank: TensorTrainBank | None = None,
        path: str = "",
    ) -> None:
        super().__init__(base, config)
        if bank is None:  # a layer adapted on its own: a train of one layer and one kind
            bank = TensorTrainBank(config.method, config, self.view, [path])
        out = math.prod(c.shape[1] for c in bank.out_cores)
        inp = math.prod(c.shape[1] for c in bank.in_cores)
        if (out, inp) != (self.out_features, self.in_features):
            raise ValueError(
                f"tensor_train: the bank's train is for out={out}, in={inp}, not this layer's "
                f"out={self.out_features}, in={self.in_features}"
            )
        use_bank(self, bank)
        self.layer, self.kind = bank.place[path]
        self.scale = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @property
    def bank(self) -> TensorTrainBank:
        return self._bank  # type: ignore[attr-defined,no-any-return]

    def shared_modules(self) -> dict[str, nn.Module]:
        return {self.bank.key: self.bank}

    def effective_weight(self) -> Tensor:
        bank = self.bank
        update = bank.output_map() @ bank.middle(self.layer, self.kind) @ bank.input_map()
        return self.base_weight() + self.scale * update

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        bank = self.bank
        return bank.input_map(), bank.output_map() @ bank.middle(self.layer, self.kind), self.scale

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out), fresh
        h = x if self.dropout is None else self.dropout(x)
        bank = self.bank
        z = (
            self.view.project(h, bank.input_map()) @ bank.middle(self.layer, self.kind).T
        )  # (rows, r_o)
        y = accumulate_(y, z, bank.output_map(), self.scale)
        return y.reshape(*lead, y.shape[-1])


@register("tensor_train")
@dataclass(frozen=True)
class TensorTrainConfig(AdapterConfig):
    """Tensor-train adaptation's hyper-parameters.

    Args:
        rank: the train's bond rank (capped inside by the mode sizes, `tt_ranks`).
        factors: how many balanced factors out and in are each split into (1: not tensorized).
        alpha: the scale numerator: s = alpha / rank.
        dropout: dropout on the adapter's input.
        group: "shape" (one train per (out, in) shape, its kinds a mode) or "kind" (one per module name and
            shape: the kind mode has size 1).
    """

    rank: int = 8
    factors: int = 2
    alpha: float = 8.0
    dropout: float = 0.0
    group: str = "shape"

    adapter: ClassVar[type[Adapter]] = TensorTrain
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.factors, bool) or not isinstance(self.factors, int) or self.factors < 1:
            raise ValueError(f"tensor_train: factors must be an integer >= 1, got {self.factors!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"tensor_train: dropout must be in [0, 1), got {self.dropout!r}")
        if self.group not in GROUPINGS:
            raise ValueError(f"tensor_train: group must be one of {GROUPINGS}, got {self.group!r}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Any shape: the bond ranks are capped by the mode sizes."""

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer: none, every core is shared (`bank_parameter_count`)."""
        return 0

    def bank_parameter_count(
        self, in_features: int, out_features: int, layers: int, kinds: int
    ) -> int:
        """The trainable parameters of one train: the sum of r_{j-1} n_j r_j over its modes."""
        sizes = [
            *balanced_factors(out_features, self.factors),
            layers,
            kinds,
            *balanced_factors(in_features, self.factors),
        ]
        ranks = tt_ranks(sizes, self.rank)
        return sum(ranks[j] * n * ranks[j + 1] for j, n in enumerate(sizes))

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        return build_grouped(
            self,
            layers,
            self.group,
            lambda key, views, paths: TensorTrainBank(key, self, views[0], paths),
            lambda module, bank, path: TensorTrain(module, self, bank, path),  # type: ignore[arg-type]
        )
