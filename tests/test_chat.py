"""Chat fine-tuning: the assistant's tokens found through the template, the loss and perplexity over exactly them."""

import logging

import pytest
import torch
import torch.nn.functional as F

from loraredux.chat import IGNORE, assistant_mask, chat_task
from tiny_models import tiny_llama

WORDS = ["system", "user", "assistant", ":", "be", "brief", "hi", "hello", "there", "how", "are", "you",
         "fine", "thanks", "bye", "ok", "<eos>"]  # fmt: skip
# A ChatML-like template: each turn ends with <eos>; the generation prompt is the assistant's header.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


def word_tokenizer(template=TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tok.chat_template = template
    return tok


def words(tok, ids):
    return " ".join(tok.convert_ids_to_tokens(ids))


def test_the_assistant_tokens_are_each_turns_content_and_end_marker_not_its_header():
    tok = word_tokenizer()
    ids, mask = assistant_mask(tok, CHAT)
    assert words(tok, ids) == (
        "system : be brief <eos> user : hi <eos> assistant : hello there <eos> "
        "user : how are you <eos> assistant : fine thanks <eos>"
    )
    assert (
        words(tok, [t for t, m in zip(ids, mask, strict=True) if m])
        == "hello there <eos> fine thanks <eos>"
    )
    short, cut = assistant_mask(tok, CHAT, max_length=13)
    assert short == ids[:13] and cut == mask[:13]


def test_a_template_without_a_generation_prompt_counts_the_header_as_the_assistants():
    tok = word_tokenizer(
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    )
    ids, mask = assistant_mask(tok, CHAT[1:3])
    assert (
        words(tok, [t for t, m in zip(ids, mask, strict=True) if m])
        == "assistant : hello there <eos>"
    )


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_way_out():
    # Shortens an assistant turn once another follows (as templates that drop earlier reasoning do).
    tok = word_tokenizer(
        "{% for m in messages %}{{ m['role'] }} : "
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split()[0] }}"
        "{% else %}{{ m['content'] }}{% endif %} <eos> {% endfor %}"
    )
    with pytest.raises(ValueError, match=r"message 2, the assistant's.*train_on_prompt=True"):
        assistant_mask(tok, CHAT)


def conversations(n):
    replies = ["hello there", "fine thanks", "ok bye", "hello", "fine"]
    return [
        [{"role": "user", "content": ["hi", "how are you", "bye"][i % 3]},
         {"role": "assistant", "content": replies[i % 5]}]
        for i in range(n)
    ]  # fmt: skip


def test_the_loss_is_the_mean_negative_log_likelihood_of_the_assistant_tokens():
    tok = word_tokenizer()
    model = tiny_llama(vocab_size=32)
    task = chat_task(tok, conversations(12), conversations(4), batch_size=4, progress=False)
    batch = task.batches(0)
    assert (batch["labels"] != IGNORE).sum() < batch["attention_mask"].sum()
    with torch.no_grad():
        loss = task.loss_fn(model, batch)
        logp = F.log_softmax(model(input_ids=batch["input_ids"]).logits, -1)
    by_hand = []
    for row, ids, labels in zip(logp, batch["input_ids"], batch["labels"], strict=True):
        for t in range(1, len(ids)):
            if labels[t] != IGNORE:
                assert labels[t] == ids[t]  # only a real token is a target
                by_hand.append(-row[t - 1, ids[t]])
    # transformers takes the loss in float32
    torch.testing.assert_close(loss.double(), torch.stack(by_hand).mean(), rtol=1e-6, atol=0)


def test_perplexity_weights_every_held_out_assistant_token_alike_whatever_the_batch():
    tok = word_tokenizer()
    model = tiny_llama(vocab_size=32)
    evals = conversations(7)  # replies of 2, 2, 2, 1, 1 words: batches hold unequal token counts
    one = chat_task(tok, conversations(6), evals, batch_size=1, progress=False).evaluate(model)
    three = chat_task(tok, conversations(6), evals, batch_size=3, progress=False).evaluate(model)
    assert one["loss"] == pytest.approx(
        three["loss"], rel=1e-6
    )  # token-weighted, not a mean of batch means
    assert one["perplexity"] == pytest.approx(torch.tensor(one["loss"]).exp().item())


def test_train_on_prompt_learns_every_token_but_padding():
    tok = word_tokenizer()
    task = chat_task(tok, conversations(8), conversations(2), batch_size=4, train_on_prompt=True,
                     progress=False)  # fmt: skip
    batch = task.batches(0)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == IGNORE).all() and (~real).any()
    assert task.info["loss_on"] == "every token"


def test_held_out_conversations_default_to_a_seeded_tenth_and_never_train():
    tok = word_tokenizer()
    task = chat_task(tok, conversations(20), batch_size=20, progress=False)
    assert task.info["conversations"] == {"train": 18, "eval": 2, "dropped": 0}
    again = chat_task(tok, conversations(20), batch_size=20, seed=5, progress=False)
    assert again.info == task.info  # the held-out pick does not follow the data-order seed


def test_conversations_with_nothing_to_learn_within_the_cut_are_left_out_with_a_warning(caplog):
    tok = word_tokenizer()
    long_prompt = [
        {"role": "user", "content": "how are you " * 5},
        {"role": "assistant", "content": "ok"},
    ]
    no_reply = [{"role": "user", "content": "hi"}]
    with caplog.at_level(logging.WARNING, logger="loraredux.chat"):
        task = chat_task(tok, [*conversations(4), long_prompt, no_reply], conversations(2),
                         max_length=10, progress=False)  # fmt: skip
    assert task.info["conversations"] == {"train": 4, "eval": 2, "dropped": 2}
    assert "2 training and 0 evaluation conversation(s)" in caplog.text
    with pytest.raises(ValueError, match=r"no training conversation has assistant tokens within "
                                         r"the first 10 tokens; raise max_length"):  # fmt: skip
        chat_task(tok, [long_prompt], conversations(2), max_length=10, progress=False)


def test_training_lowers_the_held_out_assistant_perplexity():
    import loraredux as lx

    tok = word_tokenizer()
    model = tiny_llama(hidden=64, vocab_size=32, dtype=torch.float32)
    task = chat_task(tok, conversations(40), conversations(10), batch_size=8, progress=False)
    before = task.evaluate(model)["perplexity"]
    lx.adapt_(model, lx.config("lora", rank=8, alpha=16), "all-linear")
    lx.train.fit(model, task.batches, task.loss_fn, lx.train.TrainConfig(steps=60, lr=1e-2),
                 progress=False)  # fmt: skip
    assert task.evaluate(model.eval())["perplexity"] < 0.7 * before
