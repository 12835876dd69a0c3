"""Reports rendered from the store alone (issue 6): `write_report(dir)` writes `report.md` and `runs.csv`.

A *configuration* is everything but the learning rate and the seed (suite, problem and its options, method, init,
optimizer and its options, rank). For each one the report gives:
- **best of sweep**: the learning rate whose mean of the suite's primary metric over seeds is best, with the spread
  over those seeds (mean, standard deviation, n), the runs that failed at that rate, trainable parameters and the
  median wall time;
- **learning-rate sensitivity**: the mean of the primary metric at every learning rate of the sweep (a failed run
  makes its cell "failed (k)").
Nothing is typed in by hand: the same store gives the same files, byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..io.files import write_text_atomic
from .store import Run, Store

__all__ = ["PRIMARY", "render", "write_report"]

# suite -> (primary metric, "min" or "max")
PRIMARY: dict[str, tuple[str, str]] = {"sp": ("relative_error", "min")}

STORE_NAME = "results.sqlite"


def _config(run: Run) -> tuple[str, ...]:
    t = run.trial
    problem = t.problem + (
        f" {json.dumps(t.problem_options, sort_keys=True)}" if t.problem_options else ""
    )
    optimizer = t.optimizer + (
        f" {json.dumps(t.optimizer_options, sort_keys=True)}" if t.optimizer_options else ""
    )
    method = t.method + (
        f" {json.dumps(t.method_options, sort_keys=True)}" if t.method_options else ""
    )
    return (t.suite, problem, method, t.init or "-", optimizer, str(t.rank))


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(runs: list[Run]) -> tuple[str, str]:
    """The report (Markdown) and the CSV of every run, from stored runs only.

    Raises:
        ValueError: a suite without a primary metric in PRIMARY.
    """
    by_config: dict[tuple[str, ...], dict[float, list[Run]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in sorted(runs, key=lambda r: (_config(r), r.trial.lr, r.trial.seed)):
        by_config[_config(run)][run.trial.lr].append(run)
    suites = sorted({c[0] for c in by_config})
    parts = ["# Benchmark report", "", f"Rendered from {STORE_NAME}: {len(runs)} runs."]
    for suite in suites:
        if suite not in PRIMARY:
            raise ValueError(f"no primary metric for suite {suite!r}; known: {sorted(PRIMARY)}")
        metric, goal = PRIMARY[suite]
        configs = [c for c in by_config if c[0] == suite]
        lrs = sorted({lr for c in configs for lr in by_config[c]})
        best_rows, sens_rows = [], []
        for c in configs:
            means: dict[float, float] = {}
            cells = []
            for lr in lrs:
                group = by_config[c].get(lr, [])
                ok = [r.metrics.get(metric) for r in group if r.status == "ok"]
                ok = [x for x in ok if x is not None]
                failed = sum(r.status == "failed" for r in group)
                if ok and not failed:
                    means[lr] = statistics.fmean(ok)
                    cells.append(_fmt(means[lr]))
                else:
                    cells.append(f"failed ({failed})" if failed else "-")
            sens_rows.append([*c[1:], *cells])
            if not means:
                best_rows.append([*c[1:], "-", "all failed", "-", "-", "-"])
                continue
            best = (min if goal == "min" else max)(means, key=means.__getitem__)
            group = [r for r in by_config[c][best] if r.status == "ok"]
            values = [r.metrics[metric] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            params = group[0].trainable_parameters
            wall = statistics.median(r.wall_seconds for r in group)
            best_rows.append(
                [
                    *c[1:],
                    f"{best:g}",
                    f"{_fmt(means[best])} ± {_fmt(spread)} (n={len(values)})",
                    f"{params:,}" if params is not None else "-",
                    f"{wall:.2f}",
                    str(
                        sum(len(v) for v in by_config[c].values())
                        - sum(r.status == "ok" for v in by_config[c].values() for r in v)
                    ),
                ]
            )
        head = ["problem", "method", "init", "optimizer", "rank"]
        better = "lower" if goal == "min" else "higher"
        parts += [
            "",
            f"## Suite `{suite}`: {metric} ({better} is better)",
            "",
            "### Best of the learning-rate sweep (mean ± standard deviation over seeds)",
            "",
            _table(
                [*head, "best lr", metric, "trainable", "median wall s", "failed runs"], best_rows
            ),
            "",
            f"### Learning-rate sensitivity: mean {metric} over seeds",
            "",
            _table([*head, *(f"lr {lr:g}" for lr in lrs)], sens_rows),
        ]
    return "\n".join(parts) + "\n", _csv(runs)


def _csv(runs: list[Run]) -> str:
    metrics = sorted({k for r in runs for k in r.metrics})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["key", "suite", "problem", "problem_options", "method", "method_options", "init", "optimizer",
         "optimizer_options", "rank", "lr", "seed", "steps", "status", "error", *metrics, "wall_seconds",
         "peak_memory_bytes", "trainable_parameters"]
    )  # fmt: skip
    for r in sorted(runs, key=lambda r: (_config(r), r.trial.lr, r.trial.seed)):
        t = r.trial
        w.writerow(
            [t.key(), t.suite, t.problem, json.dumps(t.problem_options, sort_keys=True), t.method,
             json.dumps(t.method_options, sort_keys=True), t.init or "", t.optimizer,
             json.dumps(t.optimizer_options, sort_keys=True), t.rank, t.lr, t.seed, t.steps, r.status,
             r.error or "", *(_cell(r.metrics.get(m)) for m in metrics), f"{r.wall_seconds:.3f}",
             r.peak_memory_bytes if r.peak_memory_bytes is not None else "",
             r.trainable_parameters if r.trainable_parameters is not None else ""]
        )  # fmt: skip
    return buf.getvalue()


def _cell(x: Any) -> str:
    return "" if x is None else repr(x)


def write_report(directory: str | Path) -> Path:
    """Render `DIR/report.md` and `DIR/runs.csv` from `DIR/results.sqlite` (atomic writes); returns the report.

    Raises:
        FileNotFoundError: the directory has no store.
    """
    directory = Path(directory)
    path = directory / STORE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {STORE_NAME}: run `loraredux bench SUITE --out {directory}`"
        )
    runs = Store(path).runs(status=None)
    text, table = render(runs)
    write_text_atomic(directory / "runs.csv", table)
    write_text_atomic(directory / "report.md", text)
    return directory / "report.md"
