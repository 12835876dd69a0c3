"""What the subcommands share: the usage error `main` reports, and argument types."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

__all__ = [
    "UsageError",
    "add_task_arguments",
    "build_task",
    "field_value",
    "fraction",
    "log",
    "positive_float",
    "positive_int",
    "targets",
]

log = logging.getLogger("loraredux")


class UsageError(Exception):
    """A mistake in what the user asked for; `main` prints it and exits with status 2."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def field_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def targets(text: str) -> str | list[str]:
    return (
        text
        if text == "all-linear" or text.startswith("re:")
        else [t for t in text.split(",") if t]
    )


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The options that pick a task (model, data and its columns, batch shape, sample, seed), shared by `train`
    and `advise`; `build_task(args)` reads them."""
    p.add_argument(
        "--model",
        default="minilm",
        help="packaged model (minilm, smollm2) or a local HF folder (hub names are not downloaded)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="rotten_tomatoes (classification), kjv (language modelling), chat (prompt/reply pairs), or your "
        "own file: a CSV, "
        "JSON Lines (.jsonl/.json), Parquet file or a folder saved by `datasets` (needs loraredux[data]); "
        "its task follows its columns: a label -> classification, messages -> chat, a text alone -> "
        "language modelling; default: rotten_tomatoes for minilm, kjv for smollm2",
    )
    p.add_argument(
        "--text-column", default=None, metavar="NAME", help="a data file's text (default: text)"
    )
    p.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="a data file's class, integer ids or names (default: label or labels); makes it classification",
    )
    p.add_argument(
        "--messages-column",
        default=None,
        metavar="NAME",
        help="a data file's conversations, lists of {role, content} rendered with the model's chat template "
        "(default: messages); makes it chat fine-tuning, the loss on the assistant's tokens",
    )
    p.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="chat: the loss on every token (system, user, template), not only the assistant's",
    )
    p.add_argument(
        "--eval-split",
        default=None,
        metavar="NAME",
        help="the split of a saved DatasetDict to evaluate on (default: test, else validation)",
    )
    p.add_argument(
        "--eval-fraction",
        type=fraction,
        default=None,
        metavar="F",
        help="hold out this fraction of a data file's rows for evaluation (seed 0); default without an "
        "eval split: 0.1 (classification, chat); language modelling holds out blocks instead",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="default 32 (cls) / 8 (LM, chat)"
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="tokens per example: truncation (cls, default 64; chat, 512) or block size (LM, 128)",
    )
    p.add_argument(
        "--train-examples",
        type=positive_int,
        default=4000,
        help="training examples drawn from the split (classification)",
    )
    p.add_argument(
        "--eval-examples",
        type=positive_int,
        default=None,
        help="test snippets (classification, default 1000), held-out conversations (chat, 100) or "
        "blocks (LM, 32)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the data sample and order, the new head, the adapter init",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


COLUMN_OPTIONS = ("text_column", "label_column", "messages_column", "eval_split", "eval_fraction")
COLUMN_OPTIONS += ("train_on_prompt",)


def data_columns(args: argparse.Namespace) -> dict[str, Any]:
    """The data options of `add_task_arguments` (a file's columns and evaluation rows, the chat loss), as
    `tasks.build_task` takes them."""
    return {name: getattr(args, name) for name in COLUMN_OPTIONS}


def build_task(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, task, data name or path) from `add_task_arguments`' options; a bad model, data set or data file is
    a usage error."""
    from loraredux import tasks

    try:
        return tasks.build_task(
            args.model,
            args.data,
            train_examples=args.train_examples,
            eval_examples=args.eval_examples,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            progress=not args.no_progress,
            **data_columns(args),
        )
    except ValueError as err:
        raise UsageError(f"--model/--data: {err}") from None
