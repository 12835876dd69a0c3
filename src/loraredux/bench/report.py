"""Reports rendered from the store alone: `write_report(dir)` writes `report.md` and `runs.csv`.

A *configuration* is everything but the learning rate and the seed (suite, problem and its options, method, init,
optimizer and its options, rank, and the base's format: dense, or quantized as QLoRA's nf4). For each one the report
gives (a suite with a quantized base gets a `base` column, "-" for the model as loaded):
- **best of sweep**: the learning rate whose mean of the suite's primary metric over seeds is best, with the spread
  over those seeds (mean, standard deviation, n), its cost (trainable parameters, the median wall time and the
  median growth of the peak memory over a run; and the median step time, adapter file size and, on a quantized
  base, initial weight error where the suite records them, `COSTS`) and the configuration's failed runs;
- **learning-rate sensitivity**: the mean of the primary metric at every learning rate of the sweep (a failed run
  makes its cell "failed (k)").
With matplotlib installed (`pip install loraredux[bench]`), three plots per suite go beside it and into the report:
the primary metric against the learning rate (mean over seeds, the spread as error bars), the suite's curve over
the run at each configuration's best learning rate (mean over seeds; the primary metric for `sp`, the training loss
for `classify` and `lm`), and the best-of-sweep metric against trainable parameters
and against wall time. Nothing is typed in by hand: the same store gives the same files, byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from ..io.files import write_text_atomic
from .store import Run, Store

__all__ = ["PRIMARY", "best_of_sweep", "plot_suite", "render", "sweep_means", "write_report"]


class Primary(NamedTuple):
    """How a suite is judged: its primary metric, whether lower ("min") or higher ("max") is better, whether it is
    plotted on a log scale, and the curve the curves plot shows (with its scale)."""

    metric: str
    goal: str
    log: bool
    curve: str
    curve_log: bool


PRIMARY: dict[str, Primary] = {
    "sp": Primary("relative_error", "min", True, "relative_error", True),
    "classify": Primary("accuracy", "max", False, "train_loss", False),
    "lm": Primary("perplexity", "min", True, "train_loss", False),
}

STORE_NAME = "results.sqlite"
# Cost metrics a suite may record, shown as extra best-of-sweep columns (median over seeds): name -> (column, factor);
# and, on a quantized base, the adapted layers' weight error against the dense model at the start (`init_error`).
COSTS: dict[str, tuple[str, float]] = {
    "step_seconds": ("median step ms", 1e3),
    "adapter_bytes": ("adapter KiB", 1 / 1024),
    "init_error": ("init error", 1.0),
}


def _median_cost(group: list[Run], name: str, factor: float) -> str:
    values = [v for r in group if (v := r.metrics.get(name)) is not None]
    return _fmt(statistics.median(values) * factor) if values else "-"


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
    return (t.suite, problem, method, t.init or "-", optimizer, str(t.rank), t.base or "-")


def _with_base(configs: list[tuple[str, ...]]) -> bool:
    """Whether any configuration has a quantized base (then the tables get a base column)."""
    return any(c[6] != "-" for c in configs)


def _cells(c: tuple[str, ...], base: bool) -> list[str]:
    """A configuration's table cells: problem, [base,] method, init, optimizer, rank."""
    return [c[1], *([c[6]] if base else []), *c[2:6]]


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _groups(runs: list[Run]) -> dict[tuple[str, ...], dict[float, list[Run]]]:
    by_config: dict[tuple[str, ...], dict[float, list[Run]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in sorted(runs, key=lambda r: (_config(r), r.trial.lr, r.trial.seed)):
        by_config[_config(run)][run.trial.lr].append(run)
    return by_config


def sweep_means(by_lr: dict[float, list[Run]], metric: str) -> dict[float, float]:
    """{lr: the metric's mean over seeds} for one configuration, at the learning rates where no run failed."""
    means = {}
    for lr, group in by_lr.items():
        ok = [x for r in group if r.status == "ok" and (x := r.metrics.get(metric)) is not None]
        if ok and not any(r.status == "failed" for r in group):
            means[lr] = statistics.fmean(ok)
    return means


def best_of_sweep(runs: list[Run]) -> dict[tuple[str, ...], tuple[float, float]]:
    """{configuration: (best lr, mean of the suite's primary metric over seeds there)}, as the report's
    best-of-sweep table has them; a configuration is (suite, problem, method, init, optimizer, rank, base) as
    strings ("-" for no init and for a dense base)."""
    best = {}
    for c, by_lr in _groups(runs).items():
        metric, goal = PRIMARY[c[0]][:2]
        means = sweep_means(by_lr, metric)
        if means:
            lr = (min if goal == "min" else max)(means, key=means.__getitem__)
            best[c] = (lr, means[lr])
    return best


def _ok_values(group: list[Run], metric: str) -> list[float] | None:
    """The metric over a group's seeds, or None if any run failed or lacks it."""
    values = [r.metrics.get(metric) for r in group]
    if any(r.status != "ok" for r in group) or any(v is None for v in values) or not values:
        return None
    return values


def plot_suite(runs: list[Run], suite: str, directory: Path) -> list[str]:
    """Write the suite's three plots into `directory` (atomic renames); returns their file names, or [] without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    metric, goal, log, curve_name, curve_log = PRIMARY[suite]
    by_config = {c: v for c, v in _groups(runs).items() if c[0] == suite}
    problems = sorted({c[1] for c in by_config})
    names = []

    def save(fig: Any, name: str) -> None:
        tmp = directory / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110, metadata={"Software": None})
        plt.close(fig)
        tmp.replace(directory / name)
        names.append(name)

    def label_of(c: tuple[str, ...]) -> str:
        parts = (c[6] if c[6] != "-" else "", c[2], c[3] if c[3] != "-" else "", c[4], f"r={c[5]}")
        return " ".join(x for x in parts if x)

    # One colour (and line style, past ten) per configuration, the same in every panel and figure.
    labels = sorted({label_of(c) for c in by_config})
    palette = matplotlib.colormaps["tab10"]
    style = {
        lab: {"color": palette(i % 10), "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}
        for i, lab in enumerate(labels)
    }
    marker = {lab: "osD^"[i // 10 % 4] for i, lab in enumerate(labels)}
    cols = min(3, len(problems))  # panels in rows of three
    rows = -(-len(problems) // cols)
    size = (5.0 * cols, 3.4 * rows + 0.25 * (len(labels) // 3 + 1))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    fig2, axes2 = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for a in [*axes.flat[len(problems) :], *axes2.flat[len(problems) :]]:
        a.set_axis_off()
    best_points = []
    for ax, ax2, problem in zip(axes.flat, axes2.flat, problems, strict=False):
        for c, per_lr in by_config.items():
            if c[1] != problem:
                continue
            label = label_of(c)
            stats = {
                lr: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                for lr, group in per_lr.items()
                if (v := _ok_values(group, metric)) is not None
            }
            if not stats:
                continue
            lrs = sorted(stats)
            ax.errorbar(lrs, [stats[x][0] for x in lrs], yerr=[stats[x][1] for x in lrs], marker="o",
                        markersize=3, capsize=3, label=label, **style[label])  # fmt: skip
            best = (min if goal == "min" else max)(stats, key=lambda x: stats[x][0])
            group = per_lr[best]
            curves = [r.curves.get(curve_name) for r in group]
            if all(isinstance(cv, list) and cv for cv in curves):
                n = min(len(cv) for cv in curves)
                mean = [statistics.fmean(cv[i] for cv in curves) for i in range(n)]
                ax2.plot(range(n), mean, label=label, **style[label])
            best_points.append((label, stats[best][0], group[0].trainable_parameters,
                                statistics.median(r.wall_seconds for r in group)))  # fmt: skip
        for a, xlabel, ylabel, scale in (
            (ax, "learning rate", metric, log),
            (ax2, "curve point (every `every` steps), at the best lr", curve_name, curve_log),
        ):
            a.set_title(problem, fontsize=9)
            if scale:
                a.set_yscale("log")
            a.set_xlabel(xlabel)
            a.set_ylabel(ylabel)
            a.grid(True, alpha=0.3)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(
            matplotlib.ticker.NullFormatter()
        )  # the decades only: no overlapping labels

    def legend(figure: Any, axes_: Any) -> None:
        handles: dict[str, Any] = {}
        for a in axes_:
            for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
                handles.setdefault(lab, h)
        if handles:
            keys = sorted(handles)
            figure.legend([handles[k] for k in keys], keys, loc="outside lower center",
                          ncols=min(3, len(keys)), fontsize=7)  # fmt: skip

    legend(fig, axes.flat)
    legend(fig2, axes2.flat)
    save(fig, f"{suite}_lr_sensitivity.png")
    save(fig2, f"{suite}_curves.png")
    fig3, (ax_p, ax_t) = plt.subplots(
        1, 2, figsize=(10, 3.6 + 0.25 * (len(labels) // 3 + 1)), layout="constrained"
    )
    for label in sorted({p[0] for p in best_points}):  # one colour per configuration
        mine = [p for p in best_points if p[0] == label]
        look = {"color": style[label]["color"], "marker": marker[label], "s": 16, "label": label}
        ax_p.scatter([p[2] or 0 for p in mine], [p[1] for p in mine], **look)
        ax_t.scatter([p[3] for p in mine], [p[1] for p in mine], **look)
    for a, xlabel in ((ax_p, "trainable parameters"), (ax_t, "median wall time of a run, s")):
        a.set_xlabel(xlabel)
        a.set_ylabel(f"best-of-sweep {metric}")
        if log:
            a.set_yscale("log")
        a.grid(True, alpha=0.3)
    legend(fig3, [ax_t])
    save(fig3, f"{suite}_cost.png")
    return names


def render(runs: list[Run], plots: dict[str, list[str]] | None = None) -> tuple[str, str]:
    """The report (Markdown) and the CSV of every run, from stored runs only.

    Raises:
        ValueError: a suite without a primary metric in PRIMARY.
    """
    by_config = _groups(runs)
    suites = sorted({c[0] for c in by_config})
    parts = ["# Benchmark report", "", f"Rendered from {STORE_NAME}: {len(runs)} runs."]
    for suite in suites:
        if suite not in PRIMARY:
            raise ValueError(f"no primary metric for suite {suite!r}; known: {sorted(PRIMARY)}")
        metric, goal = PRIMARY[suite][:2]
        configs = [c for c in by_config if c[0] == suite]
        show_base = _with_base(configs)
        cost_columns = {
            name: spec
            for name, spec in COSTS.items()
            if any(name in r.metrics for c in configs for g in by_config[c].values() for r in g)
        }
        lrs = sorted({lr for c in configs for lr in by_config[c]})
        best_rows, sens_rows = [], []
        for c in configs:
            means = sweep_means(by_config[c], metric)
            cells = []
            for lr in lrs:
                failed = sum(r.status == "failed" for r in by_config[c].get(lr, []))
                if lr in means:
                    cells.append(_fmt(means[lr]))
                else:
                    cells.append(f"failed ({failed})" if failed else "-")
            sens_rows.append([*_cells(c, show_base), *cells])
            if not means:
                filler = ["-"] * (4 + len(cost_columns))
                best_rows.append([*_cells(c, show_base), "-", "all failed", *filler, "-"])
                continue
            best = (min if goal == "min" else max)(means, key=means.__getitem__)
            group = [r for r in by_config[c][best] if r.status == "ok"]
            values = [r.metrics[metric] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            params = group[0].trainable_parameters
            wall = statistics.median(r.wall_seconds for r in group)
            peaks = [r.peak_memory_bytes for r in group if r.peak_memory_bytes is not None]
            peak = f"{statistics.median(peaks) / 2**20:.0f}" if peaks else "-"
            costs = [
                _median_cost(group, name, factor) for name, (_, factor) in cost_columns.items()
            ]
            best_rows.append(
                [
                    *_cells(c, show_base),
                    f"{best:g}",
                    f"{_fmt(means[best])} ± {_fmt(spread)} (n={len(values)})",
                    f"{params:,}" if params is not None else "-",
                    f"{wall:.2f}",
                    peak,
                    *costs,
                    str(
                        sum(len(v) for v in by_config[c].values())
                        - sum(r.status == "ok" for v in by_config[c].values() for r in v)
                    ),
                ]
            )
        head = ["problem", *(["base"] if show_base else []), "method", "init", "optimizer", "rank"]
        better = "lower" if goal == "min" else "higher"
        parts += [
            "",
            f"## Suite `{suite}`: {metric} ({better} is better)",
            "",
            "### Best of the learning-rate sweep (mean ± standard deviation over seeds)",
            "",
            _table(
                [
                    *head,
                    "best lr",
                    metric,
                    "trainable",
                    "median wall s",
                    "median peak MiB",
                    *(label for label, _ in cost_columns.values()),
                    "failed runs",
                ],
                best_rows,
            ),
            "",
            f"### Learning-rate sensitivity: mean {metric} over seeds",
            "",
            _table([*head, *(f"lr {lr:g}" for lr in lrs)], sens_rows),
        ]
        if plots is not None:
            if plots.get(suite):
                parts += ["", "### Plots", ""] + [f"![{name}]({name})" for name in plots[suite]]
            else:
                parts += ["", "(No plots: they need matplotlib, `pip install loraredux[bench]`.)"]
    return "\n".join(parts) + "\n", _csv(runs)


def _csv(runs: list[Run]) -> str:
    metrics = sorted({k for r in runs for k in r.metrics})
    base = any(r.trial.base is not None for r in runs)  # a base column only where one was quantized
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["key", "suite", "problem", "problem_options", "method", "method_options", "init",
         *(["base"] if base else []), "optimizer", "optimizer_options", "rank", "lr", "seed", "steps", "status",
         "error", *metrics, "wall_seconds", "peak_memory_bytes", "trainable_parameters"]
    )  # fmt: skip
    for r in sorted(runs, key=lambda r: (_config(r), r.trial.lr, r.trial.seed)):
        t = r.trial
        w.writerow(
            [t.key(), t.suite, t.problem, json.dumps(t.problem_options, sort_keys=True), t.method,
             json.dumps(t.method_options, sort_keys=True), t.init or "", *([t.base or ""] if base else []),
             t.optimizer, json.dumps(t.optimizer_options, sort_keys=True), t.rank, t.lr, t.seed, t.steps, r.status,
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
    plots = {
        suite: plot_suite(runs, suite, directory) for suite in sorted({r.trial.suite for r in runs})
    }
    text, table = render(runs, plots)
    write_text_atomic(directory / "runs.csv", table)
    write_text_atomic(directory / "report.md", text)
    return directory / "report.md"
