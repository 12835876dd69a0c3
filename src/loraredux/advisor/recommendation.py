"""What `lx.advise` returns: a `Recommendation` (the global choices with their reasons, a `LayerAdvice` per target
layer, the memory estimates and the verification) that converts to what `lx.adapt_` takes and to the JSON the
report reads; `parse_bytes` reads sizes such as "24GiB"."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..targets import TargetSpec
from . import rules
from .measure import LayerMeasurement
from .rules import Choice

__all__ = ["KEPT_VALUES", "LayerAdvice", "Recommendation", "is_shared", "parse_bytes"]

#: singular values kept per spectrum in `to_dict` (the plots and the report need no more)
KEPT_VALUES = 64
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_bytes(value: int | float | str | None) -> int | None:
    """Bytes from a number or a size such as "24GiB", "24 GB" or "512MiB" (binary and decimal units)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"a memory size must be bytes or a string like '24GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"a memory size must be > 0, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"cannot read {value!r} as a memory size; write bytes or a number with a unit "
            "(KiB, MiB, GiB, TiB or KB, MB, GB, TB), e.g. '24GiB'"
        )
    size = float(match.group(1)) * _UNITS[unit]
    if size <= 0:
        raise ValueError(f"a memory size must be > 0, got {value!r}")
    return int(size)


@dataclass(frozen=True)
class LayerAdvice:
    """The advice for one target layer: its rank and init with the reasons, and what was measured."""

    path: str
    shape: tuple[int, int]
    rank: int
    init: str
    rank_reason: str
    init_reason: str
    measurement: LayerMeasurement

    @property
    def reason(self) -> str:
        """Both reasons, in words."""
        return f"{self.rank_reason}. {self.init_reason}."

    def to_dict(self) -> dict[str, Any]:
        m = self.measurement

        def values(t: Tensor | None) -> list[float]:
            return [float(x) for x in t[:KEPT_VALUES]] if t is not None else []

        gradient = None
        if m.gradient is not None:
            gradient = {
                "singular_values": values(m.gradient_values),
                "threshold": m.threshold,
                "noise": m.noise,
                "needed_rank": m.needed_rank,
                "effective_rank": m.gradient.effective_rank,
                "stable_rank": m.gradient.stable_rank,
                "principal_alignment": m.principal_alignment,
                "minor_alignment": m.minor_alignment,
            }
        return {
            "shape": list(self.shape),
            "rank": self.rank,
            "init": self.init,
            "reason": self.reason,
            "rank_reason": self.rank_reason,
            "init_reason": self.init_reason,
            "weight": {
                "singular_values": values(m.weight_values),
                "effective_rank": m.weight.effective_rank,
                "stable_rank": m.weight.stable_rank,
                "condition": _finite(m.weight.condition),
            },
            "gradient": gradient,
            "input_condition": _finite(m.input_condition),
        }


def _finite(x: float | None) -> float | None:
    """JSON has no infinity: None stands for it (and for 'not measured')."""
    return None if x is None or x != x or x in (float("inf"), float("-inf")) else x


