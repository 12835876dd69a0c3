"""Fine-tuning tasks on real models: data preparation, the loss and the evaluation metric, in one object.

The CLI's `train` and the benchmark harness share these, so a number in a benchmark table and a number printed by
`loraredux train` come from the same code.

- `classification_task`: sequence classification (e.g. MiniLM on Rotten Tomatoes); metric: accuracy.
- `language_modeling_task`: causal LM on plain text cut into fixed blocks (e.g. SmolLM2 on the KJV);
  metric: held-out perplexity.
- `build_task(model, data, ...)`: a packaged model (or a local folder) with its task, on a packaged data set or
  the user's own file (CSV, JSON Lines, Parquet, a saved `datasets` folder: see `loraredux.datafiles`), as
  `loraredux train` and the `classify` / `lm` benchmark suites build them.
- `adapt_for_task(model, config, task, ...)`: `lx.adapt_` with the task's targets and head, the calibration batches a
  data-aware initialiser needs, and AdaLoRA's rank schedule set to the run's length.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .train import epoch_batches

__all__ = [
    "Task",
    "adapt_for_task",
    "build_task",
    "classification_task",
    "language_modeling_task",
    "quiet_loading",
]

Batch = dict[str, Tensor]


@dataclass
class Task:
    """What a training run needs besides the model: batches, a loss, an evaluation and sensible targets."""

    kind: str
    metric: str  # the name of the headline metric `evaluate` returns
    higher_is_better: bool
    batches: Callable[[int], Batch]
    loss_fn: Callable[[nn.Module, Batch], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    train_size: int
    default_targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(
        default_factory=dict
    )  # where the data came from (a file: path, columns, labels)


def _classification_loss(model: nn.Module, batch: Batch) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"])


def classification_task(
    tokenizer: Any,
    train: Sequence[tuple[str, int]],
    test: Sequence[tuple[str, int]],
    *,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Task:
    """Sequence classification from (text, label) pairs; the metric is test accuracy."""
    if not train or not test:
        raise ValueError(
            f"classification needs examples: got {len(train)} train and {len(test)} test"
        )

    def encode(pairs: Sequence[tuple[str, int]]) -> list[dict[str, Any]]:
        enc = tokenizer([t for t, _ in pairs], truncation=True, max_length=max_length)
        return [
            {"input_ids": ids, "label": label}
            for ids, (_, label) in zip(enc["input_ids"], pairs, strict=True)
        ]

    pad = tokenizer.pad_token_id or 0

    def collate(rows: Sequence[dict[str, Any]]) -> Batch:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([r["label"] for r in rows]),
        }

    train_rows, test_rows = encode(train), encode(test)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        correct = 0
        for start in _progress(range(0, len(test_rows), 64), "evaluating", progress):
            batch = collate(test_rows[start : start + 64])
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {"accuracy": correct / len(test_rows)}

    return Task(
        kind="classification",
        metric="accuracy",
        higher_is_better=True,
        batches=epoch_batches(train_rows, batch_size, collate, seed),
        loss_fn=_classification_loss,
        evaluate=evaluate,
        train_size=len(train_rows),
        default_targets=["query", "value"],
        modules_to_save=["classifier"],
    )


def _lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def language_modeling_task(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    seq_len: int = 128,
    eval_blocks: int = 32,
    max_tokens: int | None = 400_000,
    seed: int = 0,
    progress: bool = True,
    eval_texts: Sequence[str] | None = None,
) -> Task:
    """Causal LM on `texts` joined and cut into blocks of `seq_len` tokens; the metric is held-out perplexity.

    The held-out blocks are a fixed random sample (seed 0, independent of `seed`) so runs compare: `eval_blocks`
    blocks of the stream, or, with `eval_texts`, up to `eval_blocks` blocks cut from those texts (and every
    block of `texts` trains).
    """

    def blocks(parts: Sequence[str]) -> Tensor:
        ids: list[int] = []
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for text in parts:
            ids += tokenizer(text)["input_ids"] + sep
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        n = len(ids) // seq_len
        return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    stream = blocks(texts)
    n_blocks = stream.shape[0]
    if eval_texts is None:
        if n_blocks < eval_blocks + 1:
            raise ValueError(
                f"the text gives {n_blocks} blocks of {seq_len} tokens; need more than "
                f"eval_blocks={eval_blocks}"
            )
        order = list(range(n_blocks))
        random.Random(0).shuffle(order)
        held_out, train_idx = stream[order[:eval_blocks]], order[eval_blocks:]
    else:
        held_out, train_idx = blocks(eval_texts), list(range(n_blocks))
        if n_blocks < 1 or held_out.shape[0] < 1:
            raise ValueError(
                f"the training texts give {n_blocks} and the evaluation texts {held_out.shape[0]} blocks of "
                f"{seq_len} tokens; each needs at least one (more text, or a smaller block length)"
            )
        if held_out.shape[0] > eval_blocks:
            keep = sorted(random.Random(0).sample(range(held_out.shape[0]), eval_blocks))
            held_out = held_out[keep]
    n_eval = held_out.shape[0]
    train_rows = [stream[i] for i in train_idx]

    def collate(rows: Sequence[Tensor]) -> Batch:
        return {"input_ids": torch.stack(list(rows))}

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for start in _progress(range(0, n_eval, batch_size), "evaluating", progress):
            chunk = held_out[start : start + batch_size]
            loss = model(input_ids=chunk, labels=chunk).loss  # mean over chunk's predicted tokens
            n = chunk.shape[0] * (seq_len - 1)
            total, count = total + float(loss) * n, count + n
        nll = total / count
        return {"perplexity": math.exp(nll), "loss": nll}

    return Task(
        kind="causal-lm",
        metric="perplexity",
        higher_is_better=False,
        batches=epoch_batches(train_rows, batch_size, collate, seed),
        loss_fn=_lm_loss,
        evaluate=evaluate,
        train_size=len(train_rows),
        default_targets=["q_proj", "v_proj"],
    )


_PACKAGED_MODELS = ("minilm", "smollm2")


def _check_model(model: str) -> None:
    """Refuse, before any data is read or model loaded, a model that is neither packaged nor a local folder."""
    from pathlib import Path

    if model in _PACKAGED_MODELS or Path(model).is_dir():
        return
    raise ValueError(
        f"model {model!r} is neither a packaged model ({', '.join(_PACKAGED_MODELS)}) nor a local "
        "transformers folder; Hugging Face hub names need the network and are never downloaded: download "
        f"the model yourself (e.g. `huggingface-cli download {model} --local-dir DIR`) and pass that folder"
    )


def _load_folder(path: str, kind: str, num_labels: int = 2) -> tuple[Any, Any]:
    from pathlib import Path

    _check_model(path)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path)
    cls = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
    kwargs = {"num_labels": num_labels} if kind == "cls" else {}
    return cls.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)


def build_task(
    model: str = "minilm",
    data: str | None = None,
    *,
    train_examples: int = 4000,
    eval_examples: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    max_tokens: int | None = 400_000,
    seed: int = 0,
    progress: bool = True,
    text_column: str | None = None,
    label_column: str | None = None,
    messages_column: str | None = None,
    eval_split: str | None = None,
    eval_fraction: float | None = None,
    train_on_prompt: bool = False,
) -> tuple[nn.Module, Task, str]:
    """A model and its task, from the packaged assets or the user's data file: what `loraredux train` and the
    benchmark suites train.

    A data file is read and checked (`loraredux.datafiles.read_data`) before any model is loaded, so bad data
    fails fast; its task is inferred from its columns (a label: classification with a new head of as many
    classes; messages: chat fine-tuning, `loraredux.chat.chat_task`, the loss on the assistant's tokens of each
    conversation rendered with the tokenizer's chat template; a text alone: causal LM on packed blocks).
    `task.info` records the file, the columns and the label mapping.

    Args:
        model: "minilm", "smollm2" or a local transformers folder (a classifier for classification, a causal LM
            for language modelling). A new classification head is drawn from torch's RNG: seed it first.
        data: "rotten_tomatoes" (classification), "kjv" (language modelling), "chat" (prompt/reply pairs as
            conversations), or the path of a CSV,
            JSON Lines, Parquet file or a folder saved by `datasets`; None picks kjv for smollm2 and
            rotten_tomatoes otherwise.
        train_examples: classification: training examples sampled from the train split with `seed`.
        eval_examples: test examples (a fixed sample, seed 0; default 1000), held-out conversations (default
            100) or held-out blocks (default 32).
        batch_size: default 32 (classification) or 8 (language modelling, chat).
        max_length: truncation (classification, default 64; chat, default 512) or block length (language
            modelling, default 128).
        max_tokens: language modelling: tokens read from the start of the text (None: all of it).
        seed: the training sample and the data order.
        progress: progress bars while evaluating.
        text_column, label_column, messages_column, eval_split, eval_fraction: a data file's columns and
            evaluation examples, as `datafiles.read_data` takes them (the held-out fraction is drawn with seed
            0 whatever `seed`, so runs compare on the same examples).
        train_on_prompt: chat: the loss on every token, not only the assistant's.

    Returns:
        (model, task, the data set's name or the file's path).

    Raises:
        ValueError: an unknown data set, bad data in a file (naming the file, the row and the column), a model
            that does not fit the data, or a model that is neither packaged nor a folder.
    """
    columns = {"text_column": text_column, "label_column": label_column,
               "messages_column": messages_column, "eval_split": eval_split,
               "eval_fraction": eval_fraction}  # fmt: skip
    with quiet_loading(progress):
        return _build_task(model, data, train_examples, eval_examples, batch_size, max_length,
                           max_tokens, seed, progress, columns, train_on_prompt)  # fmt: skip


@contextlib.contextmanager
def quiet_loading(progress: bool = True) -> Iterator[None]:
    """While loading a model with transformers: its "Loading weights" bar only in a terminal and when `progress`
    (as tqdm's disable=None: no bars in a log), and no load report, which lists a newly drawn head's weights as
    MISSING (expected here, noise in a log). Both settings are restored after."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    if not progress or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _build_task(
    model: str,
    data: str | None,
    train_examples: int,
    eval_examples: int | None,
    batch_size: int | None,
    max_length: int | None,
    max_tokens: int | None,
    seed: int,
    progress: bool,
    columns: dict[str, Any],
    train_on_prompt: bool,
) -> tuple[nn.Module, Task, str]:
    from . import assets, datafiles

    _check_model(model)
    data = data or ("kjv" if model == "smollm2" else "rotten_tomatoes")
    sizes = _Sizes(train_examples, eval_examples, batch_size, max_length, max_tokens, seed, progress,
                   train_on_prompt)  # fmt: skip
    if data not in assets.DATASETS:
        if not datafiles.is_data_path(data):
            raise ValueError(
                f"unknown data {data!r}; choose from {sorted(assets.DATASETS)} or give the path of a CSV, "
                "JSON Lines or Parquet file or of a folder saved by `datasets`"
            )
        read = datafiles.read_data(data, **columns)
        net, task = _file_task(model, read, sizes)
        task.info = {
            **read.describe(),
            **task.info,
        }  # the file, its columns and its labels, for the record
        return net, task, data
    given = [f"{k}={v!r}" for k, v in columns.items() if v is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to a data file, not the packaged data set {data!r}"
        )
    # A packaged data set is a data file that ships with loraredux: the same path from here on.
    if data == "rotten_tomatoes":
        train, test = assets.rotten_tomatoes("train"), assets.rotten_tomatoes("test")
        packaged = datafiles.DataFile(data, "classification", {}, train, test, num_labels=2)
    elif data == "chat":
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                 for q, a in assets.chat_pairs()]  # fmt: skip
        packaged = datafiles.DataFile(data, "chat", {}, chats, None)
    else:
        packaged = datafiles.DataFile(data, "text", {}, assets.kjv(), None)
    net, task = _file_task(model, packaged, sizes)
    return net, task, data


