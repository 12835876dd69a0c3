"""The adapter core: `Adapter`, `AdapterConfig`, the method registry and the model verbs.

An `Adapter` wraps one frozen base layer. Its `effective_weight()` is the spec (the dense W' of shape (out, in));
`adapted(x)` is the fast path, and a contract test checks that both agree. Methods that are additive low rank also
give `lora_form() -> (A, B, scale)` with `effective_weight() == W0 + scale * B @ A`.

Adapting a model is one generic function (`adapt_`): plan which layers, build every adapter (anything that can fail
fails here, before the model is touched), then swap them in. Adapter state is found by `isinstance`, never by
parameter-name prefixes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .bases import BaseView, view_of
from .targets import TargetSpec, check_pattern, pattern_value, select

__all__ = [
    "Adapter",
    "AdapterConfig",
    "SavedModule",
    "adapt_",
    "adapter_state_dict",
    "adapters",
    "available_methods",
    "config",
    "config_from_dict",
    "disabled",
    "load_adapter_state_dict",
    "merge_",
    "register",
    "trainable_parameters",
    "unadapt_",
]

_REGISTRY: dict[str, type[AdapterConfig]] = {}
_FROZEN_ATTR = "_loraredux_frozen"  # on the model root: [(parameter, requires_grad before adapt_)]


# ----------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config: a frozen dataclass whose fields are named as in the paper.

    Subclasses set `adapter` (the `Adapter` class they build) and are registered with `@register(name)`.
    Fields named `rank` and `alpha` are validated here and are what `rank_pattern` / `alpha_pattern` override.
    """

    method: ClassVar[str] = ""
    adapter: ClassVar[type[Adapter]]
    #: The paper promises W' = W0 at initialisation (the contract suite checks it where True).
    identity_at_init: ClassVar[bool] = True
    #: The base-layer kinds (`BaseView.kind`) the method supports; the contract suite covers each.
    base_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "embedding")

    def __post_init__(self) -> None:
        rank = getattr(self, "rank", None)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{self.method}: rank must be an integer >= 1, got {rank!r}")
        alpha = getattr(self, "alpha", None)
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"{self.method}: alpha must be a finite number > 0, got {alpha!r}")

    def parameter_count(self, in_features: int, out_features: int) -> int:
        """Trainable parameters of one (out, in) layer by the paper's formula (the contract suite checks it)."""
        raise NotImplementedError(f"{self.method} does not state its parameter count")

    def build(self, base: nn.Module) -> Adapter:
        """One adapter around `base` (which it freezes)."""
        return self.adapter(base, self)

    def build_layers(
        self, layers: Mapping[str, tuple[nn.Module, AdapterConfig]]
    ) -> dict[str, Adapter]:
        """Adapters for many layers at once, each with its own (pattern-adjusted) config.

        Methods with cross-layer state override this to create their shared bank first.
        """
        built = {}
        for name, (module, layer_config) in layers.items():
            try:
                built[name] = layer_config.build(module)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{name}: {err}") from err
        return built

    def for_layer(self, rank: int | None = None, alpha: float | None = None) -> AdapterConfig:
        """This config with a layer's own rank / alpha (from `rank_pattern` / `alpha_pattern`)."""
        changes: dict[str, Any] = {}
        if rank is not None:
            if not hasattr(self, "rank"):
                raise ValueError(f"{self.method} has no rank, so rank_pattern cannot apply")
            changes["rank"] = rank
        if alpha is not None:
            if not hasattr(self, "alpha"):
                raise ValueError(f"{self.method} has no alpha, so alpha_pattern cannot apply")
            changes["alpha"] = alpha
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: `{"method": name, **fields}`."""
        return {"method": self.method, **dataclasses.asdict(self)}


def register(name: str) -> Callable[[type[AdapterConfig]], type[AdapterConfig]]:
    """Class decorator: register a config class under a method name (`lx.config(name, ...)` builds it)."""

    def decorate(cls: type[AdapterConfig]) -> type[AdapterConfig]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def config_class(name: str) -> type[AdapterConfig]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}") from None


def config(name: str, **fields: Any) -> AdapterConfig:
    """Build the registered config of method `name`, e.g. `lx.config("lora", rank=8, alpha=16)`.

    Raises:
        ValueError: unknown method, unknown field (the message lists the method's fields) or a bad value.
    """
    cls = config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{name} has no field(s) {unknown}; its fields are {sorted(known)}")
    return cls(**fields)


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Inverse of `AdapterConfig.to_dict`."""
    data = dict(data)
    if "method" not in data:
        raise ValueError(f"config dict has no 'method' key: {sorted(data)}")
    return config(data.pop("method"), **data)


# ----------------------------------------------------------------------------------------------- adapters


class Adapter(nn.Module):
    """One adapted layer: a frozen `base` and the method's parameters.

    Subclasses implement `effective_weight()` (the spec) and usually a cheaper `adapted(x)`.
    `forward` is shared: it runs the base alone while `enabled` is False (see `lx.disabled`).
    """

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        if isinstance(base, Adapter):
            raise ValueError(f"cannot adapt an already adapted layer ({type(base).__name__})")
        self.view: BaseView = view_of(base)
        if self.view.kind not in config.base_kinds:
            raise TypeError(
                f"{config.method} does not support a {type(base).__name__} base "
                f"(it supports {', '.join(config.base_kinds)} layers)"
            )
        rank = getattr(config, "rank", None)
        limit = min(self.view.in_features, self.view.out_features)
        if rank is not None and rank > limit:
            raise ValueError(
                f"rank {rank} is above min(in, out) = {limit} for this {self.view.kind} layer "
                f"(out={self.view.out_features}, in={self.view.in_features})"
            )
        self.base = base
        self.config = config
        self.enabled = True
        for p in base.parameters():
            p.requires_grad_(False)

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.view.in_features

    @property
    def out_features(self) -> int:
        return self.view.out_features

    def base_weight(self) -> Tensor:
        """W0 as (out, in)."""
        return self.view.weight()

    # -- the spec and the fast path --------------------------------------------------------------------
    def effective_weight(self) -> Tensor:
        """The dense W' (out, in): the definition every faster path must agree with."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """W' - W0 (out, in)."""
        return self.effective_weight() - self.base_weight()

    def lora_form(self) -> tuple[Tensor, Tensor, float]:
        """(A (r, in), B (out, r), scale) with W' = W0 + scale * B @ A, for additive low-rank methods."""
        raise NotImplementedError(f"{type(self).__name__} is not an additive low-rank adapter")

    def adapted(self, x: Tensor) -> Tensor:
        """The adapted layer's output. Default: the dense spec; methods override with a faster path."""
        return self.view.forward_with(x, self.effective_weight())

    def forward(self, x: Tensor) -> Tensor:
        return self.adapted(x) if self.enabled else self.base(x)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A plain module of the base's type carrying W' (and the base's bias)."""
        return self.view.rebuilt(self.effective_weight().detach().to(self.base_weight().dtype))

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.config).items())
        return f"{self.config.method}: {fields}"


