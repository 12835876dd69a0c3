"""Optimizer cost: the training step and the optimizer step of every `lx.optim` optimizer against AdamW.

The model is the foundation's benchmark model (`lora_speed.py`): a random `LlamaForCausalLM` with SmolLM2-135M's
layer shapes and 8 layers, batch 4 x 128 tokens, fp32 on CPU, 2 threads, LoRA on all seven projections, at r = 16
and r = 64 (alpha = 2 r). Every optimizer gets its own deep copy of one seeded adapted model whose B factors are
set to small random values first (a mid-training state: at LoRA's B = 0 some methods take degenerate shortcuts,
which would flatter them). Measured per rank:

  1. the **training step** (LM loss forward + backward + `optimizer.step()` + `zero_grad`), interleaved round-robin
     over all optimizers, only rounds no other process disturbed counting (`_common.py`); the ratio to AdamW is a
     ratio of medians, with the quartiles of the per-round ratios;
  2. the **optimizer step alone** (`optimizer.step()` on gradients kept from one backward and copied back before
     each call, the copy timed for every optimizer alike), interleaved the same way; its excess over AdamW's step,
     as a share of AdamW's training step, is the overhead the optimizer adds;
  3. the **optimizer state** after a step: the bytes of every tensor in `optimizer.state`, against AdamW's.

The goal: the r x r preconditioners cost at most 5% over AdamW on the training step; LoRA-Pro
(full-size moments) and LoRA-RITE (matrix-valued second moments) are measured and explained in BENCHMARKS.md.
`--help` lists the options; `--quick` is a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraredux.io.files import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, format_table, interleaved_times, machine_info, summarise
from lora_speed import TARGETS, batch, pick_rounds, ratio_stats, reference_model

# Options for optimizers whose defaults do not suit this model (none so far: every optimizer runs its defaults).
OPTIONS: dict[str, dict[str, Any]] = {}
# The optimizers whose extra work is r x r (per pair: Gram matrices, their factorizations, (out, r) / (r, in)
# products): the 5% goal applies to these.
R_BY_R = {"scaled_sgd", "scaled_adamw", "lora_fa", "reflora", "reflora_s", "balora", "altlora"}
GOAL = 1.05


def adapted(reference: nn.Module, rank: int, seed: int) -> nn.Module:
    """The reference with LoRA r = rank, alpha = 2 r on every projection, B small and random (a mid-training
    state)."""
    import loraredux as lx

    model = lx.adapt_(
        copy.deepcopy(reference), lx.config("lora", rank=rank, alpha=2 * rank), targets=TARGETS
    )
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _, adapter in lx.adapters(model):
            adapter.B.copy_(1e-2 * torch.randn(adapter.B.shape, generator=gen))
    return model


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor
) -> Callable[[], None]:
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def optimizer_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """`opt.step()` on the gradients present now, restored before every call (several optimizers write their
    transformed gradient into `.grad`, so stepping twice on one backward would compound it)."""
    saved = [
        (p, p.grad.detach().clone())
        for g in opt.param_groups
        for p in g["params"]
        if p.grad is not None
    ]

    def step() -> None:
        for p, g in saved:
            p.grad.copy_(g)
        opt.step()

    return step


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for per_param in opt.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )


def run_rank(
    args: argparse.Namespace, reference: nn.Module, ids: torch.Tensor, rank: int
) -> dict[str, Any]:
    from loraredux.optim import available, create

    names = ["adamw", *(n for n in available() if n != "adamw")]
    base = adapted(reference, rank, args.seed)
    models = {n: copy.deepcopy(base) for n in names}
    del base
    opts = {n: create(n, models[n], lr=args.lr, **OPTIONS.get(n, {})) for n in names}
    print(f"\nr = {rank}: timing the training step of {len(names)} optimizers ...", flush=True)
    t0 = time.perf_counter()
    rounds = interleaved_times(
        {n: train_step(models[n], opts[n], ids) for n in names},
        args.repeats,
        args.warmup,
        max_wait=args.max_wait,
        deadline=t0 + args.budget / 2 * 0.7,
    )
    train_times, train_basis = pick_rounds(rounds)
    state = {n: state_bytes(opts[n]) for n in names}
    print(f"r = {rank}: timing the optimizer step alone ...", flush=True)
    step_only = {}
    for n in names:  # one backward each; every timed call restores these gradients, then steps
        models[n](input_ids=ids, labels=ids).loss.backward()
        step_only[n] = optimizer_step(opts[n])
    step_rounds = interleaved_times(
        step_only,
        args.step_repeats,
        args.warmup,
        max_wait=args.max_wait,
        deadline=time.perf_counter() + args.budget / 2 * 0.25,
    )
    step_times, step_basis = pick_rounds(step_rounds)
    pairs = sum(1 for g in opts["scaled_sgd"].param_groups if g.get("pair"))
    del opts, models

    train = {n: summarise(t) for n, t in train_times.items()}
    step = {n: summarise(t) for n, t in step_times.items()}
    rows, verdicts = [], {}
    for n in names:
        r = ratio_stats(train_times[n], train_times["adamw"])
        overhead = (step[n]["median"] - step["adamw"]["median"]) / train["adamw"]["median"]
        goal = ""
        if n in R_BY_R:
            verdicts[n] = r["ratio_of_medians"] <= GOAL
            goal = "met" if verdicts[n] else "MISSED"
        rows.append(
            [
                n,
                f"{train[n]['median'] * 1e3:.1f}",
                f"{r['ratio_of_medians']:.3f} [{r['per_round_q1']:.3f}-{r['per_round_q3']:.3f}]",
                f"{step[n]['median'] * 1e3:.2f}",
                f"{step[n]['median'] / step['adamw']['median']:.2f}",
                f"{overhead:+.1%}",
                f"{state[n] / MiB:.1f}",
                f"{state[n] / state['adamw']:.2f}",
                goal,
            ]
        )
    headers = [
        "optimizer",
        "train ms",
        "train / adamw [IQR]",
        "opt.step ms",
        "/ adamw",
        "step excess / adamw train",
        "state MiB",
        "/ adamw",
        f"<= {GOAL:.2f} x",
    ]
    print(f"\n### r = {rank} ({pairs} factor pairs)")
    print(format_table(headers, rows))
    print(
        f"(training step: {train_basis['clean_rounds']} clean of {train_basis['rounds']} rounds, statistics over "
        f"{train_basis['statistics_over']}; optimizer step: {step_basis['clean_rounds']} clean of "
        f"{step_basis['rounds']} rounds, over {step_basis['statistics_over']})"
    )
    return {
        "rank": rank,
        "pairs": pairs,
        "options": {n: OPTIONS.get(n, {}) for n in names},
        "train_rounds": rounds.to_dict(),
        "step_rounds": step_rounds.to_dict(),
        "train_basis": train_basis,
        "step_basis": step_basis,
        "train_summary_s": train,
        "step_summary_s": step,
        "train_ratio_to_adamw": {
            n: ratio_stats(train_times[n], train_times["adamw"]) for n in names
        },
        "state_bytes": state,
        "goal_met": verdicts,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=15, help="clean training-step rounds wanted")
    p.add_argument(
        "--step-repeats", type=int, default=30, help="clean optimizer-step rounds wanted"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--max-wait", type=float, default=20.0, help="s to wait for quiet per round")
    p.add_argument("--budget", type=float, default=600.0, help="wall-time budget per rank, s")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of every optimizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    p.add_argument("--json", metavar="PATH", help="write every measurement and summary as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.batch, args.seq = 2, 4096, 1, 32
        args.repeats, args.step_repeats, args.warmup = 3, 3, 1
        args.max_wait, args.budget = 0.0, 20.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = machine_info()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, {torch.get_num_threads()} torch threads"
    )
    print(
        f"versions: python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}"
    )
    print(
        f"model: random Llama, SmolLM2-135M shapes, {args.layers} layers, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq} tokens; LoRA on {', '.join(TARGETS)}, alpha = 2 r; "
        f"lr={args.lr:g}; fp32"
    )
    reference = reference_model(args)
    ids = batch(args)
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": info,
        "ranks": [run_rank(args, reference, ids, r) for r in args.ranks],
    }
    result["wall_seconds"] = time.perf_counter() - t_start
    print(f"\ntotal wall time {result['wall_seconds']:.0f} s")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
