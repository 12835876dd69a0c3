"""Calibration statistics for data-aware initialisers, gathered with bounded memory.

    grad          G = (1/N) sum_n dL_n/dW0               (out, in) per target layer   (LoRA-GA, LoRA-One)
                  (accumulated in float32, or float64 for a float64 model)
    grads         G_n = dL_n/dW0 for each batch n        kept on the CPU              (inits that need the spread)
    inputs        sum_t x_t x_t^T, sum_t x_t, T          (in, in), (in,), rows         (EVA, CorDA)

- **Gradients** are the full-weight gradients at W0 (the model as it is, before any adapter), accumulated by
  autograd into the target weights only. The targets are split into groups whose gradient storage fits in
  `max_grad_bytes`, and each group gets its own pass over the batches: memory stays bounded (one layer at a time
  in the limit) at the cost of repeated passes. The weights' `requires_grad` flags and any `.grad` the user had
  are restored afterwards.
- **Inputs** are summed in float64 by forward hooks. Layers that receive the same input tensor (Q, K and V; gate
  and up) share one accumulator. Rows where a batch's `attention_mask` is 0 (padding) are left out.
- `loss_fn(model, batch)` returns the scalar loss (the signature `lx.train.fit` uses); without one, a batch that is
  a mapping is run as `model(**batch).loss` (transformers models with labels), and input statistics only need the
  forward pass, so `model(**batch)` or `model(batch)` does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..bases import view_of
from .registry import LayerData

__all__ = ["default_loss", "gather"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor]
DEFAULT_MAX_GRAD_BYTES = 2 * 1024**3


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """`model(**batch).loss` for a mapping batch (a transformers model given labels).

    Raises:
        ValueError: the batch is not a mapping or the output has no loss; pass `loss_fn` then.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"calibration batches are {type(batch).__name__}s, not mappings: pass loss_fn(model, batch) -> "
            "scalar loss"
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError(
            "the model's output has no .loss for a calibration batch (add labels to the batches, or pass "
            "loss_fn(model, batch) -> scalar loss)"
        )
    return loss


def _forward(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> None:
    if loss_fn is not None:
        loss_fn(model, batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None if enabled else True)


def _mask_of(batch: Any) -> Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, Tensor) else None


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """(rows, in): x's rows, padding rows dropped where the mask's shape matches x's leading axes."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _groups(weights: Mapping[str, Tensor], budget: int) -> list[list[str]]:
    """Consecutive groups of layers whose float32 gradients fit in `budget` bytes (at least one layer each)."""
    groups: list[list[str]] = []
    used = budget + 1
    for path, W in weights.items():
        size = W.numel() * max(W.element_size(), 4)
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(path)
        used += size
    return groups


@contextlib.contextmanager
def _grad_only_on(params: list[nn.Parameter]) -> Iterator[None]:
    """Within the block exactly `params` require gradients; every flag and `.grad` is restored after."""
    model_flags = [(p, p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        yield
    finally:
        for p, flag, grad in model_flags:
            p.requires_grad_(flag)
            p.grad = grad


def _gather_grads(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: list[Any],
    loss_fn: LossFn,
    keep_each: bool,
    max_grad_bytes: int,
    progress: bool,
) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    params = {path: m.weight for path, m in modules.items()}
    groups = _groups(params, max_grad_bytes)
    mean: dict[str, Tensor] = {}
    each: dict[str, list[Tensor]] = {path: [] for path in params} if keep_each else {}
    bar = _progress(len(groups) * len(batches), "calibration gradients", progress)
    try:
        for group in groups:
            group_params = [params[p] for p in group]
            chosen = {id(p) for p in group_params}
            # everything else is frozen for this pass: no gradient is computed or accumulated there
            frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
            for p in frozen:
                p.requires_grad_(False)
            try:
                with _grad_only_on(group_params), torch.enable_grad():
                    sums = {p: torch.zeros_like(params[p], dtype=_acc(params[p])) for p in group}
                    for batch in batches:
                        loss = loss_fn(model, batch)
                        if not isinstance(loss, Tensor) or loss.ndim != 0:
                            raise ValueError("loss_fn must return a scalar tensor")
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"calibration loss is {loss.item()}")
                        loss.backward()
                        for p in group:
                            g = params[p].grad
                            if g is None:
                                raise ValueError(
                                    f"calibration: the loss does not depend on {p!r}, so its gradient "
                                    "is undefined"
                                )
                            sums[p] += g.to(sums[p].dtype)
                            if keep_each:
                                each[p].append(_oriented(modules[p], g.to(sums[p].dtype)).cpu())
                            params[p].grad = None
                        bar.update(1)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            for p in group:
                mean[p] = _oriented(modules[p], sums.pop(p) / len(batches))
    finally:
        bar.close()
    return mean, each


def _acc(weight: Tensor) -> torch.dtype:
    """The accumulation dtype of a weight's gradient: float32 at least (bfloat16 / float16 weights), float64 for
    a float64 model."""
    return torch.promote_types(weight.dtype, torch.float32)


def _oriented(module: nn.Module, grad: Tensor) -> Tensor:
    """A tensor shaped like the module's stored weight, in the (out, in) orientation of `BaseView.weight()`."""
    view = view_of(module)
    stored = module.weight
    return grad if view.weight() is stored else grad.T


