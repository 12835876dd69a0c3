"""Speed and memory of every registered method against LoRA, and DoRA against PEFT's DoRA, side by side.

The setup is the foundation's LoRA benchmark (`lora_speed.py`): a random `LlamaForCausalLM` with SmolLM2-135M's
layer shapes and 8 layers, batch 4 x 128 tokens, fp32 on CPU, 2 threads, adapters on all seven projections, AdamW.
All variants are deep copies of one seeded model. Two parts:

  1. **DoRA** (issue 3's targets): loraredux DoRA, loraredux LoRA and PEFT DoRA (`use_dora=True`), r = 16,
     alpha = 32; PEFT LoRA beside them for reference. A sanity check first gives loraredux and PEFT DoRA the same
     A, B and magnitude and compares their losses and gradients. Timed: the training step and unmerged inference.
  2. **Every registered method**: the training step of each method, its peak RSS during a training step (fresh
     subprocesses) and its trainable parameters, each relative to loraredux LoRA r = 16. The configs are chosen
     in `METHOD_CONFIGS` (the comments say why); a registered method missing there is an error, so the table
     always covers the whole registry.

Timings are interleaved round-robin after warm-up rounds, and only rounds no other process disturbed count (see
`_common.py`); ratios are ratios of medians with the quartiles of the per-round ratios. `--help` lists the options;
`--quick` is a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraredux.io.files import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MiB,
    format_table,
    interleaved_times,
    machine_info,
    malloc_trim,
    peak_rss_window,
    rss_bytes,
    summarise,
)
from lora_speed import (
    TARGETS,
    batch,
    make_forward,
    make_train_step,
    pick_rounds,
    ratio_stats,
    reference_model,
    time_table,
    trainable,
)

# The configs of part 2, at LoRA r = 16's scale. Where a method's parameter budget is set by its rank we use the
# rank that gives LoRA r = 16's budget, so step times compare at equal trainable parameters where possible.
METHOD_CONFIGS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 16, "alpha": 32},
    "dora": {"rank": 16, "alpha": 32},  # LoRA's budget plus one magnitude per output
    "adalora": {
        "init_r": 16,
        "target_r": 8,
        "alpha": 32,
        "total_step": 10_000,
    },  # + r singular values
    "hira": {"rank": 16},  # LoRA r = 16's budget
    "loha": {"rank": 8, "alpha": 16},  # 2 r (in + out): LoRA r = 16's budget
    "abba": {"rank": 8},  # (r1 + r2)(in + out) with r1 = r2 = 8: LoRA r = 16's budget
    "mora": {"rank": 16},  # r_hat^2 <= LoRA r = 16's budget
    "lokr": {"rank": 16, "alpha": 32},  # PEFT's default factorisation: far fewer parameters
    "krona": {},  # factors near sqrt(out) x sqrt(in): far fewer parameters
    "lora_xs": {"rank": 16, "alpha": 16},  # r^2 per layer
    "svft": {"pattern": "plain"},  # one coefficient per singular value, full bases
    "polar": {"rank": 16, "alpha": 32},  # LoRA r = 16's budget plus r^2
}
DORA_TARGETS = {
    "train: dora / lora (loraredux)": 1.10,
    "train: dora loraredux / dora peft": 0.90,
    "inference: dora / lora (loraredux)": 1.10,
}


# ----------------------------------------------------------------------------------------------- variants


def adapted(reference: nn.Module, method: str, fields: dict[str, Any]) -> nn.Module:
    import loraredux as lx

    model = copy.deepcopy(reference)
    lx.adapt_(model, lx.config(method, **fields), targets=TARGETS)
    return model


def peft_model(reference: nn.Module, rank: int, alpha: float, dora: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, use_dora=dora
    )
    return get_peft_model(copy.deepcopy(reference), config)


@torch.no_grad()
def equalise_dora(ours: nn.Module, theirs: nn.Module, seed: int) -> int:
    """The same A, small random B and perturbed magnitude in loraredux's and PEFT's DoRA."""
    import loraredux as lx

    gen = torch.Generator().manual_seed(seed + 1)
    n = 0
    for path, a in lx.adapters(ours):
        layer = theirs.base_model.model.get_submodule(path)
        a.B.copy_(torch.randn(a.B.shape, generator=gen) * 0.02)
        a.magnitude.mul_(1 + 0.01 * torch.randn(a.magnitude.shape, generator=gen))
        layer.lora_A["default"].weight.copy_(a.A)
        layer.lora_B["default"].weight.copy_(a.B)
        layer.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
        n += 1
    return n


def dora_sanity(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Same loss and same A, B, magnitude gradients for loraredux's and PEFT's DoRA."""
    import loraredux as lx

    losses = {}
    for name, model in (("loraredux", ours), ("peft", theirs)):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
    diff = scale = 0.0
    for path, a in lx.adapters(ours):
        layer = theirs.base_model.model.get_submodule(path)
        for mine, other in (
            (a.A.grad, layer.lora_A["default"].weight.grad),
            (a.B.grad, layer.lora_B["default"].weight.grad),
            (a.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad),
        ):
            diff = max(diff, (mine - other).abs().max().item())
            scale = max(scale, other.abs().max().item())
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    loss_diff = abs(losses["loraredux"] - losses["peft"])
    ok = loss_diff <= 1e-5 * max(1.0, abs(losses["peft"])) and diff <= 1e-4 * max(scale, 1e-12)
    return {"losses": losses, "loss_abs_diff": loss_diff, "grad_max_abs_diff": diff, "ok": ok}


