"""The adapter core: `Adapter`, `AdapterConfig` and the method registry (the model verbs are in `verbs.py`).

An `Adapter` wraps one frozen base layer. Its `effective_weight()` is the spec (the dense W' of shape (out, in));
`adapted(x)` is the fast path, and a contract test checks that both agree. Methods that are additive low rank also
give `lora_form() -> (A, B, scale)` with `effective_weight() == W0 + scale * B @ A`.

"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .bases import BaseView, view_of
from .fieldtypes import checking_types, short_repr

__all__ = [
    "Adapter",
    "AdapterConfig",
    "SavedModule",
    "accumulate_",
    "available_methods",
    "check_tensors",
    "config",
    "config_class",
    "config_from_dict",
    "deferring_base_changes",
    "initialising",
    "nonfinite_count",
    "register",
    "skip_initialisation",
]

_REGISTRY: dict[str, type[AdapterConfig]] = {}
_INITIALISE: contextvars.ContextVar[bool] = contextvars.ContextVar("loraredux_init", default=True)
_DEFER_BASE: contextvars.ContextVar[bool] = contextvars.ContextVar("loraredux_defer", default=False)


def initialising() -> bool:
    """Whether adapters built now should initialise their weights (False under `skip_initialisation`).

    Methods whose initialisation is costly (an SVD of W0) read it and, when False, only allocate the tensors that
    every load fills (parameters and persistent buffers); anything else (non-persistent buffers) is still built.
    """
    return _INITIALISE.get()


@contextlib.contextmanager
def skip_initialisation() -> Iterator[None]:
    """Within the block, adapters are built without their initial values (arbitrary until loaded).

    For building adapters that saved tensors then fill completely (`lx.adapt_(..., init=False)`, which the
    adapter loaders use), so that no SVD of W0 is computed only to be overwritten.
    """
    token = _INITIALISE.set(False)
    try:
        yield
    finally:
        _INITIALISE.reset(token)


@contextlib.contextmanager
def deferring_base_changes() -> Iterator[None]:
    """Within the block, an adapter whose initialisation moves its base weight (PiSSA's residual, ...) only records
    the new weight; `Adapter.commit_base_()` applies it. `lx.adapt_` builds every layer this way, so a failure in
    any layer leaves the model's weights untouched."""
    token = _DEFER_BASE.set(True)
    try:
        yield
    finally:
        _DEFER_BASE.reset(token)


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
    #: The quantized base formats (`BaseView.format`: "nf4", "fp4", "int8") the method runs on. A method whose
    #: computation cannot work from a dequantized W0 and the layer's own forward narrows it, and says why in
    #: `quantized_reason`; the contract suite covers each format it keeps and checks that it refuses the others.
    quantized_formats: ClassVar[tuple[str, ...]] = ("nf4", "fp4", "int8")
    quantized_reason: ClassVar[str] = ""

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "checks_types", False):
            cls.__post_init__ = checking_types(own)  # type: ignore[method-assign]

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Refuse a layer shape this config cannot build, naming the constraint (called before anything changes).

        Default: rank <= min(in, out). Methods with other constraints (a square size, factors that must divide
        the shape) override it.

        Raises:
            ValueError: the constraint and the values that break it.
        """
        rank = getattr(self, "rank", None)
        if rank is not None and rank > min(in_features, out_features):
            raise ValueError(
                f"rank {rank} is above min(in, out) = {min(in_features, out_features)}"
            )

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


AdapterConfig.__post_init__ = checking_types(AdapterConfig.__post_init__)  # type: ignore[method-assign]


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
    """Inverse of `AdapterConfig.to_dict`.

    Raises:
        ValueError: not a mapping, no or a non-string 'method', an unknown method or field, or a field whose
            value is not of its annotated type (named, with the expected type).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"a config must be an object of fields, got {short_repr(data)}")
    data = dict(data)
    if "method" not in data:
        raise ValueError(f"config dict has no 'method' key: {sorted(map(str, data))}")
    method = data.pop("method")
    if not isinstance(method, str):
        raise ValueError(f"a config's 'method' must be a string, got {short_repr(method)}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{method}: field names must be strings, got {bad_keys[:5]}")
    return config(method, **data)


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
        fmt = self.view.format
        if fmt is not None and fmt not in config.quantized_formats:
            why = f": {config.quantized_reason}" if config.quantized_reason else ""
            raise TypeError(
                f"{config.method} cannot adapt a {fmt} quantized base ({type(base).__name__}){why}; it runs on "
                f"{', '.join(config.quantized_formats) or 'no quantized format'} and on dense layers"
            )
        try:
            config.check_shape(self.view.in_features, self.view.out_features)
        except ValueError as err:
            raise ValueError(
                f"{config.method} cannot adapt this {self.view.kind} layer "
                f"(out={self.view.out_features}, in={self.view.in_features}): {err}"
            ) from err
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
        """W0 as (out, in): the frozen base weight the adapter computes on (a pending new one, see
        `replace_base_weight_`, once set)."""
        pending = self.__dict__.get("_pending_base")
        return self.view.weight() if pending is None else pending

    def replace_base_weight_(self, weight: Tensor) -> None:
        """Make `weight` (out, in) the frozen base weight, for initialisations that move the base.

        The base layer gets a new parameter (the old tensor is not written to); under `deferring_base_changes`
        (inside `lx.adapt_`) the change waits for `commit_base_()`, and `base_weight()` already returns it.
        """
        self.__dict__["_pending_base"] = weight.detach()
        if not _DEFER_BASE.get():
            self.commit_base_()

    def load_base_tensors_(self, tensors: Mapping[str, Tensor]) -> None:
        """Overwrite tensors of the base layer (by `base.state_dict()` name) with loaded values, in place, as
        PEFT loads an adapted embedding's saved table (`save_embedding_layers`).

        The old values are kept in a non-persistent buffer (not saved, moved by `.to()` with the adapter), so
        `released()` (`lx.unadapt_`) writes them back. In place, so a module tied to the base tensor (an output
        head sharing the embedding) sees the loaded values too, as in PEFT. Under `deferring_base_changes`
        (inside `lx.adapt_`) the change waits for `commit_base_()`.
        """
        pending = self.__dict__.setdefault("_pending_tensors", {})
        pending.update({name: value.detach() for name, value in tensors.items()})
        if not _DEFER_BASE.get():
            self.commit_base_()

    def base_change_pending(self) -> bool:
        """Whether a new base weight is recorded and not yet applied (`replace_base_weight_` under
        `deferring_base_changes`: an init, or a load, that moves the base)."""
        return "_pending_base" in self.__dict__

    def commit_base_(self) -> None:
        """Apply a pending base weight (see `replace_base_weight_`) and pending base tensors (see
        `load_base_tensors_`); nothing when none is pending."""
        pending = self.__dict__.pop("_pending_base", None)
        if pending is not None:
            self.view.set_weight(pending)
        tensors = self.__dict__.pop("_pending_tensors", None)
        if tensors:
            targets = self.base.state_dict(keep_vars=True)
            kept = self.__dict__.setdefault("_kept_base", {})  # buffer name -> base tensor name
            with torch.no_grad():
                for name, value in tensors.items():
                    if name not in kept.values():  # the first load keeps the original values
                        buffer = f"_kept_base_{len(kept)}"
                        self.register_buffer(
                            buffer, targets[name].detach().clone(), persistent=False
                        )
                        kept[buffer] = name
                    targets[name].copy_(value)

    def released(self) -> nn.Module:
        """The base layer as it was before adaptation (`lx.unadapt_` puts it back): base tensors that a load
        overwrote (`load_base_tensors_`) get their kept values back, and a quantized base whose weight was replaced
        gets its original weight back, bit for bit (`BaseView.restore`). Methods whose initialisation moved a dense
        base weight restore it here too."""
        kept = self.__dict__.pop("_kept_base", {})
        if kept:
            targets = self.base.state_dict(keep_vars=True)
            with torch.no_grad():
                for buffer, name in kept.items():
                    targets[name].copy_(self._buffers.pop(buffer))
        self.view.restore()
        return self.base

    def before_load_(self) -> None:
        """Called before saved tensors are copied into an adapter that is already in use (`load_adapter_state_dict`)."""

    def after_load_(self) -> None:
        """Called after saved tensors were copied in (by `lx.load_adapter` and `load_adapter_state_dict`), for
        state derived from them (e.g. a base weight moved by the initial factors).

        Both call it under `deferring_base_changes`: a base change it makes is only recorded, and applied by
        `commit_base_()` once every layer has loaded. It raises ValueError where the loaded tensors give no
        usable state (a moved base that would hold NaN / Inf); the caller then discards the load.
        """

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

    def flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """x with its leading axes flattened into one axis of rows, and those axes (`y.reshape(*lead, out)`).

        Rows are independent, so a fast path flattens once: (..., in) -> (rows, in), or for an embedding the token
        ids (...) -> (rows,); the base then returns a fresh (rows, out) tensor to accumulate the update into.
        """
        lead = tuple(x.shape[:-1]) if self.view.input_is_dense else tuple(x.shape)
        if self.view.input_is_dense:
            return x.reshape(math.prod(lead), x.shape[-1]), lead
        return x.reshape(math.prod(lead)), lead

    def shared_modules(self) -> dict[str, nn.Module]:
        """The cross-layer state this adapter computes with, by key (`{}` for most methods).

        A shared module (a bank: VeRA's random matrices, a tensor decomposition's cores) is not a submodule of any
        adapter: `lx.adapt_` registers it once at the model's root, as `loraredux_banks.<key>`, so the model's
        parameters, `.to()` and the state dict see it exactly once however many layers use it.
        """
        return {}

    def penalty(self) -> Tensor | None:
        """The method's regulariser, added to the training loss (`lx.penalty`); None for most methods."""
        return None

    def adapted(self, x: Tensor) -> Tensor:
        """The adapted layer's output. Default: the dense spec; methods override with a faster path."""
        return self.view.forward_with(x, self.effective_weight())

    def forward(self, x: Tensor) -> Tensor:
        return self.adapted(x) if self.enabled else self.base(x)

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy PEFT-format tensors into the adapter; their names and shapes must be exactly `peft_tensors()`'s.

        Raises:
            ValueError: missing, unexpected or misshapen tensors (named); nothing is copied then.
        """
        own = self.peft_tensors()  # type: ignore[attr-defined]  # methods with a PEFT form define it
        for key, value in check_tensors(tensors, own).items():
            own[key].copy_(value)

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


def accumulate_(y: Tensor, z: Tensor, B: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """y + scale * z B^T (or y + scale * z without B), into y in place when y, z (and B) share a dtype.

    The in-place form is one GEMM (`addmm_`) or one `add_`: no new (rows, out) tensor and no separate scale or add
    pass. Autograd allows it when y is a layer's fresh output, whose backward needs the layer's input and weight,
    not y. Under autocast, or with a base computing in another dtype, it is computed out of place.

    Args:
        y: (rows, out), e.g. the base layer's output.
        z: (rows, r), or (rows, out) without B.
        B: (out, r) or None.
        scale: the update's scale.
    """
    if B is None:
        return y.add_(z, alpha=scale) if y.dtype == z.dtype else y + scale * z
    if y.dtype == z.dtype == B.dtype:
        return y.addmm_(z, B.T, alpha=scale)
    return torch.addmm(y, z, B.T, alpha=scale)


def check_tensors(
    tensors: Mapping[str, Tensor], own: Mapping[str, Tensor], *, finite: bool = False
) -> dict[str, Tensor]:
    """`tensors` if its names, shapes and dtypes fit `own` exactly; else a ValueError naming the misfits.

    A tensor fits if it has the same shape and a dtype of the same kind: a floating-point target takes only
    floating-point values (an integer, bool or complex tensor would be cast silently, or only with a warning),
    an integer or bool target only the same dtype (SVFT's indices, AdaLoRA's mask).

    Args:
        tensors: the values to load, by name.
        own: the tensors they go into, by name.
        finite: also refuse NaN and infinite values (named, with their count).

    Raises:
        ValueError: missing or unexpected names, shapes, dtypes or (with `finite`) values that do not fit.
    """
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
    kinds = [
        f"{k}: file {tensors[k].dtype} vs layer {v.dtype}"
        for k, v in own.items()
        if not _same_kind(tensors[k].dtype, v.dtype)
    ]
    if kinds:
        raise ValueError(
            f"dtype mismatch (a floating-point tensor takes only floating-point values, an integer or "
            f"bool one only its own dtype): {kinds}"
        )
    if finite:
        for k in own:
            bad = nonfinite_count(tensors[k])
            if bad:
                raise ValueError(
                    f"tensor {k!r} holds {bad} NaN or infinite value(s) of {tensors[k].numel()}"
                )
    return {k: tensors[k] for k in own}


def _same_kind(value: torch.dtype, target: torch.dtype) -> bool:
    if value.is_complex or target.is_complex:
        return value == target
    if target.is_floating_point:
        return value.is_floating_point
    return value == target


def nonfinite_count(tensor: Tensor) -> int:
    """How many entries of `tensor` are NaN or infinite (0 for integer and bool tensors)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    wide = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if tensor.dtype not in wide and not tensor.is_complex():  # float8 lacks isfinite kernels
        tensor = tensor.float()
    return int((~torch.isfinite(tensor)).sum())