@dataclass
class Recommendation:
    """What `lx.advise` returns (see the module docstring).

    Attributes:
        layers: {path: LayerAdvice}, in model order.
        choices: the global choices with their reasons: method, rank, alpha, init, optimizer, base, serving.
        targets, exclude, modules_to_save: what `lx.adapt_` adapts and trains in full.
        memory: {base format: {part: bytes, "total": ..., "fits": ...}} at `batch_size` x `seq_len`, or None
            without a transformers config.
        model_info, data_info: what was measured (for the report).
        verify: the `--verify` comparison, once run.
    """

    layers: dict[str, LayerAdvice]
    choices: dict[str, Choice]
    targets: TargetSpec
    exclude: TargetSpec | None = None
    modules_to_save: list[str] | None = None
    memory: dict[str, dict[str, Any]] | None = None
    budget_bytes: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    device: str = "cuda"
    model_info: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None

    @property
    def method(self) -> str:
        return self.choices["method"].value

    @property
    def rank(self) -> int:
        return self.choices["rank"].value

    @property
    def alpha(self) -> float:
        return self.choices["alpha"].value

    @property
    def init(self) -> str:
        return self.choices["init"].value

    @property
    def optimizer(self) -> str:
        return self.choices["optimizer"].value

    @property
    def base(self) -> str:
        return self.choices["base"].value

    @property
    def rank_pattern(self) -> dict[str, int]:
        """{path: rank} for the layers whose rank differs from the config's."""
        return {p: a.rank for p, a in self.layers.items() if a.rank != self.rank}

    @property
    def rslora(self) -> bool:
        """Whether the method scales by alpha / √r (then one alpha serves every rank; see `rules.choose_alpha`)."""
        from ..core import config_class

        return "rslora" in config_class(self.method).__dataclass_fields__

    @property
    def alpha_pattern(self) -> dict[str, float]:
        """{path: alpha} for the layers of their own rank, where the method has no rsLoRA scale (else empty)."""
        if self.rslora:
            return {}
        return {p: rules.layer_alpha(r) for p, r in self.rank_pattern.items()}

    def config(self) -> Any:
        """The adapter config `lx.adapt_` takes (the per-layer ranks are in `adapt_kwargs`)."""
        from ..core import config as make_config
        from ..core import config_class

        known = {f for f in config_class(self.method).__dataclass_fields__}
        fields: dict[str, Any] = {"rank": self.rank, "alpha": self.alpha, "init": self.init}
        if self.rslora:
            fields["rslora"] = True
        return make_config(self.method, **{k: v for k, v in fields.items() if k in known})

    def adapt_kwargs(self) -> dict[str, Any]:
        """targets, exclude, rank_pattern, alpha_pattern and modules_to_save for `lx.adapt_` (no patterns for a
        shared, cross-layer method: its layers share one rank)."""
        cfg = self.config()
        known = set(cfg.__dataclass_fields__)
        per_layer = not is_shared(cfg.method)
        return {
            "targets": self.targets,
            "exclude": self.exclude,
            "rank_pattern": (self.rank_pattern or None) if per_layer and "rank" in known else None,
            "alpha_pattern": (self.alpha_pattern or None)
            if per_layer and "alpha" in known
            else None,
            "modules_to_save": self.modules_to_save,
        }

    def apply_(
        self,
        model: nn.Module,
        calibration: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> nn.Module:
        """`lx.adapt_(model, self.config(), **self.adapt_kwargs())`, with `calibration` batches and `loss_fn` for
        a data-aware init (LoRA-One needs them)."""
        from ..init import get as get_init
        from ..verbs import adapt_

        cfg = self.config()
        extra: dict[str, Any] = {}
        name = getattr(cfg, "init", None)
        if isinstance(name, str) and get_init(name).needs:
            if calibration is None:
                raise ValueError(
                    f"the recommended init {name!r} estimates from data: pass calibration=batches (and loss_fn)"
                )
            extra = {"calibration": calibration, "loss_fn": loss_fn}
        return adapt_(model, cfg, **self.adapt_kwargs(), **extra)

    def __str__(self) -> str:
        lines = [f"{k:<10} {c.value!s:<24} {c.reason}" for k, c in self.choices.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the schema the report reads (`advisor/report.py`)."""
        from .. import __version__

        memory = None
        if self.memory is not None:
            memory = {
                "budget_bytes": self.budget_bytes,
                "batch_size": self.batch_size,
                "seq_len": self.seq_len,
                "device": self.device,
                "options": self.memory,
                "chosen": self.base,
            }
        return {
            "loraredux_version": __version__,
            "model": self.model_info,
            "data": self.data_info,
            "choices": {k: c.to_dict() for k, c in self.choices.items()},
            "config": self.config().to_dict(),
            "adapt": {
                k: (list(v) if isinstance(v, (list, tuple)) else v)
                for k, v in self.adapt_kwargs().items()
            },
            "layers": {p: a.to_dict() for p, a in self.layers.items()},
            "memory": memory,
            "verify": self.verify,
        }


def is_shared(method: str) -> bool:
    """Whether a method's layers share cross-layer state (its config builds them together: VeRA, LoTR, ...), so
    they have one rank and no factor pairs of their own."""
    from ..core import AdapterConfig, config_class

    return config_class(method).build_layers is not AdapterConfig.build_layers
