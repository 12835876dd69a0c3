"""Chat fine-tuning: each conversation rendered with the model's own chat template, the loss on the assistant's tokens.

A conversation is a list of `{"role", "content"}` messages. It is rendered once with `apply_chat_template`; the
assistant's turns are found by rendering its prefixes (up to a turn with the generation prompt, and through the
turn), so any template that renders a conversation as the concatenation of its turns works without the
`{% generation %}` markers that transformers' own assistant mask needs. An assistant turn covers its content and
the template's end-of-turn marker (the model learns to stop); the role header before it is prompt. With
`train_on_prompt` every token counts, as plain language modelling on the rendered text. This is the usual choice of
supervised fine-tuning tools (torchtune's `train_on_input=False`, LLaMA-Factory's `train_on_prompt=False`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .train import epoch_batches

__all__ = ["assistant_mask", "chat_task"]

logger = logging.getLogger(__name__)
Batch = dict[str, Tensor]
Conversation = Sequence[dict[str, Any]]
IGNORE = -100  # the label transformers' causal LM loss skips
EVAL_FRACTION = 0.1  # held out (seed 0) when no evaluation conversations are given


def _render(tokenizer: Any, messages: Conversation, prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=prompt
    )


def _assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as its turns one after "
                f"another (message {i}, the assistant's, changes how the text before it renders), so its "
                "tokens cannot be told apart; train on every token instead (train_on_prompt=True, or "
                "--train-on-prompt)"
            )
        spans.append((len(before), len(through)))
    return text, spans


def assistant_mask(
    tokenizer: Any, messages: Conversation, *, max_length: int | None = None
) -> tuple[list[int], list[bool]]:
    """The token ids of a rendered conversation and, per token, whether it belongs to an assistant turn.

    Args:
        tokenizer: a fast tokenizer (it gives character offsets) with a chat template.
        messages: `{"role", "content"}` dicts; the assistant's have role "assistant".
        max_length: keep only the first `max_length` tokens.

    Raises:
        ValueError: a tokenizer without offsets, or a template that renders a turn differently depending on
            what follows it (then `train_on_prompt`).
    """
    text, spans = _assistant_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "the loss on the assistant's tokens needs a fast tokenizer (character offsets); this one is "
            f"{type(tokenizer).__name__}; train on every token instead (train_on_prompt=True)"
        )
    # The template writes its own special tokens (a BOS among them, where the model has one).
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    return ids, mask


def _rows(
    tokenizer: Any, conversations: Sequence[Conversation], max_length: int, train_on_prompt: bool
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) per conversation that keeps a token to learn after truncation, and how many were dropped."""
    rows, dropped = [], 0
    for messages in conversations:
        if train_on_prompt:
            ids = tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]
            ids = ids[:max_length]
            labels = list(ids)
        else:
            ids, mask = assistant_mask(tokenizer, messages, max_length=max_length)
            labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
        if any(t != IGNORE for t in labels[1:]):  # the first token is never predicted
            rows.append((ids, labels))
        else:
            dropped += 1
    return rows, dropped


def _chat_loss(model: nn.Module, batch: Batch) -> Tensor:
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


def chat_task(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    eval_conversations: Sequence[Conversation] | None = None,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    eval_examples: int = 100,
    train_on_prompt: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Supervised chat fine-tuning; the metric is the held-out perplexity of the assistant's tokens.

    Each conversation is one example, cut to `max_length` tokens, padded per batch. A conversation whose kept
    tokens hold nothing to learn (an assistant turn past the cut) is dropped; `task.info` counts them.

    Args:
        tokenizer: a fast tokenizer with a chat template (the model's own).
        conversations: the training conversations.
        eval_conversations: held-out conversations; None: 10% of `conversations` (seed 0, whatever `seed`).
        batch_size, max_length: per step; the token cut.
        eval_examples: evaluate on at most this many held-out conversations (a fixed sample, seed 0).
        train_on_prompt: the loss on every token (system, user and template tokens too).
        seed: the data order.
        progress: a bar while evaluating.

    Raises:
        ValueError: no tokenizer chat template, too few conversations, none left with an assistant token
            within `max_length`, or a template whose turns cannot be told apart (see `assistant_mask`).
    """
    from .tasks import Task, _progress

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template to render conversations with")
    train = list(conversations)
    if eval_conversations is None:
        order = list(range(len(train)))
        random.Random(0).shuffle(order)
        n_eval = max(1, round(EVAL_FRACTION * len(train)))
        if n_eval >= len(train):
            raise ValueError(
                f"{len(train)} conversation(s) cannot give both training and evaluation examples; add "
                "conversations or give evaluation ones"
            )
        held = set(order[:n_eval])
        eval_conversations = [c for i, c in enumerate(train) if i in held]
        train = [c for i, c in enumerate(train) if i not in held]
    evals = list(eval_conversations)
    if len(evals) > eval_examples:
        evals = [
            evals[i] for i in sorted(random.Random(0).sample(range(len(evals)), eval_examples))
        ]
    train_rows, dropped = _rows(tokenizer, train, max_length, train_on_prompt)
    eval_rows, eval_dropped = _rows(tokenizer, evals, max_length, train_on_prompt)
    what = "tokens" if train_on_prompt else "assistant tokens"
    if not train_rows or not eval_rows:
        raise ValueError(
            f"no {'training' if not train_rows else 'evaluation'} conversation has {what} within the first "
            f"{max_length} tokens; raise max_length (--max-length)"
        )
    if dropped or eval_dropped:
        logger.warning(
            "%d training and %d evaluation conversation(s) have no %s within the first %d tokens (or none "
            "at all) and are left out; raise --max-length to keep those that have",
            dropped, eval_dropped, what, max_length,
        )  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(rows: Sequence[tuple[list[int], list[int]]]) -> Batch:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad or 0, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, target) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(target)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for start in _progress(range(0, len(eval_rows), batch_size), "evaluating", progress):
            batch = collate(eval_rows[start : start + batch_size])
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the tokens the mean loss is over
            total, count = total + float(_chat_loss(model, batch)) * n, count + n
        nll = total / count
        return {"perplexity": math.exp(nll), "loss": nll}

    learned = sum(sum(t != IGNORE for t in labels[1:]) for _, labels in train_rows)
    counts = {"train": len(train_rows), "eval": len(eval_rows), "dropped": dropped + eval_dropped}
    return Task(
        kind="causal-lm",
        metric="perplexity",
        higher_is_better=False,
        batches=epoch_batches(train_rows, batch_size, collate, seed),
        loss_fn=_chat_loss,
        evaluate=evaluate,
        train_size=len(train_rows),
        default_targets=["q_proj", "v_proj"],
        info={
            "loss_on": "every token" if train_on_prompt else "assistant tokens",
            "conversations": counts,
            "learned_tokens": learned,
        },
    )
