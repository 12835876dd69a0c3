"""The advisor's report: `write_report(rec, DIR)` turns a recommendation (`Recommendation.to_dict()`) into
files an ML engineer reads.

    recommendation.json   the recommendation itself (JSON, indent 2, keys in their order)
    report.md             how to apply it (the Python, and the `loraredux train --recommendation` command), the
                          global choices and why, what was measured per layer, the memory of each
                          base format against the budget, and the verification runs when there were any
    report.html           the same in one self-contained file (plots embedded as base64 PNG)
    spectra.png           W0's singular values per layer (over σ1), and the gradient's over its Gavish-Donoho threshold
    ranks.png             the chosen rank per layer, and the rank the gradient needs where it was measured
    memory.png            the bytes of each base format by part, against the budget
    verify.png            the metric of each verification run (only with verification)

The plots (`plots.py`) need matplotlib (`pip install loraredux[bench]`); `plots=False` leaves them out. Everything
is built in memory first, so a recommendation that cannot be rendered writes nothing; each file then replaces its
old version atomically (a temporary file beside it and a rename). `render_markdown`, `render_html` and
`render_plots` are the pure parts. Numbers print to 3 significant digits, bytes in binary units (1 GiB = 2**30
bytes), a missing value as "—"; every figure in a sentence is computed from the recommendation.

What the report claims is no surer than its numbers: the comparison of the verification runs (`compare_runs`) calls a
difference evidence only over at least 2 seeds and beyond the runs' seed spread, and says when another run beat the
advice; each memory figure says what it counts (`memory_check`: the verification's measured step against the
base-format estimates); a reason shared by several layers is printed once, with its layers.
"""

from __future__ import annotations

import base64
import html
import json
import os
import pprint
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io.files import write_text_atomic
from .formatting import (
    DASH,
    REQUIRED,
    best_runs,
    check_recommendation,
    format_bytes,
    format_number,
    rank_summary,
)
from .plots import CAPTIONS, render_plots
from .verdicts import (
    advised_and_plain,
    compare_runs,
    comparison,
    count,
    memory_check,
    run_summary,
    seeds_of,
)

__all__ = [
    "REQUIRED",
    "compare_runs",
    "format_bytes",
    "format_number",
    "memory_check",
    "render_html",
    "render_markdown",
    "render_plots",
    "write_report",
]

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:.6em 0;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}code,pre{font-family:ui-monospace,monospace;font-size:.92em}"
    "pre{background:#f6f8fa;padding:.8em;overflow-x:auto}.wide{overflow-x:auto}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:.9em;color:#555}"
)

# A report is a list of blocks, rendered to Markdown or HTML: ("h1" | "h2" | "p", text), ("code", language, text),
# ("table", header, rows), ("list", items) or ("image", file name, caption); text may hold `code` and **bold**.
Block = tuple[Any, ...]


# ----------------------------------------------------------------------------------------------- the document


def _value(x: Any) -> str:
    if isinstance(x, float):
        return format_number(x, 4)
    return x if isinstance(x, str) else json.dumps(x)


def _literal(value: Any, indent: int) -> str:
    """A Python literal of a JSON value, wrapped to 100 columns with continuation lines under its first."""
    text = pprint.pformat(value, width=max(40, 100 - indent), sort_dicts=False)
    return text.replace("\n", "\n" + " " * indent)


def _needs_data(init: Any) -> bool:
    if not isinstance(init, str):
        return False
    from .. import init as lx_init

    try:
        return bool(lx_init.get(init).needs)
    except ValueError:  # not registered here: the report cannot tell
        return False


