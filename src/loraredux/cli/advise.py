"""`loraredux advise`: measure a model on its data and prescribe the adapter configuration, each choice with its
measured reason; `--out DIR` writes recommendation.json, report.md, report.html and plots, `--verify`
trains the recommendation against plain LoRA."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from .common import (
    UsageError,
    add_task_arguments,
    build_task,
    data_columns,
    positive_float,
    positive_int,
    targets,
)
from .formatting import HelpFormatter

__all__ = ["add_advise"]


def add_advise(sub: Any) -> None:
    p = sub.add_parser(
        "advise",
        help="measure a model and its data, and recommend rank, init, optimizer, method and base format",
        description="Measure every target layer (W0's spectrum; the calibration gradient's spectrum, its noise "
        "from two halves of the batches, the rank that stands above the noise by Gavish-Donoho's threshold, its "
        "alignment with W0's principal and minor subspaces; the inputs' conditioning) and the memory of training "
        "at each base format, then recommend rank per layer, init, optimizer, method, base format and serving, "
        "each with the measured reason. Defaults: MiniLM on Rotten Tomatoes, its query and value layers.",
        formatter_class=HelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument(
        "--targets",
        type=targets,
        default=None,
        help="comma-separated module names (suffix match), 'all-linear', or 're:<regex>'; default: as "
        "`loraredux train`, query,value (BERT) or q_proj,v_proj (Llama)",
    )
    p.add_argument(
        "--exclude", type=targets, default=None, help="modules never to adapt, same forms"
    )
    p.add_argument(
        "--calibration-batches",
        type=positive_int,
        default=16,
        help="training batches the gradients are measured on; at least 2: the gradient noise, which decides "
        "the ranks, is the difference between the mean gradients of two halves of them",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="accelerator memory for training, e.g. 24GiB: decides the base format (bf16, int8, nf4)",
    )
    p.add_argument(
        "--train-batch-size",
        type=positive_int,
        default=None,
        help="the training batch the memory estimate assumes (default: --batch-size)",
    )
    p.add_argument(
        "--train-length",
        type=positive_int,
        default=None,
        help="the sequence length the memory estimate assumes (default: --max-length)",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the training hardware: which attention kernel (fused or not) the activation estimate assumes",
    )
    p.add_argument(
        "--adapters",
        type=positive_int,
        default=1,
        help="how many adapters of this shape will be stored or served (decides sharing and serving)",
    )
    p.add_argument("--storage", default=None, help="storage for all the adapters, e.g. 1GiB")
    p.add_argument(
        "--min-rank", type=positive_int, default=1, help="the smallest rank a layer gets"
    )
    p.add_argument(
        "--max-rank", type=positive_int, default=64, help="the largest rank a layer gets"
    )
    p.add_argument(
        "--preserve",
        action="store_true",
        help="protect the pretrained knowledge: prefer the minor subspace (MiLoRA)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="train the recommendation against plain LoRA r=8 and one or two alternatives, same data and lr",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="--verify: optimizer steps (default one epoch)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="--verify: train each configuration at this many seeds (--seed, --seed + 1, ...; N times the cost) "
        "and compare their means; a difference counts as evidence only over at least 2 seeds and beyond the "
        "runs' seed spread, so with 1 every difference is reported as within seed noise",
    )
    p.add_argument(
        "--lr",
        type=_learning_rates,
        default=None,
        help="--verify: peak learning rate of every run (default 4e-3 cls, 5e-4 LM), or a comma-separated grid "
        "(e.g. 2e-3,4e-3): each configuration then trains at each and is compared at its best",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write recommendation.json, report.md, report.html, plots",
    )
    p.add_argument("--no-plots", action="store_true", help="with --out: no PNG plots")
    p.set_defaults(run=_cmd_advise)


def _learning_rates(text: str) -> list[float]:
    return [positive_float(part) for part in text.split(",") if part.strip()] or [
        positive_float(text)
    ]


def _print(rec: Any) -> None:
    from collections import Counter

    from loraredux.advisor.formatting import rank_summary
    from loraredux.advisor.verdicts import compare_runs, memory_check

    def plain(text: str) -> str:  # the report's Markdown marks, for a terminal
        return text.replace("**", "").replace("`", "")

    print("\nrecommendation:")
    for name, choice in rec.choices.items():
        value = f"{choice.value:.4g}" if isinstance(choice.value, float) else str(choice.value)
        if name == "rank" and rec.rank_pattern:
            ranks = [a.rank for a in rec.layers.values()]
            value += f" (the config's r: {rank_summary(ranks, choice.value)})"
        print(f"  {name:<10} {value}")
        print(f"  {'':<10} {choice.reason}")
    ranks = Counter(a.rank for a in rec.layers.values())
    spread = ", ".join(f"r={r}: {n}" for r, n in sorted(ranks.items()))
    print(f"  layers     {len(rec.layers)} ({spread})")
    if rec.verify:
        v = rec.verify
        grid = (
            f", each at its best of lr {', '.join(v['lrs'])}"
            if v.get("lrs") and len(v["lrs"]) > 1
            else ""
        )
        seeds = v.get("seeds") or [v.get("seed")]
        at = (
            f"seed {seeds[0]}"
            if len(seeds) < 2
            else f"mean over seeds {', '.join(map(str, seeds))}"
        )
        print(f"\nverification ({v['metric']}, {v['steps']} steps, same data, {at}{grid}):")
        for run in v["runs"]:
            print(
                f"  {run['name']:<26} {v['metric']} {run['metric']:.4f}  lr {run['lr']:g}  train loss "
                f"{run['train_loss']:.4f}  {run['trainable']:>10,} trainable  {run['seconds']:.0f} s"
            )
        for sentence in compare_runs(v):
            print(f"  {plain(sentence)}")
        check = memory_check(rec.to_dict())
        if check is not None:
            print(f"  {plain(check)}")


def _cmd_advise(args: argparse.Namespace) -> int:
    from loraredux.advisor import parse_bytes
    from loraredux.advisor.model import MIN_CALIBRATION_BATCHES

    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a directory")
    for name in ("budget", "storage"):
        try:
            parse_bytes(getattr(args, name))
        except ValueError as err:
            raise UsageError(f"--{name}: {err}") from None
    if args.max_rank < args.min_rank:
        raise UsageError(f"--max-rank {args.max_rank} is below --min-rank {args.min_rank}")
    if args.calibration_batches < MIN_CALIBRATION_BATCHES:
        raise UsageError(
            f"--calibration-batches {args.calibration_batches}: at least {MIN_CALIBRATION_BATCHES} are needed, "
            "since the gradient noise, which decides every layer's rank, is the difference between the mean "
            "gradients of two halves of the batches"
        )
    # the verification's runs are logged at INFO; show them as the command runs (all phases with --verbose)
    verify_log = logging.getLogger("loraredux.advisor.verify")
    level = verify_log.level
    if not verify_log.isEnabledFor(logging.INFO):
        verify_log.setLevel(logging.INFO)
    try:
        return _advise(args)
    finally:
        verify_log.setLevel(level)


def _advise(args: argparse.Namespace) -> int:
    import torch

    from loraredux.advisor import advise, verify

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, task, data = build_task(args)
    target = args.targets or task.default_targets
    if isinstance(target, str) and target.startswith("re:"):
        target = target[3:]
    batches = [task.batches(i) for i in range(args.calibration_batches)]
    print(
        f"model {args.model}, data {data}: measuring the target layers on {len(batches)} calibration batches",
        flush=True,
    )
    rec = advise(
        model,
        batches,
        task.loss_fn,
        targets=target,
        exclude=args.exclude,
        modules_to_save=task.modules_to_save or None,
        budget=args.budget,
        batch_size=args.train_batch_size,
        seq_len=args.train_length,
        device=args.device,
        adapters=args.adapters,
        storage=args.storage,
        min_rank=args.min_rank,
        max_rank=args.max_rank,
        preserve=args.preserve,
        progress=not args.no_progress,
    )
    rec.model_info["name"] = args.model
    rec.data_info = {**(rec.data_info or {}), "name": data}
    del model
    if args.verify:
        verify(
            rec, args.model, args.data, train_examples=args.train_examples,
            eval_examples=args.eval_examples, steps=args.steps,
            lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            seeds=args.seeds, progress=not args.no_progress, columns=data_columns(args),
        )  # fmt: skip
    _print(rec)
    if args.out is not None:
        from loraredux.advisor.report import write_report

        written = write_report(rec.to_dict(), args.out, plots=not args.no_plots)
        print(f"\nwrote {', '.join(p.name for p in written)} to {args.out}/")
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    return 0
