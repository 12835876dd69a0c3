"""QLoRA speed and memory: loraredux against Hugging Face PEFT on the same 4-bit model, side by side.

Both sides load the packaged model with transformers in 4 bits, as a QLoRA user does:
`from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))`, on the CPU, fp32 otherwise. Loading is
deterministic, so the two copies hold the same codes (checked). Models:

- **smollm2**: SmolLM2-135M (`loraredux.assets.smollm2_dir()`), its 30 decoder layers (`--layers` keeps fewer),
  causal-LM loss on random token ids, batch 4 x 128; `lm_head` (tied to the embedding) stays dense.
- **minilm**: all-MiniLM-L6-v2 (`loraredux.assets.minilm_dir()`) with a new 2-class head (kept dense through
  `llm_int8_skip_modules=["classifier"]`, drawn from the same seed on both sides, frozen), classification loss on
  random token ids and labels, batch 16 x 128, the model's own dropout.

LoRA r=16, alpha=32, dropout 0 on every linear layer but the output head ("all-linear": SmolLM2's q k v o gate
up down projections, MiniLM's query key value, attention output, intermediate, output and pooler): `lx.adapt_(model,
lx.config("lora", rank=16, alpha=32), targets="all-linear")` against `get_peft_model(model, LoraConfig(r=16,
lora_alpha=32, target_modules=<the same paths>, lora_dropout=0.0))`, PEFT otherwise in its defaults (its 4-bit
`Linear4bit` LoRA layer). `prepare_model_for_kbit_training` is not called on either side: it turns on gradient
checkpointing, which would time another computation. AdamW (PyTorch defaults, lr 1e-4) over the trainable
parameters; a training step is forward with the loss + backward + `optimizer.step()` + `zero_grad()`.

Before timing, both sides get the same A (loraredux's draw) and the same small random B, and the script asserts
that the first step's loss agrees to float tolerance and so do the LoRA gradients: both sides compute the same
thing. Timing and memory follow `lora_speed.py` (`_common.py`): interleaved rounds after warm-up, statistics over
the rounds no other process disturbed, medians and ratios of medians; peak memory is the peak resident set (VmHWM,
reset through /proc/self/clear_refs) of a steady-state (second) training step above the RSS of the built model,
each side in its own fresh subprocess, `--memory-repeats` times.

    python benchmarks/qlora_speed.py --json /tmp/qlora_speed.json   # both models; ~15 minutes on 2 cores
    python benchmarks/qlora_speed.py --quick                          # smoke test: 2 layers, tiny batches
    python benchmarks/qlora_speed.py --profile                        # torch.profiler tables instead of timing
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
from lora_speed import pick_rounds, ratio_stats, time_table
from loraredux.io.files import write_json_atomic

MODELS = ("smollm2", "minilm")
VARIANTS = ("loraredux", "peft")
# The goals: upper limits on the ratios of medians, loraredux / PEFT.
TARGET_LIMITS = {"train": 0.95, "memory": 1.00}
DEFAULT_BATCH = {"smollm2": (4, 128), "minilm": (16, 128)}


# ----------------------------------------------------------------------------------------------- models


def load_4bit(name: str, layers: int | None, seed: int) -> nn.Module:
    """The packaged model loaded by transformers in NF4 with double quantization (compute dtype float32)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BitsAndBytesConfig,
    )

    from loraredux import assets
    from loraredux.tasks import quiet_loading

    skip = ["classifier"] if name == "minilm" else None
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )
    torch.manual_seed(seed)  # MiniLM's new head: the same draw on both sides
    with quiet_loading(progress=False):
        if name == "smollm2":
            model = AutoModelForCausalLM.from_pretrained(
                assets.smollm2_dir(), quantization_config=config, dtype=torch.float32
            )
            model.config.use_cache = False
            stack, owner = model.model.layers, model.model
            attr = "layers"
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                assets.minilm_dir(), num_labels=2, quantization_config=config, dtype=torch.float32
            )
            stack, owner, attr = model.bert.encoder.layer, model.bert.encoder, "layer"
    if layers is not None:
        setattr(owner, attr, nn.ModuleList(list(stack)[:layers]))
        model.config.num_hidden_layers = layers
    return model


