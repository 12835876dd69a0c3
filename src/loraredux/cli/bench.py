"""`loraredux bench SUITE --out DIR` and `loraredux bench report DIR`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import UsageError


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite into DIR/results.sqlite, or render DIR's report",
        description="Run a suite's trials (problems x methods x inits x optimizers x ranks x learning rates x "
        "seeds) into DIR/results.sqlite, skipping finished runs (an interrupted suite resumes), then write "
        "DIR/report.md and DIR/runs.csv from the store. `loraredux bench report DIR` re-renders them.",
    )
    p.add_argument("what", metavar="SUITE|report", help="a suite (sp, classify, lm) or 'report'")
    p.add_argument("directory", nargs="?", type=Path, help="with 'report': the benchmark folder")
    p.add_argument("--out", type=Path, help="the benchmark folder (created if missing)")
    p.add_argument(
        "--quick", action="store_true", help="the suite's quick spec (minutes): --preset quick"
    )
    p.add_argument(
        "--preset",
        help="one of the suite's named specs (default full; every suite has quick and full, sp also "
        "full_teacher, classify also budget: the cross-layer methods at LoRA r=8's parameter budget)",
    )
    p.add_argument("--spec", type=Path, help="a JSON spec instead of the suite's default")
    p.add_argument(
        "--retry-failed", action="store_true", help="run again the trials whose run failed"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it shows only where stderr is a terminal anyway)",
    )
    p.set_defaults(run=_cmd_bench, on_interrupt=_interrupted)


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The one line `main` prints on Ctrl-C: what is kept, and that the same command continues."""
    import shlex

    if args.what == "report" or args.out is None:
        return "interrupted"
    return (
        f"interrupted; every finished run is kept in {args.out}; the same command continues: "
        f"loraredux {shlex.join(argv)}"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    from loraredux.bench import Store, expand, load_spec, run_trials
    from loraredux.bench.report import STORE_NAME, write_report
    from loraredux.bench.suites import SPECS, execute

    if args.what == "report":
        if args.directory is None:
            raise UsageError("bench report needs the benchmark folder: loraredux bench report DIR")
        print(f"report written to {write_report(args.directory)}")
        return 0
    if args.directory is not None:
        raise UsageError(f"unexpected {args.directory}; use --out DIR for the benchmark folder")
    if args.out is None:
        raise UsageError("bench SUITE needs --out DIR (where results.sqlite and the report go)")
    if args.spec is not None:
        spec = load_spec(args.spec)
        if spec.get("suite") != args.what:
            raise UsageError(
                f"{args.spec} is a spec of suite {spec.get('suite')!r}, not {args.what!r}"
            )
    elif args.what in SPECS:
        preset = "quick" if args.quick else (args.preset or "full")
        if preset not in SPECS[args.what]:
            raise UsageError(
                f"suite {args.what!r} has no preset {preset!r}; it has {sorted(SPECS[args.what])}"
            )
        spec = SPECS[args.what][preset]
    else:
        raise UsageError(
            f"unknown suite {args.what!r}; the suites are {sorted(SPECS)} (or 'report DIR')"
        )
    trials = expand(spec)
    store = Store(args.out / STORE_NAME)
    t0 = time.perf_counter()
    summary = run_trials(
        trials, store, execute, retry_failed=args.retry_failed, progress=not args.no_progress
    )
    print(
        f"{len(trials)} trials: {summary.finished} run now, {summary.failed} failed now, {summary.skipped} "
        f"already stored ({time.perf_counter() - t0:.0f} s)"
    )
    print(f"report written to {write_report(args.out)}")
    return 0
