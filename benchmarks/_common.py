"""Helpers the benchmark scripts share: interleaved timing, robust summaries, peak-RSS probes, machine facts.

Timing: every variant is timed in the same process, round-robin (A B C, B C A, C A B, ...) after a warm-up, so slow
drifts of the machine fall on all variants alike and no variant always runs first. Each timed call runs with the
garbage collector off (as `timeit` does); a collection happens between calls, outside the clock. The machine may be
shared with other processes, and on a 2-core machine one busy neighbour slows a 2-thread PyTorch run several-fold.
So before each round we wait (boundedly) until other processes leave the CPU alone, we record the CPU time other
processes used during every call (/proc/stat minus /proc/self/stat), and a round counts as clean only if none of
its calls was disturbed. Statistics are taken over the clean rounds, which are matched across variants; all rounds
are kept in the JSON. We report medians, quartiles and ratios of medians.

Memory: on CPU PyTorch allocates through `malloc`, which `tracemalloc` does not see, so we measure the process's
resident set size (RSS). Linux keeps the peak RSS (`VmHWM` in /proc/self/status) and lets a process reset it by
writing "5" to /proc/self/clear_refs; we reset it right before the measured work and read it right after, and
subtract the RSS before the work. Where that reset is unavailable we fall back to `ru_maxrss`, which is only
meaningful in a fresh process whose earlier peak is below the measured one (each variant runs in its own
subprocess for that reason).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Rounds",
    "foreign_cpu_seconds",
    "format_table",
    "interleaved_times",
    "machine_info",
    "malloc_trim",
    "peak_rss_window",
    "rss_bytes",
    "summarise",
    "wait_for_quiet",
]

MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- timing

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process, all threads) or None off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = (
        fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    )  # user nice system irq softirq steal
    return busy, int(own[11]) + int(own[12])  # utime + stime


def foreign_cpu_seconds(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    """CPU time that other processes used between two `_cpu_jiffies()` samples (0.0 off Linux)."""
    if before is None or after is None:
        return 0.0
    return max(0, (after[0] - before[0]) - (after[1] - before[1])) / _TICK


def wait_for_quiet(max_wait: float, window: float = 0.25, threshold: float = 0.02) -> float:
    """Sleep until other processes used at most `threshold` CPU-seconds in a `window`; give up after `max_wait`.

    Returns the seconds waited. The machine these benchmarks run on may be shared: another process on one of
    two cores slows a two-thread PyTorch run several-fold (its OpenMP threads wait for each other), so a timed
    round starts only when the machine is quiet.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        a = _cpu_jiffies()
        if a is None:
            break
        time.sleep(window)
        if foreign_cpu_seconds(a, _cpu_jiffies()) <= threshold:
            break
    return time.perf_counter() - t0


@contextlib.contextmanager
def _gc_off() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Rounds:
    """Interleaved timings: per round, each variant's seconds and the CPU other processes used meanwhile."""

    names: list[str]
    seconds: dict[str, list[float]] = field(default_factory=dict)
    foreign_cpu: dict[str, list[float]] = field(default_factory=dict)
    clean: list[bool] = field(default_factory=list)
    waited_s: float = 0.0

    @property
    def n_clean(self) -> int:
        return sum(self.clean)

    def select(self, clean_only: bool) -> dict[str, list[float]]:
        """Each variant's seconds over the clean rounds (matched across variants), or over all rounds."""
        keep = [i for i, c in enumerate(self.clean) if c or not clean_only]
        return {n: [self.seconds[n][i] for i in keep] for n in self.names}

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "seconds": self.seconds,
            "foreign_cpu_seconds": self.foreign_cpu,
            "clean": self.clean,
            "waited_s": self.waited_s,
        }


