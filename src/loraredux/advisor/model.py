"""Measuring a whole model: every target layer's `measure.LayerMeasurement`, from its weight and, with
calibration batches, from its per-batch gradients and its input covariance.

The gradients and the input statistics come from `lx.init.gather` (the calibration code the data-aware inits use:
the model is left exactly as it was). Per-batch gradients are kept on the CPU until their layer is measured, so the
layers are gathered in chunks of at most `max_bytes` of them (batches x out x in x 4 bytes each), one set of
passes over the batches per chunk: memory stays bounded at the cost of more passes.

The phases are logged (`logging`, INFO, logger `loraredux.advisor.model`): each calibration pass and each layer as it
is measured ("measuring layer i/N"); with `progress`, a tqdm bar over the layers shows in a terminal only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from ..bases import view_of
from ..init import gather
from ..targets import TargetSpec, select
from .measure import LayerMeasurement, measure_layer

__all__ = ["MIN_CALIBRATION_BATCHES", "check_not_adapted", "measure_model"]

logger = logging.getLogger(__name__)

#: the fewest calibration batches a noise estimate needs: it compares the mean gradients of two halves
MIN_CALIBRATION_BATCHES = 2


def check_not_adapted(model: nn.Module) -> None:
    """Refuse a model that `lx.adapt_` already adapted: the advisor measures the bare model's layers.

    Raises:
        ValueError: the model holds adapter layers or modules trained in full (`modules_to_save`).
    """
    from ..state import adapters, saved_modules

    found = [p for p, _ in adapters(model)] + [p for p, _ in saved_modules(model)]
    if found:
        raise ValueError(
            f"{type(model).__name__} is already adapted ({len(found)} adapted or saved modules, e.g. "
            f"{found[0]!r}): the advisor measures the bare model's layers. Call lx.unadapt_(model) first "
            "(it drops the adapters and gives back the original layers), or advise on a freshly loaded model"
        )


def measure_model(
    model: nn.Module,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    *,
    targets: TargetSpec = "all-linear",
    exclude: TargetSpec | None = None,
    inputs: bool = True,
    max_bytes: int = 1 << 30,
    progress: bool = True,
) -> dict[str, LayerMeasurement]:
    """`{path: LayerMeasurement}` for the target layers of `model`.

    Args:
        model: the model (not adapted at these layers).
        batches: calibration batches; None measures the weights only.
        loss_fn: `(model, batch) -> scalar loss` (default: `model(**batch).loss`).
        targets, exclude: the layers, as `lx.adapt_` selects them.
        inputs: also gather the input covariance (its condition number).
        max_bytes: the most per-batch gradient bytes held at once (see the module docstring).
        progress: a tqdm bar over the layers and the calibration passes' bars, shown only when stderr is a
            terminal (tqdm's `disable=None`); False turns them off.

    Raises:
        ValueError: an adapted model, no target layer, or what `lx.init.gather` refuses (a layer the data never
            reaches, ...).
    """
    from tqdm.auto import tqdm

    check_not_adapted(model)
    paths = select(model, targets, exclude)
    if not paths:
        raise ValueError(f"no layer of {type(model).__name__} matches the targets {targets!r}")
    modules = {p: model.get_submodule(p) for p in paths}
    bar = tqdm(total=len(paths), desc="measuring layers", unit="layer", leave=False,
               disable=None if progress else True)  # fmt: skip
    index = {p: i for i, p in enumerate(paths, 1)}

    def measured_one(p: str, *args: Any) -> LayerMeasurement:
        logger.info("measuring layer %d/%d: %s", index[p], len(paths), p)
        out = measure_layer(view_of(modules[p]).weight(), *args)
        bar.update()
        return out

    if batches is None:
        logger.info("measuring the weights of %d target layers (no calibration data)", len(paths))
        try:
            return {p: measured_one(p) for p in paths}
        finally:
            bar.close()
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
    try:
        for k, chunk in enumerate(chunks, 1):
            logger.info(
                "calibration pass %d/%d: gradients%s of layers %d-%d of %d on %d batches",
                k, len(chunks), " and inputs" if inputs else "", index[chunk[0]], index[chunk[-1]],
                len(paths), len(batches),
            )  # fmt: skip
            stats = gather(
                model, {p: modules[p] for p in chunk}, needs, batches, loss_fn, progress=progress
            )
            for p in chunk:
                data = stats[p]
                covariance = data.covariance(centered=True) if inputs else None
                measured[p] = measured_one(p, data.grads, covariance)
    finally:
        bar.close()
    return {p: measured[p] for p in paths}
