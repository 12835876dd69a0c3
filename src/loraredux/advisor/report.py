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
    is_number,
    rank_summary,
)
from .plots import CAPTIONS, render_plots

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
    lines = [
        "import loraredux as lx",
        "",
        "config = lx.config_from_dict(",
        f"    {_literal(dict(config), 4)}",
        ")",
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
    advised = _advised_and_plain(rec)[0]
    if advised is not None and advised.get("lr") is not None:
        args.append(["--lr", format(advised["lr"])])
    return " \\\n    ".join(" ".join(shlex.quote(a) for a in arg) for arg in args)


def _how_to(rec: Mapping[str, Any], folder: str) -> list[Block]:
    choices = rec["choices"]
    base = (choices.get("base") or {}).get("value")
    serving = (choices.get("serving") or {}).get("value")
    optimizer = (choices.get("optimizer") or {}).get("value")
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
            "per-layer ranks and the optimizer of `recommendation.json`"
        )
        if rec["adapt"].get("modules_to_save"):
            note += ", and the task's own head is trained in full (`modules_to_save`)"
        if "--lr" in command:
            note += "; the learning rate is the one the verification used"
        if base and base != "fp32":
            note += (
                f"; it loads the base in fp32, having no option for the base format ({base} here)"
            )
        blocks += [("p", note + ":"), ("code", "sh", command)]
    return blocks


