"""Optimizers for adapted models (Axis 2b-d): `create(name, model, lr, **options)`, `available()`.

Each returns a `torch.optim.Optimizer` over the model's trainable (adapter) parameters, usable in any loop and in
transformers' `Trainer` (`optimizers=(opt, None)`). The maths lives in `functional/` (one module per family);
factor pairs are explicit (`pairs.py`); `describe(name)` gives an optimizer's summary and options.

    opt = lx.optim.create("scaled_sgd", model, lr=1e-2, delta=1e-6)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .alternating import AlternatingLeastSquares, AltLoRA, _als, _altlora
from .bar import BAR, _bar
from .describe import Description, describe_factory
from .functional import lora_fa_gradient, riemannian_precondition
from .groups import CheckedAdamW
from .lora_fa import LoraFA
from .lora_pro import LoraPro, _lora_pro
from .pairs import Pair, find_pairs, split_model
from .refactor import BaLoRA, RefLoRA, RefLoRAS, _balora, _reflora, _reflora_s
from .rite import LoraRite, _lora_rite
from .scaled import DEFAULT_DELTA, ScaledAdamW, ScaledSGD

__all__ = [
    "BAR",
    "AltLoRA",
    "AlternatingLeastSquares",
    "BaLoRA",
    "CheckedAdamW",
    "Description",
    "LoraFA",
    "LoraPro",
    "LoraRite",
    "Pair",
    "RefLoRA",
    "RefLoRAS",
    "ScaledAdamW",
    "ScaledSGD",
    "available",
    "create",
    "describe",
    "find_pairs",
    "lora_fa_gradient",
    "riemannian_precondition",
]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter: adapt it first (lx.adapt_)"
        )
    return params


def _adamw(model: nn.Module, lr: float, **options: Any) -> torch.optim.Optimizer:
    """Plain AdamW over the trainable parameters (the reference; a non-finite gradient is an error)."""
    return CheckedAdamW(_trainable(model), lr=lr, **options)


def _loraplus(
    model: nn.Module, lr: float, ratio: float = 16.0, **options: Any
) -> torch.optim.Optimizer:
    """LoRA+ (Hayou, Ghosh, Yu, arXiv 2402.12354): AdamW with the B factors at lr * ratio.

    eta_B = lambda eta_A, lambda >> 1 (PEFT's example uses 16); A factors and other parameters at lr. Weight decay
    defaults to 0, as PEFT's `create_loraplus_optimizer` (unlike PEFT, 1-D parameters such as DoRA's magnitude stay
    at lr rather than joining B's group)."""
    if not ratio > 0:
        raise ValueError(f"loraplus: ratio must be > 0, got {ratio!r}")
    pairs, others = split_model(model, "loraplus")
    groups = [
        {"params": [p.A for p in pairs], "lr": lr},
        {"params": [p.B for p in pairs], "lr": lr * ratio},
    ]
    if others:
        groups.append({"params": others, "lr": lr})
    return CheckedAdamW(groups, lr=lr, **{"weight_decay": 0.0, **options})


def _scaled_sgd(model: nn.Module, lr: float, delta: float = DEFAULT_DELTA) -> torch.optim.Optimizer:
    """Riemannian-preconditioned SGD (Zhang & Pilanci, arXiv 2402.02347)."""
    pairs, others = split_model(model, "scaled_sgd")
    return ScaledSGD(pairs, others, lr=lr, delta=delta)


def _scaled_adamw(
    model: nn.Module, lr: float, delta: float = DEFAULT_DELTA, **adamw: Any
) -> torch.optim.Optimizer:
    """AdamW on Riemannian-preconditioned gradients (Zhang & Pilanci; PEFT's create_riemannian_optimizer)."""
    pairs, others = split_model(model, "scaled_adamw")
    return ScaledAdamW(pairs, others, lr=lr, delta=delta, **adamw)


def _lora_fa(
    model: nn.Module, lr: float, delta: float = 1e-8, project: bool = True, **adamw: Any
) -> torch.optim.Optimizer:
    """LoRA-FA (arXiv 2308.03303): every A frozen (requires_grad=False), B trained on its projected gradient."""
    pairs, others = split_model(model, "lora_fa")
    return LoraFA(pairs, others, lr=lr, delta=delta, project=project, **adamw)


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "als": _als,
    "altlora": _altlora,
    "adamw": _adamw,
    "bar": _bar,
    "balora": _balora,
    "lora_fa": _lora_fa,
    "lora_pro": _lora_pro,
    "lora_rite": _lora_rite,
    "loraplus": _loraplus,
    "reflora": _reflora,
    "reflora_s": _reflora_s,
    "scaled_adamw": _scaled_adamw,
    "scaled_sgd": _scaled_sgd,
}


def available() -> list[str]:
    """The optimizer names, sorted."""
    return sorted(_OPTIMIZERS)


def describe(name: str) -> Description:
    """What `name` offers: a one-line summary, its options with their defaults, and whether it passes other
    keywords on to its base optimizer (AdamW's betas, eps, weight_decay).

    Raises:
        ValueError: an unknown name.
    """
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {available()}")
    return describe_factory(_OPTIMIZERS[name])


def create(name: str, model: nn.Module, lr: float, **options: Any) -> torch.optim.Optimizer:
    """The optimizer `name` over the model's adapter parameters.

    Raises:
        ValueError: an unknown name (listing the available ones), lr <= 0, a model without trainable parameters or
            factor pairs where the optimizer needs them, a bad option.
    """
    try:
        make = _OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; available: {available()}") from None
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"optimizer {name!r}: lr must be a number > 0, got {lr!r}")
    try:
        return make(model, lr, **options)
    except TypeError as err:
        raise ValueError(f"optimizer {name!r}: {err}") from None