def _python(rec: Mapping[str, Any]) -> str:
    config, adapt = rec["config"], rec["adapt"]
    base = ((rec.get("choices") or {}).get("base") or {}).get("value")
    quantized = base in ("nf4", "fp4", "int8")
    loftq = quantized and config.get("init") == "loftq"
    lines = ["import loraredux as lx"]
    if quantized:  # the dense model as loaded, quantized as `loraredux train --base` does
        saved = _literal(adapt.get("modules_to_save") or [], 41)
        lines += [
            "from loraredux.base_format import convert_base_",
            "",
            f"base = convert_base_(model, {base!r}, keep={saved}"
            + (", keep_weights=True)  # W0 kept for LoftQ" if loftq else ")"),
        ]
    lines += [
        "",
        "config = lx.config_from_dict(",
        f"    {_literal(dict(config), 4)}",
        ")",
    ]
    if loftq:
        lines.append("config, iters = base.deferred_loftq(config)  # LoftQ after adapting, from W0")
    lines += [
        "lx.adapt_(",
        "    model,",
        "    config,",
        f"    targets={_literal(adapt.get('targets'), 12)},",
    ]
    for key in ("exclude", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if adapt.get(key):
            lines.append(f"    {key}={_literal(adapt[key], 5 + len(key))},")
    if _needs_data(config.get("init")):
        lines += [
            f"    calibration=batches,  # training batches: init {config['init']!r} estimates from them",
            "    # loss_fn=...,  # (model, batch) -> loss, where that is not model(**batch).loss",
        ]
    lines.append(")")
    if loftq:
        lines.append(
            "base.loftq_(model, iters)  # s B A = SVD_r(W0 - deq(Q)) in each quantized layer"
        )
    return "\n".join(lines)


def _cli(rec: Mapping[str, Any], folder: str) -> str | None:
    """The `loraredux train` command that applies the recommendation file, or None without a model name."""
    model = (rec.get("model") or {}).get("name")
    if not model:
        return None
    args = [["loraredux", "train"], ["--model", model]]
    if (rec.get("data") or {}).get("name"):
        args.append(["--data", rec["data"]["name"]])
    args.append(["--recommendation", f"{folder.rstrip('/')}/recommendation.json"])
    advised = advised_and_plain(rec)[0]
    if advised is not None and advised.get("lr") is not None:
        args.append(["--lr", format(advised["lr"])])
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in arg) for arg in args)


def _how_to(rec: Mapping[str, Any], folder: str) -> list[Block]:
    choices = rec["choices"]
    base = (choices.get("base") or {}).get("value")
    serving = (choices.get("serving") or {}).get("value")
    optimizer = (choices.get("optimizer") or {}).get("value")
    if base in ("nf4", "fp4", "int8"):
        text = (
            f"Apply it to `model`, the loaded dense model: the first lines quantize its base to **{base}** "
            "(every linear layer but the head and the modules trained in full, as `loraredux train --base` does)"
        )
    else:
        text = "Apply it to `model`, the loaded model" + (
            f" with its base in **{base}**" if base else ""
        )
    text += (
        ", before training: `lx.config_from_dict` rebuilds the method's config from the recommendation's "
        '`"config"`, and the keyword arguments are its `"adapt"` entries.'
    )
    if optimizer:
        text += f" Train the adapter parameters with the **{optimizer}** optimizer."
    if serving == "merge":
        text += (
            " After training, `lx.merge_(model)` folds the adapters into the weights for serving."
        )
    elif serving:
        text += (
            f" Serve it **{serving}**: save the adapter with `lx.save_adapter(model, DIR)` and keep the "
            "base unmerged."
        )
    blocks: list[Block] = [("h2", "How to use it"), ("p", text), ("code", "python", _python(rec))]
    command = _cli(rec, folder)
    if command is not None:
        note = (
            "The same from the command line: `--recommendation` applies the method config, the targets, the "
            "per-layer ranks, the optimizer and the base format of `recommendation.json`"
        )
        if rec["adapt"].get("modules_to_save"):
            note += ", and the task's own head is trained in full (`modules_to_save`)"
        if "--lr" in command:
            note += "; the learning rate is the one the verification used"
        if base and base != "fp32":
            note += f", and puts the base in {base} as `--base {base}` does"
        blocks += [("p", note + ":"), ("code", "sh", command)]
    return blocks


def _choices(rec: Mapping[str, Any]) -> list[Block]:
    rows = [
        [name, f"`{_value((c or {}).get('value'))}`", str((c or {}).get("reason") or DASH)]
        for name, c in rec["choices"].items()
    ]
    return [("h2", "Global choices"), ("table", ["choice", "value", "why"], rows)]


