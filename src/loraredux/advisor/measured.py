"""Memory measured, to check the memory model against (`memory.py` re-exports both): the bytes a model's tensors
hold (`held_bytes`) and the peak that a function allocates above them (`measure_peak_bytes`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["held_bytes", "measure_peak_bytes"]


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at os.devnull inside (native code's own log lines go nowhere)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def held_bytes(model: nn.Module) -> int:
    """The bytes a model's tensors hold: its parameters and buffers, and each quantized layer's side state outside
    them (bitsandbytes' absmax scales, nested scales and code tables; int8 row scales), each tensor counted once."""
    from ..quant import backend_of

    seen: set[int] = set()
    total = 0

    def add(value: Any, depth: int = 0) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            if value.device.type != "meta" and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
        elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
            for item in vars(
                value
            ).values():  # a quantization state object (scales, code, nested state)
                add(item, depth + 1)

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for module in model.modules():
        backend = backend_of(module)
        if backend is not None:
            for value in backend.stored(module).extra.values():
                add(value)
    return total


def measure_peak_bytes(fn: Callable[[], Any], device: str | torch.device | None = None) -> int:
    """The peak memory allocated while `fn()` runs, above what was allocated when it started, in bytes.

    On CUDA, `torch.cuda.max_memory_allocated` after resetting the peak (all of the device's allocations, by the
    caching allocator's block sizes). On the CPU, PyTorch's profiler's memory events (`profile_memory=True`): the
    highest running sum of the allocations and frees made while `fn` runs, in time order (frees of tensors made
    before `fn` started are not reported to the profiler, so they never lower the figure).

    Args:
        fn: called once, with no arguments; its result is dropped.
        device: "cpu", "cuda" or "cuda:N" (a str or `torch.device`); default the current CUDA device when CUDA
            is available, else the CPU.

    Raises:
        ValueError: another device type, or CUDA without a CUDA device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is CUDA but torch.cuda.is_available() is False")
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    if device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # Kineto writes a "profiler_start" line to fd 2
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() in cpu
    ]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak
