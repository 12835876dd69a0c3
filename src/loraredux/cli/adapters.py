"""`loraredux inspect`, `merge` and `methods`: what an adapter holds, the merged model, the registered methods."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import UsageError, log, positive_int
from .train_config import add_base_argument

__all__ = ["add_adapter_commands"]


def add_adapter_commands(sub: Any) -> None:
    """The `inspect`, `merge` and `methods` subcommands."""
    p = sub.add_parser(
        "inspect",
        help="method, targets, ranks, parameter counts and update spectra",
        description="Show what an adapter holds: per layer its shape, rank, parameter count, "
        "stable rank and the top singular values of its update W' - W0.",
    )
    p.add_argument("directory", type=Path, help="an adapter folder (PEFT or loraredux format)")
    p.add_argument(
        "--model", default=None, help="base model folder (default: the one the adapter names)"
    )
    p.add_argument("--top", type=positive_int, default=5, help="how many singular values to show")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser(
        "merge",
        help="write the base model with the adapter merged in",
        description="Load the base model, apply the adapter, merge it into the weights and "
        "write a plain transformers checkpoint (safetensors) with the tokenizer.",
    )
    p.add_argument("directory", type=Path, help="an adapter folder (PEFT or loraredux format)")
    p.add_argument("--out", type=Path, required=True, help="new folder for the merged checkpoint")
    p.add_argument(
        "--model", default=None, help="base model folder (default: the one the adapter names)"
    )
    add_base_argument(
        p,
        "the base the adapter is merged into, put in that format as `train --base` does: nf4 / fp4 / int8 give "
        "dense layers W' = deq(Q) + the update, the trained model's weights; default: the base the run in "
        "DIRECTORY trained on (its metrics.json), else fp32 (the model as loaded)",
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="with a quantized base: quantize each merged layer back into it (a 4-bit or 8-bit checkpoint that "
        "transformers reloads as it is) and print how much of each layer's update that loses",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_merge)

    p = sub.add_parser("methods", help="list the registered adapter methods and their fields")
    p.set_defaults(run=_cmd_methods)

    p = sub.add_parser(
        "inits", help="list the registered initialisers (train --init NAME) and what they need"
    )
    p.set_defaults(run=_cmd_inits)

    p = sub.add_parser(
        "optimizers",
        help="list the registered optimizers (train --optimizer NAME) and their options",
    )
    p.set_defaults(run=_cmd_optimizers)


def _load_base(adapter_dir: Path, model_arg: str | None, progress: bool) -> Any:
    """The bare base model an adapter directory was trained on (or `--model`). The adapter's files are read and
    checked first: a damaged or missing file is one error line before any model is loaded."""
    from loraredux import assets
    from loraredux.io import read_adapter
    from loraredux.tasks import quiet_loading

    cfg, tensors = read_adapter(adapter_dir)
    source = model_arg or cfg.get("base_model_name_or_path")
    if source in ("minilm", "smollm2"):
        source = str(assets.minilm_dir() if source == "minilm" else assets.smollm2_dir())
    if not source or not Path(source).is_dir():
        raise UsageError(
            f"the base model {source!r} named in {adapter_dir}/adapter_config.json is not a local folder; "
            "pass --model PATH (or minilm / smollm2)"
        )
    import transformers

    task = cfg.get("task_type")
    kwargs: dict[str, Any] = {}
    if task == "SEQ_CLS":
        auto = transformers.AutoModelForSequenceClassification
        kwargs["num_labels"] = next(
            (t.shape[0] for k, t in tensors.items() if k.endswith("classifier.weight")), 2
        )
    elif task == "CAUSAL_LM":
        auto = transformers.AutoModelForCausalLM
    else:
        # No task type (PEFT's is optional; loraredux leaves it out where the head is part of the base): the class
        # the base folder's config.json names, e.g. BertForSequenceClassification, whose keys the adapter uses.
        names = transformers.AutoConfig.from_pretrained(source).architectures or []
        auto = next(
            (getattr(transformers, n) for n in names if hasattr(transformers, n)),
            transformers.AutoModel,
        )
    with quiet_loading(progress):
        return auto.from_pretrained(source, **kwargs), source


def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    import loraredux as lx
    from loraredux.verbs import saved_modules

    model, _ = _load_base(args.directory, args.model, not args.no_progress)
    lx.load_adapter(model, args.directory)
    layers = list(lx.adapters(model))
    methods = sorted({a.config.method for _, a in layers})
    n_train = sum(p.numel() for p in lx.trainable_parameters(model).values())
    print(
        f"{args.directory}: method {', '.join(methods)}, {len(layers)} adapted layers, "
        f"{n_train:,} adapter parameters"
    )
    saved = [n for n, _ in saved_modules(model)]
    if saved:
        print(f"modules trained in full: {', '.join(saved)}")
    for key, bank in lx.banks(
        model
    ).items():  # cross-layer state, once for all the layers that use it
        users = sum(key in a.shared_modules() for _, a in layers)
        shared = sum(p.numel() for p in bank.parameters() if p.requires_grad)
        print(f"shared bank {key}: {shared:,} trainable parameters, used by {users} layers")
    print(
        f"{'layer':<48} {'out x in':>11} {'rank':>4} {'params':>8}  {'stable':>6}  top singular values"
    )
    for name, a in layers:
        with torch.no_grad():
            s = torch.linalg.svdvals(a.delta_weight().double())
        own = sum(p.numel() for p in a.parameters() if p.requires_grad)
        stable = float((s**2).sum() / s[0] ** 2) if s[0] > 0 else 0.0
        top = " ".join(f"{v:.3g}" for v in s[: args.top].tolist())
        rank = getattr(a.config, "rank", "-")
        print(
            f"{name:<48} {a.out_features:>5}x{a.in_features:<5} {rank:>4} {own:>8}  {stable:>6.2f}  {top}"
        )
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from loraredux.io.atomic import usual_permissions
    from loraredux.tasks import quiet_loading

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} exists and is not empty; choose a new folder")
    model, source = _load_base(args.directory, args.model, not args.no_progress)
    _merge(model, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with quiet_loading(not args.no_progress):  # transformers' "Writing model shards" bar
            model.save_pretrained(tmp)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        except (OSError, ValueError) as err:
            log.warning("no tokenizer saved beside the merged model: %s", err)
        usual_permissions(tmp)  # mkdtemp makes 0700, safetensors 0600
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model written to {out}/ (load it with transformers' from_pretrained)")
    return 0


def _trained_base(directory: Path) -> tuple[str, str]:
    """The base an adapter's run trained on, and where that was read: metrics.json (`loraredux train`), else
    the base formats a loraredux-format file records when they agree, else fp32."""
    import json

    from loraredux.base_format import BASES
    from loraredux.io import read_adapter_config

    try:
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    if isinstance(metrics, dict) and metrics.get("base") in BASES:
        return metrics["base"], f"as the run in {directory} trained (metrics.json)"
    formats = read_adapter_config(directory).get("base_formats")
    found = set(formats.values()) if isinstance(formats, dict) else set()
    if len(found) == 1 and (fmt := found.pop()) in ("nf4", "fp4", "int8"):
        return fmt, "as the adapter file records"
    return "fp32", "the model as loaded"


def _merge(model: Any, args: argparse.Namespace) -> None:
    """Put the base in --base (or the trained one), load the adapter, merge: dense layers, or with --requantize the
    base's format again (the per-layer error printed, and a quantization config for transformers to reload it)."""
    import warnings

    import loraredux as lx
    from loraredux.base_format import convert_base_, dequantize_, quantization_config
    from loraredux.io import read_adapter_config

    name, why = (args.base, "--base") if args.base else _trained_base(args.directory)
    if args.requantize and name not in ("nf4", "fp4", "int8"):
        raise UsageError(
            f"--requantize quantizes the merged layers back into a quantized base; the base is {name} "
            "(give --base nf4, fp4 or int8)"
        )
    keep = read_adapter_config(args.directory).get("modules_to_save") or []
    try:
        base = convert_base_(model, name, keep=[k for k in keep if isinstance(k, str)])
    except (ValueError, ImportError) as err:
        raise UsageError(f"--base {name}: {err}") from None
    print(f"{base.describe()} ({why})")
    lx.load_adapter(model, args.directory)
    if not args.requantize:
        lx.merge_(model)
        dequantize_(model)  # the layers the adapter left quantized, too: a dense checkpoint
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = lx.quant.merge_requantized(model)
    print(
        "requantized merge, per layer ||deq(q(W')) - W'|| / ||ΔW|| (the share of the update lost):"
    )
    for path, e in errors.items():
        print(f"  {path:<56} {e:.3f}")
    for w in caught:
        log.warning("%s", w.message)
    model.config.quantization_config = quantization_config(model, name)


