"""Shared cross-layer state: the bank modules that many adapted layers compute with.

A bank lives once per model, registered by `lx.adapt_` at the root as `loraredux_banks.<key>` (an `nn.ModuleDict`),
and each adapter that uses it holds a plain reference (not a submodule) and its coordinates in the bank. So the
model's parameters, `.to()`, `model.state_dict()` and `lx.adapter_state_dict` see each shared tensor once, however
many layers use it; `lx.merge_` and `lx.unadapt_` remove the banks with the adapters.

Layers of different shapes cannot share one (out, in) factor: `group_layers` splits a plan by shape (attention
against MLP, grouped-query attention's narrower K/V), and each group gets its own bank. VeRA instead keeps PEFT's
one bank of the largest shape, sliced per layer, so that its files are PEFT's.

The pieces every such method shares live here: `BankedAdapter` (the reference to the bank, `shared_modules`, the
input dropout and the fast path's skeleton y = base(x) + s z B^T around the method's `low_rank(h) -> (z, B)`), and,
for the methods with one bank per group, `GroupedBank` (the group's shape and each layer's place in it),
`GroupedAdapter` and `GroupedConfig` (rank, alpha, dropout, group; `build_layers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..bases import BaseView, view_of
from ..core import Adapter, AdapterConfig, accumulate_

__all__ = [
    "GROUPINGS",
    "Bank",
    "BankedAdapter",
    "GroupedAdapter",
    "GroupedBank",
    "GroupedConfig",
    "build_grouped",
    "check_one_config",
    "coordinates",
    "group_layers",
    "orthonormal_",
    "use_bank",
]

#: How layers are grouped into banks: by (out, in) shape, or by module name and shape (one bank per matrix kind,
#: e.g. every q_proj), which is how LoTR stacks its tensors.
GROUPINGS = ("shape", "kind")


class Bank(nn.Module):
    """A shared module with the key it is registered under (`loraredux_banks.<key>`)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        if not key or "." in key:
            raise ValueError(f"a bank key is a non-empty name without dots, got {key!r}")
        self.key = key

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


@torch.no_grad()
def orthonormal_(factor: Tensor) -> Tensor:
    """Fill an (n, r) factor with orthonormal columns, the QR of a float64 Gaussian draw from torch's RNG; where
    n < r (a mode smaller than its rank) with the draw itself scaled by 1 / sqrt(n)."""
    n, r = factor.shape
    draw = torch.randn(n, r, dtype=torch.float64)
    return factor.copy_(torch.linalg.qr(draw).Q if n >= r else draw / n**0.5)


def use_bank(adapter: nn.Module, bank: Bank) -> None:
    """Give `adapter` a reference to `bank` that is not a submodule (so its tensors are not the adapter's)."""
    object.__setattr__(adapter, "_bank", bank)


def group_layers(paths_and_views: Mapping[str, BaseView], by: str) -> dict[str, list[str]]:
    """Group layer paths into banks: `{group name: [paths]}`, groups in order of their first layer.

    `by="shape"`: one group per (out, in), named "<out>x<in>"; `by="kind"`: one per module name (the last path
    component: q_proj, value, ...) and shape, named "<kind>_<out>x<in>".
    """
    if by not in GROUPINGS:
        raise ValueError(f"group must be one of {GROUPINGS}, got {by!r}")
    groups: dict[str, list[str]] = {}
    for path, view in paths_and_views.items():
        shape = f"{view.out_features}x{view.in_features}"
        name = shape if by == "shape" else f"{path.rpartition('.')[2]}_{shape}"
        groups.setdefault(name.replace(".", "_"), []).append(path)
    return groups