def fit_step(model: nn.Module, ids: torch.Tensor, lr: float) -> Callable[[], None]:
    """One training step as `lx.train.fit` runs it: the LM loss plus the adapters' penalty, backward, the
    `before_optimizer_step` hooks, AdamW's step, the `on_optimizer_step` hooks, zero_grad. So AdaLoRA's allocator
    and orthogonality penalty and PoLAR's landing field are timed with the method, as a user runs it."""
    import loraredux as lx

    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    before = [m for m in model.modules() if callable(getattr(m, "before_optimizer_step", None))]
    after = [m for m in model.modules() if callable(getattr(m, "on_optimizer_step", None))]
    model.train()
    count = [0]

    def step() -> None:
        count[0] += 1
        loss = model(input_ids=ids, labels=ids).loss
        extra = lx.penalty(model)
        (loss if extra is None else loss + extra).backward()
        for m in before:
            m.before_optimizer_step(count[0])
        optimizer.step()
        for m in after:
            m.on_optimizer_step(count[0])
        optimizer.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------------------------- memory


PEFT_VARIANTS = {
    "peft-dora": True,
    "peft-lora": False,
}  # memory variants of part 1 besides our methods


def memory_worker(args: argparse.Namespace) -> None:
    """In a fresh process: one variant's model, the peak RSS of a steady-state training step above it."""
    torch.set_num_threads(args.threads)
    name, reference = args.memory_worker, reference_model(args)
    if name in PEFT_VARIANTS:
        model = peft_model(reference, 16, 32.0, dora=PEFT_VARIANTS[name])
    else:
        model = adapted(reference, name, METHOD_CONFIGS[name])
    step = fit_step(model, batch(args), args.lr)
    malloc_trim()
    baseline = rss_bytes()
    peak_rss_window(step, baseline)  # the first step creates the optimizer state
    steady = peak_rss_window(step, baseline)
    print(json.dumps({"method": args.memory_worker, "steady_step": steady}))


def measure_memory(args: argparse.Namespace, methods: list[str]) -> dict[str, list[float]]:
    """MiB above the built model for each method, `--memory-repeats` fresh processes each, two at a time."""
    flags = ("layers", "vocab", "batch", "seq", "seed", "threads", "lr")
    runs: dict[str, list[float]] = {m: [] for m in methods}
    jobs = [m for _ in range(args.memory_repeats) for m in methods]
    for i in range(0, len(jobs), 2):
        procs = {}
        for method in jobs[i : i + 2]:
            command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", method]
            for flag in flags:
                command += [f"--{flag}", str(getattr(args, flag))]
            procs[method] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        for method, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker {method} failed:\n{stderr[-4000:]}")
            record = json.loads(stdout.strip().splitlines()[-1])
            runs[method].append(record["steady_step"]["peak_bytes"] / MiB)
    return runs


# ----------------------------------------------------------------------------------------------- parts