def build(variant: str, model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """`model` with LoRA on every linear layer but the output head, by loraredux or by PEFT (the same paths)."""
    import loraredux as lx
    from loraredux.targets import select

    paths = select(model, "all-linear")
    if variant == "loraredux":
        lx.adapt_(model, lx.config("lora", rank=rank, alpha=alpha), targets=paths)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0)
    return get_peft_model(model, config)


def pairs(ours: nn.Module, theirs: nn.Module) -> list[tuple[Any, Any]]:
    """(loraredux adapter, PEFT LoRA layer) for every adapted path; both must adapt the same 4-bit layers."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    import loraredux as lx

    out = []
    for path, adapter in lx.adapters(ours):
        layer = theirs.base_model.model.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            raise RuntimeError(f"{path}: PEFT has no LoRA layer there ({type(layer).__name__})")
        for base in (adapter.base, layer.get_base_layer()):
            if not isinstance(base, bnb.nn.Linear4bit):
                raise RuntimeError(f"{path}: base is a {type(base).__name__}, not a Linear4bit")
        if not torch.equal(adapter.base.weight.data, layer.get_base_layer().weight.data):
            raise RuntimeError(f"{path}: the two loads hold different 4-bit codes")
        out.append((adapter, layer))
    peft_paths = {n for n, m in theirs.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    if not out or peft_paths != {p for p, _ in lx.adapters(ours)}:
        raise RuntimeError("loraredux and PEFT adapted different layers")
    return out


@torch.no_grad()
def equalise(ours: nn.Module, theirs: nn.Module, seed: int) -> int:
    """The same A (loraredux's draw) and the same small random B on both sides; returns the layers matched."""
    gen = torch.Generator().manual_seed(seed + 1)
    matched = pairs(ours, theirs)
    for adapter, layer in matched:
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.02)
        layer.lora_A["default"].weight.copy_(adapter.A)
        layer.lora_B["default"].weight.copy_(adapter.B)
    return len(matched)


