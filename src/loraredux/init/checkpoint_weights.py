"""Dense weights of a loaded model's layers, read lazily from the transformers checkpoint it was loaded from.

A model loaded in 4-bit (`BitsAndBytesConfig(load_in_4bit=True)`) no longer holds its dense weights W0, but its
folder does. `SafetensorsCheckpoint` opens that folder (`model.safetensors`, or the shards named by
`model.safetensors.index.json`) and reads one tensor at a time with `safetensors.safe_open`, so the dense model is
never in memory at once; only safetensors files are read, never a pickle.

A loaded module path maps to a checkpoint key as transformers maps them when loading:

- `path.weight` itself;
- without or with the model's `base_model_prefix`: a `BertForSequenceClassification` (prefix `bert`) has
  `bert.encoder.layer.0...` where a checkpoint saved from the bare `BertModel` has `encoder.layer.0...`, and the
  other way round;
- the same for every module whose weight is the same parameter object (tied weights: an output head sharing the
  input embedding, of which the checkpoint keeps one name);
- a name that `safetensors.torch.save_model` dropped as a duplicate, recorded in the file's metadata as
  `{dropped name: kept name}`.

An adapted layer (an `Adapter`) is found under its own path: its base's weight is the module's weight.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor, nn

__all__ = ["CheckpointError", "SafetensorsCheckpoint", "dense_weights"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that does not hold what was asked of it (a key, a shard, a readable index)."""


