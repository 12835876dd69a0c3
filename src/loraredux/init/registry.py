"""The initialiser registry: `Factors`, `LayerData`, `Initialiser`, `register_init`, `get`, `available`.

An initialiser is a pure function of one layer's frozen weight (and, for data-aware ones, its calibration
statistics) that returns the starting factors of an additive low-rank update W' = W0 + s B A:

    fn(W0, rank, scale, *, data=None, **options) -> Factors(A, B, base)

- `W0` (out, in) is the base weight in PyTorch's orientation (a `BaseView.weight()`), detached.
- `scale` is the adapter's s (alpha / r, or alpha / sqrt(r)): inits that must reproduce a given matrix with
  s B A divide by it (as PEFT does for PiSSA).
- `data` is the layer's `LayerData` (gradients and/or input moments) for data-aware inits, else None.
- `base` in the result is the new base weight when the init moves it (PiSSA's residual, LoftQ's quantized
  weight), else None: the change of W0 is a return value, never a hidden mutation.

The function never touches a module; `lx.adapt_` calls it through the adapter and applies the new base only once
every layer has been built.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Factors",
    "Initialiser",
    "LayerData",
    "available",
    "calibration_data",
    "data_for",
    "get",
    "register_init",
]

_DATA: contextvars.ContextVar[Mapping[int, LayerData] | None] = contextvars.ContextVar(
    "loraredux_calibration", default=None
)


@dataclass(frozen=True)
class Factors:
    """The starting factors of W' = W0 + s B A, and the new base weight if the init moves it.

    Attributes:
        A: (r, in).
        B: (out, r).
        base: (out, in) the new W0, or None when the base is unchanged.
    """

    A: Tensor
    B: Tensor
    base: Tensor | None = None


@dataclass(frozen=True)
class LayerData:
    """Calibration statistics of one target layer, gathered by `lx.init.gather` (see `calibrate.py`).

    Attributes:
        grad: (out, in) the mean over calibration batches of dL/dW0, in the base's (out, in) orientation; None
            unless an init needs gradients.
        grads: the per-batch gradients (out, in) when an init asked for them (kept on the CPU), else ().
        second_moment: (in, in) sum over input rows of x x^T (float64; padding rows excluded); None unless an
            init needs input statistics.
        input_sum: (in,) sum over input rows of x (float64).
        rows: the number of input rows summed.
    """

    grad: Tensor | None = None
    grads: tuple[Tensor, ...] = ()
    second_moment: Tensor | None = None
    input_sum: Tensor | None = None
    rows: int = 0

    def covariance(self, centered: bool = False) -> Tensor:
        """(in, in) the input second moment divided by the rows, E[x x^T]; with `centered`, E[(x-mu)(x-mu)^T].

        Raises:
            ValueError: no input statistics were gathered for this layer.
        """
        if self.second_moment is None or self.input_sum is None or self.rows == 0:
            raise ValueError("no input statistics were gathered for this layer")
        C = self.second_moment / self.rows  # (in, in)
        if centered:
            mu = self.input_sum / self.rows  # (in,)
            C = C - torch.outer(mu, mu)
        return C


@dataclass(frozen=True)
class Initialiser:
    """A registered initialiser and what it needs and promises.

    Attributes:
        name: the name used in configs (`init="pissa"`).
        fn: the pure function (see the module docstring).
        needs: calibration statistics it reads: a subset of {"grad", "grads", "inputs"}.
        moves_base: it returns a new base weight.
        exact: with `moves_base`, W0 == new base + s B A exactly (up to float rounding), so the original model is
            recoverable from the initial factors and the adapter converts to a plain rank-2r LoRA on the
            original base. False for LoftQ (the quantisation error is not low rank).
        identity: W' == W0 at init (the function of the model is unchanged).
        options: option name -> default value (`init_options` in the config).
        kinds: the base-layer kinds (`BaseView.kind`) it supports.
        allocate: for inits that spread a rank budget over layers (EVA's rho), a function
            `(weights: {path: W0}, data: {path: LayerData}, rank, **options) -> {path: rank}` run before the
            adapters are built; a rank of 0 leaves that layer unadapted.
        summary: one line for `available()` listings and the CLI help.
        quantized_reason: why the init cannot run on a quantized base layer (bitsandbytes 4-bit / 8-bit), which
            `lx.adapt_` then refuses, naming the layer; "" where it can.
    """

    name: str
    fn: Callable[..., Factors]
    needs: frozenset[str] = frozenset()
    moves_base: bool = False
    exact: bool = True
    identity: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("linear", "conv1d")
    allocate: Callable[..., dict[str, int]] | None = None
    alphas: Callable[..., dict[str, float]] | None = None
    summary: str = ""
    quantized_reason: str = ""

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in.

        Raises:
            ValueError: an option this init does not have (the message lists the ones it has).
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            have = sorted(self.options) or "none"
            raise ValueError(f"init {self.name!r} has no option(s) {unknown}; its options: {have}")
        return {**self.options, **options}

    def plan(
        self,
        weights: Mapping[str, Tensor],
        data: Mapping[str, LayerData],
        rank: int,
        alpha: float | None,
        options: Mapping[str, Any],
    ) -> tuple[dict[str, int], dict[str, float]]:
        """The per-layer ranks (0 = leave the layer unadapted) and alphas of an allocating init.

        Raises:
            ValueError: the init does not allocate ranks.
        """
        if self.allocate is None:
            raise ValueError(f"init {self.name!r} does not allocate ranks")
        opts = self.check_options(options)
        ranks = self.allocate(weights, data, rank, **opts)
        alphas: dict[str, float] = {}
        if self.alphas is not None and alpha is not None:
            accepted = inspect.signature(self.alphas).parameters
            alphas = self.alphas(
                ranks, rank, alpha, **{k: v for k, v in opts.items() if k in accepted}
            )
        return ranks, alphas

    def __call__(
        self, W0: Tensor, rank: int, scale: float, *, data: LayerData | None = None, **options: Any
    ) -> Factors:
        """Run the initialiser on one weight (options checked, data required where needed)."""
        opts = self.check_options(options)
        if self.needs and data is None:
            raise ValueError(
                f"init {self.name!r} needs calibration data ({', '.join(sorted(self.needs))}): pass "
                "lx.adapt_(..., calibration=batches, loss_fn=fn)"
            )
        kwargs = {"data": data} if self.needs else {}
        return self.fn(W0, rank, scale, **kwargs, **opts)


_REGISTRY: dict[str, Initialiser] = {}


def register_init(
    name: str,
    *,
    needs: tuple[str, ...] = (),
    moves_base: bool = False,
    exact: bool = True,
    identity: bool = True,
    kinds: tuple[str, ...] = ("linear", "conv1d"),
    allocate: Callable[..., dict[str, int]] | None = None,
    alphas: Callable[..., dict[str, float]] | None = None,
    quantized_reason: str = "",
) -> Callable[[Callable[..., Factors]], Callable[..., Factors]]:
    """Function decorator: register a pure initialiser under `name`.

    Its keyword-only parameters after `data` (with defaults) become the init's options; `quantized_reason`, where
    given, says why it cannot run on a quantized base (`Initialiser.quantized_reason`).
    """
    bad = set(needs) - {"grad", "grads", "inputs"}
    if bad:
        raise ValueError(f"needs must be among 'grad', 'grads', 'inputs', got {sorted(bad)}")

    def decorate(fn: Callable[..., Factors]) -> Callable[..., Factors]:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"init {name!r} is already registered")
        params = inspect.signature(fn).parameters
        options = {
            p.name: p.default
            for p in params.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "data"
        }
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = Initialiser(
            name=name,
            fn=fn,
            needs=frozenset(needs),
            moves_base=moves_base,
            exact=exact,
            identity=identity,
            options=options,
            kinds=kinds,
            allocate=allocate,
            alphas=alphas,
            summary=doc.splitlines()[0] if doc else "",
            quantized_reason=quantized_reason,
        )
        return fn

    return decorate


def available() -> list[str]:
    """The registered initialiser names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Initialiser:
    """The registered initialiser `name`.

    Raises:
        ValueError: unknown name (the message lists the available ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown init {name!r}; available: {available()}") from None


@contextlib.contextmanager
def calibration_data(data: Mapping[Any, LayerData]) -> Iterator[None]:
    """Within the block, adapters built around these base modules find their calibration statistics.

    Args:
        data: `{base module: LayerData}` (`lx.adapt_` gathers it with `calibrate.gather`).
    """
    token = _DATA.set({id(module): d for module, d in data.items()})
    try:
        yield
    finally:
        _DATA.reset(token)


def data_for(module: Any) -> LayerData | None:
    """The calibration statistics of a base module inside `calibration_data`, else None."""
    data = _DATA.get()
    return None if data is None else data.get(id(module))
