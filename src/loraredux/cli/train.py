"""`loraredux train`: fine-tune a packaged model (or a local folder) with any registered method.

The run goes to a folder (`--out`, or a new one under runs/) and checkpoints into its checkpoint/ every
--save-every steps and at Ctrl-C or SIGTERM; `--resume` continues it exactly (the folder's rules: `runs.py`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    UsageError,
    add_task_arguments,
    build_task,
    field_value,
    positive_float,
    positive_int,
    targets,
)
from .formatting import HelpFormatter
from .runs import (
    SAVE_EVERY,
    check_earlier_run,
    check_out,
    check_resume,
    default_out,
    interrupted,
    run_signature,
    stop_on_signals,
)
from .train_config import add_base_argument, method_fields, read_recommendation

__all__ = ["add_train"]


def add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a packaged model with an adapter and report the metric before and after",
        description="Fine-tune a model with an adapter. Defaults: MiniLM on Rotten Tomatoes, LoRA r=8 on "
        "query/value plus the classifier head, one epoch over 4,000 snippets (a few minutes on 2 cores).",
        formatter_class=HelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument(
        "--method",
        default="lora",
        help="adapter method (see `loraredux methods`); --rank, --alpha, --dropout and --rslora apply "
        "where the method has that field",
    )
    add_base_argument(
        p,
        "the frozen base's format: bf16 converts the model; nf4 / fp4 / int8 quantize every linear layer but "
        "the head and the modules trained in full with bitsandbytes (QLoRA's: double quantization, blocks of "
        "64), computing in the model's dtype; default fp32 (the model as loaded), or the recommendation's "
        "with --recommendation",
    )
    p.add_argument(
        "--targets",
        type=targets,
        default=None,
        help="comma-separated module names (suffix match), 'all-linear', or 're:<regex>'; "
        "default: query,value (BERT) or q_proj,v_proj (Llama)",
    )
    p.add_argument(
        "--exclude", type=targets, default=None, help="modules never to adapt, same forms"
    )
    p.add_argument("--rank", type=positive_int, default=None, help="adapter rank r (default 8)")
    p.add_argument(
        "--alpha",
        type=positive_float,
        default=None,
        help="scale numerator: s = alpha / r (default 16: the tuned s = 2 at r = 8; the library's LoRA "
        "config, like PEFT's, defaults to alpha 8)",
    )
    p.add_argument(
        "--dropout", type=float, default=None, help="dropout on the adapter input (default 0)"
    )
    p.add_argument("--rslora", action="store_true", help="use s = alpha / sqrt(r)")
    p.add_argument(
        "--init",
        default=None,
        help="initialiser of the factors (see `loraredux inits`), e.g. pissa, lora_ga, eva; data-aware ones use "
        "the first --calibration-batches training batches (default: the method's, kaiming for LoRA)",
    )
    p.add_argument(
        "--init-option",
        action="append",
        default=[],
        type=field_value,
        metavar="KEY=VALUE",
        help="an option of the initialiser (repeatable), e.g. --init-option niter=4 (PiSSA's randomized SVD) "
        "or --init-option rho=2 (EVA)",
    )
    p.add_argument(
        "--calibration-batches",
        type=positive_int,
        default=8,
        help="training batches a data-aware --init estimates its subspace from",
    )
    p.add_argument(
        "--field",
        action="append",
        default=[],
        type=field_value,
        metavar="KEY=VALUE",
        help="set any field of the method's config (repeatable), e.g. --field init_r=16 or --field "
        "compress=sharing; the value is read as JSON, else as text",
    )
    p.add_argument(
        "--optimizer",
        default=None,
        help="optimizer over the adapter parameters (loraredux.optim.available(): adamw, loraplus, "
        "scaled_sgd, scaled_adamw, ...); its options with --optimizer-option (default adamw, or the "
        "recommendation's)",
    )
    p.add_argument(
        "--recommendation",
        type=Path,
        default=None,
        metavar="PATH",
        help="apply `loraredux advise`'s recommendation.json (or the folder holding it): its method config, "
        "targets, per-layer ranks, optimizer and base format; --targets, --optimizer and --base still override",
    )
    p.add_argument(
        "--optimizer-option",
        action="append",
        default=[],
        type=field_value,
        metavar="KEY=VALUE",
        help="an option of the optimizer (repeatable), e.g. --optimizer-option ratio=16 (LoRA+) or "
        "--optimizer-option delta=0.01 (scaled optimizers)",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="optimizer steps; default: one epoch over the training examples",
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate (warmup + cosine); default 4e-3 classification, 5e-4 LM",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the adapter (PEFT format), metrics.json and the checkpoints here; default: a new folder "
        "runs/train-MODEL-DATA-METHOD-TIME, printed at the start",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out (its adapter, metrics and checkpoint); without it such an --out "
        "is refused",
    )
    p.add_argument(
        "--save-every",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"checkpoint every N steps (and after the last, and at Ctrl-C or SIGTERM) into OUT/checkpoint/, "
        f"so that a run that is killed or interrupted can continue with --resume; default {SAVE_EVERY} "
        "(with --resume: the checkpointed run's N)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in OUT/checkpoint/ (needs --out); the options that decide the "
        "training (model, data, method and its fields, optimizer, steps, lr, seed, ...) must be those of "
        "that run; the result is the same as if it had never stopped",
    )
    p.set_defaults(run=_cmd_train, on_interrupt=interrupted)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    import loraredux as lx
    from loraredux.io.files import write_json_atomic
    from loraredux.tasks import adapt_for_task
    from loraredux.train import NonFiniteError, TrainConfig, fit

    if args.resume and args.out is None:
        raise UsageError("--resume needs --out DIR, the folder of the run to continue")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: give one")
    advice = read_recommendation(args) if args.recommendation is not None else None
    if advice is not None:
        cfg, patterns = advice.config, advice.patterns
        args.method = cfg.method
        args.targets = args.targets or advice.targets
        args.optimizer = args.optimizer or advice.optimizer
        args.base = args.base or advice.base
    else:
        cfg = lx.config(args.method, **method_fields(args))  # a bad value fails before any loading
        patterns = {}
    args.base = args.base or "fp32"
    args.optimizer = args.optimizer or "adamw"
    if args.optimizer not in lx.optim.available():
        raise UsageError(
            f"unknown --optimizer {args.optimizer!r}; choose from {lx.optim.available()}"
        )
    if args.out is None:
        args.out = default_out(args)
        print(f"writing to {args.out}/ (--out DIR chooses the folder)")
    check_out(args.out)
    signature = run_signature(args, cfg, patterns)
    save_every = args.save_every
    if args.resume:
        found = check_resume(args, signature)
        save_every = save_every or found.config.get("checkpoint_every")
    else:
        check_earlier_run(args.out, args.overwrite)
    save_every = save_every or SAVE_EVERY
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, task, data = build_task(args)
    targets = args.targets or task.default_targets
    if isinstance(targets, str) and targets.startswith("re:"):
        targets = targets[3:]
    batch_size = args.batch_size or (32 if task.kind == "classification" else 8)
    steps = args.steps or math.ceil(task.train_size / batch_size)
    lr = args.lr or (4e-3 if task.kind == "classification" else 5e-4)
    init = lx.init.get(cfg.init) if isinstance(getattr(cfg, "init", None), str) else None
    loftq = init is not None and init.name == "loftq"
    base = _convert_base(model, args.base, task.modules_to_save, keep_weights=loftq)
    if init is not None and init.needs:
        print(f"init {cfg.init}: estimating from {args.calibration_batches} training batches")
    try:
        cfg = adapt_for_task(
            model,
            cfg,
            task,
            steps=steps,
            targets=targets,
            exclude=args.exclude,
            calibration_batches=args.calibration_batches,
            progress=not args.no_progress,
            base=base,
            **patterns,
        )
    except ValueError as err:
        if not base.quantized:
            raise
        raise UsageError(f"--base {args.base}: {err}") from None

    what = "training examples"
    if "loss_on" in task.info:  # chat
        what = f"training conversations, the loss on {task.info['loss_on']}"
    print(f"model {args.model}, data {data}: {task.train_size} {what}")
    print(base.describe())
    if base.loftq is not None:
        report = base.loftq
        print(
            f"init loftq from the dense weights before quantizing: relative weight error "
            f"{report.aggregate('base_error'):.4f} (QLoRA, B = 0) -> {report.aggregate('error'):.4f}"
        )
    with lx.disabled(model):  # exactly the base model
        before = task.evaluate(model.eval())
    print(f"{task.metric} before: {before[task.metric]:.4f}")
    n_train = sum(p.numel() for p in lx.trainable_parameters(model).values())
    n_total = _parameter_count(model)
    ranks = f"r={getattr(cfg, 'rank', '-')}"
    if patterns.get("rank_pattern"):
        ranks += f" ({len(patterns['rank_pattern'])} layers with their own rank)"
    print(
        f"{args.method} {ranks} on {len(list(lx.adapters(model)))} layers: "
        f"{n_train:,} trainable of {n_total:,} parameters ({100 * n_train / n_total:.2f}%)"
    )

    train_cfg = TrainConfig(
        steps=steps,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        seed=args.seed,
        checkpoint_every=save_every,
    )
    model.train()
    options = dict(args.optimizer_option)

    def make_optimizer(
        params: list[Any],
    ) -> Any:  # fit's factory; loraredux.optim finds the pairs itself
        try:
            return lx.optim.create(args.optimizer, model, lr=lr, **options)
        except ValueError as err:
            raise UsageError(f"--optimizer {args.optimizer}: {err}") from None

    if args.resume:
        print(f"resuming from {found.path} (step {found.step} of {steps})")
    try:
        with stop_on_signals() as asked:
            result = fit(
                model,
                task.batches,
                task.loss_fn,
                train_cfg,
                optimizer=make_optimizer,
                checkpoint_dir=args.out,
                resume=args.resume,
                signature=signature,
                should_stop=asked,
                progress=not args.no_progress,
            )
    # A diverged run or a full disk is no bug: one line (the step, the layer, the checkpoint kept), status 1.
    except NonFiniteError as err:
        hint = (
            f"; a lower --lr (this run: {lr:g}) often keeps training finite"
            if err.what != "parameter"
            else ""
        )
        print(f"error: {err}{hint}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    after = task.evaluate(model.eval())
    print(
        f"{task.metric} after:  {after[task.metric]:.4f}  ({steps} steps, lr {lr:g}, "
        f"{time.perf_counter() - t0:.0f} s in all)"
    )

    lx.save_adapter(model, args.out)
    metrics = {
        f"{task.metric}_before": before[task.metric],
        f"{task.metric}_after": after[task.metric],
        "model": args.model,
        "data": data,
        "method": args.method,
        "base": args.base,
        "base_info": base.to_dict(),
        "optimizer": args.optimizer,
        "optimizer_options": options,
        "config": cfg.to_dict(),
        "targets": targets,
        **patterns,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": args.seed,
        "trainable_parameters": n_train,
        "total_parameters": n_total,
        "final_train_loss": result.losses[-1] if result.losses else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if task.info:  # a data file: its path, columns, sizes and label mapping
        metrics["data_info"] = task.info
    write_json_atomic(args.out / "metrics.json", metrics)
    print(f"adapter and metrics written to {args.out}/")
    return 0


def _convert_base(model: Any, name: str, keep: list[str], keep_weights: bool) -> Any:
    """`base_format.convert_base_` with its one printed line; what it refuses is a usage error."""
    from loraredux.base_format import convert_base_

    try:
        base = convert_base_(model, name, keep=keep, keep_weights=keep_weights)
    except (ValueError, ImportError) as err:
        raise UsageError(f"--base {name}: {err}") from None
    return base


def _parameter_count(model: Any) -> int:
    """The model's parameters, a quantized layer's weight counted as out x in (its codes pack two to a byte)."""
    import loraredux as lx

    quantized = {
        id(m.weight): m.out_features * m.in_features
        for m in model.modules()
        if lx.quant.is_quantized(m)
    }
    return sum(quantized.get(id(p), p.numel()) for p in model.parameters())