def _choices(rec: Mapping[str, Any]) -> list[Block]:
    rows = [
        [name, f"`{_value((c or {}).get('value'))}`", str((c or {}).get("reason") or DASH)]
        for name, c in rec["choices"].items()
    ]
    return [("h2", "Global choices"), ("table", ["choice", "value", "why"], rows)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _grouped(reasons: Mapping[str, list[str]], total: int) -> list[str]:
    """A line "`a`, `b`: reason" per distinct reason ("All N layers: reason" when every layer shares it)."""
    return [
        (f"All {total} layers" if len(paths) == total > 1 else ", ".join(f"`{p}`" for p in paths))
        + f": {reason}"
        for reason, paths in reasons.items()
    ]


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
            off = _count(sum(r != default for r in known), "layer")
            summary += f" ({off} off the config's r = {default}: {rank_summary(known, default)})"
    summary += (
        f"; the gradient was measured on {len(measured)} of them."
        if measured
        else "; no gradient was measured."
    )
    summary += (
        " Needed rank: the number of the mean gradient's singular values above its Gavish-Donoho threshold. "
        "Gradient noise: the per-entry noise level of the mean gradient, from two halves of the batches. "
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
    head = ["layer", "shape", "rank", "init", "needed rank (Gavish-Donoho)", "gradient noise",
            "principal / minor alignment", "W0 effective rank", "input κ"]  # fmt: skip
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
                reasons.setdefault(str(layer[key]), []).append(path)
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


def _advised_and_plain(
    rec: Mapping[str, Any],
) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    """The verification's advised run and its plain-LoRA run: by name ("advised", "lora"), else by position (the
    schema's order); None where there is none."""
    runs = list((rec.get("verify") or {}).get("runs") or [])
    by_name = {r.get("name"): r for r in runs}
    advised = by_name.get("advised", runs[0] if runs else None)
    plain = by_name.get("lora", runs[1] if len(runs) > 1 else None)
    return advised, (plain if plain is not advised else None)


def _run_summary(run: Mapping[str, Any]) -> str:
    config = run.get("config") or {}
    parts = [str(config.get("method", DASH))]
    for key, label in (("rank", "r"), ("alpha", "α")):
        if config.get(key) is not None:
            parts.append(f"{label}={format_number(config[key])}")
    if config.get("init"):
        parts.append(f"init={config['init']}")
    if run.get("rank_pattern"):
        parts.append(_count(len(run["rank_pattern"]), "per-layer rank"))
    if run.get("optimizer"):
        parts.append(str(run["optimizer"]))
    if run.get("lr") is not None:
        parts.append(f"lr {run['lr']:g}")
    if run.get("per_seed"):
        values = "; ".join(f"{k}: {format_number(v, 4)}" for k, v in run["per_seed"].items())
        parts.append(f"mean of seeds {values} (spread {format_number(_spread(run))})")
    if run.get("sweep"):
        grid = "; ".join(f"{lr}: {format_number(v, 4)}" for lr, v in run["sweep"].items())
        parts.append(f"best of lr {grid}")
    return ", ".join(parts)


def _seeds(verify: Mapping[str, Any]) -> list[Any]:
    """The seeds every run trained at (older files name one `seed`)."""
    return list(verify.get("seeds") or [verify.get("seed", DASH)])


def _spread(run: Mapping[str, Any]) -> float | None:
    """The run's seed spread (largest minus smallest metric over its seeds), None with fewer than 2 seeds."""
    values = [v for v in (run.get("per_seed") or {}).values() if is_number(v)]
    return max(values) - min(values) if len(values) >= 2 else None


def _noise(
    verify: Mapping[str, Any], a: Mapping[str, Any], b: Mapping[str, Any], *, short: bool = False
) -> str | None:
    """Why the difference between runs `a` and `b` is within seed noise, or None when it is evidence; `short`:
    the one-seed case without its explanation (said once before)."""
    seeds = _seeds(verify)
    spreads = [_spread(a), _spread(b)]
    if len(seeds) < 2 or None in spreads:
        if short:
            return "within seed noise (one seed)"
        return (
            f"within seed noise: only one seed ({seeds[0]}) was run, so the seed-to-seed spread is unmeasured "
            "and no difference counts as evidence (`--seeds 2` or more measures it)"
        )
    noise = max(s for s in spreads if s is not None)
    if abs(a["metric"] - b["metric"]) <= noise:
        return (
            f"within seed noise: over {len(seeds)} seeds the difference of the means does not exceed the "
            f"larger seed spread of the two runs, {format_number(noise)} (largest minus smallest metric)"
        )
    return None


def compare_runs(verify: Mapping[str, Any] | None) -> list[str]:
    """The sentences comparing the verification's runs (the module docstring's rule): the advice against plain
    LoRA, then every other run that beat the advice. Empty without verification."""
    if not verify:
        return []
    rec = {"verify": verify}
    metric = verify.get("metric", "metric")
    higher = bool(verify.get("higher_is_better", True))
    advised, plain = _advised_and_plain(rec)
    if advised is None or plain is None:
        return ["There is no plain-LoRA run to compare the advised configuration with."]
    a, b = advised.get("metric"), plain.get("metric")
    if not (is_number(a) and is_number(b)):
        return [
            f"The advised run or the plain-LoRA run has no {metric}, so they cannot be compared."
        ]
    diff = a - b
    noise = _noise(verify, advised, plain)
    if diff == 0:
        verdict = "the same score" + (f"; {noise}." if noise is not None else ".")
    elif noise is not None:
        verdict = noise + "."
    else:
        spread = max(s for s in (_spread(advised), _spread(plain)) if s is not None)
        verdict = (
            f"so the advice did {'better' if (diff > 0) == higher else 'worse'} than plain LoRA: over "
            f"{len(_seeds(verify))} seeds the difference of the means exceeds the larger seed spread of the two "
            f"runs, {format_number(spread)}."
        )
    sentences = [
        f"The advised configuration (`{advised.get('name')}`) reached {metric} {format_number(a, 4)} against "
        f"{format_number(b, 4)} for plain LoRA (`{plain.get('name')}`): a difference of {diff:+.3g} "
        f"({'higher' if higher else 'lower'} is better), {verdict}"
    ]
    for run in verify.get("runs") or []:
        m = run.get("metric")
        if run is advised or run is plain or not is_number(m) or m == a or (m > a) != higher:
            continue
        noise = _noise(verify, run, advised, short=True)
        if noise is None:
            spread = max(s for s in (_spread(run), _spread(advised)) if s is not None)
            noise = f"beyond the larger seed spread of the two, {format_number(spread)}: prefer it"
        sentences.append(
            f"`{run.get('name')}` beat the advice: {metric} {format_number(m, 4)} against "
            f"{format_number(a, 4)} ({m - a:+.3g}), {noise}."
        )
    return sentences


def _comparison(rec: Mapping[str, Any]) -> str | None:
    """The comparison sentences as one paragraph; None without verification."""
    sentences = compare_runs(rec.get("verify"))
    return " ".join(sentences) if sentences else None


def memory_check(rec: Mapping[str, Any]) -> str | None:
    """The verification's memory check in words, naming what it counts and how it differs from the base-format
    estimates of the Memory section (which set of figures is which); None without a measured check."""
    memory = (rec.get("verify") or {}).get("memory")
    if not (memory and is_number(memory.get("measured")) and memory["measured"] > 0):
        return None
    estimated = memory.get("estimated")
    text = (
        f"The memory model, checked on the way: one training step of the advised model as the verification "
        f"trains it (batch {memory.get('batch_size')} × {memory.get('seq_len')} tokens, fp32 base, "
        f"{memory.get('device')}; weights, adapters, gradients, optimizer states and activations) measured "
        f"{format_bytes(memory['measured'])}; the memory model's estimate for that same step is "
        f"{format_bytes(estimated)}"
    )
    if is_number(estimated):
        text += f", {estimated / memory['measured']:.3f} times the measurement"
    table = rec.get("memory") or {}
    chosen = table.get("chosen")
    option = (table.get("options") or {}).get(chosen) or {}
    if not option.get("total"):
        return text + "."
    method = (rec.get("config") or {}).get("method")
    optimizer = ((rec.get("choices") or {}).get("optimizer") or {}).get("value")
    differences = []
    if table.get("device") and table["device"] != memory.get("device"):
        differences.append(
            f"the device ({table['device']} there, {memory.get('device')} here: the activations depend on the "
            "attention kernel each device runs)"
        )
    there = (table.get("batch_size"), table.get("seq_len"))
    if there != (memory.get("batch_size"), memory.get("seq_len")):
        shape = "no batch" if None in there else f"{there[0]} × {there[1]} tokens"
        differences.append(f"the batch ({shape} there)")
    if chosen != "fp32":
        differences.append(f"the base format ({chosen} there, fp32 here)")
    if method and method != "lora":
        differences.append(f"the method (LoRA there, {method} here)")
    if optimizer and optimizer != "adamw":
        differences.append(f"the optimizer (AdamW's states there, {optimizer} here)")
    parts = memory.get("estimated_parts") or {}
    activations = ""
    if is_number(parts.get("activations")) and is_number(option.get("activations")):
        activations = (
            f" (activations {format_bytes(parts['activations'])} here, "
            f"{format_bytes(option['activations'])} there)"
        )
    if differences:
        text += (
            f". It is a different figure from the Memory section's estimate for the chosen base, "
            f"{format_bytes(option['total'])} at {chosen}: that one is for the training setup the advice was "
            f"given, and differs from this step in {', '.join(differences)}{activations}."
        )
    else:
        text += (
            f". The Memory section's estimate at {chosen}, {format_bytes(option['total'])}, is for the same "
            f"setup{activations}."
        )
    return text


def _verify(rec: Mapping[str, Any], available: Sequence[str]) -> list[Block]:
    verify = rec.get("verify")
    if not verify:
        return []
    metric = verify.get("metric", "metric")
    best = best_runs(verify)
    seeds = _seeds(verify)
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
            _run_summary(run),
            format_number(run.get("metric"), 4),
            format_number(run.get("train_loss"), 4),
            DASH if run.get("seconds") is None else f"{run['seconds']:.1f}",
            DASH if trainable is None else f"{trainable:,}",
        ])  # fmt: skip
    head = ["run", "configuration", metric, "train loss", "seconds", "trainable params"]
    blocks: list[Block] = [("h2", "Verification"), ("p", text), ("table", head, rows)]
    blocks.append(("p", _comparison(rec)))
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
