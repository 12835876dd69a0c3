"""Trials on a quantized base (`Trial.base`): QLoRA, and the inits that move the base (QPiSSA, LoftQ).

A trial with base "nf4" ("fp4", "int8") trains its adapter on the task's model with its linear layers quantized by
`lx.quantize_`: "all-linear" (not the output head) but the modules trained in full (a new classification head),
QLoRA's format (Dettmers et al., arXiv 2305.14314): NF4 codes with double quantization, blocks of 64, computing in
the model's dtype (fp32 here), the codes transformers' `BitsAndBytesConfig(load_in_4bit=True, ...)` gives.

- An init that leaves the base alone (kaiming: QLoRA; gaussian; EVA) runs on the quantized model: quantize, then
  adapt, as `lx.quantize_` followed by `lx.adapt_`.
- An init that moves the base (PiSSA: QPiSSA, Meng et al., arXiv 2404.02948; LoftQ, Li et al., arXiv 2310.08659;
  MiLoRA, OLoRA, CorDA) runs on the dense weights, and the base it leaves (PiSSA's residual W0 - s B A, LoftQ's
  Q_T) is what gets quantized, once: the papers' definitions. The factors then go to a fresh adapter on the
  quantized base (`set_lora_form_`: methods with a free (A, B) pair). Run on an already quantized layer instead,
  an init sees deq(q(W0)) and its moved base is quantized a second time: PiSSA's residual error then adds to W0's
  own (on MiniLM's 37 layers at r = 16: 0.125 against QLoRA's 0.094 and 0.082 this way), and LoftQ, which
  `lx.adapt_` refuses on a quantized layer, would find nothing to correct.

Metric `init_error` = sqrt(sum_l ||W0_l - W'_l||_F^2) / sqrt(sum_l ||W0_l||_F^2) over the adapted layers when
training starts, W0 the dense weights before quantizing and W' the adapted layer's effective weight: what
quantization, less the init's correction, changed (`benchmarks/quant_init_error.py` measures the same on every
linear layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

import loraredux as lx

from ...targets import select
from ...tasks import Task, adapt_for_task

__all__ = ["adapt_on_base", "init_error", "quantize_base_"]


def quantize_base_(model: nn.Module, fmt: str, task: Task) -> list[str]:
    """Quantize the task's model to `fmt` in place (see the module docstring); returns the quantized paths."""
    keep = list(task.modules_to_save)
    lx.quantize_(model, fmt, "all-linear", exclude=keep or None)
    return [n for n, m in model.named_modules() if lx.quant.is_quantized(m)]


def _moves_base(config: Any) -> bool:
    name = getattr(config, "init", None)
    return isinstance(name, str) and name in lx.init.available() and lx.init.get(name).moves_base


def adapt_on_base(
    model: nn.Module,
    config: Any,
    task: Task,
    fmt: str,
    *,
    steps: int,
    targets: Any,
    calibration_batches: int,
) -> float:
    """Quantize the task's base to `fmt` and adapt it with `config` (`tasks.adapt_for_task`, the task's targets
    unless given), an init that moves the base computed on the dense weights (see the module docstring).

    Returns:
        `init_error` (see the module docstring) when training starts.

    Raises:
        ValueError: an init that moves the base with a method that has no free (A, B) pair to carry its factors.
    """
    paths = select(model, targets or task.default_targets)
    dense = {p: model.get_submodule(p).weight.detach().clone() for p in paths}  # (out, in) each W0
    options = {"steps": steps, "targets": targets, "calibration_batches": calibration_batches}
    if not _moves_base(config):
        quantize_base_(model, fmt, task)
        adapt_for_task(model, config, task, progress=False, **options)
        return init_error(model, dense)
    adapt_for_task(model, config, task, progress=False, **options)  # on the dense weights
    moved: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for path, adapter in lx.adapters(model):
        if not hasattr(adapter, "set_lora_form_"):
            raise ValueError(
                f"init {config.init!r} on a {fmt} base: {config.method} has no free (A, B) pair to carry the "
                "factors computed on the dense weights over to the quantized base"
            )
        A, B, _ = adapter.lora_form()
        moved[path] = (
            A.detach().clone(),
            B.detach().clone(),
            adapter.base_weight().detach().clone(),
        )
    lx.unadapt_(model)
    for path, (_, _, base) in moved.items():  # the moved base (W_res, Q_T) is what gets quantized
        layer = model.get_submodule(path)
        layer.weight = nn.Parameter(base.to(layer.weight.dtype), requires_grad=False)
    quantize_base_(model, fmt, task)
    plain = dataclasses.replace(config, init="kaiming", init_options={})
    adapt_for_task(model, plain, task, progress=False, **options)
    for path, adapter in lx.adapters(model):
        A, B, _ = moved[path]
        adapter.set_lora_form_(A, B)
    return init_error(model, dense)


@torch.no_grad()
def init_error(model: nn.Module, dense: dict[str, Tensor]) -> float:
    """sqrt(sum ||W0 - W'||_F^2) / sqrt(sum ||W0||_F^2) over the adapted layers, W0 from `dense` ({path: W0})."""
    err = norm = 0.0
    for path, adapter in lx.adapters(model):
        W0 = dense[path].double()
        err += float(torch.linalg.matrix_norm(W0 - adapter.effective_weight().double())) ** 2
        norm += float(torch.linalg.matrix_norm(W0)) ** 2
    return math.sqrt(err / norm) if norm > 0 else 0.0
