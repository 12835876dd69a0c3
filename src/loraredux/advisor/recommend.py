"""`lx.advise`: measure a model (and its data), apply the rules, and return a `Recommendation` (`recommendation.py`)
that explains itself and converts to what `lx.adapt_` takes.

    rec = lx.advise(model, batches, loss_fn, targets="all-linear", budget="24GiB")
    rec.layers["model.layers.0.self_attn.q_proj"].rank, .init, .reason
    rec.method, rec.rank, rec.init, rec.optimizer, rec.base        # the global choices (rec.choices: with reasons)
    rec.apply_(model, calibration=batches, loss_fn=loss_fn)         # lx.adapt_ with the recommended configuration
    rec.to_dict()                                                   # recommendation.json (advisor/report.py)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..bases import view_of
from ..targets import TargetSpec
from . import rules
from .measure import LayerMeasurement
from .model import MIN_CALIBRATION_BATCHES, check_not_adapted, measure_model
from .recommendation import LayerAdvice, Recommendation, is_shared, parse_bytes
from .rules import Choice

__all__ = ["LayerAdvice", "Recommendation", "advise", "parse_bytes"]

logger = logging.getLogger(__name__)


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
    progress: bool = True,
) -> Recommendation:
    """Measure `model` (and `batches`) and recommend an adapter configuration, each choice with its reason.

    Args:
        model: the model to fine-tune, not adapted (`lx.adapt_` not called on it); it is left exactly as it was.
        batches: calibration batches (a few training batches), at least `MIN_CALIBRATION_BATCHES` (2): the
            gradient noise is the difference between the mean gradients of two halves of them. None measures the
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
        max_bytes: as in `measure_model`.
        progress: a tqdm bar over the layers (and the calibration passes), shown only when stderr is a terminal;
            False turns it off. The phases are also logged at INFO (`logging`, loggers `loraredux.advisor.*`).

    Raises:
        ValueError: an already adapted model, fewer than 2 calibration batches, no target layer, a bad size or
            range, or what measuring refuses.
    """
    from .. import core

    check_not_adapted(model)
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
    if batches is not None and measurements is None and len(batches) < MIN_CALIBRATION_BATCHES:
        raise ValueError(
            f"batches: the advisor needs at least {MIN_CALIBRATION_BATCHES} calibration batches, got "
            f"{len(batches)}: the gradient noise, which decides every layer's rank, is estimated from the "
            "difference between the mean gradients of two halves of the batches, so each half needs one. "
            "Pass more batches, or batches=None to measure the weights only"
        )
    if measurements is None:
        logger.info(
            "advise: measuring %s on %s", type(model).__name__,
            f"{len(batches)} calibration batches" if batches is not None else "its weights only",
        )  # fmt: skip
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
        logger.info("advise: estimating the training memory of each base format")
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
    optimizer = rules.choose_optimizer(measurements, shared=is_shared(method.value))
    if memory is not None:
        totals = {fmt: part["total"] for fmt, part in memory.items()}
        current = _dtype_format(model)
        base = rules.choose_base(
            totals, budget_bytes, current=current, counts=_counts(batch_size, seq_len, device)
        )
    else:
        base = Choice(
            _dtype_format(model),
            "kept as it is: the model has no transformers config to estimate memory from",
        )
    if base.value == "nf4" and init.value == "kaiming":
        init = Choice(
            "loftq",
            "loftq: the base is quantized to 4 bits, and LoftQ starts the adapter on the low-rank part of the "
            f"quantization error W0 - Q(W0) (LoftQ, arXiv 2310.08659); the data gave no better start "
            f"({init.reason})",
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


def _counts(batch_size: int | None, seq_len: int | None, device: str) -> str:
    """What the base-format estimates count, for the base choice's reason."""
    parts = "the base weights at that format, the adapters, their gradients and optimizer states"
    if batch_size is None or seq_len is None:
        return f"{parts}; no activations (no batch shape was given)"
    return (
        f"{parts}, and the activations of one training step on {batch_size} × {seq_len} tokens on {device}; "
        "an estimate, not a measurement"
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
