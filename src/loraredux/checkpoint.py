"""Training checkpoints: trainable tensors, optimizer and scheduler state and every RNG state, written atomically.

A checkpoint is a folder `checkpoint/` with `tensors.safetensors` (model, optimizer and RNG tensors) and `state.json`
(the rest). Only safetensors and JSON are written and read: nothing is pickled. A new checkpoint is built in a
temporary folder and renamed into place; the previous one survives a crash (as `checkpoint/`, or for the instant
between the two renames as `.checkpoint.old/`, which `load` also reads).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .core import check_tensors
from .verbs import adapter_state_dict, adapters

__all__ = ["load", "rng_state", "save", "set_rng_state"]

logger = logging.getLogger(__name__)
_CHECKPOINT, _OLD = "checkpoint", ".checkpoint.old"
_TENSORS, _STATE, _FORMAT = "tensors.safetensors", "state.json", 1


def _json_safe(value: Any, where: str) -> Any:
    """`value` as JSON (tuples become lists), or a TypeError naming where the unserialisable value is."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_safe(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(
        f"{where}: cannot checkpoint a {type(value).__name__} (only tensors and numbers)"
    )


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer `state_dict` as (tensors named `optimizer.<param index>.<key>`, the JSON rest)."""
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for index, values in sd["state"].items():
        state[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                state[str(index)][key] = _json_safe(value, f"optimizer state {index}.{key}")
    groups = [_json_safe(g, f"optimizer param group {i}") for i, g in enumerate(sd["param_groups"])]
    return tensors, {"state": state, "param_groups": groups}


def _unflatten_optimizer(
    tensors: dict[str, Tensor], plain: dict[str, Any], current: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of `_flatten_optimizer`; tuples are restored where the live optimizer has them (e.g. betas)."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    if len(plain["param_groups"]) != len(current["param_groups"]):
        raise ValueError(
            f"checkpoint has {len(plain['param_groups'])} optimizer parameter groups, "
            f"the optimizer has {len(current['param_groups'])}"
        )
    groups = [
        {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in saved.items()}
        for saved, now in zip(plain["param_groups"], current["param_groups"], strict=True)
    ]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG state a training step may draw from: (uint8 tensors, JSON)."""
    import numpy as np

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, {"python": [version, list(internal), gauss], "numpy": numpy_state}


def set_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["rng.torch"])
    cuda = [
        tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """What of the model a checkpoint holds: the trainable parameters and the adapters' state (buffers too)."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return state | adapter_state_dict(model)


def save(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    history: dict[str, Any],
    step: int,
) -> Path:
    """Write `root/checkpoint/` atomically: a complete temporary folder, then renames.

    Until the new folder is in place the previous checkpoint stays on disk (as `checkpoint/`, or for the instant
    between the two renames as `.checkpoint.old/`, which `fit(resume=True)` also reads).
    """
    from safetensors.torch import save_file

    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_plain = rng_state()
    tensors = {f"model.{k}": v for k, v in _model_state(model).items()} | opt_tensors | rng_tensors
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    state = {
        "format": _FORMAT,
        "step": step,
        "config": _json_safe(config, "config"),
        "history": _json_safe(history, "history"),
        "optimizer": opt_plain,
        "scheduler": _json_safe(scheduler.state_dict(), "scheduler"),
        "rng": rng_plain,
    }
    root.mkdir(parents=True, exist_ok=True)
    final, old = root / _CHECKPOINT, root / _OLD
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".checkpoint.tmp-"))
    try:
        save_file(tensors, str(tmp / _TENSORS))
        (tmp / _STATE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # a stale copy: `final` is the good one
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint at step %d written to %s", step, final)
    return final


def load(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    must_match: Sequence[str],
) -> dict[str, Any]:
    """Restore what `save` wrote and return the saved history; everything is checked before the model is touched.

    Raises:
        FileNotFoundError: no checkpoint in `root`.
        ValueError: another format, a config that differs in a `must_match` field, or tensors that do not fit.
    """
    from safetensors.torch import load_file

    path = next((p for p in (root / _CHECKPOINT, root / _OLD) if (p / _STATE).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"resume=True but there is no checkpoint in {root}")
    state = json.loads((path / _STATE).read_text())
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {_FORMAT}")
    differ = [
        f"{k}: checkpoint {state['config'].get(k)!r}, given {config.get(k)!r}"
        for k in must_match
        if state["config"].get(k) != config.get(k)
    ]
    if differ:
        raise ValueError(f"{path} was written with another config ({'; '.join(differ)})")
    tensors = load_file(str(path / _TENSORS))
    part = {
        p: {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(p + ".")}
        for p in ("model", "optimizer", "rng")
    }
    own = _model_state(model)
    try:
        weights = check_tensors(part["model"], own)
    except ValueError as err:
        raise ValueError(f"{path} does not fit this model: {err}") from err
    opt_tensors = {f"optimizer.{k}": v for k, v in part["optimizer"].items()}
    sd = _unflatten_optimizer(opt_tensors, state["optimizer"], optimizer.state_dict())
    optimizer.load_state_dict(sd)
    scheduler.load_state_dict(state["scheduler"])
    layers = [a for _, a in adapters(model)]
    for adapter in layers:
        adapter.before_load_()
    with torch.no_grad():
        for key, value in weights.items():
            own[key].copy_(value)
    for adapter in layers:  # derived state, e.g. a base moved by the initial factors
        adapter.after_load_()
    set_rng_state({f"rng.{k}": v for k, v in part["rng"].items()}, state["rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["history"]