def part_dora(args: argparse.Namespace, reference: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    models = {
        "dora": adapted(reference, "dora", METHOD_CONFIGS["dora"]),
        "lora": adapted(reference, "lora", METHOD_CONFIGS["lora"]),
        "peft dora": peft_model(reference, 16, 32.0, dora=True),
        "peft lora": peft_model(reference, 16, 32.0, dora=False),
    }
    n = equalise_dora(models["dora"], models["peft dora"], args.seed)
    check = dora_sanity(models["dora"], models["peft dora"], ids)
    print(
        f"\nsanity ({n} DoRA layers, identical weights): loss loraredux {check['losses']['loraredux']:.6f} "
        f"vs PEFT {check['losses']['peft']:.6f}; max |grad diff| {check['grad_max_abs_diff']:.1e} -> "
        f"{'OK' if check['ok'] else 'MISMATCH'}"
    )
    if not check["ok"]:
        raise SystemExit(
            "sanity check failed: loraredux and PEFT DoRA do not compute the same thing"
        )
    print(f"timing training steps ({args.repeats} clean rounds wanted) ...", flush=True)
    deadline = time.perf_counter() + 0.3 * args.budget
    steps = {v: make_train_step(m, ids, args.lr) for v, m in models.items()}
    train_rounds = interleaved_times(
        steps, args.repeats, args.warmup, max_wait=args.max_wait, deadline=deadline
    )
    del steps
    print(f"timing inference ({3 * args.repeats} clean rounds wanted) ...", flush=True)
    deadline = time.perf_counter() + 0.2 * args.budget
    forwards = {v: make_forward(m, ids) for v, m in models.items()}
    infer_rounds = interleaved_times(
        forwards, 3 * args.repeats, args.warmup, max_wait=args.max_wait, deadline=deadline
    )
    del forwards, models
    memory = None if args.no_memory else measure_memory(args, ["dora", "lora", *PEFT_VARIANTS])
    train_times, train_basis = pick_rounds(train_rounds)
    infer_times, infer_basis = pick_rounds(infer_rounds)
    train = {v: summarise(t) for v, t in train_times.items()}
    infer = {v: summarise(t) for v, t in infer_times.items()}
    ratios = {
        "train: dora / lora (loraredux)": ratio_stats(train_times["dora"], train_times["lora"]),
        "train: dora loraredux / dora peft": ratio_stats(
            train_times["dora"], train_times["peft dora"]
        ),
        "train: dora peft / lora peft": ratio_stats(
            train_times["peft dora"], train_times["peft lora"]
        ),
        "inference: dora / lora (loraredux)": ratio_stats(infer_times["dora"], infer_times["lora"]),
        "inference: dora peft / lora peft": ratio_stats(
            infer_times["peft dora"], infer_times["peft lora"]
        ),
        "inference: dora loraredux / dora peft": ratio_stats(
            infer_times["dora"], infer_times["peft dora"]
        ),
    }
    print("\n### DoRA: training step (forward + backward + AdamW step + zero_grad), ms")
    print(time_table(train, ("lora", "peft dora")))
    print(
        f"({train_basis['clean_rounds']} clean of {train_basis['rounds']} rounds, "
        f"statistics over {train_basis['statistics_over']})"
    )
    print("\n### DoRA: unmerged inference (forward, no_grad, eval), ms")
    print(time_table(infer, ("lora", "peft dora")))
    print(
        f"({infer_basis['clean_rounds']} clean of {infer_basis['rounds']} rounds, "
        f"statistics over {infer_basis['statistics_over']})"
    )
    if memory is not None:
        mib = {v: summarise(runs)["median"] for v, runs in memory.items()}
        ratios["memory: dora / lora (loraredux)"] = {"ratio_of_medians": mib["dora"] / mib["lora"]}
        ratios["memory: dora loraredux / dora peft"] = {
            "ratio_of_medians": mib["dora"] / mib["peft-dora"]
        }
        ratios["memory: dora peft / lora peft"] = {
            "ratio_of_medians": mib["peft-dora"] / mib["peft-lora"]
        }
        print("\n### DoRA: peak RSS during a steady training step, above the built model, MiB")
        rows = [
            [v, f"{m:.1f}", f"{min(memory[v]):.1f}-{max(memory[v]):.1f}"] for v, m in mib.items()
        ]
        print(format_table(["variant", "median", "range"], rows))
        print(f"({args.memory_repeats} fresh processes per variant)")
    print(
        "\n### DoRA: ratios of medians [quartiles of the per-round ratios], and issue 3's targets"
    )
    rows = []
    verdicts = {}
    for key, r in ratios.items():
        limit = DORA_TARGETS.get(key)
        met = None if limit is None else r["ratio_of_medians"] <= limit
        verdicts[key] = {"value": r["ratio_of_medians"], "limit": limit, "met": met}
        spread = (
            f" [{r['per_round_q1']:.3f}-{r['per_round_q3']:.3f}]" if "per_round_q1" in r else ""
        )
        rows.append(
            [
                key,
                f"{r['ratio_of_medians']:.3f}{spread}",
                "" if limit is None else f"<= {limit:.2f}",
                "" if met is None else ("met" if met else "MISSED"),
            ]
        )
    print(format_table(["ratio", "value", "target", "verdict"], rows))
    return {
        "sanity": check,
        "train_rounds": train_rounds.to_dict(),
        "inference_rounds": infer_rounds.to_dict(),
        "train_summary_s": train,
        "inference_summary_s": infer,
        "basis": {"train": train_basis, "inference": infer_basis},
        "memory_mib": memory,
        "ratios": ratios,
        "targets": verdicts,
    }


def part_methods(
    args: argparse.Namespace, reference: nn.Module, ids: torch.Tensor
) -> dict[str, Any]:
    import loraredux as lx

    missing = sorted(set(lx.available_methods()) - set(METHOD_CONFIGS))
    if missing:
        raise SystemExit(f"METHOD_CONFIGS has no entry for registered method(s) {missing}")
    methods = [m for m in METHOD_CONFIGS if m in lx.available_methods()]
    models = {m: adapted(reference, m, METHOD_CONFIGS[m]) for m in methods}
    params = {m: sum(p.numel() for p in trainable(models[m])) for m in methods}
    print(
        f"\ntiming the training step of {len(methods)} methods ({args.method_repeats} clean rounds wanted) ..."
    )
    deadline = time.perf_counter() + 0.35 * args.budget
    steps = {m: fit_step(models[m], ids, args.lr) for m in methods}
    rounds = interleaved_times(
        steps, args.method_repeats, args.warmup, max_wait=args.max_wait, deadline=deadline
    )
    del steps, models
    times, basis = pick_rounds(rounds)
    train = {m: summarise(t) for m, t in times.items()}
    memory = None if args.no_memory else measure_memory(args, methods)
    print(
        "\n### Every method: training step, peak memory and trainable parameters relative to LoRA r=16"
    )
    rows = []
    for m in methods:
        r = ratio_stats(times[m], times["lora"])
        row = [
            m,
            json.dumps(METHOD_CONFIGS[m]).replace('"', ""),
            f"{params[m]:,}",
            f"{params[m] / params['lora']:.3f}",
            f"{train[m]['median'] * 1e3:.1f}",
            f"{r['ratio_of_medians']:.3f} [{r['per_round_q1']:.3f}-{r['per_round_q3']:.3f}]",
        ]
        if memory is not None:
            mib = summarise(memory[m])["median"]
            row += [f"{mib:.1f}", f"{mib / summarise(memory['lora'])['median']:.3f}"]
        rows.append(row)
    headers = ["method", "config", "trainable", "/ lora", "step ms", "step / lora [IQR]"]
    if memory is not None:
        headers += ["peak MiB", "/ lora"]
    print(format_table(headers, rows))
    print(
        f"({basis['clean_rounds']} clean of {basis['rounds']} rounds, statistics over "
        f"{basis['statistics_over']}; peak MiB: RSS above the built model during a steady training "
        f"step, median of {args.memory_repeats} fresh processes)"
    )
    return {
        "configs": METHOD_CONFIGS,
        "trainable_parameters": params,
        "rounds": rounds.to_dict(),
        "basis": basis,
        "train_summary_s": train,
        "memory_mib": memory,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=40, help="clean DoRA training rounds wanted")
    p.add_argument("--method-repeats", type=int, default=15, help="clean rounds for part 2")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--memory-repeats", type=int, default=2, help="fresh processes per method")
    p.add_argument("--max-wait", type=float, default=20.0, help="s to wait for quiet per round")
    p.add_argument("--budget", type=float, default=1500.0, help="wall-time budget, s")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("all", "dora", "methods"), default="all")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--json", metavar="PATH", help="write every measurement and summary as JSON")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.batch, args.seq = 2, 4096, 1, 32
        args.repeats, args.method_repeats, args.warmup, args.memory_repeats = 5, 3, 1, 1
        args.max_wait, args.budget = 0.0, 30.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
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
        f"batch {args.batch} x {args.seq} tokens; adapters on {', '.join(TARGETS)}; "
        f"AdamW lr={args.lr:g}; fp32"
    )
    reference = reference_model(args)
    ids = batch(args)
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_worker")},
        "machine": info,
    }
    if args.part in ("all", "dora"):
        result["dora"] = part_dora(args, reference, ids)
    if args.part in ("all", "methods"):
        result["methods"] = part_methods(args, reference, ids)
    result["wall_seconds"] = time.perf_counter() - t_start
    print(f"\ntotal wall time {result['wall_seconds']:.0f} s")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
