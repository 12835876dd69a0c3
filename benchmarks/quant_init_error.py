"""How much of the NF4 quantization error QPiSSA and LoftQ take back, on MiniLM and SmolLM2-135M.

For every targeted layer with dense weight W0 (fp32), a frozen 4-bit base Q and an adapter s B A, the error is
W0 - deq(Q) - s B A. Per model and rank we report the aggregate relative error

    e = sqrt(sum_l ||W0_l - deq(Q_l) - s B_l A_l||_F^2) / sqrt(sum_l ||W0_l||_F^2),

the relative error of all the layers taken as one matrix (large layers weigh more than in a mean of per-layer
ratios). q is bitsandbytes' NF4 (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`, blocks of 64 over the
row-major weight, as `Linear4bit` quantizes an (out, in) weight), without double quantization: transformers'
`BitsAndBytesConfig` default (`bnb_4bit_use_double_quant=False`); `--double-quant` quantizes the absmax too.

- **QLoRA**: Q = q(W0), B = 0.
- **QPiSSA**: s B A = SVD_r(W0) from `lx.init.get("pissa")` (exact SVD), Q = q(W0 - s B A).
- **LoftQ T**: `lx.init.get("loftq")(W0, r, s, iters=T)` (exact SVD, NF4 without double quantization, as PEFT);
  its base Q_T goes through q once more, which is what loading it in 4-bit does (a no-op without double
  quantization: Q_T is a fixed point of NF4, and the script checks that it is).
- **from ckpt T** (`lx.init.loftq_from_checkpoint_`): the model is loaded, adapted with LoRA (rank r, alpha r) on
  the targets and every base replaced by q(W0), i.e. what loading it with `BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")` gives; then the function reads W0 from the model's safetensors folder and runs T
  alternations, re-quantizing through `quantize=q` for T > 1. The error is the report's `aggregate()`. With Q_1 =
  q(W0) it is LoftQ again, so its T = 1 column matches LoftQ T = 1 (to float32 rounding) and checks the reader and
  the function end to end on real checkpoints (MiniLM's keys lack the `bert.` prefix of the loaded classifier).

Targets. MiniLM (`loraredux.assets.load_minilm()`, the packaged all-MiniLM-L6-v2): the 37 `nn.Linear` of the BERT
encoder, 6 layers x (query, key, value, attention output, intermediate, output) and the pooler; the new
classification head is left out. SmolLM2 (`load_smollm2()`): the 210 projections of its 30 decoder layers (q k v o
gate up down); the output head is left out (it is the input embedding, tied, and transformers keeps it in 16/32
bits when loading in 4-bit). All fp32, on the CPU, `torch.set_num_threads(--threads)`.

    python benchmarks/quant_init_error.py                  # both models, r = 16 and 64, T = 1 and 5; ~13 min here
    python benchmarks/quant_init_error.py --quick          # smoke test: MiniLM, r = 16, T = 1 and 2

`--threads` defaults to 1: on this shared 2-core machine a 2-thread LAPACK SVD of a 1536 x 576 matrix took 26 times
longer than a 1-thread one while another job held a core. `--help` lists the options.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info
from loraredux.io.files import write_json_atomic

MODELS = ("minilm", "smollm2")


# ----------------------------------------------------------------------------------------------- the parts


def quantizer(double_quant: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> deq(q(W)): bitsandbytes NF4, blocks of 64 over the row-major weight, in W's dtype."""
    import bitsandbytes.functional as bnbF

    def q(W: torch.Tensor) -> torch.Tensor:
        flat = W.detach().reshape(-1).to(torch.float32).contiguous()
        codes, state = bnbF.quantize_4bit(
            flat, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
        )
        return bnbF.dequantize_4bit(codes, state).reshape(W.shape).to(W.dtype)

    return q


def load(name: str) -> tuple[nn.Module, list[str], Path]:
    """The model (fp32, eval), the paths of its targeted linear layers and its checkpoint folder."""
    from loraredux import assets

    if name == "minilm":
        model, _ = assets.load_minilm()
        paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        paths = [p for p in paths if p.startswith("bert.")]  # not the new classifier
        folder = assets.minilm_dir()
    else:
        model, _ = assets.load_smollm2()
        paths = [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
        ]
        folder = assets.smollm2_dir()
    return model.eval(), paths, folder


def aggregate(errors: list[float], norms: list[float]) -> float:
    """sqrt(sum ||E_l||^2) / sqrt(sum ||W0_l||^2) from absolute errors and norms."""
    return math.sqrt(sum(e * e for e in errors) / sum(n * n for n in norms))


def fro(X: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(X))


# ----------------------------------------------------------------------------------------------- methods