@dataclass(frozen=True)
class _Sizes:
    """build_task's sizes and options, as the caller gave them (None: the task kind's default)."""

    train_examples: int
    eval_examples: int | None
    batch_size: int | None
    max_length: int | None
    max_tokens: int | None
    seed: int
    progress: bool
    train_on_prompt: bool


def _file_task(model: str, data: Any, o: _Sizes) -> tuple[nn.Module, Task]:
    """The model and task for a `datafiles.DataFile`, read and checked already."""
    from . import assets

    if o.train_on_prompt and data.kind != "chat":
        raise ValueError(
            f"train_on_prompt (--train-on-prompt) applies to chat data; {data.path} is {data.kind}"
        )
    if data.kind == "classification":
        if model == "smollm2":
            raise ValueError(
                f"data {data.path} is classification: it needs a classification model (minilm or a "
                "classifier folder)"
            )
        n = data.num_labels
        net, tok = (
            assets.load_minilm(num_labels=n) if model == "minilm" else _load_folder(model, "cls", n)
        )
        # The class names travel with the model (its config), and with the task for the caller.
        names = data.label_names or [str(i) for i in range(n)]
        net.config.id2label = dict(enumerate(names))
        net.config.label2id = {name: i for i, name in enumerate(names)}
        train = random.Random(o.seed).sample(data.train, min(o.train_examples, len(data.train)))
        test = random.Random(0).sample(data.eval, min(o.eval_examples or 1000, len(data.eval)))
        task = classification_task(tok, train, test, batch_size=o.batch_size or 32,
                                   max_length=o.max_length or 64, seed=o.seed,
                                   progress=o.progress)  # fmt: skip
        return net, task
    if model == "minilm":
        raise ValueError(
            f"data {data.path} is language modelling ({data.kind}); use model smollm2 or a causal LM folder"
        )
    net, tok = assets.load_smollm2() if model == "smollm2" else _load_folder(model, "lm")
    if data.kind == "chat":
        from .chat import chat_task

        if not getattr(tok, "chat_template", None):
            raise ValueError(
                f"{data.path} holds conversations but the tokenizer of model {model!r} has no chat "
                "template to render them; use a chat model, or a text column"
            )
        task = chat_task(tok, data.train, data.eval, batch_size=o.batch_size or 8,
                         max_length=o.max_length or 512, eval_examples=o.eval_examples or 100,
                         train_on_prompt=o.train_on_prompt, seed=o.seed,
                         progress=o.progress)  # fmt: skip
        return net, task
    task = language_modeling_task(tok, data.train, batch_size=o.batch_size or 8,
                                  seq_len=o.max_length or 128, eval_blocks=o.eval_examples or 32,
                                  max_tokens=o.max_tokens, seed=o.seed, progress=o.progress,
                                  eval_texts=data.eval)  # fmt: skip
    return net, task


