"""The user's own data files: every format read exactly, the task inferred, the evaluation split, bad data refused
before any model is loaded, and `loraredux train --data FILE` end to end."""

import json

import pytest
import torch

from loraredux import datafiles, tasks
from loraredux.cli import main
from loraredux.datafiles import read_data
from tiny_models import tiny_llama

datasets = pytest.importorskip("datasets")

REVIEWS = [
    ("a fine film", "pos"),
    ("dull and long", "neg"),
    ("loved it", "pos"),
    ("so so", "meh"),
    ("never again", "neg"),
    ("a delight", "pos"),
]
CHATS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}],
]


def write(path, rows: list[dict]):
    """`rows` as a file whose format follows the suffix; a folder without one is a saved DatasetDict."""
    if path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        raise AssertionError(path)
    return path


FORMATS = [".csv", ".jsonl", ".parquet"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_string_labels_are_read_in_order_and_mapped_in_sorted_order(tmp_path, suffix):
    path = write(tmp_path / f"reviews{suffix}", [{"text": t, "label": y} for t, y in REVIEWS])
    data = read_data(path, eval_fraction=0.5, seed=3)
    assert (data.kind, data.columns) == ("classification", {"text": "text", "label": "label"})
    assert data.label_names == ["meh", "neg", "pos"] and data.num_labels == 3
    ids = {"meh": 0, "neg": 1, "pos": 2}
    every = [(t, ids[y]) for t, y in REVIEWS]
    # held out and kept are disjoint, together the file, each in file order
    assert len(data.eval) == 3 and len(data.train) == 3
    assert sorted(data.train + data.eval) == sorted(every)
    assert data.train == [x for x in every if x in data.train]
    assert data.eval == [x for x in every if x in data.eval]
    assert data.describe()["label_ids"] == ids


@pytest.mark.parametrize("suffix", FORMATS)
def test_integer_labels_are_the_class_ids_under_any_column_names(tmp_path, suffix):
    rows = [{"review": t, "stars": i % 4, "id": i} for i, (t, _) in enumerate(REVIEWS)]
    path = write(tmp_path / f"stars{suffix}", rows)
    data = read_data(path, text_column="review", label_column="stars", eval_fraction=1 / 6)
    assert data.kind == "classification" and data.label_names is None and data.num_labels == 4
    assert sorted(data.train + data.eval) == sorted((t, i % 4) for i, (t, _) in enumerate(REVIEWS))
    assert len(data.eval) == 1


def test_the_held_out_fraction_is_seeded_and_defaults_to_a_tenth_for_classification(tmp_path):
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(40)]
    path = write(tmp_path / "many.jsonl", rows)
    a, b = read_data(path, seed=1), read_data(path, seed=1)
    assert a.eval == b.eval and len(a.eval) == 4 and len(a.train) == 36  # 10% by default
    assert set(a.eval).isdisjoint(a.train)
    assert read_data(path, seed=2).eval != a.eval
    quarter = read_data(path, eval_fraction=0.25, seed=1)
    assert len(quarter.eval) == 10 and set(quarter.eval).isdisjoint(quarter.train)
    assert "10 of 40 rows held out" in quarter.eval_source


def test_a_saved_dataset_dict_gives_its_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": t, "label": y} for t, y in REVIEWS]),
            "test": datasets.Dataset.from_list([{"text": "meh at best", "label": "meh"}]),
            "dev": datasets.Dataset.from_list([{"text": "good", "label": "pos"}]),
        }
    ).save_to_disk(str(folder))
    data = read_data(folder)
    assert data.train == [(t, {"meh": 0, "neg": 1, "pos": 2}[y]) for t, y in REVIEWS]
    assert data.eval == [("meh at best", 0)] and data.eval_source == "split 'test'"
    assert read_data(folder, eval_split="dev").eval == [("good", 2)]
    with pytest.raises(
        ValueError, match=r"no split 'nope'; the splits are \['dev', 'test', 'train'\]"
    ):
        read_data(folder, eval_split="nope")
    # One saved Dataset (no DictDict) is the train split.
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(single))
    assert read_data(single).train == ["one", "two"]


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_text_column_alone_is_language_modelling(tmp_path, suffix):
    path = write(tmp_path / f"verses{suffix}", [{"text": f"verse {i}", "n": i} for i in range(5)])
    data = read_data(path)
    assert (data.kind, data.columns, data.eval) == ("text", {"text": "text"}, None)
    assert data.train == [f"verse {i}" for i in range(5)]
    held = read_data(path, eval_fraction=0.4, seed=0)
    assert len(held.eval) == 2 and sorted(held.train + held.eval) == sorted(data.train)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_messages_column_is_chat(tmp_path, suffix):
    path = write(tmp_path / f"chats{suffix}", [{"messages": c, "topic": "x"} for c in CHATS])
    data = read_data(path)
    assert (data.kind, data.columns) == ("chat", {"messages": "messages"})
    assert data.train == CHATS
    saved = tmp_path / "chats-saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"conv": c} for c in CHATS[:2]]),
            "test": datasets.Dataset.from_list([{"conv": CHATS[2]}]),
        }
    ).save_to_disk(str(saved))
    data = read_data(saved, messages_column="conv")
    assert data.kind == "chat" and data.train == CHATS[:2] and data.eval == [CHATS[2]]


