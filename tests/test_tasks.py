"""The tasks shared by the CLI and the benchmarks: their data, losses and metrics, on tiny models."""

import math

import pytest
import torch
import torch.nn.functional as F

import loraredux as lx
from loraredux.tasks import classification_task, language_modeling_task
from loraredux.train import TrainConfig, fit
from tiny_models import tiny_bert, tiny_llama


class CharTokenizer:
    """Characters a-z and space as ids 1..27; 0 pads and ends a text."""

    pad_token_id = 0
    eos_token_id = 0

    def _ids(self, text: str) -> list[int]:
        return [
            1 + "abcdefghijklmnopqrstuvwxyz ".index(c)
            for c in text.lower()
            if c.isalpha() or c == " "
        ]

    def __call__(self, texts, truncation=False, max_length=None):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        ids = [self._ids(t)[:max_length] if truncation else self._ids(t) for t in texts]
        return {"input_ids": ids}


TEXTS = ["in the beginning god created the heaven and the earth"] * 40


def test_language_modeling_blocks_and_perplexity():
    # 15 characters + the end token = one 16-token block, so every block (held out or not) is this one.
    block = torch.tensor([[*CharTokenizer()._ids("the cat sat on "), 0]])
    task = language_modeling_task(
        CharTokenizer(),
        ["the cat sat on "] * 30,
        batch_size=4,
        seq_len=16,
        eval_blocks=8,
        progress=False,
    )
    assert task.train_size == 30 - 8
    assert torch.equal(task.batches(5)["input_ids"], block.expand(4, 16))
    model = tiny_llama()
    logits = model(input_ids=block).logits[0, :-1]  # predicts tokens 1..15
    nll = F.cross_entropy(logits, block[0, 1:]).item()
    got = task.evaluate(model)
    # transformers computes the causal-LM loss in float32 (`logits.float()`), hence float32 tolerances.
    assert got["loss"] == pytest.approx(nll, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_language_modeling_training_lowers_held_out_perplexity():
    task = language_modeling_task(
        CharTokenizer(), TEXTS, batch_size=4, seq_len=16, eval_blocks=8, progress=False
    )
    # A wider init than transformers' 0.02 lets a 2-layer model with a frozen tied head reach confident logits.
    model = tiny_llama(dtype=torch.float32, initializer_range=0.3)
    lx.adapt_(model, lx.config("lora", rank=8, alpha=16), targets="all-linear")
    before = task.evaluate(model)["perplexity"]
    fit(model, task.batches, task.loss_fn, TrainConfig(steps=30, lr=1e-2, seed=0), progress=False)
    assert task.evaluate(model)["perplexity"] < 0.3 * before


def test_classification_batches_loss_and_accuracy():
    pairs = [("good film", 1), ("bad film", 0), ("a good one", 1), ("so bad", 0)] * 4
    task = classification_task(
        CharTokenizer(), pairs, pairs[:6], batch_size=4, max_length=5, progress=False
    )
    batch = task.batches(0)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 5
    assert ((batch["input_ids"] != 0) == batch["attention_mask"].bool()).all()
    model = tiny_bert(num_labels=2)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(task.loss_fn(model, batch), F.cross_entropy(logits, batch["labels"]))
    test = task.evaluate(model)["accuracy"]
    assert test * 6 == pytest.approx(round(test * 6))  # a fraction of the 6 test examples


def test_tasks_refuse_too_little_data():
    with pytest.raises(ValueError, match="need more than eval_blocks=8"):
        language_modeling_task(
            CharTokenizer(), ["short"], seq_len=16, eval_blocks=8, progress=False
        )
    with pytest.raises(ValueError, match="classification needs examples"):
        classification_task(CharTokenizer(), [], [("a", 1)], progress=False)


def test_language_modeling_with_eval_texts_holds_out_exactly_their_blocks():
    tok = CharTokenizer()
    task = language_modeling_task(
        tok, ["abc"] * 6, eval_texts=["xyz"] * 3, batch_size=2, seq_len=4, eval_blocks=2,
        progress=False,
    )  # fmt: skip
    # "abc" + end = one 4-token block per text: all six train; "xyz" gives three blocks, two are kept
    assert task.train_size == 6
    assert task.batches(0)["input_ids"].tolist() == [[1, 2, 3, 0]] * 2
    model = tiny_llama()
    block = torch.tensor([[24, 25, 26, 0]])
    nll = F.cross_entropy(model(input_ids=block).logits[0, :-1], block[0, 1:]).item()
    assert task.evaluate(model)["loss"] == pytest.approx(nll, rel=1e-6)
    with pytest.raises(ValueError, match="the evaluation texts 0 blocks"):
        language_modeling_task(tok, ["abc"] * 6, eval_texts=["x"], seq_len=4, progress=False)
