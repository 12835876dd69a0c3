"""The user's own data: CSV, JSON Lines, Parquet files and folders saved by Hugging Face `datasets`.

`read_data(path, ...)` reads a file through the `datasets` library (imported here, lazily: it is the `data` extra),
picks the columns, infers the task, checks every row and splits off the evaluation examples. It never loads a
model, so bad data is refused before anything heavy happens, with an error naming the file, the row and the column.

Inference (explicit columns first, then the common names `text`, `label` / `labels`, `messages`):

- a label column -> classification of the text column; integer labels are the class ids as they are, string
  labels get ids in sorted order (`DataFile.label_names[i]` is the name of id i);
- a messages column (a list of `{"role", "content"}` messages) -> chat fine-tuning on the conversations rendered
  with the model's chat template, the loss on the assistant's tokens (`loraredux.chat`);
- a text column alone -> causal LM on the texts;
- anything else (no known column, or both `messages` and `text` without a label) -> an error listing the columns
  and the options that choose.

Evaluation examples: `eval_split` (a split of a saved `DatasetDict`), else `eval_fraction` of the rows held out
with `seed`, else a saved `test` / `validation` split, else 10% held out (classification), 10% of the
conversations held out with seed 0 by the chat task (chat), or held-out blocks cut from the token stream as for
the packaged data sets (text). `DataFile.eval` is None in the last two cases.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataFile", "is_data_path", "read_data"]

logger = logging.getLogger(__name__)

# File suffix -> the `datasets` builder that reads it.
_BUILDERS = {
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_LABEL_NAMES = ("label", "labels")
_EVAL_SPLITS = ("test", "validation")
_DEFAULT_EVAL_FRACTION = 0.1  # classification without an evaluation split


@dataclass(frozen=True)
class DataFile:
    """A data file read and checked: the examples of each part and what they are.

    Attributes:
        path: the file or folder, as given.
        kind: "classification", "chat" or "text" (language modelling).
        columns: role -> column used, e.g. {"text": "review", "label": "stars"}.
        train: (text, label id) pairs, texts, or conversations (lists of {"role", "content"} dicts), in file order.
        eval: the same for the held-out examples, or None: language modelling holds out blocks of the stream.
        label_names: classification with string labels: the names in sorted order (id i is label_names[i]);
            None for integer labels.
        num_labels: classification: the number of classes (the largest integer label + 1, or the names' count).
        eval_source: where the evaluation examples come from, for people (e.g. "split 'test'").
    """

    path: str
    kind: str
    columns: dict[str, str]
    train: list[Any]
    eval: list[Any] | None
    label_names: list[str] | None = None
    num_labels: int | None = None
    eval_source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What a run records about its data: path, kind, columns, sizes, the label mapping."""
        out: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind,
            "columns": dict(self.columns),
            "train_rows": len(self.train),
            "eval_rows": None if self.eval is None else len(self.eval),
            "eval": self.eval_source,
        }
        if self.kind == "classification":
            out["num_labels"] = self.num_labels
            if self.label_names is not None:
                out["label_ids"] = {name: i for i, name in enumerate(self.label_names)}
        return out


def is_data_path(data: str) -> bool:
    """Whether `data` names a file or folder rather than a packaged data set: it exists, or it looks like a path
    (a separator or a known suffix), so that a missing file is reported as such and not as an unknown name."""
    path = Path(data)
    return path.exists() or "/" in data or "\\" in data or path.suffix.lower() in _BUILDERS


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading a data file needs the `datasets` library; install it with: pip install loraredux[data]"
        ) from None
    return datasets


def _head(path: Path) -> bytes:
    """The first 64 KiB of a file: enough to tell an empty file or a lone header."""
    with path.open("rb") as fh:
        return fh.read(65536)


def _read_splits(path: Path) -> dict[str, Any]:
    """split name -> `datasets.Dataset`; a single file is the one split "train"."""
    datasets = _datasets()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            raise ValueError(
                f"{path} is a folder but not one saved by `datasets` (no dataset_dict.json or state.json); "
                "expected a CSV, JSON Lines or Parquet file, or a folder from Dataset.save_to_disk"
            )
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}; expected .csv, .jsonl, .json, .parquet "
            "or a folder saved by `datasets`"
        )
    if not _head(path).strip():
        raise ValueError(f"{path} is empty; expected a header and rows of examples")
    progress = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # A throwaway cache: the rows are copied out at once, and the user's cache is left as it was.
        with tempfile.TemporaryDirectory(prefix="loraredux-data-") as cache:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        return {"train": table}  # in memory: the cache can go
    except Exception as err:  # whatever the parser (pandas, pyarrow, datasets) says: unreadable
        if builder == "csv" and len(_head(path).splitlines()) == 1 and path.stat().st_size < 65536:
            raise ValueError(
                f"{path} has no rows, only a header; expected rows of examples"
            ) from None
        cause = err.__cause__ or err
        raise ValueError(f"{path}: not readable as {builder.upper()} ({cause})") from None
    finally:
        if progress:
            datasets.enable_progress_bars()


