"""The advisor report's plots (matplotlib with the Agg canvas, imported only when plots are drawn):

spectra.png   W0's singular values per layer (over σ1), and the gradient's over its Gavish-Donoho threshold
ranks.png     the chosen rank per layer, and the rank the gradient needs where it was measured
memory.png    the bytes of each base format by part, against the budget
verify.png    the metric of each verification run (only with verification)
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

from .formatting import (
    best_runs,
    check_recommendation,
    format_bytes,
    format_number,
    is_number,
    short_path,
)

__all__ = ["CAPTIONS", "render_plots"]

CAPTIONS = {
    "spectra.png": "Singular values per layer: W0's over its largest (left) and the mean gradient's over the "
    "layer's Gavish-Donoho threshold, where measured (right).",
    "ranks.png": "The chosen rank per layer, and the rank the gradient needs where it was measured.",
    "memory.png": "Estimated memory of each base format, by part, against the budget.",
    "verify.png": "The metric of each verification run.",
}
_DPI = 110  # as the benchmark reports
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray")


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.backends.backend_agg  # the Agg canvas, without pyplot's global state
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] != "matplotlib":
            raise  # matplotlib is there but one of its own imports failed: show that error
        raise ImportError(
            "the advisor's plots need matplotlib: pip install loraredux[bench], or pass plots=False"
        ) from err
    return matplotlib


def _png(mpl: Any, fig: Any) -> bytes:
    mpl.backends.backend_agg.FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _spectra(mpl: Any, layers: Mapping[str, Any]) -> Any:
    n = len(layers)
    cmap = mpl.colormaps["viridis"]
    colour = [cmap(i / max(n - 1, 1)) for i in range(n)]
    width = 1.0 if n <= 24 else 0.6
    grads = [(i, g) for i, layer in enumerate(layers.values())
             if (g := layer.get("gradient")) and g.get("singular_values")]  # fmt: skip
    fig = mpl.figure.Figure(figsize=(11.0 if grads else 6.5, 4.0), layout="constrained")
    axes = fig.subplots(1, 2 if grads else 1, squeeze=False)[0]

    def curve(ax: Any, i: int, values: list[float], scale: float, **kw: Any) -> None:
        points = [(k, v / scale) for k, v in enumerate(values, 1) if v > 0]
        if points:
            ax.plot(*zip(*points, strict=True), color=colour[i], linewidth=width, **kw)

    for i, layer in enumerate(layers.values()):
        s = (layer.get("weight") or {}).get("singular_values") or []
        if s and s[0] > 0:
            curve(axes[0], i, s, s[0])
    axes[0].set_title("W0: singular values over the largest", fontsize=9)
    axes[0].set_ylabel(r"$\sigma_i / \sigma_1$")
    normalised = False  # the gradient's values over each layer's threshold
    if grads:
        ax = axes[1]
        normalised = all(is_number(g.get("threshold")) and g["threshold"] > 0 for _, g in grads)
        for i, g in grads:
            curve(ax, i, g["singular_values"], g["threshold"] if normalised else 1.0)
            if not normalised and is_number(g.get("threshold")) and g["threshold"] > 0:
                ax.axhline(g["threshold"], color=colour[i], linestyle=":", linewidth=0.8)
        if normalised:
            ax.axhline(
                1.0, color="black", linestyle="--", linewidth=1, label="Gavish-Donoho threshold"
            )
            ax.set_ylabel(r"$\sigma_i / \tau$ (the layer's threshold $\tau$)")
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.set_ylabel(r"$\sigma_i$ (dotted: each layer's Gavish-Donoho threshold)")
        ax.set_title("mean gradient: singular values (above the line: needed rank)", fontsize=9)
    # numerically zero tails (1e-17) would squash what matters: W0 to 1e-4 of σ1, the gradient to 1e-3 of τ
    for ax, floor in zip(axes, (1e-4, 1e-3 if normalised else 0.0), strict=False):
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        if low < floor < high:
            ax.set_ylim(bottom=floor)
        ax.set_xlabel("singular value index i")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    norm = mpl.colors.Normalize(0, max(n - 1, 1))
    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes),
                       label="layer index (model order)")  # fmt: skip
    bar.locator = mpl.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    return fig


def _ranks(mpl: Any, layers: Mapping[str, Any]) -> Any:
    n = len(layers)
    fig = mpl.figure.Figure(
        figsize=(min(max(6.4, 0.16 * n + 2.5), 18.0), 4.2), layout="constrained"
    )
    ax = fig.subplots()
    ax.bar(range(n), [layer.get("rank") or 0 for layer in layers.values()], color=_COLOURS[0],
           width=0.8, label="chosen rank")  # fmt: skip
    needed = [(i, g["needed_rank"]) for i, layer in enumerate(layers.values())
              if (g := layer.get("gradient")) and g.get("needed_rank") is not None]  # fmt: skip
    if needed:
        ax.plot(*zip(*needed, strict=True), linestyle="none", marker="D", color=_COLOURS[1],
                markersize=4 if n <= 60 else 2.5, label="needed rank (Gavish-Donoho)")  # fmt: skip
    step = max(1, math.ceil(n / 48))  # at most ~48 labels, however many layers
    ticks = list(range(0, n, step))
    names = [short_path(p) for p in layers]
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if n > 8 else 0,
                  fontsize=7 if n <= 48 else 6)  # fmt: skip
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("layer (model order)" + (f", every {step}th labelled" if step > 1 else ""))
    ax.set_ylabel("rank")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside upper center", ncols=2, fontsize=8)
    return fig


def _memory_plot(mpl: Any, memory: Mapping[str, Any]) -> Any:
    options = memory.get("options") or {}
    parts = list(
        dict.fromkeys(k for o in options.values() for k in o if k not in ("total", "fits"))
    )
    fig = mpl.figure.Figure(figsize=(8.0, 1.7 + 0.45 * len(options)), layout="constrained")
    ax = fig.subplots()
    names = [f"{n} (chosen)" if n == memory.get("chosen") else n for n in options]
    left = [0.0] * len(options)
    for j, part in enumerate(parts):
        widths = [(o.get(part) or 0) / 2**30 for o in options.values()]
        ax.barh(names, widths, left=left, color=_COLOURS[j % len(_COLOURS)], label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    if memory.get("budget_bytes") is not None:
        ax.axvline(memory["budget_bytes"] / 2**30, color="black", linestyle="--",
                   label=f"budget {format_bytes(memory['budget_bytes'])}")  # fmt: skip
    ax.invert_yaxis()  # in the order of preference, top down
    ax.set_xlabel("GiB (2**30 bytes)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(4, len(parts) + 1), fontsize=7)
    return fig


def _verify_plot(mpl: Any, verify: Mapping[str, Any]) -> Any | None:
    runs = [r for r in verify.get("runs") or [] if is_number(r.get("metric"))]
    if not runs:
        return None
    best = best_runs({**verify, "runs": runs})
    fig = mpl.figure.Figure(figsize=(max(5.0, 1.1 * len(runs) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    colours = [_COLOURS[1] if i in best else _COLOURS[0] for i in range(len(runs))]
    bars = ax.bar([str(r.get("name")) for r in runs], [r["metric"] for r in runs], color=colours)
    ax.bar_label(bars, labels=[format_number(r["metric"], 4) for r in runs], fontsize=8)
    ax.set_ylabel(str(verify.get("metric", "metric")))
    better = "higher" if verify.get("higher_is_better", True) else "lower"
    ax.set_title(
        f"{verify.get('metric', 'metric')} per run ({better} is better; best in orange)", fontsize=9
    )
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def render_plots(rec: Mapping[str, Any]) -> dict[str, bytes]:
    """The report's plots as PNG bytes by file name (see the module docstring), nothing written.

    Raises:
        ValueError: a required key (`REQUIRED`) is missing.
        ImportError: matplotlib is not installed (`pip install loraredux[bench]`).
    """
    check_recommendation(rec)
    mpl = _matplotlib()
    figures = {}
    if rec["layers"]:
        figures["spectra.png"] = _spectra(mpl, rec["layers"])
        figures["ranks.png"] = _ranks(mpl, rec["layers"])
    if (rec["memory"] or {}).get("options"):
        figures["memory.png"] = _memory_plot(mpl, rec["memory"])
    if rec.get("verify") and (fig := _verify_plot(mpl, rec["verify"])) is not None:
        figures["verify.png"] = fig
    return {name: _png(mpl, fig) for name, fig in figures.items()}
