"""LoRA speed and memory: loraredux against Hugging Face PEFT and against the frozen model, side by side.

The model is a random `LlamaForCausalLM` with SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 heads, 3 KV
heads, head dim 64, vocab 49152, tied embeddings) but fewer layers (8 by default), built from a config (nothing is
downloaded). LoRA r=16, alpha=32 sits on all seven linear projections of every layer. All variants are deep copies
of one seeded model, so they start from identical base weights; the two LoRA variants also get identical A and B,
and a sanity check shows they compute the same loss and gradients before anything is timed.

Measured, fp32 on CPU, batch 4 x 128 tokens, AdamW (PyTorch defaults otherwise):
  1. the training step (forward with the LM loss + backward + optimizer step + zero_grad) of loraredux LoRA,
     PEFT LoRA, and the frozen model with only the (tied) embedding trainable; beside them, for the analysis only,
     the "floor": the same frozen model with nothing trainable, back-propagated to the embedding output (the
     backward every adapter must run), no optimizer;
  2. unmerged inference (one forward under `torch.no_grad`, eval mode) of loraredux LoRA, PEFT LoRA and the plain
     model;
  3. the peak RSS of a training step for each training variant, each in a fresh subprocess (see `_common.py`).

Timings are interleaved round-robin in one process after warm-up rounds, and only rounds that no other process
disturbed count (see `_common.py`); the tables give medians, quartiles, ratios of medians and the quartiles of the
per-round ratios. `python benchmarks/lora_speed.py --help` lists the options; `--quick` is a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
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
    Rounds,
    format_table,
    interleaved_times,
    machine_info,
    malloc_trim,
    peak_rss_window,
    rss_bytes,
    summarise,
    wait_for_quiet,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_VARIANTS = ("loraredux", "peft", "frozen", "floor")
MEMORY_VARIANTS = ("loraredux", "peft", "frozen")
INFER_VARIANTS = ("loraredux", "peft", "plain")
# The goals: upper limits on ratios of medians.
TARGET_LIMITS = {
    "train: loraredux / peft": 0.95,
    "train: loraredux / frozen": 1.10,
    "memory: loraredux / peft": 1.00,
    "inference: loraredux / plain": 1.03,
}


# ----------------------------------------------------------------------------------------------- models


def llama_config(layers: int, vocab: int = 49152) -> Any:
    """SmolLM2-135M's config (HuggingFaceTB/SmolLM2-135M, config.json) with `layers` decoder layers."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=8192,
        initializer_range=0.041666666666666664,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        use_cache=False,  # one forward pass, no generation: no KV cache for any variant
        attn_implementation="sdpa",
    )


def reference_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(args.layers, args.vocab)).float()
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("expected tied input and output embeddings (as SmolLM2)")
    return model


def build_variant(variant: str, reference: nn.Module, rank: int, alpha: float) -> nn.Module:
    """A deep copy of `reference` prepared as `variant` (same base weights for every variant)."""
    model = copy.deepcopy(reference)
    if variant in ("frozen", "plain", "floor"):
        model.requires_grad_(False)
        if variant == "frozen":  # only the (tied) embedding trains
            model.get_input_embeddings().weight.requires_grad_(True)
        if variant == "floor":  # nothing trains, but the backward runs down to the embedding output
            model.enable_input_require_grads()
    elif variant == "loraredux":
        import loraredux as lx

        lx.adapt_(model, lx.config("lora", rank=rank, alpha=alpha), targets=TARGETS)
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, config)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return model


def lora_pairs(lx_model: nn.Module, peft_model: nn.Module) -> list[tuple[Any, Any]]:
    """(loraredux adapter, PEFT LoRA layer) for every adapted path, matched by module path."""
    from peft.tuners.lora import LoraLayer

    import loraredux as lx

    pairs = []
    for path, adapter in lx.adapters(lx_model):
        layer = peft_model.base_model.model.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            raise RuntimeError(f"{path}: PEFT has no LoRA layer there ({type(layer).__name__})")
        pairs.append((adapter, layer))
    if not pairs:
        raise RuntimeError("no adapted layers found")
    return pairs