def _grouped(reasons: Mapping[str, list[str]], total: int) -> list[str]:
    """A line "`a`, `b`: reason" per distinct reason ("All N layers: reason" when every layer shares it)."""
    return [
        (f"All {total} layers" if len(paths) == total > 1 else ", ".join(f"`{p}`" for p in paths))
        + f": {reason}"
        for reason, paths in reasons.items()
    ]


# The rank reason of every layer whose rank is its measured need, said once: the numbers are the table's.
GAVISH_DONOHO = (
    "the rank its gradient needs (the table's needed rank, measured as said above the table)"
)


def _as_measured(layer: Mapping[str, Any]) -> bool:
    """Whether the layer's rank is exactly its measured need (not a default, a minimum or a cap)."""
    rank, g = layer.get("rank"), layer.get("gradient") or {}
    return (
        rank is not None
        and g.get("needed_rank") == rank
        and g.get("threshold") is not None
        and str(layer.get("rank_reason", "")).startswith(f"rank {rank}: ")
    )


def _layers(rec: Mapping[str, Any], available: Sequence[str]) -> list[Block]:
    layers = rec["layers"]
    default = rec["config"].get("rank")
    ranks = [layer.get("rank") for layer in layers.values()]
    measured = [g for layer in layers.values() if (g := layer.get("gradient"))]
    summary = f"{len(layers)} target layers"
    known = [r for r in ranks if r is not None]
    if known:
        summary += (
            f", ranks {min(known)} to {max(known)}"
            if min(known) != max(known)
            else f", all rank {known[0]}"
        )
        if default is not None:
            off = count(sum(r != default for r in known), "layer")
            summary += f" ({off} off the config's r = {default}: {rank_summary(known, default)})"
    summary += (
        f"; the gradient was measured on {len(measured)} of them."
        if measured
        else "; no gradient was measured."
    )
    summary += (
        " Needed rank: the number of the mean gradient's singular values above its Gavish-Donoho threshold τ, "
        "the optimal hard threshold for its noise. Gradient noise: the per-entry noise level σ of the mean "
        "gradient, from two halves of the batches. "
        "Alignment: the overlap of the gradient's top singular subspace with W0's principal / minor one "
        "(1: the same; k/n for unrelated ones). Effective rank: Roy-Vetterli's, of W0. Input κ: the condition "
        "number of the layer's input covariance."
    )
    init = rec["config"].get("init")
    others = [p for p, layer in layers.items() if layer.get("init") not in (None, init)]
    if others:
        summary += (
            f" {len(others)} layers list an init other than the config's ({init}); the call above "
            f"initialises every layer with {init}."
        )
    head = ["layer", "shape", "rank", "init", "needed rank (Gavish-Donoho)", "threshold τ",
            "gradient noise", "principal / minor alignment", "W0 effective rank", "input κ"]  # fmt: skip
    rows = []
    for path, layer in layers.items():
        g = layer.get("gradient") or {}
        align = (
            " / ".join(format_number(g.get(k)) for k in ("principal_alignment", "minor_alignment"))
            if g
            else DASH
        )
        rows.append([
            f"`{path}`",
            "×".join(str(d) for d in layer.get("shape") or []) or DASH,
            format_number(layer.get("rank")),
            str(layer.get("init") or DASH),
            format_number(g.get("needed_rank")),
            format_number(g.get("threshold")),
            format_number(g.get("noise")),
            align,
            format_number((layer.get("weight") or {}).get("effective_rank")),
            format_number(layer.get("input_condition")),
        ])  # fmt: skip
    blocks: list[Block] = [("h2", "Per layer"), ("p", summary), ("table", head, rows)]
    split = all(layer.get("rank_reason") and layer.get("init_reason") for layer in layers.values())
    keys = (("rank_reason", "Why each layer's rank:"), ("init_reason", "Why each layer's init:"))
    for key, title in keys if split else (("reason", "Why each layer's rank and init:"),):
        reasons: dict[str, list[str]] = {}
        for path, layer in layers.items():
            if layer.get(key):
                reason = (
                    GAVISH_DONOHO if key == "rank_reason" and _as_measured(layer) else layer[key]
                )
                reasons.setdefault(str(reason), []).append(path)
        if reasons:
            blocks += [("p", title), ("list", _grouped(reasons, len(layers)))]
    return blocks + [
        ("image", n, CAPTIONS[n]) for n in ("spectra.png", "ranks.png") if n in available
    ]


