"""`loraredux advise --verify`: train the recommended configuration against plain LoRA and one or two alternatives on
the user's task, with the same data, seeds, steps and learning rate, and report the comparison.

The runs (each one a fresh model from `tasks.build_task`, adapted by `tasks.adapt_for_task`, trained by
`train.fit`, exactly as `loraredux train` does):
    advised          the recommendation: its method, ranks (rank and alpha patterns), init and optimizer
    lora             plain LoRA r = 8, alpha = 16, kaiming, AdamW: what a user would run without advice
    uniform rank     the advised method, init and optimizer at one rank for every layer, chosen so the trainable
                     count is closest to the advised pattern's (only when there is a pattern): does the pattern help?
    kaiming          the advised ranks from B = 0 with AdamW (only when the advised init or optimizer differ): do they?
    dora             DoRA r = 8 (when no other alternative applies)
A run identical to an earlier one is not trained twice. With a grid of learning rates (`lr=[...]`, `--lr 2e-3,4e-3`)
each configuration trains at each rate and is compared at its best, as the benchmark suites compare methods.

Seeds: with `seeds=N` (`--seeds N`) every configuration trains at seeds `seed`, ..., `seed + N - 1` (N times the
cost); its metric is the mean over the seeds, and its seed spread (the largest minus the smallest) is kept. The report
(`verdicts.compare_runs`) calls a difference evidence only when at least 2 seeds were run and it exceeds the larger seed
spread of the two runs compared; otherwise, and always with one seed (the default, today's cost), it says the
difference is within seed noise.

Base format: where the recommendation's base is quantized (nf4, fp4, int8), every run trains on that base, as
`loraredux train --base` makes it (`base_format.convert_base_`: the model loaded in fp32, its linear layers but the
head quantized, computing in fp32), and a LoftQ init starts from the dense weights kept before quantizing. Other
bases (fp32, bf16) train in fp32, as the packaged models load. `verify["base"]` records it.

The memory model is checked on the way: before the advised run trains, one training step (forward, loss, backward,
optimizer step) of a copy of its model is measured (`memory.measure_peak_bytes`, on the CPU or the GPU the model is
on; the weights by `memory.held_bytes`, quantization state included) and set against `memory.estimate_memory` for
the same configuration, batch shape, device and base (a quantized one with everything else and the activations in
fp32, as trained here). Both go to `verify["memory"]`. This is another figure than the base-format estimates of the
recommendation (`Recommendation.memory`), which are for the training device and batch shape `advise` was given, at
each base format (the quantized ones computing in bf16): the report names what each counts.

Each run is logged at INFO (`logging`, logger `loraredux.advisor.verify`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import rules
from .recommendation import Recommendation

__all__ = ["QUANTIZED", "verified_base", "verify"]

logger = logging.getLogger(__name__)

#: the recommended bases the verification trains on; others train in fp32 (module docstring)
QUANTIZED = ("nf4", "fp4", "int8")


def verified_base(rec: Recommendation) -> str:
    """The base the verification trains on: the recommendation's when quantized, else fp32."""
    return rec.base if rec.base in QUANTIZED else "fp32"


def _runs(rec: Recommendation) -> list[dict[str, Any]]:
    import loraredux as lx

    kwargs = rec.adapt_kwargs()
    advised = {
        "name": "advised",
        "config": rec.config().to_dict(),
        "rank_pattern": kwargs["rank_pattern"] or {},
        "alpha_pattern": kwargs["alpha_pattern"] or {},
        "optimizer": rec.optimizer,
    }
    lora = {
        "name": "lora",
        "config": lx.config("lora", rank=8, alpha=16.0).to_dict(),
        "rank_pattern": {},
        "alpha_pattern": {},
        "optimizer": "adamw",
    }
    runs = [advised, lora]
    alternatives = []
    has_rank = "rank" in advised["config"]
    if advised["rank_pattern"] and has_rank:
        target = sum(a.rank * sum(a.shape) for a in rec.layers.values())
        per_rank = sum(sum(a.shape) for a in rec.layers.values())
        uniform = max(1, round(target / per_rank))
        alternatives.append({
            **advised,
            "name": f"uniform rank {uniform}",
            "config": {
                **advised["config"],
                "rank": uniform,
                "alpha": advised["config"]["alpha"] if rec.rslora else rules.layer_alpha(uniform),
            },
            "rank_pattern": {},
            "alpha_pattern": {},
        })  # fmt: skip
    init = advised["config"].get("init")
    if has_rank and "init" in advised["config"] and (init != "kaiming" or rec.optimizer != "adamw"):
        alternatives.append({
            **advised, "name": "advised ranks, kaiming", "optimizer": "adamw",
            "config": {**advised["config"], "init": "kaiming", "init_options": {}},
        })  # fmt: skip
    if not alternatives and rec.method != "dora":
        alternatives.append({**lora, "name": "dora",
                             "config": lx.config("dora", rank=8, alpha=16.0).to_dict()})  # fmt: skip
    runs.extend(alternatives[:2])
    return [r for i, r in enumerate(runs) if not any(_same(r, q) for q in runs[:i])]


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("config", "rank_pattern", "alpha_pattern", "optimizer")
    return all(a[k] == b[k] for k in keys)