@torch.no_grad()
def equalise_lora(lx_model: nn.Module, peft_model: nn.Module, seed: int) -> int:
    """Give both LoRA variants the same A (loraredux's Kaiming draw) and the same small random B.

    B != 0 makes the adapters change the output, so the sanity check compares something; speed does not depend on
    the values. Returns the number of layers matched.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    pairs = lora_pairs(lx_model, peft_model)
    for adapter, layer in pairs:
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=gen) * 0.02)
        layer.lora_A["default"].weight.copy_(adapter.A)
        layer.lora_B["default"].weight.copy_(adapter.B)
    return len(pairs)


def sanity_check(models: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, Any]:
    """Same loss and same LoRA gradients for loraredux and PEFT; loraredux disabled equals the plain model."""
    import loraredux as lx

    losses = {}
    for name in ("loraredux", "peft"):
        models[name].train()
        loss = models[name](input_ids=ids, labels=ids).loss
        loss.backward()
        losses[name] = loss.item()
    grad_diff = 0.0
    grad_scale = 0.0
    for adapter, layer in lora_pairs(models["loraredux"], models["peft"]):
        for mine, theirs in (
            (adapter.A.grad, layer.lora_A["default"].weight.grad),
            (adapter.B.grad, layer.lora_B["default"].weight.grad),
        ):
            grad_diff = max(grad_diff, (mine - theirs).abs().max().item())
            grad_scale = max(grad_scale, theirs.abs().max().item())
    for name in ("loraredux", "peft"):
        models[name].zero_grad(set_to_none=True)
    with torch.no_grad():
        with lx.disabled(models["loraredux"]):
            disabled_loss = models["loraredux"](input_ids=ids, labels=ids).loss.item()
        plain_loss = models["plain"](input_ids=ids, labels=ids).loss.item()
    diff = abs(losses["loraredux"] - losses["peft"])
    check = {
        "loss_loraredux": losses["loraredux"],
        "loss_peft": losses["peft"],
        "loss_abs_diff": diff,
        "lora_grad_max_abs_diff": grad_diff,
        "lora_grad_max_abs": grad_scale,
        "loss_plain": plain_loss,
        "loss_loraredux_disabled": disabled_loss,
    }
    adapters_matter = diff < abs(
        losses["peft"] - plain_loss
    )  # B != 0: the adapters do change the loss
    check["ok"] = (
        diff <= 1e-5 * max(1.0, abs(losses["peft"]))
        and grad_diff <= 1e-4 * max(grad_scale, 1e-12)
        and abs(disabled_loss - plain_loss) <= 1e-6 * max(1.0, abs(plain_loss))
        and adapters_matter
    )
    return check


# ----------------------------------------------------------------------------------------------- work units


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_train_step(model: nn.Module, ids: torch.Tensor, lr: float) -> Callable[[], None]:
    """One training step: LM loss forward, backward, AdamW step, zero_grad (set_to_none, PyTorch's default).

    A model with nothing trainable (the floor) gets forward + backward only.
    """
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=lr) if params else None
    model.train()

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def make_forward(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One unmerged inference forward (eval mode, no autograd), logits for every position."""
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return forward


def batch(args: argparse.Namespace) -> torch.Tensor:
    gen = torch.Generator().manual_seed(args.seed + 2)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)


# ----------------------------------------------------------------------------------------------- memory


def memory_worker(args: argparse.Namespace) -> None:
    """In a fresh process: build one variant, then the peak RSS of its first and of a steady-state step."""
    torch.set_num_threads(args.threads)
    model = build_variant(args.memory_worker, reference_model(args), args.rank, args.alpha)
    step = make_train_step(model, batch(args), args.lr)
    malloc_trim()
    baseline = rss_bytes()  # the built (and adapted) model; no gradient or optimizer state yet
    first = peak_rss_window(step, baseline)
    steady = peak_rss_window(step, baseline)
    record = {"variant": args.memory_worker, "baseline_rss_bytes": baseline, "first_step": first}
    print(json.dumps({**record, "steady_step": steady}))