def _is_clean(seconds: float, foreign: float) -> bool:
    # a jiffy or two of kernel threads is noise; a neighbour's busy thread is not
    return foreign <= 0.02 + 0.02 * seconds


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    *,
    max_rounds: int | None = None,
    max_wait: float = 0.0,
    deadline: float | None = None,
    min_rounds: int = 5,
) -> Rounds:
    """Time each function round-robin with a rotating start, until `repeats` clean rounds.

    A round is clean when no other process used the CPU noticeably during any of its calls. Rounds go on until
    `repeats` of them are clean, or `max_rounds` (default 2 x repeats) have run, or `deadline` (a
    `time.perf_counter()` value) has passed and at least `min_rounds` have run. Before each round we wait up to
    `max_wait` seconds (never past the deadline) for the machine to be quiet.

    Args:
        fns: `{name: zero-argument callable}`; each call is one unit of work (a training step, a forward).
        repeats: clean rounds wanted.
        warmup: untimed rounds first.

    Returns:
        A `Rounds` with every call's seconds and whether its round was clean.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    out = Rounds(names, {n: [] for n in names}, {n: [] for n in names})
    limit = max_rounds if max_rounds is not None else 2 * repeats
    # Park the long-lived objects (models, modules, imported libraries) outside the collector's reach, so the
    # collection between calls takes milliseconds instead of a quarter second.
    gc.collect()
    gc.freeze()
    try:
        _rounds(fns, names, out, repeats, limit, max_wait, deadline, min_rounds)
    finally:
        gc.unfreeze()
    return out


def _rounds(
    fns: Mapping[str, Callable[[], Any]],
    names: list[str],
    out: Rounds,
    repeats: int,
    limit: int,
    max_wait: float,
    deadline: float | None,
    min_rounds: int,
) -> None:
    i = 0
    while out.n_clean < repeats and i < limit:
        if i >= min_rounds and deadline is not None and time.perf_counter() > deadline:
            break
        wait = max_wait if deadline is None else min(max_wait, deadline - time.perf_counter())
        # after a quiet round go on at once; otherwise wait for the neighbours first
        if wait > 0 and not (out.clean and out.clean[-1]):
            out.waited_s += wait_for_quiet(wait)
        k = i % len(names)
        clean = True
        for name in names[k:] + names[:k]:
            gc.collect()
            with _gc_off():
                a = _cpu_jiffies()
                t0 = time.perf_counter()
                fns[name]()
                dt = time.perf_counter() - t0
                foreign = foreign_cpu_seconds(a, _cpu_jiffies())
            out.seconds[name].append(dt)
            out.foreign_cpu[name].append(foreign)
            clean = clean and _is_clean(dt, foreign)
        out.clean.append(clean)
        i += 1


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sequence."""
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarise(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, IQR, min, max and count of a sample."""
    s = sorted(xs)
    q1, q3 = _quantile(s, 0.25), _quantile(s, 0.75)
    return {
        "median": statistics.median(s),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": s[0],
        "max": s[-1],
        "n": len(s),
    }


# ----------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    """The current resident set size of this process."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # not Linux: psutil knows the platform's way

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _peak_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def malloc_trim() -> None:
    """Collect garbage and give free heap pages back to the OS (glibc), so RSS reflects live memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_window(fn: Callable[[], Any], baseline: int | None = None) -> dict[str, Any]:
    """Run `fn` once and return its peak RSS above `baseline` (default: the RSS just before the call).

    Returns:
        `{"peak_bytes": peak RSS during the call minus the baseline, "after_bytes": RSS after the call minus the
        baseline, "method": "VmHWM reset" or "ru_maxrss (fresh process)"}`.
    """
    malloc_trim()
    start = rss_bytes() if baseline is None else baseline
    method = "VmHWM reset" if _reset_peak() else "ru_maxrss (fresh process)"
    fn()
    peak = max(_peak_bytes(), rss_bytes())
    return {"peak_bytes": peak - start, "after_bytes": rss_bytes() - start, "method": method}


# ----------------------------------------------------------------------------------------------- reporting


def _cpu_model() -> str:
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def machine_info(packages: Sequence[str] = ("torch", "transformers", "peft")) -> dict[str, Any]:
    """What the numbers were measured on: CPU model, core count, Python and package versions."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in packages:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text (and Markdown) table: `| a | b |` rows under a header and separator."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