def _memory_check(
    rec: Recommendation, net: nn.Module, task: Any, batch: dict[str, Any], optimizer: str, lr: float,
    kind: str, base: str,
) -> dict[str, Any]:  # fmt: skip
    """One training step of a copy of `net` measured, against the memory model's estimate (module docstring)."""
    import loraredux as lx

    from .memory import OPTIMIZER_STATES, estimate_memory, held_bytes, measure_peak_bytes

    device = next(net.parameters()).device
    clone = copy.deepcopy(net).train()
    opt = lx.optim.create(optimizer, clone, lr=lr)

    def step() -> None:
        task.loss_fn(clone, batch).backward()
        opt.step()

    measured = held_bytes(clone) + measure_peak_bytes(step, device)
    batch_size, seq_len = batch["input_ids"].shape
    cfg, adapt = rec.config(), rec.adapt_kwargs()
    fields = {k: v for k, v in cfg.to_dict().items() if k in ("rank", "alpha", "rslora")}
    quantized = base in QUANTIZED
    estimate = estimate_memory(
        net.config, kind=kind, base=base if quantized else "fp32",
        dtype=torch.float32 if quantized else None, method=cfg.method, method_fields=fields,
        targets=adapt["targets"], exclude=adapt["exclude"], modules_to_save=adapt["modules_to_save"],
        rank_pattern=adapt["rank_pattern"], alpha_pattern=adapt["alpha_pattern"],
        optimizer=optimizer if optimizer in OPTIMIZER_STATES else "adamw",
        batch_size=int(batch_size), seq_len=int(seq_len), device=device.type,
    )  # fmt: skip
    return {
        "device": device.type,
        "base": base if quantized else "fp32",
        "dtype": "fp32",
        "batch_size": int(batch_size),
        "seq_len": int(seq_len),
        "estimated": estimate.total_bytes,
        "estimated_parts": estimate.breakdown(),
        "measured": measured,
        "ratio": estimate.total_bytes / measured,
    }