def measure_memory(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Each memory variant `--memory-repeats` times, each run in its own fresh subprocess.

    RSS is per process, so the workers of one repeat run concurrently (sharing the CPU slows them but does not
    change what they allocate).
    """
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in MEMORY_VARIANTS}
    flags = ("layers", "vocab", "batch", "seq", "rank", "alpha", "seed", "threads", "lr")
    for _ in range(args.memory_repeats):
        procs = {}
        for variant in MEMORY_VARIANTS:
            command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", variant]
            for flag in flags:
                command += [f"--{flag}", str(getattr(args, flag))]
            procs[variant] = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        for variant, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory worker {variant} failed:\n{stderr[-4000:]}")
            runs[variant].append(json.loads(stdout.strip().splitlines()[-1]))
    return runs


# ----------------------------------------------------------------------------------------------- report


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Ratio of medians, and the median and quartiles of the per-round ratios (rounds are interleaved)."""
    per_round = summarise([a / b for a, b in zip(num, den, strict=True)])
    return {
        "ratio_of_medians": statistics.median(num) / statistics.median(den),
        "per_round_median": per_round["median"],
        "per_round_q1": per_round["q1"],
        "per_round_q3": per_round["q3"],
    }


def pick_rounds(rounds: Rounds) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The seconds to summarise: the clean rounds if there are enough, else all rounds (and say so)."""
    clean_only = rounds.n_clean >= max(3, len(rounds.clean) // 4)
    basis = {
        "rounds": len(rounds.clean),
        "clean_rounds": rounds.n_clean,
        "statistics_over": "clean rounds" if clean_only else "ALL rounds (too few clean ones)",
        "waited_for_quiet_s": rounds.waited_s,
    }
    return rounds.select(clean_only), basis


def time_table(summary: dict[str, dict[str, float]], refs: tuple[str, ...], extra=None) -> str:
    headers = ["variant", *(extra or {}).keys(), "median", "IQR (q1-q3)", "min"]
    headers += [f"/ {r}" for r in refs]
    rows = []
    for v, s in summary.items():
        row = [v, *((extra or {})[k][v] for k in (extra or {}))]
        row += [ms(s["median"]), f"{ms(s['q1'])}-{ms(s['q3'])}", ms(s["min"])]
        row += [f"{s['median'] / summary[r]['median']:.3f}" for r in refs]
        rows.append(row)
    return format_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layers", type=int, default=8, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's is 49152)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--repeats", type=int, default=40, help="clean timed training rounds wanted")
    p.add_argument(
        "--infer-repeats",
        type=int,
        default=None,
        help="clean inference rounds wanted (default 3 x --repeats)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument(
        "--memory-repeats", type=int, default=3, help="fresh subprocesses per variant for memory"
    )
    p.add_argument(
        "--max-wait", type=float, default=20.0, help="s to wait for a quiet machine per round"
    )
    p.add_argument(
        "--budget", type=float, default=600.0, help="wall-time budget, s (ends timing phases)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--profile", action="store_true", help="print torch.profiler tables instead of timing"
    )
    p.add_argument("--json", metavar="PATH", help="write every measurement and summary as JSON")
    p.add_argument("--memory-worker", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.batch, args.seq = 2, 4096, 1, 32
        args.repeats, args.warmup, args.memory_repeats = 5, 1, 1
        args.max_wait, args.budget = 0.0, 12.0
    if args.infer_repeats is None:
        args.infer_repeats = 3 * args.repeats
    return args


def profile(fns: dict[str, Callable[[], None]], rank: int, calls: int = 3, rows: int = 16) -> None:
    """torch.profiler tables (self CPU time, grouped by input shapes) over `calls` calls of each function.

    Also prints the share of self CPU time spent in matrix products with a rank-sized operand dimension: the
    LoRA products x A^T, z B^T and their gradients (no other dimension of this model equals r = 16).
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gemms = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")
    for name, fn in fns.items():
        fn()
        wait_for_quiet(20.0)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                fn()
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events)
        low_rank = sum(
            e.self_cpu_time_total
            for e in events
            if e.key in gemms and any(rank in shape for shape in e.input_shapes if shape)
        )
        print(f"\n## profile: {name} ({calls} calls)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
        print(
            f"self CPU time in products with a rank-{rank} operand: {low_rank / max(total, 1):.1%}"
        )


def mac_shares(model: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """Multiply-adds per token of one forward, by part, counted from the adapted layers' shapes."""
    import loraredux as lx

    c = model.config
    layers = [a for _, a in lx.adapters(model)]
    return {
        "base projections": sum(a.in_features * a.out_features for a in layers),
        "lm_head": c.hidden_size * c.vocab_size,
        # q k^T and p v over the whole sequence (an upper bound: causal attention may skip half)
        "attention": c.num_hidden_layers * 2 * c.num_attention_heads * c.head_dim * args.seq,
        "lora": sum(a.config.rank * (a.in_features + a.out_features) for a in layers),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = machine_info()
    info["torch_threads"] = torch.get_num_threads()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"
    )
    print(
        f"versions: python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}"
    )
    print(
        f"model: random Llama, SmolLM2-135M shapes, {args.layers} layers, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq} tokens; LoRA r={args.rank} alpha={args.alpha:g} on "
        f"{', '.join(TARGETS)}; AdamW lr={args.lr:g}; fp32"
    )

    reference = reference_model(args)
    names = ("loraredux", "peft", "frozen", "floor", "plain")
    models = {v: build_variant(v, reference, args.rank, args.alpha) for v in names}
    del reference
    ids = batch(args)
    n_layers = equalise_lora(models["loraredux"], models["peft"], args.seed)
    check = sanity_check(models, ids)
    print(
        f"\nsanity ({n_layers} LoRA layers, identical base weights, A and B copied equal): "
        f"loss loraredux {check['loss_loraredux']:.6f} vs PEFT {check['loss_peft']:.6f} "
        f"(|diff| {check['loss_abs_diff']:.1e}); max |grad diff| on A, B "
        f"{check['lora_grad_max_abs_diff']:.1e} (max |grad| {check['lora_grad_max_abs']:.1e}); "
        f"loraredux disabled {check['loss_loraredux_disabled']:.6f} vs plain "
        f"{check['loss_plain']:.6f} -> {'OK' if check['ok'] else 'MISMATCH'}"
    )
    if not check["ok"]:
        raise SystemExit("sanity check failed: loraredux and PEFT do not compute the same thing")
    params = {v: sum(p.numel() for p in trainable(models[v])) for v in TRAIN_VARIANTS}

    macs = mac_shares(models["loraredux"], args)
    total = sum(macs.values())
    print(
        "multiply-adds per token of a forward: "
        + ", ".join(f"{k} {v / 1e6:.2f} M ({v / total:.1%})" for k, v in macs.items())
    )
    if args.profile:  # tables only, then stop
        profile(
            {f"train {v}": make_train_step(models[v], ids, args.lr) for v in TRAIN_VARIANTS},
            args.rank,
        )
        profile({f"inference {v}": make_forward(models[v], ids) for v in INFER_VARIANTS}, args.rank)
        return {}

    # -- 1. training step ------------------------------------------------------------------------------
    steps = {v: make_train_step(models[v], ids, args.lr) for v in TRAIN_VARIANTS}
    print(
        f"\ntiming training steps: {args.warmup} warm-up rounds, then interleaved rounds until "
        f"{args.repeats} clean ones ...",
        flush=True,
    )
    deadline = t_start + 0.42 * args.budget
    train_rounds = interleaved_times(
        steps, args.repeats, args.warmup, max_wait=args.max_wait, deadline=deadline
    )
    del steps
    # -- 2. unmerged inference -------------------------------------------------------------------------
    forwards = {v: make_forward(models[v], ids) for v in INFER_VARIANTS}
    print(
        f"timing inference: {args.warmup} warm-up rounds, then interleaved rounds until "
        f"{args.infer_repeats} clean ones ...",
        flush=True,
    )
    deadline = t_start + 0.80 * args.budget
    infer_rounds = interleaved_times(
        forwards, args.infer_repeats, args.warmup, max_wait=args.max_wait, deadline=deadline
    )
    del forwards, models
    # -- 3. memory -------------------------------------------------------------------------------------
    memory = None
    if not args.no_memory:
        print(f"measuring peak RSS: {args.memory_repeats} fresh subprocess(es) per variant ...")
        memory = measure_memory(args)

    # -- report ----------------------------------------------------------------------------------------
    train_times, train_basis = pick_rounds(train_rounds)
    infer_times, infer_basis = pick_rounds(infer_rounds)
    basis = {"train": train_basis, "inference": infer_basis}
    train = {v: summarise(t) for v, t in train_times.items()}
    infer = {v: summarise(t) for v, t in infer_times.items()}
    pairs = {
        "train: loraredux / peft": (train_times, "loraredux", "peft"),
        "train: loraredux / frozen": (train_times, "loraredux", "frozen"),
        "train: peft / frozen": (train_times, "peft", "frozen"),
        "train: loraredux / floor": (train_times, "loraredux", "floor"),
        "train: peft / floor": (train_times, "peft", "floor"),
        "inference: loraredux / plain": (infer_times, "loraredux", "plain"),
        "inference: peft / plain": (infer_times, "peft", "plain"),
        "inference: loraredux / peft": (infer_times, "loraredux", "peft"),
    }
    ratios: dict[str, dict[str, float]] = {
        key: ratio_stats(times[a], times[b]) for key, (times, a, b) in pairs.items()
    }

    print("\n### Timing rounds")
    rows = [
        [
            phase,
            b["rounds"],
            b["clean_rounds"],
            b["statistics_over"],
            f"{b['waited_for_quiet_s']:.0f}",
        ]
        for phase, b in basis.items()
    ]
    headers = ["phase", "rounds run", "clean rounds", "statistics over", "waited for quiet (s)"]
    print(format_table(headers, rows))

    print("\n### Training step (forward + backward + AdamW step + zero_grad), ms")
    trainable_col = {"trainable params": {v: f"{params[v]:,}" for v in TRAIN_VARIANTS}}
    print(time_table(train, ("peft", "frozen", "floor"), trainable_col))
    print(
        "(floor: frozen model, backward to the embedding output, no optimizer; for analysis only)"
    )

    print("\n### Unmerged inference (forward, no_grad, eval), ms")
    print(time_table(infer, ("plain", "peft")))

    mem_summary = None
    if memory is not None:
        mem_summary = {
            v: {
                "steady": summarise([r["steady_step"]["peak_bytes"] / MiB for r in memory[v]]),
                "first": summarise([r["first_step"]["peak_bytes"] / MiB for r in memory[v]]),
            }
            for v in MEMORY_VARIANTS
        }
        print("\n### Peak RSS during a training step, above the built model, MiB")
        rows = []
        for v in MEMORY_VARIANTS:
            m = mem_summary[v]
            rows.append(
                [
                    v,
                    f"{m['steady']['median']:.1f}",
                    f"{m['steady']['min']:.1f}-{m['steady']['max']:.1f}",
                    f"{m['first']['median']:.1f}",
                    f"{m['steady']['median'] / mem_summary['peft']['steady']['median']:.3f}",
                ]
            )
        headers = ["variant", "second step (median)", "range", "first step (median)", "/ peft"]
        print(format_table(headers, rows))
        print(
            f"({args.memory_repeats} fresh process(es) per variant; method: "
            f"{memory['peft'][0]['steady_step']['method']}; baseline = RSS after building the model)"
        )
        ratios["memory: loraredux / peft"] = {
            "ratio_of_medians": mem_summary["loraredux"]["steady"]["median"]
            / mem_summary["peft"]["steady"]["median"]
        }

    print("\n### Ratios of medians [quartiles of the per-round ratios]")
    rows = []
    for key, r in ratios.items():
        spread = (
            f" [{r['per_round_q1']:.3f}-{r['per_round_q3']:.3f}]" if "per_round_q1" in r else ""
        )
        rows.append([key, f"{r['ratio_of_medians']:.3f}{spread}"])
    print(format_table(["ratio", "value"], rows))

    print("\n### Targets (issue 2, section 9)")
    verdicts = {}
    rows = []
    for key, limit in TARGET_LIMITS.items():
        if key not in ratios:
            continue
        value = ratios[key]["ratio_of_medians"]
        verdicts[key] = {"value": value, "limit": limit, "met": value <= limit}
        rows.append([key, f"{value:.3f}", f"<= {limit:.2f}", "met" if value <= limit else "MISSED"])
    print(format_table(["target", "ratio of medians", "limit", "verdict"], rows))
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal wall time {elapsed:.0f} s")

    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "memory_worker")},
        "target_modules": TARGETS,
        "machine": info,
        "sanity": check,
        "trainable_parameters": params,
        "forward_macs_per_token": macs,
        "timing_basis": basis,
        "train_rounds": train_rounds.to_dict(),
        "inference_rounds": infer_rounds.to_dict(),
        "train_summary_s": train,
        "inference_summary_s": infer,
        "memory_runs": memory,
        "memory_summary_mib": mem_summary,
        "ratios": ratios,
        "targets": verdicts,
        "wall_seconds": elapsed,
    }
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
