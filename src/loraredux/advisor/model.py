"""Measuring a whole model (issue 8): every target layer's `measure.LayerMeasurement`, from its weight and, with
calibration batches, from its per-batch gradients and its input covariance.

The gradients and the input statistics come from `lx.init.gather` (the calibration code the data-aware inits use:
the model is left exactly as it was). Per-batch gradients are kept on the CPU until their layer is measured, so the
layers are gathered in chunks of at most `max_bytes` of them (batches x out x in x 4 bytes each), one set of
passes over the batches per chunk: memory stays bounded at the cost of more passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from ..bases import view_of
from ..init import gather
from ..targets import TargetSpec, select
from .measure import LayerMeasurement, measure_layer

__all__ = ["measure_model"]


def measure_model(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    *,
    targets: TargetSpec = "all-linear",
    exclude: TargetSpec | None = None,
    inputs: bool = True,
    max_bytes: int = 1 << 30,
    progress: bool = False,
) -> dict[str, LayerMeasurement]:
    """`{path: LayerMeasurement}` for the target layers of `model`.

    Args:
        model: the model (not adapted at these layers).
        batches: calibration batches; None measures the weights only.
        loss_fn: `(model, batch) -> scalar loss` (default: `model(**batch).loss`).
        targets, exclude: the layers, as `lx.adapt_` selects them.
        inputs: also gather the input covariance (its condition number).
        max_bytes: the most per-batch gradient bytes held at once (see the module docstring).
        progress: progress bars while gathering.

    Raises:
        ValueError: no target layer, or what `lx.init.gather` refuses (a layer the data never reaches, ...).
    """
    paths = select(model, targets, exclude)
    if not paths:
        raise ValueError(f"no layer of {type(model).__name__} matches the targets {targets!r}")
    modules = {p: model.get_submodule(p) for p in paths}
    if batches is None:
        return {p: measure_layer(view_of(m).weight()) for p, m in modules.items()}
    batches = list(batches)
    needs = {"grads", "inputs"} if inputs else {"grads"}
    chunks: list[list[str]] = [[]]
    held = 0
    for p in paths:
        view = view_of(modules[p])
        size = len(batches) * view.out_features * view.in_features * 4
        if chunks[-1] and held + size > max_bytes:
            chunks.append([])
            held = 0
        chunks[-1].append(p)
        held += size
    measured: dict[str, LayerMeasurement] = {}
    for chunk in chunks:
        stats = gather(
            model, {p: modules[p] for p in chunk}, needs, batches, loss_fn, progress=progress
        )
        for p in chunk:
            data = stats[p]
            covariance = data.covariance(centered=True) if inputs else None
            measured[p] = measure_layer(view_of(modules[p]).weight(), data.grads, covariance)
    return {p: measured[p] for p in paths}