def library_errors(
    weights: dict[str, torch.Tensor], q: Callable, rank: int, iters: list[int], exact_q: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """QLoRA, QPiSSA and LoftQ T (each T in `iters`) by the library's initialisers: (error, seconds) by column."""
    import loraredux as lx

    norms = [fro(W) for W in weights.values()]
    errors: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def column(name: str, error_of: Callable[[torch.Tensor], float]) -> None:
        start = time.perf_counter()
        errors[name] = aggregate([error_of(W) for W in weights.values()], norms)
        seconds[name] = time.perf_counter() - start

    column("QLoRA", lambda W: fro(W - q(W)))

    def qpissa(W: torch.Tensor) -> float:
        f = lx.init.get("pissa")(W, rank, 1.0)  # s B A = SVD_r(W0), base = W0 - s B A
        return fro(W - q(f.base) - f.B @ f.A)

    column("QPiSSA", qpissa)
    for T in iters:

        def loftq(W: torch.Tensor, T: int = T) -> float:
            f = lx.init.get("loftq")(W, rank, 1.0, iters=T)
            Q = q(f.base)
            if exact_q and not torch.equal(Q, f.base):
                raise AssertionError("LoftQ's Q_T is not a fixed point of NF4")
            return fro(W - Q - f.B @ f.A)

        column(f"LoftQ T={T}", loftq)
    return errors, seconds


def checkpoint_errors(
    name: str, q: Callable, rank: int, iters: list[int]
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """`loftq_from_checkpoint_` on the loaded model with NF4 bases: (error, seconds, rolled back) by column."""
    import loraredux as lx

    errors, seconds, rolled = {}, {}, {}
    for T in iters:
        model, paths, folder = load(name)
        lx.adapt_(model, lx.config("lora", rank=rank, alpha=float(rank)), targets=paths)
        for _, adapter in lx.adapters(model):  # the base a 4-bit load gives: q(W0)
            adapter.replace_base_weight_(q(adapter.base_weight().detach()))
        start = time.perf_counter()
        report = lx.init.loftq_from_checkpoint_(model, folder, iters=T, quantize=q)
        seconds[f"from ckpt T={T}"] = time.perf_counter() - start
        errors[f"from ckpt T={T}"] = report.aggregate()
        rolled[f"from ckpt T={T}"] = len(report.rolled_back)
        if len(report.layers) != len(paths):
            raise AssertionError(f"{len(report.layers)} layers reported, {len(paths)} adapted")
        del model
    return errors, seconds, rolled


# ----------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="adapter ranks r")
    p.add_argument("--iters", type=int, nargs="+", default=[1, 5], help="LoftQ alternations T")
    p.add_argument("--double-quant", action="store_true", help="NF4 with 8-bit absmax (QLoRA's)")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the from-ckpt columns")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="MiniLM, r = 16, T = 1 and 2: a smoke test")
    p.add_argument("--json", metavar="PATH", help="write the tables' numbers as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.ranks, args.iters = ["minilm"], [16], [1, 2]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    info = machine_info(("torch", "transformers", "bitsandbytes"))
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, {torch.get_num_threads()} torch threads"
    )
    print(
        f"versions: python {info['python']}, torch {info['torch']}, "
        f"transformers {info['transformers']}, bitsandbytes {info['bitsandbytes']}"
    )
    dq = "with" if args.double_quant else "without"
    print(f"quantizer: bitsandbytes NF4, blocks of 64, {dq} double quantization; fp32 weights")
    print("error: sqrt(sum_l ||W0 - deq(Q) - s B A||_F^2) / sqrt(sum_l ||W0||_F^2)\n")
    q = quantizer(args.double_quant)
    rows, time_rows, results = [], [], []
    headers: list[str] = []
    for name in args.models:
        model, paths, _ = load(name)
        weights = {p: model.get_submodule(p).weight.detach() for p in paths}
        for rank in args.ranks:
            errors, seconds = library_errors(weights, q, rank, args.iters, not args.double_quant)
            rolled: dict[str, int] = {}
            if not args.no_checkpoint:
                more, more_s, rolled = checkpoint_errors(name, q, rank, args.iters)
                errors.update(more)
                seconds.update(more_s)
            qlora = errors["QLoRA"]
            headers = ["model", "layers", "r", *errors]
            rows.append(
                [name, len(paths), rank]
                + [
                    f"{e:.4f}" if k == "QLoRA" else f"{e:.4f} ({e / qlora - 1:+.0%})"
                    for k, e in errors.items()
                ]
            )
            time_rows.append([name, len(paths), rank] + [f"{s:.1f}" for s in seconds.values()])
            results.append(
                {"model": name, "layers": len(paths), "rank": rank, "errors": errors}
                | {"seconds": seconds, "rolled_back": rolled}
            )
            print(f"{name} r={rank}: " + ", ".join(f"{k} {e:.4f}" for k, e in errors.items()))
        del model, weights
    print("\n### Aggregate relative error (change against QLoRA)")
    print(format_table(headers, rows))
    print("\n### Seconds per column (the whole model)")
    print(format_table(headers, time_rows))
    gaps = [
        abs(r["errors"][f"from ckpt T={T}"] - r["errors"][f"LoftQ T={T}"])
        for r in results
        for T in args.iters
        if f"from ckpt T={T}" in r["errors"]
    ]
    if gaps:
        n_rolled = sum(sum(r["rolled_back"].values()) for r in results)
        print(f"\nmax |from ckpt T - LoftQ T| over the rows: {max(gaps):.1e}")
        print(f"layers rolled back by loftq_from_checkpoint_ (error not below QLoRA's): {n_rolled}")
    wall = time.perf_counter() - start
    print(f"total wall time {wall:.0f} s")
    out = {"config": vars(args), "machine": info, "results": results, "wall_seconds": wall}
    if args.json:
        write_json_atomic(args.json, out)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