class SavedModule(nn.Module):
    """A module trained in full beside the adapters (PEFT's `modules_to_save`), such as a new classifier head.

    `module` is the trainable copy the model uses; `original` is kept frozen so `lx.disabled` and
    `lx.unadapt_` give back the model as it was.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        if isinstance(original, (Adapter, SavedModule)):
            raise ValueError(f"cannot save a {type(original).__name__} as a module to save")
        self.module = copy.deepcopy(original)
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.original = original
        for p in original.parameters():
            p.requires_grad_(False)
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.module if self.enabled else self.original)(*args, **kwargs)


# ----------------------------------------------------------------------------------------------- verbs


def adapters(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """(path, adapter) for every adapted layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _normalise_saved(model: nn.Module, modules_to_save: Sequence[str] | None) -> list[str]:
    if not modules_to_save:
        return []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    paths = []
    for want in modules_to_save:
        found = [
            n
            for n, m in model.named_modules()
            if (n == want or n.endswith("." + want))
            and not isinstance(m, (Adapter, SavedModule))
            and not any(n.startswith(p + ".") for p in paths)
        ]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found if f != n)]
        if not found:
            raise ValueError(f"modules_to_save: no module named {want!r} in {type(model).__name__}")
        paths += found
    return paths


def adapt_(
    model: nn.Module,
    config: AdapterConfig,
    targets: TargetSpec,
    *,
    exclude: TargetSpec | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    prepare: Callable[[dict[str, Adapter], dict[str, SavedModule]], None] | None = None,
) -> nn.Module:
    """Adapt `model` in place: wrap each target layer in the method's adapter and freeze everything else.

    Args:
        model: any `nn.Module` (a transformers model or not).
        config: a method config (`lx.config("lora", rank=8)`).
        targets: `"all-linear"`, a regex (full match) or a list of module names (suffix match, as PEFT).
        exclude: modules never to adapt, in the same forms.
        rank_pattern: `{key: rank}`, a layer's own rank where a key matches its path (PEFT's rule).
        alpha_pattern: `{key: alpha}`, likewise.
        modules_to_save: modules trained in full beside the adapters (e.g. `["classifier"]`).
        prepare: called with the built adapters and saved modules before they are swapped in (loading uses
            it to fill in weights); an exception there leaves the model untouched.

    Returns:
        The same model, adapted.

    Raises:
        ValueError / TypeError: bad targets, patterns or config for a layer; the model is left unchanged.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"config must be an AdapterConfig (lx.config(...)), got {type(config).__name__}"
        )
    check_pattern("rank_pattern", rank_pattern)
    check_pattern("alpha_pattern", alpha_pattern)
    saved_paths = _normalise_saved(model, modules_to_save)
    paths = select(model, targets, exclude, skip=saved_paths)
    plan: dict[str, tuple[nn.Module, AdapterConfig]] = {}
    for path in paths:
        rank, alpha = pattern_value(path, rank_pattern), pattern_value(path, alpha_pattern)
        try:
            plan[path] = (model.get_submodule(path), config.for_layer(rank=rank, alpha=alpha))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    # Build on the side: the model is not touched until everything has succeeded.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        built = config.build_layers(plan)
        saved = {p: SavedModule(model.get_submodule(p)) for p in saved_paths}
        if prepare is not None:
            prepare(built, saved)
    except BaseException:
        for p, flag in flags:  # building froze base layers: undo that
            p.requires_grad_(flag)
        raise

    record = getattr(model, _FROZEN_ATTR, None)
    if record is None:
        record = []
        object.__setattr__(model, _FROZEN_ATTR, record)
    known = {id(p) for p, _ in record}
    adapter_params = {id(p) for a in built.values() for p in a.parameters() if p.requires_grad}
    adapter_params |= {id(p) for s in saved.values() for p in s.module.parameters()}
    for p, flag in flags:
        if id(p) not in known and id(p) not in adapter_params:
            record.append((p, flag))
    for path, adapter in built.items():
        adapter.train(
            adapter.base.training
        )  # a model in eval mode stays in eval mode (dropout off)
        _replace(model, path, adapter)
    for path, module in saved.items():
        _replace(model, path, module)
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    return model


def _restore_flags(model: nn.Module) -> None:
    for p, flag in getattr(model, _FROZEN_ATTR, []):
        p.requires_grad_(flag)
    if hasattr(model, _FROZEN_ATTR):
        object.__delattr__(model, _FROZEN_ATTR)


def merge_(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain layer carrying its W', and every saved module by its trained copy.

    The result is an ordinary model (no loraredux class left) that `save_pretrained` writes as usual.
    """
    layers = list(adapters(model))
    saved = list(saved_modules(model))
    if not layers and not saved:
        raise ValueError(f"{type(model).__name__} has no adapter to merge")
    _restore_flags(model)
    for path, adapter in layers:
        _replace(model, path, adapter.merged())
    for path, module in saved:
        _replace(model, path, module.module)
    return model