def _cmd_methods(args: argparse.Namespace) -> int:
    import loraredux as lx
    from loraredux.core import config_class

    for name in lx.available_methods():
        cls = config_class(name)
        fields = ", ".join(f"{f.name}={_default(f)!r}" for f in dataclasses.fields(cls))
        doc = (sys.modules[cls.adapter.__module__].__doc__ or "").strip()
        print(f"{name:<12} {doc.splitlines()[0] if doc else ''}\n{'':<12} {fields}")
    return 0


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _cmd_inits(args: argparse.Namespace) -> int:
    import loraredux as lx

    print(f"{'init':<11} {'data':<7} {'base':<7} summary / options")
    for name in lx.init.available():
        spec = lx.init.get(name)
        data = ",".join(sorted(spec.needs)) or "-"
        base = ("moves" if spec.exact else "moves*") if spec.moves_base else "-"
        print(f"{name:<11} {data:<7} {base:<7} {spec.summary}")
        if spec.options:
            options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
            print(f"{'':<27} options: {options}")
    print(
        "data: calibration statistics it estimates from (train uses --calibration-batches batches)"
    )
    print(
        "base: it moves the frozen base weight (* not by a low-rank term: no rank-2r PEFT conversion)"
    )
    return 0


def _cmd_optimizers(args: argparse.Namespace) -> int:
    import textwrap

    import loraredux as lx

    for name in lx.optim.available():
        d = lx.optim.describe(name)
        print(
            textwrap.fill(d.summary, 114, initial_indent=f"{name:<13} ", subsequent_indent=" " * 14)
        )
        options = [f"{k}={v!r}" for k, v in d.options.items()]
        if d.passes_on:
            options.append("and torch.optim.AdamW's (betas, eps, weight_decay, ...)")
        if options:
            lead = " " * 14 + "options: "
            print(
                textwrap.fill(
                    ", ".join(options), 114, initial_indent=lead, subsequent_indent=" " * 23
                )
            )
    print("set options with train --optimizer NAME --optimizer-option KEY=VALUE")
    return 0