@pytest.mark.parametrize(
    ("columns", "options", "message"),
    [
        (["body", "score"], {}, r"no column to train on .* the columns are \['body', 'score'\]"),
        (["text", "messages"], {}, r"both 'messages' and 'text' columns: chat or plain text\?"),
        (["label", "body"], {}, r"a label column 'label' but no text column; the columns are"),
        (["text", "label", "labels"], {}, r"both 'label' and 'labels' columns"),
        (["text"], {"label_column": "y"}, r"no label column 'y'; the columns are \['text'\]"),
    ],
)
def test_ambiguous_or_missing_columns_list_the_columns_and_the_options(
    tmp_path, columns, options, message
):
    row = {c: ([{"role": "user", "content": "x"}] if c == "messages" else "x") for c in columns}
    path = write(tmp_path / "d.jsonl", [row, row])
    with pytest.raises(ValueError, match=message):
        read_data(path, **options)


def test_a_label_column_given_with_a_text_column_wins_and_common_names_are_found(tmp_path):
    path = write(
        tmp_path / "d.csv", [{"review": "good", "labels": "a"}, {"review": "bad", "labels": "b"}]
    )
    data = read_data(path, text_column="review", eval_fraction=0.5)
    assert data.kind == "classification" and data.columns == {"text": "review", "label": "labels"}