def make_batch(name: str, batch: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    if name == "smollm2":
        return {"input_ids": ids, "labels": ids}
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_step(model: nn.Module, inputs: dict[str, torch.Tensor], lr: float) -> Callable[[], float]:
    """One training step: forward with the loss, backward, AdamW step, zero_grad (set_to_none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def sanity(ours: nn.Module, theirs: nn.Module, inputs: dict[str, torch.Tensor], seed: int) -> dict:
    """The first step's loss and LoRA gradients of both sides (the same dropout draws: seeded alike)."""
    losses = {}
    for name, model in (("loraredux", ours), ("peft", theirs)):
        model.train()
        torch.manual_seed(seed + 3)
        loss = model(**inputs).loss
        loss.backward()
        losses[name] = loss.item()
    diff = scale = 0.0
    for adapter, layer in pairs(ours, theirs):
        for mine, theirs_grad in (
            (adapter.A.grad, layer.lora_A["default"].weight.grad),
            (adapter.B.grad, layer.lora_B["default"].weight.grad),
        ):
            diff = max(diff, (mine - theirs_grad).abs().max().item())
            scale = max(scale, theirs_grad.abs().max().item())
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    loss_diff = abs(losses["loraredux"] - losses["peft"])
    ok = loss_diff <= 1e-5 * max(1.0, abs(losses["peft"])) and diff <= 1e-4 * max(scale, 1e-12)
    return {"loss": losses, "loss_abs_diff": loss_diff, "grad_max_abs_diff": diff,
            "grad_max_abs": scale, "ok": ok}  # fmt: skip


# ----------------------------------------------------------------------------------------------- memory


def memory_worker(args: argparse.Namespace) -> None:
    """In a fresh process: load, adapt one side, then the peak RSS of its first and of a steady-state step."""
    torch.set_num_threads(args.threads)
    name, variant = args.memory_worker
    model = build(variant, load_4bit(name, args.layers, args.seed), args.rank, args.alpha)
    batch, seq = args.shapes[name]
    step = make_step(
        model, make_batch(name, batch, seq, model.config.vocab_size, args.seed), args.lr
    )
    malloc_trim()
    baseline = rss_bytes()  # the loaded, adapted model; no gradients or optimizer state yet
    first = peak_rss_window(step, baseline)
    steady = peak_rss_window(step, baseline)
    print(json.dumps({"baseline_rss_bytes": baseline, "first_step": first, "steady_step": steady}))


def measure_memory(args: argparse.Namespace, name: str) -> dict[str, list[dict[str, Any]]]:
    """Each side `--memory-repeats` times, each in its own subprocess (the two sides of a repeat run together)."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(args.memory_repeats):
        procs = {}
        for variant in VARIANTS:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-worker",
                name,
                variant,
            ]
            command += [
                "--rank",
                str(args.rank),
                "--alpha",
                str(args.alpha),
                "--seed",
                str(args.seed),
            ]
            command += ["--threads", str(args.threads), "--lr", str(args.lr)]
            command += ["--shape", f"{name}={args.shapes[name][0]}x{args.shapes[name][1]}"]
            command += ["--layers", str(args.layers)] if args.layers is not None else []
            procs[variant] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        for variant, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker {name} {variant} failed:\n{stderr[-4000:]}")
            runs[variant].append(json.loads(stdout.strip().splitlines()[-1]))
    return runs


# ----------------------------------------------------------------------------------------------- one model


def profile(steps: dict[str, Callable[[], float]], calls: int = 3, rows: int = 14) -> None:
    """torch.profiler tables (self CPU time) over `calls` steps of each side, and the share in bitsandbytes ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, step in steps.items():
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        bnb = sum(e.self_cpu_time_total for e in events if e.key.startswith("bitsandbytes::"))
        print(f"\n## profile: {name} ({calls} steps)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44))
        print(f"self CPU time in bitsandbytes ops (dequantizing W0): {bnb / max(total, 1):.1%}")


def run_model(args: argparse.Namespace, name: str, deadline: float) -> dict[str, Any]:
    batch, seq = args.shapes[name]
    models = {
        v: build(v, load_4bit(name, args.layers, args.seed), args.rank, args.alpha)
        for v in VARIANTS
    }
    n_layers = equalise(models["loraredux"], models["peft"], args.seed)
    inputs = make_batch(name, batch, seq, models["loraredux"].config.vocab_size, args.seed)
    check = sanity(models["loraredux"], models["peft"], inputs, args.seed)
    trainable = {
        v: sum(p.numel() for p in m.parameters() if p.requires_grad) for v, m in models.items()
    }
    layers = models["loraredux"].config.num_hidden_layers
    print(f"\n## {name}: {layers} layers, batch {batch} x {seq}, {n_layers} NF4 layers with LoRA "
          f"r={args.rank} alpha={args.alpha:g}, trainable {trainable['loraredux']:,} (PEFT "
          f"{trainable['peft']:,})")  # fmt: skip
    print(f"first step: loss loraredux {check['loss']['loraredux']:.7f} vs PEFT {check['loss']['peft']:.7f} "
          f"(|diff| {check['loss_abs_diff']:.1e}); max |grad diff| on A, B {check['grad_max_abs_diff']:.1e} "
          f"(max |grad| {check['grad_max_abs']:.1e}) -> {'OK' if check['ok'] else 'MISMATCH'}")  # fmt: skip
    if not check["ok"]:
        raise SystemExit(f"{name}: loraredux and PEFT do not compute the same thing")
    steps = {v: make_step(m, inputs, args.lr) for v, m in models.items()}
    if args.profile:
        profile(steps)
        return {}
    print("timing ...", flush=True)
    rounds = interleaved_times(
        steps, args.repeats, args.warmup, max_wait=args.max_wait, deadline=deadline
    )
    del steps, models
    times, basis = pick_rounds(rounds)
    summary = {v: summarise(t) for v, t in times.items()}
    ratio = ratio_stats(times["loraredux"], times["peft"])
    print(
        f"rounds {basis['rounds']}, clean {basis['clean_rounds']}, statistics over {basis['statistics_over']}"
    )
    print(time_table(summary, ("peft",), {"trainable": {v: f"{trainable[v]:,}" for v in VARIANTS}}))
    result = {"layers": layers, "shape": [batch, seq], "adapted_layers": n_layers, "sanity": check,
              "trainable": trainable, "rounds": rounds.to_dict(), "basis": basis, "summary_s": summary,
              "train_ratio": ratio}  # fmt: skip
    if not args.no_memory:
        print(f"peak RSS: {args.memory_repeats} fresh subprocess(es) per side ...", flush=True)
        memory = measure_memory(args, name)
        mem = {v: {k: summarise([r[k]["peak_bytes"] / MiB for r in memory[v]])
                   for k in ("first_step", "steady_step")} for v in VARIANTS}  # fmt: skip
        rows = [[v, f"{m['steady_step']['median']:.1f}",
                 f"{m['steady_step']['min']:.1f}-{m['steady_step']['max']:.1f}",
                 f"{m['first_step']['median']:.1f}",
                 f"{m['steady_step']['median'] / mem['peft']['steady_step']['median']:.3f}"]
                for v, m in mem.items()]  # fmt: skip
        print(
            format_table(
                ["side", "second step MiB (median)", "range", "first step MiB", "/ peft"], rows
            )
        )
        print(
            f"(method: {memory['peft'][0]['steady_step']['method']}; baseline = RSS of the built model)"
        )
        result.update(memory_runs=memory, memory_mib=mem,
                      memory_ratio=mem["loraredux"]["steady_step"]["median"]
                      / mem["peft"]["steady_step"]["median"])  # fmt: skip
    return result


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default all)")
    p.add_argument("--shape", action="append", default=[], metavar="MODEL=BxS",
                   help="batch x sequence length of a model (default smollm2=4x128, minilm=16x128)")  # fmt: skip
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--repeats", type=int, default=15, help="clean timed rounds wanted per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--memory-repeats", type=int, default=2, help="fresh subprocesses per side")
    p.add_argument("--max-wait", type=float, default=20.0, help="s to wait for a quiet machine")
    p.add_argument("--budget", type=float, default=900.0, help="s of timing over all models")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 layers, small batches, few rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--profile", action="store_true", help="torch.profiler tables instead of timing")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = dict(DEFAULT_BATCH)
    if args.quick:
        args.layers, shapes = 2, {"smollm2": (1, 32), "minilm": (4, 32)}
        args.repeats, args.warmup, args.memory_repeats, args.max_wait, args.budget = (
            4,
            1,
            1,
            0.0,
            60.0,
        )
    for item in args.shape:
        model, _, size = item.partition("=")
        b, _, s = size.partition("x")
        if model not in MODELS or not (b.isdigit() and s.isdigit()):
            p.error(f"--shape takes MODEL=BxS with MODEL in {MODELS}, got {item!r}")
        shapes[model] = (int(b), int(s))
    args.shapes = shapes
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = machine_info(("torch", "transformers", "peft", "bitsandbytes"))
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, {torch.get_num_threads()} torch threads"
    )
    print(f"versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"peft {info['peft']}, bitsandbytes {info['bitsandbytes']}")  # fmt: skip
    print("base: transformers BitsAndBytesConfig NF4, double quantization, compute dtype float32; LoRA "
          f"r={args.rank} alpha={args.alpha:g} all-linear, dropout 0; AdamW lr={args.lr:g}")  # fmt: skip
    results = {}
    for i, name in enumerate(args.models):
        share = (i + 1) / len(args.models)
        results[name] = run_model(args, name, start + share * args.budget)
    if args.profile:
        return {}
    print("\n### Targets: ratios of medians, loraredux / PEFT [quartiles of the per-round ratios]")
    rows, verdicts = [], {}
    for name, r in results.items():
        t = r["train_ratio"]
        items = [
            ("train", t["ratio_of_medians"], f" [{t['per_round_q1']:.3f}-{t['per_round_q3']:.3f}]")
        ]
        if "memory_ratio" in r:
            items.append(("memory", r["memory_ratio"], ""))
        for kind, value, spread in items:
            limit = TARGET_LIMITS[kind]
            verdicts[f"{name} {kind}"] = {"value": value, "limit": limit, "met": value <= limit}
            rows.append(
                [
                    name,
                    kind,
                    f"{value:.3f}{spread}",
                    f"<= {limit:.2f}",
                    "met" if value <= limit else "MISSED",
                ]
            )
    print(format_table(["model", "ratio", "loraredux / peft", "target", "verdict"], rows))
    elapsed = time.perf_counter() - start
    print(f"\ntotal wall time {elapsed:.0f} s")
    out = {"config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_worker")},
           "machine": info, "models": results, "targets": verdicts, "wall_seconds": elapsed}  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