def _memory(rec: Mapping[str, Any], available: Sequence[str]) -> list[Block]:
    memory = rec["memory"]
    if not memory:
        return [("h2", "Memory"), ("p", "No memory estimate was made.")]
    options = memory.get("options") or {}
    chosen = memory.get("chosen")
    parts = list(
        dict.fromkeys(k for o in options.values() for k in o if k not in ("total", "fits"))
    )
    budget = memory.get("budget_bytes")
    text = (
        "The memory model's estimate (not a measurement) of training LoRA at the advised ranks, per base "
        "format: the base weights at that format, the adapters, their gradients and optimizer states"
    )
    if memory.get("batch_size") is not None:
        text += (
            f", and the activations of one training step on batches of {memory['batch_size']} × "
            f"{memory.get('seq_len', DASH)} tokens"
        )
    else:
        text += "; no activations (no batch shape was given)"
    if memory.get("device"):
        text += f", for training on {memory['device']}"
    text += (
        f", against a budget of **{format_bytes(budget)}**"
        if budget is not None
        else "; no budget was set"
    )
    text += " (binary units: 1 KiB = 1024 bytes, 1 MiB = 1024 KiB, 1 GiB = 1024 MiB)."
    if chosen is not None:
        text += f" Chosen: **{chosen}**."
    rows = []
    for name, o in options.items():
        fits = o.get("fits")
        rows.append(
            [f"**{name}** (chosen)" if name == chosen else name]
            + [format_bytes(o.get(p)) for p in parts]
            + [format_bytes(o.get("total")), DASH if fits is None else ("yes" if fits else "no")]
        )
    head = ["base format", *parts, "total", "fits"]
    blocks: list[Block] = [("h2", "Memory"), ("p", text), ("table", head, rows)]
    return blocks + (
        [("image", "memory.png", CAPTIONS["memory.png"])] if "memory.png" in available else []
    )


def _verify(rec: Mapping[str, Any], available: Sequence[str]) -> list[Block]:
    verify = rec.get("verify")
    if not verify:
        return []
    metric = verify.get("metric", "metric")
    best = best_runs(verify)
    seeds = seeds_of(verify)
    at = (
        f"seed {seeds[0]}; one seed, so no difference below is evidence"
        if len(seeds) < 2
        else f"seeds {', '.join(map(str, seeds))}; each {metric} is the mean over the seeds and the seconds "
        "their sum"
    )
    text = (
        f"Each configuration trained for {verify.get('steps', DASH)} steps ({at}) and was scored by {metric} "
        f"({'higher' if verify.get('higher_is_better', True) else 'lower'} is better); the best run is marked."
    )
    rows = []
    for i, run in enumerate(verify.get("runs") or []):
        trainable = run.get("trainable")
        rows.append([
            f"**{run.get('name')}** (best)" if i in best else str(run.get("name")),
            run_summary(run),
            format_number(run.get("metric"), 4),
            format_number(run.get("train_loss"), 4),
            DASH if run.get("seconds") is None else f"{run['seconds']:.1f}",
            DASH if trainable is None else f"{trainable:,}",
        ])  # fmt: skip
    head = ["run", "configuration", metric, "train loss", "seconds", "trainable params"]
    blocks: list[Block] = [("h2", "Verification"), ("p", text), ("table", head, rows)]
    blocks.append(("p", comparison(rec)))
    check = memory_check(rec)
    if check is not None:
        blocks.append(("p", check))
    return blocks + (
        [("image", "verify.png", CAPTIONS["verify.png"])] if "verify.png" in available else []
    )


def _title(rec: Mapping[str, Any]) -> str:
    model = (rec.get("model") or {}).get("name") or "a model"
    data = rec.get("data")
    return f"Adapter advice: {model}" + (f" on {data['name']}" if data and data.get("name") else "")