def adapt_for_task(
    model: nn.Module,
    config: Any,
    task: Task,
    *,
    steps: int,
    targets: Any = None,
    exclude: Any = None,
    calibration_batches: int = 8,
    progress: bool = True,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    base: Any = None,
) -> Any:
    """`lx.adapt_` for a training run on `task`: the task's default targets unless given, its head in
    `modules_to_save`, the first `calibration_batches` training batches and the task's loss for a data-aware
    initialiser (LoRA-GA, EVA, CorDA, ...), and a method's run-length field (AdaLoRA's `total_step`) set to
    `steps` where the config leaves it None; `rank_pattern` / `alpha_pattern` as `lx.adapt_` takes them. On a base
    quantized by `base_format.convert_base_` (`base`, its `BaseFormat`), LoftQ starts the adapters from the dense
    weights it kept (`BaseFormat.loftq_`). Returns the config actually applied.
    """
    import dataclasses

    from . import init as lx_init
    from .verbs import adapt_

    if getattr(config, "total_step", False) is None:  # a rank schedule over the run (AdaLoRA)
        config = dataclasses.replace(config, total_step=steps)
    config, loftq_iters = (config, None) if base is None else base.deferred_loftq(config)
    name = getattr(config, "init", None)
    extra: dict[str, Any] = {}
    if isinstance(name, str) and lx_init.get(name).needs:
        extra = {
            "calibration": [task.batches(i) for i in range(calibration_batches)],
            "loss_fn": task.loss_fn,
            "calibration_options": {"progress": progress},
        }
    adapt_(
        model,
        config,
        targets=targets or task.default_targets,
        exclude=exclude,
        modules_to_save=task.modules_to_save,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **extra,
    )
    if loftq_iters is not None:
        base.loftq_(model, loftq_iters)
    return config


def _progress(iterable: Any, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, leave=False, disable=None
    )  # None: only where stderr is a terminal
