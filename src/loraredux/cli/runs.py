"""The folder of a `loraredux train` run: where it goes, what an earlier run there means, what a --resume must
match, and how Ctrl-C and SIGTERM end a run with a checkpoint to resume from."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .common import UsageError

__all__ = [
    "SAVE_EVERY",
    "TRAJECTORY",
    "check_earlier_run",
    "check_out",
    "check_resume",
    "default_out",
    "interrupted",
    "run_signature",
    "stop_on_signals",
]

SAVE_EVERY = (
    100  # steps between checkpoints by default: a LoRA checkpoint is small, a lost hour is not
)
_EARLIER_RUN = ("adapter_config.json", "adapter_model.safetensors", "metrics.json")


def default_out(args: argparse.Namespace) -> Path:
    """A new folder named after the run, under runs/ (never an existing one)."""
    model = Path(str(args.model)).name or "model"
    data = Path(str(args.data)).stem or "data"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"train-{model}-{data}-{args.method}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = out.with_name(f"train-{model}-{data}-{args.method}-{stamp}-{n}")
    return out


def check_earlier_run(out: Path, overwrite: bool) -> None:
    """Refuse an --out that holds an earlier run, unless --overwrite (which drops its checkpoint, so that it
    cannot be taken for this run's)."""
    import shutil

    from loraredux import checkpoint

    found = checkpoint.find(out) if out.is_dir() else None
    held = [n for n in _EARLIER_RUN if (out / n).exists()] + ([found.path.name] if found else [])
    if not held:
        return
    if not overwrite:
        hint = f"--resume to continue its checkpoint (step {found.step}), " if found else ""
        raise UsageError(
            f"--out {out} holds an earlier run ({', '.join(held)}); add {hint}--overwrite to replace it, "
            "or choose another --out"
        )
    if found is not None:
        shutil.rmtree(found.path)


def check_out(out: Path) -> None:
    """Refuse an --out that cannot become a writable folder, before anything is loaded: it exists and is not a
    folder, a parent is a file, or no file can be created where it would go (a probe file, removed at once)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".loraredux-probe-"):
            pass
    except OSError as err:
        raise UsageError(
            f"--out {out}: cannot write in {existing} ({err.strerror or err}); choose a writable folder"
        ) from None


# The options that decide a run's trajectory: a --resume must give the same (the rest, e.g. --eval-examples or
# --no-progress, may change). Compared before anything is loaded; `fit` checks the resolved TrainConfig too.
TRAJECTORY = (
    "model", "data", "batch_size", "max_length", "train_examples", "seed", "method", "targets",
    "exclude", "rank", "alpha", "dropout", "rslora", "init", "init_option", "calibration_batches",
    "field", "optimizer", "optimizer_option", "recommendation", "steps", "lr",
    "text_column", "label_column", "messages_column", "eval_split", "eval_fraction", "train_on_prompt",
    "base",
)  # fmt: skip
# Options added to TRAJECTORY after runs were checkpointed without them, and their value in such a run: a run at
# that value leaves them out of its signature, so that it resumes those runs (and `fit`'s own check agrees).
_ADDED = {"base": "fp32"}


def run_signature(args: argparse.Namespace, cfg: Any, patterns: dict[str, Any]) -> dict[str, Any]:
    """What of the command decides the trajectory, as JSON: its options and the method config they give."""
    sig: dict[str, Any] = {}
    for name in TRAJECTORY:
        value = getattr(args, name)
        if isinstance(value, Path):
            value = str(value)
        elif name in ("init_option", "field", "optimizer_option"):
            value = [[k, v] for k, v in value]
        if name in _ADDED and value == _ADDED[name]:
            continue
        sig[name] = value
    return sig | {"config": cfg.to_dict(), "patterns": patterns}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_resume(args: argparse.Namespace, signature: dict[str, Any]) -> Any:
    """The checkpoint --resume continues (`checkpoint.Found`), or a usage error: none, or other options."""
    import json

    from loraredux import checkpoint

    found = checkpoint.find(args.out)
    if found is None:
        raise UsageError(
            f"--resume: no checkpoint in {args.out / 'checkpoint'}; start the run with --save-every N "
            f"--out {args.out}"
        )
    saved = found.config.get("signature") or {}
    differ = [
        f"{_flag(k)} {json.dumps(saved.get(k, _ADDED.get(k)))} there, "
        f"{json.dumps(signature.get(k, _ADDED.get(k)))} here"
        for k in TRAJECTORY
        if json.dumps(saved.get(k)) != json.dumps(signature.get(k))
    ]
    if not differ and json.dumps(saved.get("config")) != json.dumps(signature["config"]):
        differ.append("the method config (from --recommendation)")
    if differ:
        raise UsageError(
            f"--resume: {found.path} was written by a run with other options ({'; '.join(differ)}); "
            "resume with that run's options, or start a new run in another --out"
        )
    return found


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT) or SIGTERM asks training to stop after the current step, where
    `fit` writes a checkpoint to resume from; a second Ctrl-C stops at once. Yields the question `fit` asks."""
    import signal

    asked = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if asked["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked["stop"] = True
        name = signal.Signals(signum).name
        print(
            f"{name}: stopping after this step, with a checkpoint (Ctrl-C again: at once)",
            file=sys.stderr,
        )

    if (
        threading.current_thread() is not threading.main_thread()
    ):  # only the main thread may set handlers
        yield lambda: False
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: asked["stop"]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """The one line `main` prints on Ctrl-C: where the last checkpoint is and the command that resumes."""
    import shlex

    from loraredux import checkpoint

    if args.out is None:  # before the run began
        return "interrupted before training began; nothing was written"
    found = checkpoint.find(args.out)
    if found is None:
        return (
            f"interrupted before the first checkpoint; nothing was written to {args.out / 'checkpoint'} "
            "(run the same command again to start over)"
        )
    again = list(argv) + ([] if args.resume else ["--resume"])
    if "--out" not in argv:  # the folder chosen for the run
        again += ["--out", str(args.out)]
    again = [a for a in again if a != "--overwrite"]
    return (
        f"interrupted; the last checkpoint is {found.path} (step {found.step}); resume with: "
        f"loraredux {shlex.join(again)}"
    )
