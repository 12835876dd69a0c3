"""Run a suite's trials into the store: skip what finished, record every run as it ends.

`run_trials(trials, store, execute)` calls `execute(trial) -> Outcome` for each trial whose key has no stored run
(a failed one is retried only with `retry_failed=True`), with torch seeded from the trial. It writes the run
(metrics, curves, wall time, peak memory, trainable parameters, library versions) in its own transaction before the
next starts. An arithmetic, runtime or value error inside a trial is stored as a failed run with its message (a
diverged learning rate is a result, not a crash) and the suite goes on; an interrupt (Ctrl-C) stops it, losing only
the run in flight, and the next call resumes there; so does a process killed at any moment (kill -9), since each
run is one SQLite transaction. A run that another process on the same store finished meanwhile is skipped, not
stored twice. A tqdm bar shows progress and the time left.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .store import AlreadyFinished, Run, Store
from .trial import Trial

logger = logging.getLogger(__name__)

__all__ = ["Outcome", "RunSummary", "library_versions", "run_trials"]


@dataclass(frozen=True)
class Outcome:
    """What a trial returns.

    Attributes:
        metrics: final metrics by name (finite numbers; None for a missing value).
        curves: metric name -> values over the run.
        trainable_parameters: the adapter's trainable parameters.
    """

    metrics: dict[str, float | None]
    curves: dict[str, list[float | None]] = field(default_factory=dict)
    trainable_parameters: int | None = None


@dataclass(frozen=True)
class RunSummary:
    """What `run_trials` did: runs skipped (already finished), finished now, and failed now."""

    skipped: int
    finished: int
    failed: int


def library_versions() -> dict[str, str]:
    """The versions of the libraries a result depends on (those installed)."""
    out = {}
    for name in ("loraredux", "torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


class _PeakMemory:
    """The peak memory of a block: CUDA's allocator peak where a GPU is in use, else the growth of the peak
    resident set (Linux: the kernel's VmHWM, reset before the block); None where neither can be measured."""

    def __enter__(self) -> _PeakMemory:
        self.cuda = torch.cuda.is_available()
        self.bytes: int | None = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        elif self.start is not None:
            peak = _status_kib("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self.start) * 1024


def run_trials(
    trials: Sequence[Trial],
    store: Store,
    execute: Callable[[Trial], Outcome],
    progress: bool = True,
    retry_failed: bool = False,
) -> RunSummary:
    """Run every trial without a finished run in `store`, recording each as it ends.

    Args:
        trials: the trials (`expand(spec)`); duplicates run once.
        store: where runs are kept (and what has finished is read from).
        execute: runs one trial; torch's RNG is seeded with `trial.seed` before the call.
        progress: show a tqdm bar with the time left.
        retry_failed: run again the trials whose stored run failed (by default a failed run is a result too,
            and is kept).

    Returns:
        How many were skipped, finished and failed.
    """
    stored = store.runs(status="ok" if retry_failed else None)
    done = {run.trial.key() for run in stored}
    todo = list({t.key(): t for t in trials if t.key() not in done}.values())
    skipped = len({t.key() for t in trials}) - len(todo)
    versions = library_versions()
    finished = failed = 0
    suites = sorted({t.suite for t in todo})
    # disable=None: no bar where stderr is not a terminal (a CI log), as train's
    off = True if not progress or not todo else None
    bar = tqdm(todo, desc=" + ".join(suites) or "bench", unit="run", disable=off)
    for trial in bar:
        bar.set_postfix_str(
            f"{trial.problem} {trial.method} {trial.optimizer} lr={trial.lr:g} seed={trial.seed}"
        )
        torch.manual_seed(trial.seed)
        t0 = time.perf_counter()
        error: str | None = None
        outcome = Outcome(metrics={})
        with _PeakMemory() as memory:
            try:
                outcome = execute(trial)
            except (ArithmeticError, RuntimeError, ValueError) as err:  # a run that failed is data
                error = f"{type(err).__name__}: {err}"
        run = Run(
            trial=trial,
            status="failed" if error else "ok",
            error=error,
            metrics=outcome.metrics,
            curves=outcome.curves,
            wall_seconds=time.perf_counter() - t0,
            versions=versions,
            peak_memory_bytes=memory.bytes,
            trainable_parameters=outcome.trainable_parameters,
        )
        try:
            store.record(run)
        except AlreadyFinished:  # another process on this store finished it meanwhile: keep its run
            skipped += 1
            continue
        finished += error is None
        failed += error is not None
        if off is None and not sys.stderr.isatty():  # a log has no bar: a line per run instead
            logger.info(
                "run %d/%d %s: %s", finished + failed, len(todo), trial.key()[:12], error or "ok"
            )
    return RunSummary(skipped=skipped, finished=finished, failed=failed)
