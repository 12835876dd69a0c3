"""How often the advisor's pick is within 1% of the best configuration in hindsight (the advisor's evidence).

For every problem of the stored `sp` suite (docs/bench/sp: matrix sensing and teacher-student) and of the `classify`
suite (docs/bench/classify), the advisor measures the problem as a user's data would let it (W0 and the loss
gradient at W0 over calibration batches: for `sp` the problem's own data cut into 8 batches, for `classify` the
suite's first 16 training batches), and its rules pick what the store varies: the init and the rank (teacher),
the optimizer (sensing), the method, init and optimizer (classify). The pick's best-of-sweep result (the mean over
seeds at its best learning rate, as the suite report's table) is set against the best configuration in hindsight.

"Within 1%": both metrics are fractions (the relative error ||ΔW - ΔW*|| / ||ΔW*||, the test accuracy), so 1% is
one hundredth of the target's norm, or one point of accuracy: pick <= best + 0.01 (error), pick >= best - 0.01
(accuracy). Because an error of 1e-3 passes that bar against a best of 1e-16, the ratio pick / best (error) or
best / pick (accuracy) is reported beside it, and how many picks are within 1% by that ratio. Each seed's problem
is measured and picked on its own; the store's result is the mean over seeds, as in the suite report.

    python benchmarks/advisor_hindsight.py [--sp docs/bench/sp] [--classify docs/bench/classify] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loraredux.advisor import rules
from loraredux.advisor.measure import measure_layer
from loraredux.bench.report import STORE_NAME, best_of_sweep
from loraredux.bench.store import Store
from loraredux.bench.suites.sp import (
    SENSING_DEFAULTS,
    TEACHER_DEFAULTS,
    sensing_data,
    teacher_data,
)

BATCHES = 8


def _pick_layer(W0: torch.Tensor, grads: list[torch.Tensor]) -> dict[str, Any]:
    m = measure_layer(W0, grads)
    rank = rules.layer_rank(m, max_rank=min(W0.shape))
    init = rules.layer_init(m, rank.value)
    optimizer = rules.choose_optimizer({"layer": m})
    return {"rank": rank.value, "init": init.value, "optimizer": optimizer.value,
            "needed_rank": m.needed_rank}  # fmt: skip


def sp_pick(problem: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """The advisor's pick on one stored sp problem and seed."""
    if problem == "teacher":
        o = {**TEACHER_DEFAULTS, **options}
        W0, _, x, target = teacher_data(o, seed)
        grads = [-2 * t.T @ xb / (len(xb) * W0.shape[0])  # d/dΔW mean((xb ΔW^T - t)^2) at ΔW = 0
                 for xb, t in zip(x.chunk(BATCHES), target.chunk(BATCHES), strict=True)]  # fmt: skip
    else:
        o = {**SENSING_DEFAULTS, **options}
        W0, _, X, y = sensing_data(o, seed)
        grads = [-2 * torch.einsum("m,moi->oi", yb, Xb) / len(yb)  # d/dΔW mean((<X, ΔW> - y)^2) at 0
                 for Xb, yb in zip(X.chunk(BATCHES), y.chunk(BATCHES), strict=True)]  # fmt: skip
    return _pick_layer(W0, grads)


def _score(best: dict[tuple[str, ...], tuple[float, float]], problem_key: str, pick_key: tuple[str, ...],
           goal: str) -> dict[str, Any]:  # fmt: skip
    # the dense-base configurations, keyed without the base (the advisor picks for the model as loaded)
    configs = {c[:6]: v for c, v in best.items() if c[1] == problem_key and c[6] == "-"}
    top_config, (top_lr, top) = (min if goal == "min" else max)(
        configs.items(), key=lambda kv: kv[1][1]
    )
    row: dict[str, Any] = {"problem": problem_key, "pick": pick_key[2:], "best": top_config[2:],
                           "best_value": top, "best_lr": top_lr}  # fmt: skip
    if pick_key not in configs:
        row.update(value=None, within=None)
        return row
    lr, value = configs[pick_key]
    within = value <= top + 0.01 if goal == "min" else value >= top - 0.01
    ratio = (value / top if top > 0 else float("inf")) if goal == "min" else top / value
    row.update(value=value, lr=lr, within=within, gap=value - top, ratio=ratio)
    return row


def sp_rows(directory: Path) -> list[dict[str, Any]]:
    runs = Store(directory / STORE_NAME).runs("sp")
    best = best_of_sweep(runs)
    problems = {}
    for run in runs:
        t = run.trial
        key = t.problem + (
            f" {json.dumps(t.problem_options, sort_keys=True)}" if t.problem_options else ""
        )
        problems.setdefault(key, (t.problem, t.problem_options, set()))[2].add(t.seed)
    rows = []
    for key, (problem, options, seeds) in sorted(problems.items()):
        for seed in sorted(seeds):
            pick = sp_pick(problem, options, seed)
            if problem == "teacher":  # the store varies the init and the rank (optimizer: AdamW)
                pick_key = ("sp", key, "lora", pick["init"], "adamw", str(pick["rank"]))
            else:  # sensing: the optimizer (rank 3, B = 0)
                pick_key = ("sp", key, "lora", "-", pick["optimizer"], "3")
            row = _score(best, key, pick_key, "min")
            row.update(seed=seed, needed_rank=pick["needed_rank"])
            rows.append(row)
    return rows