def _pick_columns(
    where: str,
    present: Sequence[str],
    text_column: str | None,
    label_column: str | None,
    messages_column: str | None,
) -> tuple[str, dict[str, str]]:
    """(kind, role -> column) from the explicit columns and the common names."""
    options = "choose with text_column= / label_column= / messages_column= (--text-column, ...)"
    for role, name in (
        ("text", text_column),
        ("label", label_column),
        ("messages", messages_column),
    ):
        if name is not None and name not in present:
            raise ValueError(f"{where}: no {role} column {name!r}; the columns are {list(present)}")
    if label_column is not None and messages_column is not None:
        raise ValueError(
            f"{where}: label_column and messages_column both given; a label classifies a text, messages "
            "are a conversation to model: give one"
        )
    if messages_column is not None:
        return "chat", {"messages": messages_column}
    labels = [n for n in _LABEL_NAMES if n in present]
    if label_column is None and len(labels) == 1:
        label_column = labels[0]
    elif label_column is None and len(labels) > 1 and text_column is None:
        raise ValueError(f"{where}: both 'label' and 'labels' columns; {options}")
    text = text_column or ("text" if "text" in present else None)
    if label_column is not None:
        if text is None:
            raise ValueError(
                f"{where}: a label column {label_column!r} but no text column; the columns are "
                f"{list(present)}; give the text with text_column= (--text-column)"
            )
        return "classification", {"text": text, "label": label_column}
    has_messages = "messages" in present
    if text_column is not None:
        return "text", {"text": text_column}
    if has_messages and text is not None:
        raise ValueError(
            f"{where}: both 'messages' and 'text' columns: chat or plain text? The columns are "
            f"{list(present)}; {options}"
        )
    if has_messages:
        return "chat", {"messages": "messages"}
    if text is not None:
        return "text", {"text": text}
    raise ValueError(
        f"{where}: no column to train on (none named text, label, labels or messages); the columns are "
        f"{list(present)}; {options}"
    )


def _check_text(where: str, column: str, values: Sequence[Any]) -> list[str]:
    for row, value in enumerate(values, 1):
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: row {row}, column {column!r}: the text is {value!r} "
                f"({type(value).__name__}); expected a string"
            )
    return list(values)


def _check_messages(where: str, column: str, values: Sequence[Any]) -> list[list[dict[str, str]]]:
    out = []
    for row, value in enumerate(values, 1):
        at = f"{where}: row {row}, column {column!r}"
        if not isinstance(value, list) or not value:
            raise ValueError(
                f"{at}: expected a non-empty list of {{'role': ..., 'content': ...}} messages, got {value!r}"
            )
        conversation = []
        for i, message in enumerate(value, 1):
            if not isinstance(message, dict):
                raise ValueError(
                    f"{at}: message {i} is {message!r}; expected {{'role': ..., 'content': ...}}"
                )
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    got = "has none" if message.get(key) is None else f"is {message[key]!r}"
                    raise ValueError(
                        f"{at}: message {i} lacks a string {key!r} ({key} {got}); each message is "
                        "{'role': ..., 'content': ...}"
                    )
            conversation.append({"role": message["role"], "content": message["content"]})
        out.append(conversation)
    return out


def _check_labels(
    parts: dict[str, tuple[str, Sequence[Any]]], column: str
) -> tuple[dict[str, list[int]], list[str] | None, int]:
    """part -> label ids, the names of string labels (sorted) or None, and the number of classes.

    `parts` maps a part to (where, labels); every label of every part must be of one type."""
    first: tuple[str, int, type] | None = None
    for where, values in parts.values():
        for row, value in enumerate(values, 1):
            at = f"{where}: row {row}, column {column!r}"
            if isinstance(value, float) and value.is_integer():
                # Readers widen a column of integers to floats when one value is a float or missing: 1.0 is 1.
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(
                    f"{at}: the label is {value!r} ({type(value).__name__}); expected an integer class id "
                    "or a string class name"
                )
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{at}: the label is {value}; integer labels are class ids >= 0")
            kind = int if isinstance(value, int) else str
            if first is None:
                first = (where, row, kind)
            elif kind is not first[2]:
                name = {int: "an integer", str: "a string"}
                raise ValueError(
                    f"{at}: the label {value!r} is {name[kind]} but row {first[1]} of {first[0]} has "
                    f"{name[first[2]]}; labels must be all integers or all strings"
                )
    assert first is not None  # the parts are not empty
    if first[2] is int:
        ids = {part: [int(v) for v in values] for part, (_, values) in parts.items()}
        return ids, None, max(max(v) for v in ids.values()) + 1
    names = sorted({v for _, values in parts.values() for v in values})
    index = {name: i for i, name in enumerate(names)}
    ids = {part: [index[v] for v in values] for part, (_, values) in parts.items()}
    return ids, names, len(names)