def _document(rec: Mapping[str, Any], available: Sequence[str], folder: str) -> list[Block]:
    check_recommendation(rec)
    model, data = rec.get("model") or {}, rec.get("data")
    intro = f"Recommended by loraredux {rec.get('loraredux_version', DASH)}"
    if model:
        intro += f" for `{model.get('class', model.get('name'))}`"
        if model.get("parameters") is not None:
            intro += f" ({model['parameters']:,} parameters)"
    if data:
        shape = [data.get(k) for k in ("batches", "batch_size", "seq_len")]
        intro += ", measured on " + (
            "{} batches of {} × {} tokens".format(*shape)
            if None not in shape
            else "calibration data"
        )
        intro += f" of {data['name']}." if data.get("name") else "."
    else:
        intro += ", without calibration data: the layers' gradients were not measured."
    return [
        ("h1", _title(rec)),
        ("p", intro),
        *_how_to(rec, folder),
        *_choices(rec),
        *_layers(rec, available),
        *_memory(rec, available),
        *_verify(rec, available),
    ]


# ----------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rec: Mapping[str, Any], plots: Sequence[str] = (), folder: str = "DIR") -> str:
    """The Markdown report of a recommendation.

    Args:
        rec: the recommendation (`Recommendation.to_dict()`).
        plots: the plot files beside the report (`render_plots`' names) to link, by relative path.
        folder: where recommendation.json is, for the `loraredux train --recommendation` command.

    Raises:
        ValueError: a required key (`REQUIRED`) is missing.
    """
    out: list[str] = []
    for block in _document(rec, plots, folder):
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}")
        elif kind == "h2":
            out.append(f"## {block[1]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "code":
            out.append(f"```{block[1]}\n{block[2]}\n```")
        elif kind == "table":
            head, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "image":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def render_html(
    rec: Mapping[str, Any], images: Mapping[str, bytes] | None = None, folder: str = "DIR"
) -> str:
    """The report as one self-contained HTML page: the Markdown report's content, plots embedded as PNG data URIs.

    Args:
        rec: the recommendation (`Recommendation.to_dict()`).
        images: PNG bytes by file name (`render_plots`' result); the plots to embed.

    Raises:
        ValueError: a required key (`REQUIRED`) is missing.
    """
    images = images or {}
    body: list[str] = []
    for block in _document(rec, list(images), folder):
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "code":
            code = html.escape(block[2], quote=False)
            body.append(f'<pre><code class="language-{block[1]}">{code}</code></pre>')
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>\n"
                for row in block[2]
            )
            body.append(
                f'<div class="wide"><table>\n<thead><tr>{head}</tr></thead>\n'
                f"<tbody>\n{rows}</tbody></table></div>"
            )
        elif kind == "list":
            body.append("<ul>\n" + "".join(f"<li>{_inline(i)}</li>\n" for i in block[1]) + "</ul>")
        elif kind == "image":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            caption = html.escape(block[2])
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(_title(rec), quote=False)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------- files


def write_report(
    rec: Mapping[str, Any], out: str | os.PathLike[str], *, plots: bool = True
) -> list[Path]:
    """Write `recommendation.json`, `report.md`, `report.html` and (with `plots`) the plots into `out`.

    Everything is rendered in memory before the first file is written, so an error leaves the directory as it was;
    each file then replaces its old version atomically. Other files in `out` are left alone.

    Args:
        rec: the recommendation (`Recommendation.to_dict()`).
        out: the directory (created if needed).
        plots: draw the plots (needs matplotlib); False writes the JSON and the two reports only.

    Returns:
        The paths written: the JSON, the Markdown and HTML reports, then the plots.

    Raises:
        TypeError: `rec` is not a dict.
        ValueError: a required key (`REQUIRED`) is missing.
        ImportError: `plots` without matplotlib installed (`pip install loraredux[bench]`, or plots=False).
    """
    check_recommendation(rec)
    images = render_plots(rec) if plots else {}
    texts = {
        "recommendation.json": json.dumps(rec, indent=2) + "\n",
        "report.md": render_markdown(rec, list(images), str(out)),
        "report.html": render_html(rec, images, str(out)),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(out / name, text) for name, text in texts.items()]
    return written + [write_text_atomic(out / name, data) for name, data in images.items()]
