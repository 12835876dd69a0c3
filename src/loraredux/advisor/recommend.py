"""`lx.advise`: measure a model (and its data), apply the rules, and return a `Recommendation` that explains itself
and converts to what `lx.adapt_` takes.

    rec = lx.advise(model, batches, loss_fn, targets="all-linear", budget="24GiB")
    rec.layers["model.layers.0.self_attn.q_proj"].rank, .init, .reason
    rec.method, rec.rank, rec.init, rec.optimizer, rec.base        # the global choices (rec.choices: with reasons)
    rec.apply_(model, calibration=batches, loss_fn=loss_fn)         # lx.adapt_ with the recommended configuration
    rec.to_dict()                                                   # recommendation.json (advisor/report.py)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..bases import view_of
from ..targets import TargetSpec
from . import rules
from .measure import LayerMeasurement
from .model import measure_model
from .rules import Choice

__all__ = ["LayerAdvice", "Recommendation", "advise", "parse_bytes"]

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
        from ..core import AdapterConfig

        cfg = self.config()
        known = set(cfg.__dataclass_fields__)
        per_layer = type(cfg).build_layers is AdapterConfig.build_layers
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


def _kind(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "classification"
    return "base" if hasattr(model, "config") else None


def _shape_of(batches: Sequence[Any] | None) -> tuple[int | None, int | None]:
    if not batches:
        return None, None
    first = batches[0]
    ids = first.get("input_ids") if isinstance(first, Mapping) else None
    if isinstance(ids, Tensor) and ids.ndim == 2:
        return int(ids.shape[0]), int(ids.shape[1])
    return None, None


def advise(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    *,
    targets: TargetSpec = "all-linear",
    exclude: TargetSpec | None = None,
    modules_to_save: Sequence[str] | None = None,
    budget: int | float | str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    device: str = "cuda",
    adapters: int = 1,
    storage: int | float | str | None = None,
    min_rank: int = 1,
    max_rank: int = 64,
    preserve: bool = False,
    measurements: Mapping[str, LayerMeasurement] | None = None,
    max_bytes: int = 1 << 30,
    progress: bool = False,
) -> Recommendation:
    """Measure `model` (and `batches`) and recommend an adapter configuration, each choice with its reason.

    Args:
        model: the model to fine-tune (not adapted at the target layers; it is left exactly as it was).
        batches: calibration batches (a few training batches; at least 2 for a noise estimate). None measures the
            weights only, and the rank and init fall back to defaults, saying so.
        loss_fn: `(model, batch) -> scalar loss` (default: `model(**batch).loss`).
        targets, exclude: the layers to adapt, as `lx.adapt_` takes them.
        modules_to_save: modules trained in full (a new classification head): the gradient then passes through
            that newly drawn head, so the init is not read from it (kaiming).
        budget: the accelerator memory for training, bytes or a size such as "24GiB"; decides the base format.
        batch_size, seq_len: the training shape for the memory estimate (default: the calibration batches').
        device: the training hardware, "cuda" or "cpu" (which attention kernel the activation estimate assumes).
        adapters: how many adapters of this shape will be stored or served (decides shared adapters and serving).
        storage: the storage those adapters may take, bytes or a size.
        min_rank, max_rank: the range of the per-layer ranks.
        preserve: protect the pretrained knowledge (prefer MiLoRA's minor subspace).
        measurements: `{path: LayerMeasurement}` measured before (skips measuring; `batches` then only set the
            training shape).
        max_bytes, progress: as in `measure_model`.

    Raises:
        ValueError: no target layer, a bad size or range, or what measuring refuses.
    """
    from .. import core

    budget_bytes = parse_bytes(budget)
    storage_bytes = parse_bytes(storage)
    if isinstance(adapters, bool) or not isinstance(adapters, int) or adapters < 1:
        raise ValueError(f"adapters must be an integer >= 1, got {adapters!r}")
    for name, value in (("min_rank", min_rank), ("max_rank", max_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_rank < min_rank:
        raise ValueError(f"max_rank {max_rank} is below min_rank {min_rank}")
    batches = list(batches) if batches is not None else None
    if measurements is None:
        measurements = measure_model(
            model, batches, loss_fn, targets=targets, exclude=exclude, max_bytes=max_bytes,
            progress=progress,
        )  # fmt: skip
    paths = list(measurements)
    shapes = {}
    for p in paths:
        view = view_of(model.get_submodule(p))
        shapes[p] = (view.out_features, view.in_features)

    layers: dict[str, LayerAdvice] = {}
    for p in paths:
        m = measurements[p]
        r = rules.layer_rank(m, min_rank=min_rank, max_rank=max_rank, limit=min(shapes[p]))
        i = rules.layer_init(m, r.value, preserve=preserve, new_head=bool(modules_to_save))
        layers[p] = LayerAdvice(p, shapes[p], r.value, i.value, r.reason, i.reason, m)

    ranks = {p: a.rank for p, a in layers.items()}
    rank = rules.choose_rank(ranks)
    init = rules.choose_init(
        {p: Choice(a.init, a.init_reason) for p, a in layers.items()}, rules.weights_of(shapes)
    )
    kind = _kind(model)
    b, s = _shape_of(batches)
    batch_size, seq_len = batch_size or b, seq_len or s
    memory = None
    lora_bytes = 2 * sum(ranks[p] * (o + i) for p, (o, i) in shapes.items())  # 16-bit files
    dora_fits = True
    if kind is not None:
        memory, dora_fits = _memory(
            model, kind, ranks, rank.value, targets, exclude, modules_to_save, batch_size, seq_len,
            budget_bytes, device,
        )  # fmt: skip
    method = rules.choose_method(
        {p: m.needed_rank for p, m in measurements.items()},
        ranks,
        max_rank=max_rank,
        adapters=adapters,
        storage_bytes=storage_bytes,
        adapter_bytes=lora_bytes,
        dora_fits=dora_fits,
    )
    shared = bool(
        core.config_class(method.value).build_layers is not core.AdapterConfig.build_layers
    )
    optimizer = rules.choose_optimizer(measurements, shared=shared)
    if memory is not None:
        totals = {fmt: part["total"] for fmt, part in memory.items()}
        current = _dtype_format(model)
        base = rules.choose_base(totals, budget_bytes, current=current)
    else:
        base = Choice(
            _dtype_format(model),
            "kept as it is: the model has no transformers config to estimate memory from",
        )
    if base.value == "nf4" and init.value == "kaiming":
        init = Choice(
            "loftq",
            "loftq: the base is quantized to 4 bits, and LoftQ starts the adapter on the low-rank part of the "
            f"quantization error W0 - Q(W0) (TAXONOMY §6.3); the data gave no better start ({init.reason})",
        )
    base_bytes = memory[base.value]["base"] if memory is not None else None
    serving = rules.choose_serving(adapters, base_bytes)
    alpha = rules.choose_alpha(
        rank.value, "rslora" in core.config_class(method.value).__dataclass_fields__
    )
    choices = {"method": method, "rank": rank, "alpha": alpha, "init": init,
               "optimizer": optimizer, "base": base, "serving": serving}  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters())
    data_info = None
    if batches is not None:
        data_info = {"batches": len(batches), "batch_size": b, "seq_len": s}
    return Recommendation(
        layers=layers,
        choices=choices,
        targets=list(targets) if isinstance(targets, (list, tuple)) else targets,
        exclude=list(exclude) if isinstance(exclude, (list, tuple)) else exclude,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        memory=memory,
        budget_bytes=budget_bytes,
        batch_size=batch_size,
        seq_len=seq_len,
        device=device,
        model_info={"class": type(model).__name__, "parameters": n_params},
        data_info=data_info,
    )


def _dtype_format(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _memory(
    model: nn.Module,
    kind: str,
    ranks: Mapping[str, int],
    rank: int,
    targets: TargetSpec,
    exclude: TargetSpec | None,
    modules_to_save: Sequence[str] | None,
    batch_size: int | None,
    seq_len: int | None,
    budget_bytes: int | None,
    device: str,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """{format: breakdown} for LoRA at the chosen ranks, and whether DoRA fits the budget at the chosen format."""
    from .memory import estimate_memory

    formats = (["fp32"] if _dtype_format(model) == "fp32" else []) + ["bf16", "int8", "nf4"]
    pattern = {p: r for p, r in ranks.items() if r != rank}
    common = {
        "kind": kind,
        "targets": targets,
        "exclude": exclude,
        "modules_to_save": modules_to_save,
        "rank_pattern": pattern or None,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "device": device,
    }
    if batch_size is None or seq_len is None:
        common.pop("batch_size")
        common.pop("seq_len")
    fields = {"rank": rank, "alpha": rules.choose_alpha(rank, True).value, "rslora": True}
    options: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        est = estimate_memory(model.config, base=fmt, method="lora", method_fields=fields, **common)
        options[fmt] = {**est.breakdown(), "total": est.total_bytes,
                        "fits": budget_bytes is None or est.total_bytes <= budget_bytes}  # fmt: skip
    dora_fits = True
    if budget_bytes is not None:
        fmt = next((f for f in formats if options[f]["fits"]), formats[-1])
        dora = estimate_memory(
            model.config, base=fmt, method="dora", method_fields=fields, **common
        )
        dora_fits = dora.total_bytes <= budget_bytes
    return options, dora_fits