def _train(
    run: dict[str, Any], rec: Recommendation, build: dict[str, Any], steps: int | None, lr: float | None,
    calibration_batches: int, seed: int, progress: bool, check_memory: bool,
) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:  # fmt: skip
    """One run at one learning rate: (its result, the task, the memory check or None)."""
    import math

    import loraredux as lx

    from ..base_format import convert_base_
    from ..tasks import adapt_for_task, build_task
    from ..train import TrainConfig, fit

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    net, task, data_name = build_task(**build, seed=seed, progress=False)
    size = build["batch_size"] or (32 if task.kind == "classification" else 8)
    n_steps = steps or math.ceil(task.train_size / size)
    rate = lr or (4e-3 if task.kind == "classification" else 5e-4)
    config = lx.config_from_dict(run["config"])
    base = convert_base_(
        net, verified_base(rec), keep=task.modules_to_save,
        keep_weights=getattr(config, "init", None) == "loftq",
    )  # fmt: skip
    adapt_for_task(
        net, config, task, steps=n_steps, targets=rec.targets,
        exclude=rec.exclude, calibration_batches=calibration_batches, progress=False,
        rank_pattern=run["rank_pattern"] or None, alpha_pattern=run["alpha_pattern"] or None,
        base=base,
    )  # fmt: skip
    memory = None
    if check_memory:
        memory = _memory_check(
            rec, net, task, task.batches(0), run["optimizer"], rate, task.kind, base.name
        )
    logger.info(
        "verify: training %s at lr %g, seed %d (%d steps)", run["name"], rate, seed, n_steps
    )
    result = fit(
        net,
        task.batches,
        task.loss_fn,
        TrainConfig(steps=n_steps, lr=rate, warmup_steps=max(1, n_steps // 10), seed=seed),
        optimizer=lambda _: lx.optim.create(run["optimizer"], net, lr=rate),
        eval_fn=task.evaluate,
        progress=progress,
    )
    tail = result.losses[-max(1, len(result.losses) // 10) :]
    out = {
        "lr": rate,
        "metric": result.evals[-1][1][task.metric],
        "train_loss": statistics.fmean(tail),
        "seconds": round(time.perf_counter() - t0, 1),
        "trainable": sum(p.numel() for p in lx.trainable_parameters(net).values()),
        "steps": n_steps,
        "data": data_name,
    }
    return out, task, memory


def verify(
    rec: Recommendation,
    model: str = "minilm",
    data: str | None = None,
    *,
    train_examples: int = 4000,
    eval_examples: int | None = None,
    steps: int | None = None,
    lr: float | Sequence[float] | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    calibration_batches: int = 8,
    seed: int = 0,
    seeds: int = 1,
    progress: bool = True,
    columns: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the runs of the module docstring on a packaged task (or a local folder) and return the comparison,
    also stored in `rec.verify` (the `verify` entry of recommendation.json).

    Args:
        lr: the peak learning rate of every run (default: the task's, 4e-3 classification, 5e-4 LM), or a grid
            of them: each configuration then trains at each, and its best is what is compared (every point is in
            the run's `"sweep"`).
        seed: the first seed.
        seeds: how many seeds each configuration trains at (`seed`, `seed + 1`, ...): its metric is their mean,
            and `"per_seed"` and `"spread"` (largest minus smallest) say how far they scatter. With 1 (the
            default) no difference counts as evidence (module docstring).
        progress: the training progress bars (shown only in a terminal).
        columns: for a data file, `tasks.build_task`'s column options (`text_column`, `label_column`,
            `messages_column`, `eval_split`, `eval_fraction`).

    Raises:
        ValueError: what `tasks.build_task` refuses (an unknown model or data set), an empty or non-positive lr grid,
            seeds below 1.
    """
    rates: list[float | None] = (
        [None]
        if lr is None
        else ([float(lr)] if isinstance(lr, (int, float)) else [float(x) for x in lr])
    )
    if not rates or any(r is not None and not r > 0 for r in rates):
        raise ValueError(f"lr must be a number > 0 or a non-empty list of them, got {lr!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    build = {"model": model, "data": data, "train_examples": train_examples,
             "eval_examples": eval_examples, "batch_size": batch_size, "max_length": max_length,
             **dict(columns or {})}  # fmt: skip
    seed_list = list(range(seed, seed + seeds))
    runs = _runs(rec)
    results, memory, task, out = [], None, None, {}
    for i, run in enumerate(runs, 1):
        logger.info(
            "verifying %d/%d: %s at %d learning rate(s) x %d seed(s)", i, len(runs), run["name"],
            len(rates), len(seed_list),
        )  # fmt: skip
        sweep = []
        for rate in rates:
            per_seed = []
            for s in seed_list:
                check = run["name"] == "advised" and memory is None
                out, task, measured = _train(
                    run, rec, build, steps, rate, calibration_batches, s, progress, check
                )
                memory = measured or memory
                per_seed.append(out)
            metrics = [o["metric"] for o in per_seed]
            sweep.append({
                **per_seed[0],
                "metric": statistics.fmean(metrics),
                "train_loss": statistics.fmean(o["train_loss"] for o in per_seed),
                "seconds": round(sum(o["seconds"] for o in per_seed), 1),
                "per_seed": {str(s): m for s, m in zip(seed_list, metrics, strict=True)},
            })  # fmt: skip
        pick = (max if task.higher_is_better else min)(sweep, key=lambda o: o["metric"])
        entry = {
            **run,
            **{k: pick[k] for k in ("lr", "metric", "train_loss", "seconds", "trainable")},
        }
        if len(seed_list) > 1:
            entry["per_seed"] = pick["per_seed"]
            entry["spread"] = max(pick["per_seed"].values()) - min(pick["per_seed"].values())
        if len(sweep) > 1:
            entry["sweep"] = {format(o["lr"], "g"): o["metric"] for o in sweep}
        results.append(entry)
    rec.verify = {
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "model": model,
        "data": out["data"],
        "steps": out["steps"],
        "seed": seed,
        "seeds": seed_list,
        "lrs": [o for o in (format(r, "g") for r in rates if r is not None)] or None,
        "runs": results,
        "memory": memory,
        "base": verified_base(rec),
    }
    return rec.verify