# --------------------------------------------------------------------------- bad data, refused before loading


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: bad data must be refused first."""
    from loraredux import assets

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(assets, "load_minilm", loaded)
    monkeypatch.setattr(assets, "load_smollm2", loaded)
    monkeypatch.setattr(tasks, "_load_folder", loaded)


BAD = [
    ("missing.csv", "text,label\na,1\n", {"text_column": "review"},
     r"no text column 'review'; the columns are \['text', 'label'\]"),
    ("empty.csv", "", {}, r"empty\.csv is empty"),
    ("empty.jsonl", "\n", {}, r"empty\.jsonl is empty"),
    ("header.csv", "text,label\n", {}, r"header\.csv has no rows, only a header"),
    ("float.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n', {},
     r"float\.jsonl: row 2, column 'label': the label is 0\.5 \(float\); expected an integer class id or a "
     "string"),
    ("mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "label": "x"}\n',
     {}, r"mixed\.jsonl: row 3, column 'label': the label 'x' is a string but row 1 .* has an integer"),
    ("negative.jsonl", '{"text": "a", "label": -1}\n{"text": "b", "label": 0}\n', {},
     r"negative\.jsonl: row 1, column 'label': the label is -1"),
    ("none.csv", "text,label\na,1\n,0\n", {},
     r"none\.csv: row 2, column 'text': the text is None \(NoneType\); expected a string"),
    ("number.jsonl", '{"text": "a", "label": 1}\n{"text": 7, "label": 0}\n', {},
     r"number\.jsonl: row 2, column 'text': the text is 7 \(int\); expected a string"),
    ("norole.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n'
     '{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}\n', {},
     r"norole\.jsonl: row 2, column 'messages': message 2 lacks a string 'role'"),
    ("nocontent.jsonl", '{"messages": [{"role": "user"}]}\n', {},
     r"nocontent\.jsonl: row 1, column 'messages': message 1 lacks a string 'content'"),
    ("notalist.jsonl", '{"messages": "hello"}\n', {},
     r"notalist\.jsonl: row 1, column 'messages': expected a non-empty list"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "options", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_refused_naming_file_row_and_column_before_any_model_loads(
    tmp_path, no_loading, name, content, options, message
):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        tasks.build_task("minilm", str(path), progress=False, **options)


def test_bad_data_is_one_line_from_the_cli_with_status_2(tmp_path, no_loading, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\na,1\n,0\n")
    assert main(["train", "--data", str(path), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert f"{path}: row 2, column 'text': the text is None" in err


def test_unknown_data_files_and_models_are_explained(tmp_path, no_loading):
    with pytest.raises(ValueError, match=r"data file .*nosuch\.csv does not exist"):
        tasks.build_task("minilm", str(tmp_path / "nosuch.csv"))
    with pytest.raises(ValueError, match=r"unknown data 'imdb'; choose from .* or give the path"):
        tasks.build_task("minilm", "imdb")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown format '\.txt'; expected \.csv"):
        tasks.build_task("minilm", str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"text_column='t' apply to a data file, not the packaged"):
        tasks.build_task("minilm", "rotten_tomatoes", text_column="t")
    with pytest.raises(
        ValueError, match=r"hub names need the network and are never downloaded.*--local-dir DIR"
    ):
        tasks.build_task("bert-base/uncased", "rotten_tomatoes")


def test_a_missing_datasets_library_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def without(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(ImportError, match=r"pip install loraredux\[data\]"):
        read_data(write(tmp_path / "a.jsonl", [{"text": "a"}]))


# --------------------------------------------------------------------------- tasks built from files


def chat_llama_folder(tmp_path):
    """A tiny random Llama saved with a word-level tokenizer that has a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CHATS for m in c for w in f"{m['role']} {m['content']}".split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, ":": 3, **{w: i + 4 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    folder = tmp_path / "tiny-chat"
    model = tiny_llama(dtype=torch.float32, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


def test_chat_is_rendered_with_the_models_template_and_learns_the_assistants_tokens(tmp_path):
    folder, tok = chat_llama_folder(tmp_path)
    train = write(tmp_path / "chats.jsonl", [{"messages": c} for c in CHATS * 4])
    net, task, name = tasks.build_task(
        str(folder), str(train), eval_fraction=0.25, batch_size=64, progress=False
    )
    assert name == str(train) and task.kind == "causal-lm"
    assert task.info["kind"] == "chat" and task.info["loss_on"] == "assistant tokens"
    data = read_data(train, eval_fraction=0.25)
    # the system/user-only conversation has nothing to learn: left out of both
    replying = [c for c in data.train if c[-1]["role"] == "assistant"]
    assert task.info["conversations"]["train"] == task.train_size == len(replying)
    batch = task.batches(0)
    rendered = {tok.apply_chat_template(c, tokenize=False).strip() for c in replying}
    for ids, mask, labels in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
    ):
        assert tok.decode(ids[mask.bool()]) in rendered
        # this template has no generation prompt: the assistant's header is the assistant's to write
        assert tok.decode(labels[labels != -100]).startswith("assistant : ")
    assert task.evaluate(net)["perplexity"] > 1


def test_train_on_prompt_is_refused_for_data_that_is_not_chat_before_a_model_loads(
    tmp_path, monkeypatch
):
    from loraredux import assets

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(assets, "load_smollm2", load)
    data = write(tmp_path / "t.jsonl", [{"text": "a b c"}] * 4)
    with pytest.raises(ValueError, match=r"applies to chat data; .*t.jsonl is text"):
        tasks.build_task("smollm2", str(data), train_on_prompt=True)


def test_a_classification_file_sets_the_heads_classes_and_names(tmp_path, monkeypatch):
    from loraredux import assets
    from test_tasks import CharTokenizer
    from tiny_models import tiny_bert

    heads = []

    def load_minilm(num_labels=2, **kwargs):
        heads.append(num_labels)
        return tiny_bert(num_labels=num_labels), CharTokenizer()

    monkeypatch.setattr(assets, "load_minilm", load_minilm)
    path = write(tmp_path / "r.csv", [{"text": t, "label": y} for t, y in REVIEWS * 5])
    net, task, _ = tasks.build_task(
        "minilm", str(path), train_examples=100, batch_size=4, eval_fraction=0.2, progress=False
    )
    assert heads == [3] and net.config.id2label == {0: "meh", 1: "neg", 2: "pos"}
    assert (task.kind, task.train_size, task.modules_to_save) == (
        "classification",
        24,
        ["classifier"],
    )
    assert task.info["label_ids"] == {"meh": 0, "neg": 1, "pos": 2} and task.info["eval_rows"] == 6
    ids = {"meh": 0, "neg": 1, "pos": 2}
    batch = task.batches(0)
    texts = [
        "".join(" abcdefghijklmnopqrstuvwxyz "[i] for i in row if i)
        for row in batch["input_ids"].tolist()
    ]
    assert [ids[dict(REVIEWS)[t]] for t in texts] == batch["labels"].tolist()
    accuracy = task.evaluate(net)["accuracy"]
    assert accuracy * 6 == pytest.approx(round(accuracy * 6))  # over the 6 held-out rows


# --------------------------------------------------------------------------- the CLI end to end


@pytest.mark.slow
def test_train_on_a_csv_with_minilm_writes_an_adapter(tmp_path, capsys):
    rows = [{"review": t, "sentiment": y} for t, y in REVIEWS * 4]
    path = write(tmp_path / "mine.csv", rows)
    out = tmp_path / "run"
    argv = ["train", "--model", "minilm", "--data", str(path), "--text-column", "review"]
    argv += ["--label-column", "sentiment", "--eval-fraction", "0.25", "--train-examples", "12"]
    argv += ["--steps", "2", "--batch-size", "4", "--rank", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert f"data {path}: 12 training examples" in shown
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    from safetensors.torch import load_file

    head = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "classifier" in k]
    assert {tuple(v.shape) for v in head} == {(3, 384), (3,)}  # three classes: meh, neg, pos
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == str(path)
    # the label mapping travels with the run: the adapter file cannot hold it
    assert metrics["data_info"]["label_ids"] == {"meh": 0, "neg": 1, "pos": 2}


def test_datafiles_is_data_path():
    assert datafiles.is_data_path("my.csv") and datafiles.is_data_path("dir/data")
    assert not datafiles.is_data_path("kjv")


def test_integral_float_labels_are_integers_and_others_are_refused(tmp_path):
    # JSON readers widen a column holding 1 and 2.0 to floats: 1.0 and 2.0 are still class ids 1 and 2.
    path = tmp_path / "f.jsonl"
    path.write_text(
        '{"text": "a", "label": 1}\n{"text": "b", "label": 2.0}\n{"text": "c", "label": 0}\n'
    )
    data = read_data(path, eval_fraction=0.4, seed=0)
    assert sorted(data.train + data.eval) == [("a", 1), ("b", 2), ("c", 0)]
    assert all(type(y) is int for _, y in data.train + data.eval) and data.num_labels == 3


def test_chat_trains_from_the_cli_on_a_tiny_llama_folder(tmp_path, capsys):
    folder, _ = chat_llama_folder(tmp_path)
    path = write(tmp_path / "chats.jsonl", [{"conversation": c} for c in CHATS * 4])
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(folder),
        "--data",
        str(path),
        "--messages-column",
        "conversation",
    ]
    argv += ["--eval-fraction", "0.25", "--max-length", "4", "--steps", "2", "--rank", "2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 0
    assert "perplexity after:" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((out / "metrics.json").read_text())["data"] == str(path)


def test_advise_takes_the_same_data_options():
    from loraredux.cli import build_parser

    args = build_parser().parse_args(
        [
            "advise",
            "--data",
            "x.csv",
            "--text-column",
            "t",
            "--label-column",
            "y",
            "--eval-split",
            "dev",
        ]
    )
    assert (args.data, args.text_column, args.label_column, args.eval_split) == (
        "x.csv",
        "t",
        "y",
        "dev",
    )


@pytest.mark.slow
def test_the_classify_bench_suite_takes_a_data_file(tmp_path):
    from loraredux.bench import Trial
    from loraredux.bench.suites import execute

    path = write(tmp_path / "mine.csv", [{"review": t, "y": s} for t, s in REVIEWS * 4])
    options = {"data": str(path), "text_column": "review", "label_column": "y", "eval_fraction": 0.25,
               "train_examples": 12, "batch_size": 4, "max_length": 16}  # fmt: skip
    trial = Trial(
        "classify", "rotten_tomatoes", "lora", 2, "adamw", 1e-30, 0, 1, problem_options=options
    )
    outcome = execute(trial)
    # the 3-class head (384 x 3 + 3) beside LoRA r=2 on query and value of 6 layers
    assert outcome.trainable_parameters == 6 * 2 * 2 * (384 + 384) + 384 * 3 + 3
    assert outcome.metrics["accuracy"] * 6 == pytest.approx(round(outcome.metrics["accuracy"] * 6))
    # a classification file in the lm suite is refused: its metric would not be the suite's
    lm_options = {k: v for k, v in options.items() if k != "train_examples"} | {"model": "minilm"}
    lm = Trial("lm", "kjv", "lora", 2, "adamw", 1e-3, 0, 1, problem_options=lm_options)
    with pytest.raises(ValueError, match=r"is a classification task; this suite trains causal-lm"):
        execute(lm)


@pytest.mark.slow
def test_advise_verify_reads_the_same_columns(tmp_path, monkeypatch, capsys):
    """`advise --verify` trains on the file the advice measured, columns and all."""
    import loraredux.advisor

    rows = [{"review": t, "sentiment": y} for t, y in REVIEWS * 4]
    path = write(tmp_path / "mine.csv", rows)
    seen = {}

    def verify(rec, model, data, **kwargs):
        seen.update(kwargs, model=model, data=data)

    monkeypatch.setattr(loraredux.advisor, "verify", verify)
    argv = ["advise", "--data", str(path), "--text-column", "review", "--label-column", "sentiment"]
    argv += ["--eval-fraction", "0.25", "--calibration-batches", "2", "--verify", "--no-progress"]
    assert main(argv) == 0
    assert (seen["model"], seen["data"]) == ("minilm", str(path))
    assert seen["columns"] == {"text_column": "review", "label_column": "sentiment",
                               "messages_column": None, "eval_split": None, "eval_fraction": 0.25,
                               "train_on_prompt": False}  # fmt: skip