class SafetensorsCheckpoint:
    """The tensors of a transformers checkpoint folder, by key, read one at a time.

    Args:
        path: the folder (holding `model.safetensors`, or `model.safetensors.index.json` and its shards, as
            `save_pretrained` writes them, `max_shard_size` included), or one of those two files.

    Raises:
        FileNotFoundError: no such path, or a folder with neither file (the message lists the files there and says
            that pickled checkpoints are not read), or a shard the index names is missing.
        CheckpointError: an index that is not JSON with a `weight_map` of plain file names in the folder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.is_file():
            folder, name = path.parent, path.name
        elif path.is_dir():
            folder = path
            name = SINGLE if (path / SINGLE).is_file() else INDEX  # transformers' order
            if not (path / name).is_file():
                present = sorted(p.name for p in path.iterdir())
                raise FileNotFoundError(
                    f"{path}: no {SINGLE} and no {INDEX}; files present: {present or 'none'}. Only safetensors "
                    "checkpoints are read (a pytorch_model.bin is a pickle: save the model again with "
                    "save_pretrained, which writes safetensors)"
                )
        else:
            raise FileNotFoundError(f"no checkpoint folder or file at {path}")
        self.folder = folder
        self._aliases: dict[
            str, str
        ] = {}  # a duplicate name save_model dropped -> the name it kept
        if name.endswith(".index.json"):
            self._files = self._read_index(folder / name)
        elif name.endswith(".safetensors"):
            self._files = self._read_header(folder / name)
        else:
            raise CheckpointError(
                f"{path}: expected a folder, a .safetensors file or a {INDEX}, got {name!r}"
            )

    # -- opening ---------------------------------------------------------------------------------------
    def _read_header(self, file: Path) -> dict[str, Path]:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:  # reads the header only
            keys = list(f.keys())
            metadata = f.metadata() or {}
        self._aliases = {k: v for k, v in metadata.items() if k not in keys and v in keys}
        return dict.fromkeys(keys, file)

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{index}: not a safetensors index (JSON with a 'weight_map' of key -> file): {err}"
            ) from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map keys to file names")
        files: dict[str, Path] = {}
        shards: dict[str, Path] = {}
        for key, name in weight_map.items():
            # a shard is a plain file name inside the folder: an index must not point elsewhere
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(
                    f"{index}: key {key!r} names the shard {name!r}; expected a file name in {index.parent}"
                )
            shard = shards.setdefault(name, index.parent / name)
            files[key] = shard
        missing = sorted(name for name, shard in shards.items() if not shard.is_file())
        if missing:
            present = sorted(p.name for p in index.parent.iterdir())
            raise FileNotFoundError(
                f"{index.parent}: the index names shard(s) {missing} that are not there; files present: {present}"
            )
        return files

    # -- reading ---------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """The tensor keys, sorted."""
        return sorted(self._files)

    def __contains__(self, key: object) -> bool:
        return key in self._files

    def _missing(self, key: str) -> CheckpointError:
        close = difflib.get_close_matches(key, self._files, n=3)
        hint = f"; close keys: {close}" if close else ""
        return CheckpointError(
            f"{self.folder}: no tensor {key!r} among its {len(self._files)} keys{hint}"
        )

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor `key`, from the file's header (no data read).

        Raises:
            CheckpointError: no such key (the message names the folder and close keys).
        """
        from safetensors import safe_open

        if key not in self._files:
            raise self._missing(key)
        with safe_open(str(self._files[key]), framework="pt", device="cpu") as f:
            return tuple(f.get_slice(key).get_shape())

    def tensor(self, key: str) -> Tensor:
        """Tensor `key` as stored (its dtype, the module's own layout), on the CPU.

        Raises:
            CheckpointError: no such key, or a shard that lacks the key its index gives it.
        """
        from safetensors import SafetensorError, safe_open

        if key not in self._files:
            raise self._missing(key)
        file = self._files[key]
        with safe_open(str(file), framework="pt", device="cpu") as f:
            try:
                return f.get_tensor(key)
            except SafetensorError as err:
                raise CheckpointError(f"{file}: cannot read {key!r} ({err})") from None

    # -- mapping a loaded model's modules to keys ---------------------------------------------------------
    def candidates(self, model: nn.Module, path: str, name: str = "weight") -> list[str]:
        """The keys a loaded module's tensor may have in the checkpoint, in the order they are tried."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        found: list[str] = []
        for alias in [path, *_tied_paths(model, path)]:
            found.append(f"{alias}.{name}")
            if prefix and alias.startswith(prefix + "."):
                found.append(f"{alias[len(prefix) + 1 :]}.{name}")
            elif prefix and alias != prefix:
                found.append(f"{prefix}.{alias}.{name}")
        found += [self._aliases[k] for k in found if k in self._aliases]
        return list(dict.fromkeys(found))

    def key_for(self, model: nn.Module, path: str, name: str = "weight") -> str:
        """The checkpoint key of the tensor `name` of the module at `path` of the loaded `model`.

        Raises:
            ValueError: the model has no module at `path`.
            CheckpointError: none of the candidate keys is in the checkpoint (the message lists them).
        """
        tried = self.candidates(model, path, name)
        for key in tried:
            if key in self._files:
                return key
        close = difflib.get_close_matches(tried[0], self._files, n=3)
        hint = f"; close keys: {close}" if close else ""
        raise CheckpointError(
            f"{self.folder}: no tensor for {path!r}.{name} of {type(model).__name__}; tried {tried} among "
            f"the checkpoint's {len(self._files)} keys{hint}"
        )


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no module {path!r}") from None


def _weight_of(module: nn.Module) -> object | None:
    from ..core import Adapter  # lazily: core must not be imported while loraredux.init loads

    owner = module.base if isinstance(module, Adapter) else module
    return owner._parameters.get("weight")


def _tied_paths(model: nn.Module, path: str) -> list[str]:
    """The other module paths whose weight is the same parameter object as the module at `path` (an adapted
    layer's base counts as the adapter's path)."""
    from ..core import Adapter

    target = _weight_of(_module(model, path))
    if target is None:
        return []
    tied = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, Adapter) or module._parameters.get("weight") is not target:
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf == "base" and isinstance(model.get_submodule(parent), Adapter):
            name = parent
        if name != path:
            tied.append(name)
    return list(dict.fromkeys(tied))


def dense_weights(
    checkpoint: str | os.PathLike[str] | SafetensorsCheckpoint,
    model: nn.Module,
    paths: Iterable[str],
) -> dict[str, Tensor]:
    """Each module's `weight` as the checkpoint stores it (dtype and layout as saved: a `Conv1D`'s is (in, out)).

    All of them are read, so this holds them all in memory; `SafetensorsCheckpoint.tensor(key_for(...))` reads one
    at a time.

    Args:
        checkpoint: the model's folder (see `SafetensorsCheckpoint`) or an opened one.
        model: the loaded model (quantized or not; adapted or not).
        paths: module paths of `model` (`model.named_modules()` names).

    Raises:
        ValueError: a path that is not a module of the model.
        CheckpointError: a module whose weight is not in the checkpoint (the message names the keys tried).
        FileNotFoundError: no safetensors checkpoint at that path.
    """
    ckpt = (
        checkpoint
        if isinstance(checkpoint, SafetensorsCheckpoint)
        else SafetensorsCheckpoint(checkpoint)
    )
    keys = {path: ckpt.key_for(model, path) for path in paths}  # every key found before any is read
    return {path: ckpt.tensor(key) for path, key in keys.items()}
