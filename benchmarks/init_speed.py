"""Initialisation time and peak memory of every registered initialiser on SmolLM2-135M.

The model is the packaged SmolLM2-135M-Instruct (`loraredux.assets.load_smollm2`, fp32, 30 layers, offline); the
targets are its 210 "all-linear" projections (q k v o gate up down of every layer), LoRA rank 16 with the default
alpha, on the CPU with `torch.set_num_threads(2)`. One measured unit is the whole call

    lx.adapt_(model, lx.config("lora", rank=16, init=NAME, init_options=...), targets="all-linear"
              [, calibration=batches, loss_fn=None])

on a fresh deep copy of the loaded model. Every registered initialiser is measured (`lx.init.available()`, with its
default options), PiSSA three times: the exact SVD (`init="pissa"`) and the randomized SVD with `niter` = k for
each `--niters` k. The data-aware ones (`needs` non-empty: LoRA-GA, LoRA-One, EVA, CorDA) get `--calib-batches`
batches of `--calib-batch-size` x `--calib-seq` tokens of the King James Bible, cut by `loraredux.tasks`'s
language-modelling loader, each `{"input_ids", "labels"}` so the default loss is `model(**batch).loss`.

- **Time** (this process): the variants are called round-robin, each on a fresh deep copy (made outside the
  clock), after waiting (boundedly) for the machine to be quiet; the garbage collector is off during a call. A
  call counts as clean when other processes used (almost) no CPU meanwhile (`_common.py`: on this 2-core machine
  one busy neighbour slows LAPACK several-fold). A variant is called until `--repeats` clean calls, or twice that
  many calls, or until another call would take its clean seconds past `--variant-budget` (see `wants_more`). We
  report the median over the clean calls (over all calls if none was clean, marked), and split it into the
  calibration pass (`lx.init.gather`), the rank allocation (EVA), the initialiser functions themselves
  (`Initialiser.__call__`) and the rest (building the adapters, moving the base, swapping the modules), by
  wrapping those functions.
- **Memory** (one fresh subprocess per variant and repeat): load the model (copied out of its memory-mapped file,
  see `load_model`) and build the batches, collect and `malloc_trim`, take the RSS as the baseline, reset the
  kernel's peak-RSS counter, run the call, read `VmHWM`. Reported: the peak above the loaded model, the RSS
  above it after the call (after `malloc_trim`: live tensors plus what the allocator keeps), and the call's
  time: the first call in a fresh process, with one-off costs included (what a user pays once).
- **PiSSA quality**: for each PiSSA run, E = sum over layers of ||W0 - s B A||_F with the adapter's initial
  factors, against the optimum (Eckart-Young: sqrt of the sum of the squared singular values beyond r, from
  `torch.linalg.svdvals` of every W0). Reported: the relative gap E / E_exact - 1, and the shortfall in captured
  energy 1 - sum ||s B A||_F^2 / sum_{i <= r} sigma_i^2 (more sensitive: the tail dominates E).

`--quick` is a smoke test (2 layers, tiny calibration, one call each, two memory subprocesses); `--profile NAME`
prints a cProfile of one call of a variant instead. `--help` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import gc
import json
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MiB,
    _cpu_jiffies,
    _is_clean,
    foreign_cpu_seconds,
    format_table,
    machine_info,
    malloc_trim,
    peak_rss_window,
    rss_bytes,
    wait_for_quiet,
)

#: The initialisers the benchmark expects; any of them not registered is reported as missing.
EXPECTED = ("kaiming", "pissa", "milora", "olora", "loftq", "lora_ga", "lora_one", "eva", "corda")
GOAL_SECONDS = 10.0  # the goal: "pissa with randomized SVD at r=16 under 10 s on 2 cores"


@dataclass(frozen=True)
class Variant:
    """One row of the table: an initialiser with its options."""

    key: str
    init: str
    options: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()

    @property
    def randomized_pissa(self) -> bool:
        return self.init == "pissa" and self.options.get("niter") is not None


def variants(args: argparse.Namespace) -> list[Variant]:
    """Every registered initialiser (PiSSA once per SVD), data-free ones first, kaiming (the floor) first of all."""
    import loraredux as lx

    found = []
    for name in lx.init.available():
        needs = tuple(sorted(lx.init.get(name).needs))
        if name == "pissa":
            found.append(Variant("pissa", name, {}, needs))
            found += [Variant(f"pissa-niter{k}", name, {"niter": k}, needs) for k in args.niters]
        else:
            found.append(Variant(name, name, {}, needs))
    # a stable sort: alphabetical within the groups
    found.sort(key=lambda v: (v.init != "kaiming", bool(v.needs)))
    if args.only:
        unknown = sorted(set(args.only) - {v.key for v in found})
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; have {[v.key for v in found]}")
        found = [v for v in found if v.key in args.only]
    return found


# ----------------------------------------------------------------------------------------------- model, data


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """SmolLM2-135M (fp32, eval mode, resident in memory) and its tokenizer; with `--layers n`, only the first n
    decoder layers.

    transformers maps the safetensors file into memory, so a weight becomes resident only when first read (the
    loaded model's RSS is 376 MiB for 514 MiB of weights). Every parameter and buffer is copied into ordinary
    memory here (the tied embedding stays tied: one parameter), so that the memory baseline holds the whole
    model and an init that reads W0 is not charged for the model's own pages.
    """
    from loraredux import assets

    model, tokenizer = assets.load_smollm2()
    if args.layers is not None:
        model.model.layers = nn.ModuleList(list(model.model.layers)[: args.layers])
        model.config.num_hidden_layers = args.layers
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
    model.eval()
    return model, tokenizer


def calibration_batches(tokenizer: Any, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """`--calib-batches` KJV batches of `--calib-batch-size` x `--calib-seq` tokens, with labels = input_ids."""
    from loraredux import assets, tasks

    # the blocks the batches take, plus the held-out block the task insists on, plus one to spare
    blocks = args.calib_batches * args.calib_batch_size + 2
    task = tasks.language_modeling_task(
        tokenizer,
        assets.kjv(),
        batch_size=args.calib_batch_size,
        seq_len=args.calib_seq,
        eval_blocks=1,
        max_tokens=blocks * args.calib_seq,
        seed=args.seed,
        progress=False,
    )
    out = []
    for i in range(args.calib_batches):
        ids = task.batches(i)["input_ids"]
        out.append({"input_ids": ids, "labels": ids})
    return out


# ----------------------------------------------------------------------------------------------- one call


@contextlib.contextmanager
def timed_parts() -> Iterator[dict[str, float]]:
    """Within the block, seconds spent in the calibration pass, the rank allocation and the initialisers.

    Wraps `lx.init.gather` (as `lx.adapt_` calls it), `verbs._calibrate` (gather + allocation) and
    `Initialiser.__call__` (the pure init functions; kaiming/gaussian LoRA take a shortcut around it).
    """
    import loraredux.init as inits
    from loraredux import verbs
    from loraredux.init.registry import Initialiser

    parts = {"gather": 0.0, "prepare": 0.0, "init_fn": 0.0}

    def timing(fn: Any, key: str) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[key] += time.perf_counter() - t0

        return wrapped

    originals = (inits.gather, verbs._calibrate, Initialiser.__call__)
    inits.gather = timing(originals[0], "gather")
    verbs._calibrate = timing(originals[1], "prepare")
    Initialiser.__call__ = timing(originals[2], "init_fn")
    try:
        yield parts
    finally:
        inits.gather, verbs._calibrate, Initialiser.__call__ = originals


def adapt_call(
    model: nn.Module,
    variant: Variant,
    batches: list[dict[str, torch.Tensor]] | None,
    rank: int,
    profiler: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """Run the measured `lx.adapt_` call once (gc off) and return its seconds, foreign CPU and parts."""
    import loraredux as lx

    config = lx.config("lora", rank=rank, init=variant.init, init_options=dict(variant.options))
    kwargs: dict[str, Any] = {"calibration": batches, "loss_fn": None} if variant.needs else {}
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        with timed_parts() as parts:
            before = _cpu_jiffies()
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            lx.adapt_(model, config, targets="all-linear", **kwargs)
            if profiler is not None:
                profiler.disable()
            seconds = time.perf_counter() - t0
            foreign = foreign_cpu_seconds(before, _cpu_jiffies())
    finally:
        if was:
            gc.enable()
    allocate = max(0.0, parts["prepare"] - parts["gather"])
    return {
        "seconds": seconds,
        "foreign_cpu_s": foreign,
        "clean": _is_clean(seconds, foreign),
        "gather_s": parts["gather"],
        "allocate_s": allocate,
        "init_fn_s": parts["init_fn"],
        "rest_s": max(0.0, seconds - parts["prepare"] - parts["init_fn"]),
        "adapted_layers": sum(1 for _ in lx.adapters(model)),
    }


# ----------------------------------------------------------------------------------------------- PiSSA quality


@torch.no_grad()
def exact_reference(reference: nn.Module, rank: int) -> dict[str, dict[str, float]]:
    """Per target layer: the optimal rank-r error sqrt(sum_{i>r} s_i^2) and the top-r energy sum_{i<=r} s_i^2."""
    from loraredux.bases import view_of
    from loraredux.targets import select

    out = {}
    for path in select(reference, "all-linear", None):
        W = view_of(reference.get_submodule(path)).weight().detach().double()
        s2 = torch.linalg.svdvals(W) ** 2
        out[path] = {
            "tail_error": s2[rank:].sum().sqrt().item(),
            "head_energy": s2[:rank].sum().item(),
        }
    return out


@torch.no_grad()
def reconstruction(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Sum over layers of ||W0 - s B A||_F and of ||s B A||_F^2, W0 from the unadapted reference model."""
    import loraredux as lx
    from loraredux.bases import view_of

    error = energy = 0.0
    for path, adapter in lx.adapters(model):
        A, B, s = adapter.lora_form()
        W0 = view_of(reference.get_submodule(path)).weight().detach().double()
        P = s * (B.double() @ A.double())  # (out, in)
        error += torch.linalg.matrix_norm(W0 - P).item()
        energy += torch.linalg.matrix_norm(P).item() ** 2
    return {"error_sum": error, "energy_sum": energy}


def quality(record: dict[str, float], exact: dict[str, dict[str, float]]) -> dict[str, float]:
    e_exact = sum(v["tail_error"] for v in exact.values())
    h_exact = sum(v["head_energy"] for v in exact.values())
    return {
        "error_sum": record["error_sum"],
        "exact_error_sum": e_exact,
        "relative_gap": record["error_sum"] / e_exact - 1.0,
        "energy_shortfall": 1.0 - record["energy_sum"] / h_exact,
    }


@torch.no_grad()
def randomized_svd_study(
    reference: nn.Module, exact: dict[str, dict[str, float]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """`torch.svd_lowrank(W0, q, niter)` alone over every target W0, truncated to rank r: seconds and quality.

    q = r is what `init_options={"niter": k}` runs (as PEFT's `pissa_niter_k`); q = r + p adds p oversampling
    columns (Halko, Martinsson, Tropp 2011, §4.2 recommend p = 5-10). Not part of `lx.adapt_`: an analysis of
    what a change of the randomized SVD would buy. Each W0 is taken in float32, as the init does.
    """
    from loraredux.bases import view_of

    weights = [view_of(reference.get_submodule(path)).weight().detach().float() for path in exact]
    r = args.rank
    out = []
    for niter in args.niters:
        for p in args.oversample:
            torch.manual_seed(args.seed)
            error = energy = seconds = 0.0
            for W in weights:
                t0 = time.perf_counter()
                U, S, V = torch.svd_lowrank(W, q=r + p, niter=niter)
                seconds += time.perf_counter() - t0
                P = (U[:, :r].double() * S[:r].double()) @ V[:, :r].double().T  # (out, in)
                error += torch.linalg.matrix_norm(W.double() - P).item()
                energy += torch.linalg.matrix_norm(P).item() ** 2
            q = quality({"error_sum": error, "energy_sum": energy}, exact)
            out.append({"niter": niter, "oversample": p, "q": r + p, "svd_seconds": seconds, **q})
    return out


# ----------------------------------------------------------------------------------------------- timing phase


def wants_more(calls: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    """Another call of a variant? Until `--repeats` clean calls, at most 2 x repeats calls; a variant with clean
    calls stops when one more (of their median length) would take its clean seconds past `--variant-budget`; one
    without any gets up to 3 tries (a busy neighbour can slow a call ten-fold, so disturbed seconds do not count
    against the budget)."""
    clean = [c["seconds"] for c in calls if c["clean"]]
    if len(clean) >= args.repeats or len(calls) >= 2 * args.repeats:
        return False
    if not clean:
        return len(calls) < 3
    return sum(clean) + statistics.median(clean) <= args.variant_budget


def time_variants(
    args: argparse.Namespace,
    reference: nn.Module,
    batches: list[dict[str, torch.Tensor]] | None,
    chosen: list[Variant],
    exact: dict[str, dict[str, float]],
) -> dict[str, list[dict[str, Any]]]:
    """Round-robin calls (rotating start) until each variant has what `wants_more` asks for."""
    calls: dict[str, list[dict[str, Any]]] = {v.key: [] for v in chosen}
    # untimed warm-up: the first SVD, QR and forward pass of the process pay one-off costs
    warm = copy.deepcopy(reference)
    adapt_call(warm, Variant("warm-up", "pissa", {"niter": 2}), None, args.rank)
    if batches is not None:
        with torch.no_grad():
            reference(**batches[0])
    del warm
    round_index = 0
    while True:
        todo = [v for v in chosen if wants_more(calls[v.key], args)]
        if not todo:
            break
        k = round_index % len(todo)
        for v in todo[k:] + todo[:k]:
            model = copy.deepcopy(reference)
            malloc_trim()
            waited = wait_for_quiet(args.max_wait)
            torch.manual_seed(args.seed)
            record = adapt_call(model, v, batches if v.needs else None, args.rank)
            record["waited_s"] = waited
            if v.init == "pissa":
                record["quality"] = quality(reconstruction(model, reference), exact)
            calls[v.key].append(record)
            print(
                f"  {v.key:<16} {record['seconds']:8.2f} s  "
                f"(other processes {record['foreign_cpu_s']:.2f} CPU-s{'' if record['clean'] else ', DISTURBED'})",
                flush=True,
            )
            del model
        round_index += 1
    return calls


def summarise_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    clean = [c for c in calls if c["clean"]]
    basis = clean or calls

    def med(key: str) -> float:
        return statistics.median(c[key] for c in basis)

    out = {
        "calls": len(calls),
        "clean_calls": len(clean),
        "statistics_over": "clean calls" if clean else "all calls (none clean)",
        "median_s": med("seconds"),
        "min_s": min(c["seconds"] for c in basis),
        "max_s": max(c["seconds"] for c in basis),
        "gather_s": med("gather_s"),
        "allocate_s": med("allocate_s"),
        "init_fn_s": med("init_fn_s"),
        "rest_s": med("rest_s"),
        "adapted_layers": calls[-1]["adapted_layers"],
    }
    if "quality" in calls[-1]:
        out["quality"] = {
            k: statistics.median(c["quality"][k] for c in basis) for k in calls[-1]["quality"]
        }
    return out


# ----------------------------------------------------------------------------------------------- memory phase


def memory_worker(args: argparse.Namespace) -> None:
    """In a fresh process: load the model (and batches), then the peak RSS and time of one call above that."""
    torch.set_num_threads(args.threads)
    variant = next(v for v in variants(args) if v.key == args.memory_worker)
    model, tokenizer = load_model(args)
    batches = calibration_batches(tokenizer, args) if variant.needs else None
    torch.manual_seed(args.seed)
    malloc_trim()
    baseline = rss_bytes()
    waited = wait_for_quiet(args.max_wait)
    record: dict[str, Any] = {}

    def call() -> None:
        record.update(adapt_call(model, variant, batches, args.rank))

    window = peak_rss_window(call, baseline)
    malloc_trim()
    record.update(
        peak_bytes=window["peak_bytes"],
        kept_bytes=rss_bytes() - baseline,
        baseline_bytes=baseline,
        method=window["method"],
        waited_s=waited,
    )
    print(json.dumps(record))


def measure_memory(
    args: argparse.Namespace, chosen: list[Variant]
) -> dict[str, list[dict[str, Any]]]:
    """`--memory-repeats` fresh subprocesses per variant, one at a time (their call times are measured too)."""
    flags = [
        "--threads",
        str(args.threads),
        "--rank",
        str(args.rank),
        "--seed",
        str(args.seed),
        "--max-wait",
        str(args.max_wait),
        "--calib-batches",
        str(args.calib_batches),
        "--calib-batch-size",
        str(args.calib_batch_size),
        "--calib-seq",
        str(args.calib_seq),
        "--niters",
        *[str(k) for k in args.niters],
    ]
    if args.layers is not None:
        flags += ["--layers", str(args.layers)]
    runs: dict[str, list[dict[str, Any]]] = {v.key: [] for v in chosen}
    for _ in range(args.memory_repeats):
        for v in chosen:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-worker",
                v.key,
                *flags,
            ]
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker {v.key} failed:\n{proc.stderr[-4000:]}")
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[v.key].append(record)
            print(
                f"  {v.key:<16} peak {record['peak_bytes'] / MiB:8.1f} MiB, first call {record['seconds']:.2f} s"
                f"{'' if record['clean'] else ' (DISTURBED)'}",
                flush=True,
            )
    return runs


# ----------------------------------------------------------------------------------------------- report


def options_text(v: Variant) -> str:
    return ", ".join(f"{k}={val}" for k, val in v.options.items()) or "defaults"


def report(
    args: argparse.Namespace,
    chosen: list[Variant],
    summary: dict[str, dict[str, Any]],
    memory: dict[str, list[dict[str, Any]]] | None,
) -> dict[str, Any]:
    """Print the tables; return the verdict on issue 4's goal."""
    floor = summary.get("kaiming", {}).get("median_s")
    rows = []
    for v in chosen:
        s = summary[v.key]
        row = [
            v.key,
            options_text(v),
            ", ".join(v.needs) or "-",
            f"{s['clean_calls']}/{s['calls']}" + ("" if s["clean_calls"] else " !"),
            f"{s['median_s']:.2f}",
            f"{s['min_s']:.2f}",
            f"{s['gather_s']:.2f}" if v.needs else "-",
            f"{s['allocate_s']:.2f}" if s["allocate_s"] > 0.005 else "-",
            f"{s['init_fn_s']:.2f}",
            f"{s['rest_s']:.2f}",
            f"{s['median_s'] / floor:.0f}" if floor else "",
        ]
        if memory is not None and not memory.get(v.key):
            row += ["-", "-", "-"]
        elif memory is not None:
            runs = memory[v.key]
            peak = statistics.median(r["peak_bytes"] / MiB for r in runs)
            kept = statistics.median(r["kept_bytes"] / MiB for r in runs)
            first = statistics.median(r["seconds"] for r in runs)
            disturbed = "" if all(r["clean"] for r in runs) else " !"
            row += [f"{first:.2f}{disturbed}", f"{peak:.0f}", f"{kept:.0f}"]
        rows.append(row)
    headers = [
        "init",
        "options",
        "data",
        "clean/calls",
        "median s",
        "min s",
        "calibration s",
        "allocate s",
        "init fn s",
        "rest s",
        "/ kaiming",
    ]
    if memory is not None:
        headers += ["fresh-process s", "peak MiB", "kept MiB"]
    print(f"\n### Initialisation: lx.adapt_ on SmolLM2-135M all-linear, r={args.rank}")
    print(format_table(headers, rows))
    print(
        "(median/min over clean calls, '!' = no clean call, statistics over all; calibration = lx.init.gather, "
        "allocate = the init's rank allocation (EVA), init fn = the initialiser functions, rest = building the "
        "adapters + moving the base + swapping modules; fresh-process s = the call as the first in a fresh "
        "process; peak / kept MiB = RSS above the loaded model during / after the call, the latter after "
        "malloc_trim and including what the allocator keeps)"
    )
    quality_rows = []
    for v in chosen:
        q = summary[v.key].get("quality")
        if q is not None:
            quality_rows.append(
                [
                    v.key,
                    options_text(v),
                    f"{q['error_sum']:.4f}",
                    f"{q['relative_gap']:.2e}",
                    f"{q['energy_shortfall']:.2e}",
                ]
            )
    if quality_rows:
        exact_sum = next(
            s["quality"]["exact_error_sum"] for s in summary.values() if "quality" in s
        )
        print(
            f"\n### PiSSA: rank-{args.rank} reconstruction, sum over layers (optimum {exact_sum:.4f})"
        )
        headers = ["init", "options", "sum ||W0 - s B A||_F", "gap to optimum", "energy shortfall"]
        print(format_table(headers, quality_rows))
    verdict = {}
    for v in chosen:
        if v.randomized_pissa:
            s = summary[v.key]
            first = None
            if memory is not None and memory.get(v.key):
                first = max(r["seconds"] for r in memory[v.key])
            worst = max(s["median_s"], first or 0.0)
            verdict[v.key] = {
                "median_s": s["median_s"],
                "fresh_process_s": first,
                "limit_s": GOAL_SECONDS,
                "met": worst < GOAL_SECONDS,
            }
    if verdict:
        print(
            f"\n### Issue 4's goal: PiSSA with the randomized SVD at r={args.rank} under {GOAL_SECONDS:.0f} s"
        )
        rows = [
            [
                k,
                f"{d['median_s']:.2f}",
                "-" if d["fresh_process_s"] is None else f"{d['fresh_process_s']:.2f}",
                "met" if d["met"] else "MISSED",
            ]
            for k, d in verdict.items()
        ]
        print(format_table(["variant", "median s", "fresh-process s", "verdict"], rows))
    return verdict


def profile_variant(
    args: argparse.Namespace, reference: nn.Module, batches: list[dict[str, torch.Tensor]] | None
) -> None:
    """cProfile of one call of `--profile`'s variant (after a warm-up call), top functions by own and total time."""
    variant = next(v for v in variants(args) if v.key == args.profile)
    adapt_call(copy.deepcopy(reference), variant, batches if variant.needs else None, args.rank)
    model = copy.deepcopy(reference)
    wait_for_quiet(args.max_wait)
    profiler = cProfile.Profile()
    record = adapt_call(model, variant, batches if variant.needs else None, args.rank, profiler)
    print(
        f"\n## profile: {variant.key} ({record['seconds']:.2f} s, other processes {record['foreign_cpu_s']:.2f} CPU-s)"
    )
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler).sort_stats(order).print_stats(25)


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument(
        "--niters", type=int, nargs="+", default=[2, 4], help="PiSSA randomized-SVD niter values"
    )
    p.add_argument(
        "--oversample",
        type=int,
        nargs="*",
        default=[0, 8],
        help="oversampling p of the randomized-SVD study (q = r + p); none to skip it",
    )
    p.add_argument(
        "--layers", type=int, default=None, help="keep only the first n decoder layers (of 30)"
    )
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches")
    p.add_argument(
        "--calib-batch-size", type=int, default=8, help="sequences per calibration batch"
    )
    p.add_argument("--calib-seq", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--repeats", type=int, default=3, help="clean timed calls wanted per variant")
    p.add_argument(
        "--variant-budget",
        type=float,
        default=120.0,
        help="s of timed calls per variant after which no further call starts (at least one call)",
    )
    p.add_argument("--memory-repeats", type=int, default=1, help="fresh subprocesses per variant")
    p.add_argument(
        "--max-wait", type=float, default=30.0, help="s to wait for a quiet machine per call"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="measure only these variants")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 layers, tiny calibration, one call each: a smoke test",
    )
    p.add_argument(
        "--profile", metavar="VARIANT", help="print a cProfile of one call instead of timing"
    )
    p.add_argument(
        "--json", metavar="PATH", help="write every call, summary and memory run as JSON"
    )
    p.add_argument("--memory-worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.calib_batches, args.calib_batch_size, args.calib_seq = 2, 2, 2, 32
        args.repeats, args.variant_budget, args.max_wait = 1, 5.0, 0.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return {}
    t_start = time.perf_counter()
    import loraredux as lx

    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    chosen = variants(args)
    missing = [name for name in EXPECTED if name not in lx.init.available()]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"
    )
    print(
        f"versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}"
    )
    reference, tokenizer = load_model(args)
    needs_data = any(v.needs for v in chosen) or (
        args.profile is not None and any(v.needs for v in variants(args) if v.key == args.profile)
    )
    batches = calibration_batches(tokenizer, args) if needs_data else None
    n_layers = len(reference.model.layers)
    print(
        f"model: SmolLM2-135M-Instruct (packaged), {n_layers} decoder layers, fp32; targets all-linear; "
        f"LoRA r={args.rank}, alpha={lx.config('lora').alpha:g}"
    )
    if batches is not None:
        shape = tuple(batches[0]["input_ids"].shape)
        print(
            f"calibration: {len(batches)} KJV batches of {shape[0]} x {shape[1]} tokens, loss model(**batch).loss"
        )
    print(
        f"registered inits: {', '.join(lx.init.available())}; missing of issue 4's list: {missing or 'none'}"
    )
    if args.profile:
        profile_variant(args, reference, batches)
        return {}

    print("exact rank-r errors (svdvals of every W0) ...", flush=True)
    exact = exact_reference(reference, args.rank)
    print(f"timing {len(chosen)} variants ({args.repeats} clean calls wanted each) ...", flush=True)
    calls = time_variants(args, reference, batches, chosen, exact)
    summary = {key: summarise_calls(c) for key, c in calls.items()}
    study = randomized_svd_study(reference, exact, args) if args.oversample else []
    del reference
    malloc_trim()
    memory = None
    if not args.no_memory:
        memory_chosen = chosen
        if args.quick:  # one data-free and one data-aware subprocess exercise the path
            memory_chosen = [v for v in chosen if v.randomized_pissa][:1] + [
                v for v in chosen if v.needs
            ][:1]
        print(
            f"measuring peak RSS: {args.memory_repeats} fresh subprocess(es) per variant ...",
            flush=True,
        )
        memory = measure_memory(args, memory_chosen)
    verdict = report(args, chosen, summary, memory)
    if study:
        print(
            f"\n### The randomized SVD alone: torch.svd_lowrank(W0, q = r + p, niter) over all "
            f"{len(exact)} W0, truncated to r={args.rank} (analysis, outside lx.adapt_)"
        )
        rows = [
            [
                d["niter"],
                d["oversample"],
                d["q"],
                f"{d['svd_seconds']:.2f}",
                f"{d['relative_gap']:.2e}",
                f"{d['energy_shortfall']:.2e}",
            ]
            for d in study
        ]
        headers = [
            "niter",
            "oversample p",
            "q",
            "SVD s (sum)",
            "gap to optimum",
            "energy shortfall",
        ]
        print(format_table(headers, rows))
    if missing:
        print(f"\nnot registered (not measured): {', '.join(missing)}")
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal wall time {elapsed:.0f} s")
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_worker")},
        "machine": info,
        "variants": [
            {"key": v.key, "init": v.init, "options": v.options, "needs": v.needs} for v in chosen
        ],
        "missing": missing,
        "calls": calls,
        "summary": summary,
        "memory_runs": memory,
        "exact_rank_r": exact,
        "goal": verdict,
        "randomized_svd_study": study,
        "wall_seconds": elapsed,
    }
    if args.json:
        from loraredux.io.files import write_json_atomic

        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