def _gather_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: list[Any],
    loss_fn: LossFn | None,
    progress: bool,
) -> dict[str, tuple[Tensor, Tensor, int]]:
    shared: dict[
        int, list[Any]
    ] = {}  # id(input tensor) -> [second moment, sum, rows] within one batch
    stats: dict[str, list[Any]] = {}
    mask: list[Tensor | None] = [None]

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            key = id(x)
            if key in shared and shared[key][3] is x:
                entry = shared[key]
            else:
                rows = _rows(x.detach(), mask[0]).to(torch.float64)  # (rows, in)
                entry = [rows.T @ rows, rows.sum(0), rows.shape[0], x]
                shared[key] = entry
            acc = stats.get(path)
            if acc is None:
                stats[path] = [entry[0].clone(), entry[1].clone(), entry[2]]
            else:
                acc[0] += entry[0]
                acc[1] += entry[1]
                acc[2] += entry[2]

        return record

    handles = [m.register_forward_pre_hook(hook(p)) for p, m in modules.items()]
    bar = _progress(len(batches), "calibration inputs", progress)
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = _mask_of(batch)
                shared.clear()
                _forward(model, batch, loss_fn)
                bar.update(1)
    finally:
        shared.clear()
        for h in handles:
            h.remove()
        bar.close()
    missing = sorted(set(modules) - set(stats))
    if missing:
        raise ValueError(f"calibration: the batches never reached layer(s) {missing[:5]}")
    return {p: (s[0], s[1], s[2]) for p, s in stats.items()}


def gather(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    needs: Iterable[str],
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    max_grad_bytes: int = DEFAULT_MAX_GRAD_BYTES,
    progress: bool = True,
) -> dict[str, LayerData]:
    """Calibration statistics (see the module docstring) of `modules` for the initialisers that need them.

    The model is left as it was: its mode (train/eval), its parameters' `requires_grad` and `.grad`.
    Dropout is off during the passes (eval mode), so the statistics are those of the deterministic model.

    Args:
        model: the model (not yet adapted at these layers).
        modules: `{path: base layer}` of the target layers (nn.Linear or transformers' Conv1D).
        needs: a subset of {"grad", "grads", "inputs"}.
        batches: the calibration batches (a list or any iterable; it is read once into a list).
        loss_fn: `(model, batch) -> scalar loss`; see the module docstring for the default.
        max_grad_bytes: bound on the gradient storage of one pass (float32 bytes); more layers take more passes.
        progress: show a tqdm bar (off when stderr is not a terminal).

    Returns:
        `{path: LayerData}` for every module.

    Raises:
        ValueError: no batches, a loss that is not a scalar, a layer the data never reaches or whose gradient is
            undefined. FloatingPointError: a non-finite calibration loss.
    """
    needs = set(needs)
    batches = list(batches)
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch")
    for path, m in modules.items():
        if not view_of(m).input_is_dense:
            raise ValueError(
                f"{path}: data-aware inits need a dense input (nn.Linear or Conv1D), not a "
                f"{type(m).__name__}"
            )
    was_training = model.training
    model.eval()
    try:
        grads: dict[str, Tensor] = {}
        each: dict[str, list[Tensor]] = {}
        if needs & {"grad", "grads"}:
            grads, each = _gather_grads(
                model,
                modules,
                batches,
                loss_fn or default_loss,
                "grads" in needs,
                max_grad_bytes,
                progress,
            )
        inputs = (
            _gather_inputs(model, modules, batches, loss_fn, progress) if "inputs" in needs else {}
        )
    finally:
        model.train(was_training)
    data = {}
    for path in modules:
        second, total, rows = inputs.get(path, (None, None, 0))
        data[path] = LayerData(
            grad=grads.get(path),
            grads=tuple(each.get(path, ())),
            second_moment=second,
            input_sum=total,
            rows=rows,
        )
    return data