def read_data(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    messages_column: str | None = None,
    eval_split: str | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> DataFile:
    """Read, check and split a data file (see the module docstring for the inference and the evaluation split).

    Args:
        path: a .csv, .jsonl / .json (JSON Lines or a JSON list of records), .parquet file, or a folder written
            by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        text_column: the text (classification, language modelling); default: the column `text`.
        label_column: the class (classification); default: the column `label` or `labels`.
        messages_column: a conversation per row (chat language modelling); default: the column `messages`.
        eval_split: the split of a saved DatasetDict to evaluate on (default: `test`, else `validation`).
        eval_fraction: the fraction of the rows (0 < F < 1) held out for evaluation, drawn with `seed`.
        seed: the held-out draw.

    Raises:
        ValueError: a missing file, an unknown format, an empty file, a missing or ambiguous column, a bad
            value (naming the file, the row and the column), or a bad split option.
        ImportError: `datasets` is not installed.
    """
    if eval_split is not None and eval_fraction is not None:
        raise ValueError("give eval_split or eval_fraction, not both")
    if eval_fraction is not None and not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    where = str(path)
    splits = _read_splits(Path(path))
    if eval_split is not None and eval_split not in splits:
        raise ValueError(
            f"{where}: no split {eval_split!r}; "
            + (
                f"the splits are {sorted(splits)}"
                if len(splits) > 1 or Path(path).is_dir()
                else "a single file has none; hold out rows with eval_fraction= (--eval-fraction) instead"
            )
        )
    train_name = "train" if "train" in splits else None
    if train_name is None:
        rest = [s for s in splits if s != eval_split]
        if len(rest) != 1:
            raise ValueError(
                f"{where}: no 'train' split and no single other one; the splits are {sorted(splits)}"
            )
        train_name = rest[0]
    if eval_split is None and eval_fraction is None:
        eval_split = next((s for s in _EVAL_SPLITS if s in splits and s != train_name), None)

    def label(split: str) -> str:
        return where if len(splits) == 1 else f"{where} (split {split!r})"

    train_table = splits[train_name]
    if len(train_table) == 0:
        raise ValueError(f"{label(train_name)} has no rows; expected at least one example")
    present = list(train_table.column_names)
    kind, columns = _pick_columns(
        label(train_name), present, text_column, label_column, messages_column
    )
    parts = {"train": (label(train_name), train_table)}
    if eval_split is not None:
        table = splits[eval_split]
        missing = [c for c in columns.values() if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{label(eval_split)}: no column {missing[0]!r}; the columns are {list(table.column_names)}"
            )
        if len(table) == 0:
            raise ValueError(f"{label(eval_split)} has no rows; expected at least one example")
        parts["eval"] = (label(eval_split), table)

    values: dict[str, list[Any]] = {}
    for part, (at, table) in parts.items():
        if kind == "chat":
            values[part] = _check_messages(at, columns["messages"], table[columns["messages"]])
        else:
            values[part] = _check_text(at, columns["text"], table[columns["text"]])
    names, num_labels = None, None
    if kind == "classification":
        ids, names, num_labels = _check_labels(
            {part: (at, table[columns["label"]]) for part, (at, table) in parts.items()},
            columns["label"],
        )
        values = {part: list(zip(values[part], ids[part], strict=True)) for part in values}

    train, held_out = values["train"], values.get("eval")
    source = f"split {eval_split!r}" if held_out is not None else ""
    if held_out is None and (eval_fraction is not None or kind == "classification"):
        fraction = _DEFAULT_EVAL_FRACTION if eval_fraction is None else eval_fraction
        n_eval = max(1, round(fraction * len(train)))
        if n_eval >= len(train):
            raise ValueError(
                f"{where}: {len(train)} row(s) cannot give both training and evaluation examples at "
                f"eval_fraction={fraction}; add rows or give an evaluation split"
            )
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        chosen = set(order[:n_eval])
        held_out = [x for i, x in enumerate(train) if i in chosen]
        train = [x for i, x in enumerate(train) if i not in chosen]
        source = (
            f"{n_eval} of {len(values['train'])} rows held out (fraction {fraction}, seed {seed})"
        )
    if held_out is None:
        source = (
            "10% of the conversations held out (seed 0)"
            if kind == "chat"
            else "held-out blocks of the token stream"
        )
    data = DataFile(where, kind, columns, train, held_out, names, num_labels, source)
    logger.info("read %s: %s", where, data.describe())
    return data
