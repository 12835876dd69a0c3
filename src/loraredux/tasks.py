"""Fine-tuning tasks on real models: data preparation, the loss and the evaluation metric, in one object.

The CLI's `train` and the benchmark harness share these, so a number in a benchmark table and a number printed by
`loraredux train` come from the same code.

- `classification_task`: sequence classification (e.g. MiniLM on Rotten Tomatoes); metric: accuracy.
- `language_modeling_task`: causal LM on plain text cut into fixed blocks (e.g. SmolLM2 on the KJV);
  metric: held-out perplexity.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .train import epoch_batches

__all__ = ["Task", "classification_task", "language_modeling_task"]

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
) -> Task:
    """Causal LM on `texts` joined and cut into blocks of `seq_len` tokens; the metric is held-out perplexity.

    The held-out blocks are a fixed random sample (seed 0, independent of `seed`) so runs compare.
    """
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + sep
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n_blocks = len(ids) // seq_len
    if n_blocks < eval_blocks + 1:
        raise ValueError(
            f"the text gives {n_blocks} blocks of {seq_len} tokens; need more than eval_blocks={eval_blocks}"
        )
    blocks = torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)
    order = list(range(n_blocks))
    random.Random(0).shuffle(order)
    held_out, train_idx = blocks[order[:eval_blocks]], order[eval_blocks:]
    train_rows = [blocks[i] for i in train_idx]

    def collate(rows: Sequence[Tensor]) -> Batch:
        return {"input_ids": torch.stack(list(rows))}

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for start in _progress(range(0, eval_blocks, batch_size), "evaluating", progress):
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


def _progress(iterable: Any, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)