def classify_rows(directory: Path, calibration_batches: int = 16) -> list[dict[str, Any]]:
    """The advisor on the classify suite's problem (MiniLM query/value, its training batches), scored on the
    configurations the store holds: its method, init and optimizer, at the store's rank 8 and alpha 8 (the
    per-layer ranks and the rsLoRA scale are not stored; `loraredux advise --verify` trains them)."""
    from loraredux import tasks
    from loraredux.advisor import advise
    from loraredux.bench.suites.real import CLASSIFY_DEFAULTS

    runs = Store(directory / STORE_NAME).runs("classify")
    best = best_of_sweep(runs)
    rows = []
    problems = {
        (r.trial.problem, json.dumps(r.trial.problem_options, sort_keys=True)) for r in runs
    }
    for problem, options_text in sorted(problems):
        options = {**CLASSIFY_DEFAULTS, **json.loads(options_text)}
        key = problem + (f" {options_text}" if options_text != "{}" else "")
        seeds = sorted({r.trial.seed for r in runs if r.trial.problem == problem})
        for seed in seeds:
            torch.manual_seed(seed)
            model, task, _ = tasks.build_task(
                options["model"], "rotten_tomatoes", train_examples=options["train_examples"],
                eval_examples=options["eval_examples"], batch_size=options["batch_size"],
                max_length=options["max_length"], seed=seed, progress=False,
            )  # fmt: skip
            batches = [task.batches(i) for i in range(calibration_batches)]
            rec = advise(model, batches, task.loss_fn, targets=task.default_targets,
                         modules_to_save=task.modules_to_save)  # fmt: skip
            # the store names LoRA's default init "-" (B = 0, as kaiming)
            init = rec.init if rec.method == "lora" and rec.init != "kaiming" else "-"
            pick_key = ("classify", key, rec.method, init, rec.optimizer, "8")
            row = _score(best, key, pick_key, "max")
            ranks = Counter(a.rank for a in rec.layers.values())
            row.update(seed=seed, ranks=dict(sorted(ranks.items())),
                       reasons={k: c.reason for k, c in rec.choices.items()})  # fmt: skip
            rows.append(row)
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}")


def _ratio(x: float | None) -> str:
    return "-" if x is None else (f"{x:.4g}" if x < 1e4 else f"{x:.2e}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| problem | seeds | pick (method, init, optimizer, rank) | pick's result | best in hindsight | "
             "best's result | within 1 point | ratio |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:  # seeds with the same pick share the store's result: one line
        merged.setdefault((r["problem"], tuple(r["pick"])), [r, []])[1].append(str(r["seed"]))
    for r, seeds in merged.values():
        within = {True: "yes", False: "**no**", None: "not stored"}[r["within"]]
        lines.append(
            f"| {r['problem']} | {','.join(seeds)} | {', '.join(r['pick'])} | {_fmt(r['value'])} | "
            f"{', '.join(r['best'])} | {_fmt(r['best_value'])} | {within} | {_ratio(r.get('ratio'))} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    scored = [r for r in rows if r["within"] is not None]
    hits = sum(r["within"] for r in scored)
    close = sum(r["ratio"] <= 1.01 for r in scored)
    ratios = [r["ratio"] for r in scored]
    median = statistics.median(ratios) if ratios else None
    return (f"{hits} of {len(scored)} picks (problem x seed) within 1 point of the best in hindsight, {close} within "
            f"1% by ratio ({len(rows) - len(scored)} not in the store); pick / best: median {_ratio(median)}, "
            f"largest {_ratio(max(ratios) if ratios else None)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sp", type=Path, default=Path("docs/bench/sp"))
    parser.add_argument("--classify", type=Path, default=Path("docs/bench/classify"))
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    for name, make in (("sp", sp_rows), ("classify", classify_rows)):
        directory = getattr(args, name)
        if not (directory / STORE_NAME).exists():
            print(f"{directory / STORE_NAME} missing: skipped {name}", file=sys.stderr)
            continue
        rows = make(directory)
        out[name] = rows
        print(f"## {name}\n\n{summary(rows)}\n\n{table(rows)}\n")
        if name == "classify":
            for r in rows:
                print(f"seed {r['seed']}: layer ranks {r['ranks']}")
                for k, reason in r["reasons"].items():
                    print(f"  {k}: {reason}")
            print()
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