def unadapt_(model: nn.Module) -> nn.Module:
    """Give back the original layers (and the original modules to save); adapter weights are dropped."""
    layers = list(adapters(model))
    saved = list(saved_modules(model))
    if not layers and not saved:
        raise ValueError(f"{type(model).__name__} has no adapter to remove")
    for path, adapter in layers:
        _replace(model, path, adapter.base)
    for path, module in saved:
        _replace(model, path, module.original)
    _restore_flags(model)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base: adapters and saved modules are switched off."""
    switched = [m for _, m in adapters(model)] + [m for _, m in saved_modules(model)]
    before = [m.enabled for m in switched]
    try:
        for m in switched:
            m.enabled = False
        yield model
    finally:
        for m, flag in zip(switched, before, strict=True):
            m.enabled = flag


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`{name: parameter}` of every parameter that requires a gradient (after `adapt_`: the adapters')."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter state of the model, keyed as in `model.state_dict()`: adapter parameters and buffers (not
    the frozen base), plus the trained copies of the modules to save."""
    state: dict[str, Tensor] = {}
    for path, adapter in adapters(model):
        for key, value in adapter.state_dict().items():
            if not key.startswith("base."):
                state[f"{path}.{key}"] = value
    for path, module in saved_modules(model):
        for key, value in module.module.state_dict().items():
            state[f"{path}.module.{key}"] = value
    return state


def check_tensors(tensors: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` if its names and shapes are exactly those of `own`; else a ValueError naming the misfits."""
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"expected tensors {sorted(own)}, missing {missing}, unexpected {extra}")
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs layer {tuple(v.shape)}"
        for k, v in own.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"shape mismatch: {wrong}")
    return {k: tensors[k] for k in own}


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load adapter state (as `adapter_state_dict` gives it); keys and shapes must match exactly.

    Raises:
        ValueError: missing or unexpected keys, or a shape mismatch (all are named); nothing is loaded then.
    """
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "adapter state does not fit the model: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}, "
            f"shape mismatches {wrong[:10]}"
        )
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])