def coordinates(paths: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Each layer's place in a stacked (out, in, layer, kind) tensor: the layer is the module's parent path (one
    transformer block's attention or MLP, "model.layers.3.self_attn"), the kind its own name ("q_proj").

    Returns:
        (the distinct parents, the distinct kinds, {path: (layer index, kind index)}), in order of appearance.
    """
    parents: list[str] = []
    kinds: list[str] = []
    place: dict[str, tuple[int, int]] = {}
    for path in paths:
        parent, _, kind = path.rpartition(".")
        if parent not in parents:
            parents.append(parent)
        if kind not in kinds:
            kinds.append(kind)
        place[path] = (parents.index(parent), kinds.index(kind))
    return parents, kinds, place


def check_one_config(
    config: Any, layers: Mapping[str, tuple[nn.Module, Any]], what: str = "rank or alpha"
) -> None:
    """Refuse per-layer configs (rank_pattern / alpha_pattern) for a method whose layers share factors."""
    different = sorted(path for path, (_, c) in layers.items() if c != config)
    if different:
        raise ValueError(
            f"{config.method}: layers share their factors, so a per-layer {what} cannot apply "
            f"(layers {different[:5]})"
        )


def build_grouped(
    config: Any,
    layers: Mapping[str, tuple[nn.Module, Any]],
    by: str,
    make_bank: Callable[[str, list[BaseView], list[str]], Bank],
    make_adapter: Callable[[nn.Module, Bank, str], nn.Module],
) -> dict[str, Any]:
    """Adapters for a method with one bank per group of layers (`group_layers`): check that the layers share one
    config and are of supported kinds, make each group's bank (`make_bank(key, views, paths)`, key
    "<method>_<group>"), then each layer's adapter on its bank (`make_adapter(module, bank, path)`). Errors name
    the layer."""
    check_one_config(config, layers)
    views: dict[str, BaseView] = {}
    for path, (module, _) in layers.items():
        try:
            views[path] = view_of(module)
        except TypeError as err:
            raise TypeError(f"{path}: {err}") from err
        if views[path].kind not in config.base_kinds:
            raise TypeError(
                f"{path}: {config.method} does not support a {type(module).__name__} base (it supports "
                f"{', '.join(config.base_kinds)} layers)"
            )
    built: dict[str, Any] = {}
    for group, paths in group_layers(views, by).items():
        bank = make_bank(f"{config.method}_{group}", [views[p] for p in paths], paths)
        for path in paths:
            try:
                built[path] = make_adapter(layers[path][0], bank, path)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{path}: {err}") from err
    return {path: built[path] for path in layers}  # in plan order


class BankedAdapter(Adapter):
    """An adapter computing with a bank: it holds the bank by reference (`use_bank`), reports it in
    `shared_modules`, and adds s z B^T to the base's output, where `low_rank(h) -> (z (rows, r), B (out, r))` is the
    method's own and h the (dropped-out) input rows. Subclasses say how to make a bank for a layer adapted on its
    own (`own_bank`) and which banks fit it (`check_bank`), and set `scale` where it is not 1."""

    scale: float = 1.0

    def __init__(
        self, base: nn.Module, config: AdapterConfig, bank: Bank | None = None, path: str = ""
    ) -> None:
        super().__init__(base, config)
        if bank is None:  # a layer adapted on its own: a bank of its own
            bank = self.own_bank(config, path)
        self.check_bank(bank)
        use_bank(self, bank)
        dropout = getattr(config, "dropout", 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def own_bank(self, config: Any, path: str) -> Bank:
        """The bank of this layer alone (`config.build(base)` without a group)."""
        raise NotImplementedError

    def check_bank(self, bank: Any) -> None:
        """Raise ValueError, naming both, if `bank` cannot serve this layer."""

    @property
    def bank(self) -> Any:
        return self._bank  # type: ignore[attr-defined]

    def shared_modules(self) -> dict[str, nn.Module]:
        return {self.bank.key: self.bank}

    def low_rank(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(z (rows, r), B (out, r)) with the update's output s z B^T for input rows h (rows, in)."""
        raise NotImplementedError

    def adapted(self, x: Tensor) -> Tensor:
        x, lead = self.flatten(x)
        y = self.base(x)  # (rows, out), fresh
        z, B = self.low_rank(x if self.dropout is None else self.dropout(x))
        y = accumulate_(y, z, B, self.scale)  # y += s z B^T
        return y.reshape(*lead, y.shape[-1])


class GroupedBank(Bank):
    """The bank of one group of same-shaped layers: its (out, in) shape, and each layer's place in the group's
    stacked (out, in, layer, kind) tensor (`coordinates`). Subclasses add the method's shared tensors."""

    def __init__(self, key: str, config: AdapterConfig, view: BaseView, paths: list[str]) -> None:
        super().__init__(key)
        self.shape = (view.out_features, view.in_features)
        self.parents, self.kinds, self.place = coordinates(paths)
        W0 = view.weight()
        self.like = {"dtype": W0.dtype, "device": W0.device}  # for the subclass's tensors


class GroupedAdapter(BankedAdapter):
    """A layer of a group: its bank (one of its own when adapted alone), its (layer, kind) place, s = alpha / r."""

    def __init__(
        self,
        base: nn.Module,
        config: GroupedConfig,
        bank: GroupedBank | None = None,
        path: str = "",
    ) -> None:
        super().__init__(base, config, bank, path)
        self.layer, self.kind = self.bank.place[path]
        self.scale = config.alpha / config.rank

    def own_bank(self, config: Any, path: str) -> Bank:
        return config.bank_class(config.method, config, self.view, [path])

    def check_bank(self, bank: Any) -> None:
        if bank.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.config.method}: bank {bank.key!r} is for out={bank.shape[0]}, in={bank.shape[1]}, not "
                f"this layer's out={self.out_features}, in={self.in_features}"
            )


@dataclasses.dataclass(frozen=True)
class GroupedConfig(AdapterConfig):
    """The fields and the building of the methods with one bank per group of layers.

    Args:
        rank: the method's rank.
        alpha: the scale numerator: s = alpha / rank.
        dropout: dropout on the adapter's input.
        group: "shape" (one bank per (out, in) shape, its kinds a mode) or "kind" (per module name and shape).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    group: str = "shape"

    bank_class: ClassVar[type[GroupedBank]]
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.method}: dropout must be in [0, 1), got {self.dropout!r}")
        if self.group not in GROUPINGS:
            raise ValueError(f"{self.method}: group must be one of {GROUPINGS}, got {self.group!r}")

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Per layer: none by default, everything is in the bank (`bank_parameter_count`); methods with per-layer
        parameters (Tied-LoRA's scalings, LoTR's cores) override it."""
        return 0

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        return build_grouped(
            self,
            layers,
            self.group,
            lambda key, views, paths: self.bank_class(key, self, views[0], paths),
            lambda module, bank, path: self.adapter(module, self, bank, path),  # type: ignore[call-arg]
        )
