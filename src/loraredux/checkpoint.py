"""Training checkpoints: trainable tensors, optimizer and scheduler state and every RNG state, written atomically.

A checkpoint is a folder `checkpoint/` with `tensors.safetensors` (model, optimizer and RNG tensors) and `state.json`
(the rest). Only safetensors and JSON are written and read: nothing is pickled.

A new checkpoint is built in a temporary folder `.checkpoint.tmp-*` (each file and the folder fsynced), then the
previous one is renamed aside to `.checkpoint.old/`, the new one renamed into place (the root fsynced after each
rename), and the previous one discarded (its `state.json` first, so a half-deleted folder never looks like a
checkpoint). A process killed at any point leaves a loadable checkpoint: `checkpoint/` (the new one or the
previous), or for the instant between the two renames `.checkpoint.old/` (the previous), which `find` and `load`
also read. What a killed save leaves behind (temporary folders, a stale `.checkpoint.old/`) is removed by the next
`save` and by `load`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .core import check_tensors
from .io.atomic import fsync, usual_permissions
from .state import adapter_state_dict, load_adapter_state_dict

__all__ = [
    "Found",
    "check_space",
    "check_writable",
    "clean",
    "estimate_bytes",
    "find",
    "load",
    "rng_state",
    "save",
    "set_rng_state",
]

logger = logging.getLogger(__name__)
_CHECKPOINT, _OLD, _TMP = "checkpoint", ".checkpoint.old", ".checkpoint.tmp-"
_TENSORS, _STATE, _FORMAT = "tensors.safetensors", "state.json", 1
_SLACK = 1 << 20  # JSON, RNG states and file headers on top of the tensors, in bytes


def _reached(point: str) -> None:
    """Called at each point of `save` between its writes and renames; a no-op. The kill tests replace it with a
    function that kills the process there, to check that every point leaves a loadable checkpoint."""


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


@dataclass(frozen=True)
class Found:
    """A checkpoint on disk.

    Attributes:
        path: its folder (`root/checkpoint`, or `root/.checkpoint.old` after a save was killed between renames).
        step: the optimizer steps it holds.
        config: the training config it was written with (`TrainConfig` as a dict, plus fit's `signature`).
    """

    path: Path
    step: int
    config: dict[str, Any]


def _read_state(path: Path) -> dict[str, Any] | None:
    """The state.json of the checkpoint folder `path`, or None where it has none (or an unreadable one)."""
    try:
        state = json.loads((path / _STATE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not (path / _TENSORS).is_file():
        return None
    return state


def find(root: str | Path) -> Found | None:
    """The checkpoint `load` would read from `root`, or None where there is none.

    Args:
        root: the checkpoint_dir given to `fit`.
    """
    root = Path(root)
    for path in (root / _CHECKPOINT, root / _OLD):
        state = _read_state(path)
        if state is not None:
            return Found(path, int(state.get("step", 0)), dict(state.get("config") or {}))
    return None


def _discard(path: Path) -> None:
    """Remove a checkpoint folder, its state.json first: a half-removed folder is never taken for a checkpoint."""
    (path / _STATE).unlink(missing_ok=True)
    _reached("discarding-old" if path.name == _OLD else "discarding-tmp")
    shutil.rmtree(path, ignore_errors=True)


def clean(root: str | Path) -> list[Path]:
    """Remove what a killed `save` left in `root`: temporary folders, and `.checkpoint.old/` where `checkpoint/`
    is complete. Returns what was removed. Only for one writer per root (a second one's folder in progress would
    be removed too)."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir() if p.name.startswith(_TMP) and p.is_dir()]
    if (root / _OLD).is_dir() and _read_state(root / _CHECKPOINT) is not None:
        removed.append(root / _OLD)
    for path in removed:
        _discard(path)
        logger.info("removed %s, left by an interrupted checkpoint write", path)
    return removed


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _layout(t: Tensor) -> list[int] | None:
    """The strides of a dense tensor stored in another order than row-major (a transpose, a permutation), None
    for a row-major or an overlapping one (see `_restored`)."""
    if t.is_contiguous():
        return None
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride != expected:
            return None
        expected *= size
    return list(t.stride())


def _restored(t: Tensor, strides: list[int] | None) -> Tensor:
    """A loaded tensor in a fresh allocation with the layout it was saved from.

    Both matter for an exact resume on CPU: BLAS rounds differently on a transposed operand (AltLoRA's B
    momentum is a transpose, safetensors stores row-major) and on one that is not 64-byte aligned (torch's
    allocator aligns; tensors read from a safetensors file sit at arbitrary offsets of its buffer), so a state
    tensor restored either way would change the last bits of every later step."""
    strides = strides or list(torch.empty(t.shape, device="meta").stride())
    return torch.empty_strided(tuple(t.shape), tuple(strides), dtype=t.dtype).copy_(t)


def estimate_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """About how many bytes a checkpoint of `model` and `optimizer` takes: the trainable tensors and adapter
    state, the optimizer state (before the first step, which creates it, two tensors per trainable parameter as
    AdamW keeps), and a margin for the JSON and the RNG states."""
    state = _model_state(model)
    opt = _nbytes(v for s in optimizer.state.values() for v in s.values())
    if not optimizer.state:
        opt = 2 * _nbytes(p for g in optimizer.param_groups for p in g["params"])
    return _nbytes(state.values()) + opt + _SLACK


def check_writable(root: str | Path) -> Path:
    """Create `root` (with its parents) and create and remove a file in it, or raise a clear error.

    Raises:
        OSError: `root` or a parent is a file, or a file cannot be created in it (no permission, read-only).
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), root)
        raise OSError(
            err.errno,
            f"checkpoint folder {root} cannot be created: {blocker} is a file, not a directory",
        ) from None
    except OSError as err:
        raise OSError(
            err.errno, f"checkpoint folder {root} cannot be created: {err.strerror or err}"
        ) from None
    try:
        with tempfile.TemporaryFile(dir=root, prefix=".checkpoint.probe-"):
            pass
    except OSError as err:
        raise OSError(
            err.errno,
            f"checkpoint folder {root} is not writable ({err.strerror or err}); "
            "give a folder this process may write",
        ) from None
    return root


def check_space(root: str | Path, need: int) -> None:
    """Raise a clear error where the disk of `root` has fewer than `need` bytes free (a new checkpoint is written
    while the previous one is still there, so the free space must hold a whole one).

    Raises:
        OSError: ENOSPC, with the bytes needed and free.
    """
    free = shutil.disk_usage(root).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"not enough room for a checkpoint in {root}: about {need / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free; free some space or give another checkpoint folder",
        )


def save(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    history: dict[str, Any],
    step: int,
) -> Path:
    """Write `root/checkpoint/` atomically (see the module docstring) and return its path.

    Leftovers of an earlier killed save are removed first. On an error nothing partial is left and the previous
    checkpoint stays loadable (as `checkpoint/`).

    Raises:
        OSError: the checkpoint could not be written (e.g. the disk is full); the message names the step, the
            folder and the checkpoint that is kept, and the errno is the cause's.
    """
    from safetensors.torch import save_file

    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_plain = rng_state()
    tensors = {f"model.{k}": v for k, v in _model_state(model).items()} | opt_tensors | rng_tensors
    layouts = {k: s for k, v in tensors.items() if (s := _layout(v)) is not None}
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    state = {
        "format": _FORMAT,
        "step": step,
        "layouts": layouts,
        "config": _json_safe(config, "config"),
        "history": _json_safe(history, "history"),
        "optimizer": opt_plain,
        "scheduler": _json_safe(scheduler.state_dict(), "scheduler"),
        "rng": rng_plain,
    }
    text = json.dumps(state)  # a value JSON cannot hold fails here, before anything is written
    final, old = root / _CHECKPOINT, root / _OLD
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean(root)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=_TMP))
        _reached("tmp")
        save_file(tensors, str(tmp / _TENSORS))
        fsync(tmp / _TENSORS)
        _reached("tensors")
        with open(tmp / _STATE, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkdtemp makes 0700 and safetensors 0600: a checkpoint gets the modes of anything this process makes
        usual_permissions(tmp)
        fsync(tmp)
        _reached("state")
        if final.exists():
            if old.exists():
                _discard(old)  # stale: `final` is the good one
            os.replace(final, old)
            fsync(root)
            _reached("aside")
        os.replace(tmp, final)
        tmp = None
        fsync(root)
        _reached("placed")
        if (
            old.exists()
        ):  # the new checkpoint is in place: a failure here only leaves what `clean` removes
            with contextlib.suppress(OSError):
                _discard(old)
        _reached("done")
    except OSError as err:
        kept = _restore(root)
        where = (
            f"the checkpoint of step {kept.step} is kept in {kept.path}"
            if kept
            else "no checkpoint is kept"
        )
        message = f"could not write the checkpoint of step {step} to {final} ({err}); {where}"
        raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            _restore(root)
    logger.info("checkpoint at step %d written to %s", step, final)
    return final


def _restore(root: Path) -> Found | None:
    """After a failed save: the previous checkpoint back in place where only `.checkpoint.old/` holds it."""
    final, old = root / _CHECKPOINT, root / _OLD
    if not final.exists() and _read_state(old) is not None:
        with contextlib.suppress(OSError):  # else `load` reads `.checkpoint.old/`
            os.replace(old, final)
            fsync(root)
    return find(root)


def _differences(saved: Any, given: Any, where: str) -> list[str]:
    """Where two JSON values differ, key by key inside dicts (tuples and lists compare alike)."""
    if isinstance(saved, dict) and isinstance(given, dict):
        return [
            d
            for k in sorted(set(saved) | set(given))
            for d in _differences(saved.get(k), given.get(k), f"{where}.{k}")
        ]
    if _json_safe(saved, where) != _json_safe(given, where):
        return [f"{where}: checkpoint {saved!r}, given {given!r}"]
    return []


def load(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    must_match: Sequence[str],
) -> dict[str, Any]:
    """Restore what `save` wrote and return the saved history; everything is checked before the model is touched.

    Leftovers of a killed save are removed first (`clean`).

    Raises:
        FileNotFoundError: no checkpoint in `root`.
        ValueError: another format, a config that differs in a `must_match` field (a dict field, such as fit's
            signature, is compared key by key and the differing keys are named), or tensors that do not fit.
    """
    from safetensors.torch import load_file

    root = Path(root)
    clean(root)
    found = find(root)
    if found is None:
        raise FileNotFoundError(f"resume=True but there is no checkpoint in {root}")
    path = found.path
    state = json.loads((path / _STATE).read_text())
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, expected {_FORMAT}")
    differ = [d for k in must_match for d in _differences(state["config"].get(k), config.get(k), k)]
    if differ:
        raise ValueError(f"{path} was written with another config ({'; '.join(differ)})")
    layouts = state.get("layouts", {})
    tensors = {k: _restored(v, layouts.get(k)) for k, v in load_file(str(path / _TENSORS)).items()}
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
    # The adapters' state as one transaction (derived state such as a base moved by the initial factors is
    # checked and applied only once every layer has loaded, or nothing is); then the other trained tensors.
    adapter_keys = set(adapter_state_dict(model))
    try:
        load_adapter_state_dict(model, {k: v for k, v in weights.items() if k in adapter_keys})
    except ValueError as err:
        raise ValueError(f"{path} does not fit this model: {err}") from err
    with torch.no_grad():
        for key, value in weights.items():
            if key not in adapter_keys:
                own[key].copy_(value)
    set_rng_state({f"rng.{k}": v for k, v in part["rng"].items()}, state["rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["history"]
