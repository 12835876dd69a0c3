"""Adapter files: `lx.save_adapter` and `lx.load_adapter`.

Two formats share the same two files (`adapter_config.json` + `adapter_model.safetensors`): PEFT's (`peft.py`),
the interchange currency, for methods that have a PEFT form, and loraredux's own (`native.py`) for every
registered method. Only JSON and safetensors are read; saves are atomic (`files.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from . import native, peft
from .files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    read_adapter,
    read_adapter_config,
    write_adapter,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdapterFileError",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]

Format = Literal["auto", "peft", "native"]


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    format: Format = "auto",
    convert_to_lora: bool = True,
) -> Path:
    """Write the model's adapters (and modules to save) to `directory`, atomically.

    Args:
        model: an adapted model (`lx.adapt_`).
        directory: created if needed; an adapter already there is replaced only once the new one is complete,
            and other files are left alone.
        format: `"peft"` (PEFT's format, loadable by `peft.PeftModel.from_pretrained`), `"native"` (loraredux's
            format, for any method) or `"auto"` (PEFT's where every adapter has a PEFT form, else native).
        convert_to_lora: in PEFT's format, an adapter whose init moved the base weight (PiSSA, MiLoRA, OLoRA,
            LoRA-GA, CorDA) is written as the plain rank-2r LoRA that gives the same model on the original base,
            so PEFT, vLLM and others load it on the model they have (PEFT's
            `path_initial_model_for_weight_conversion`). False writes its rank-r factors, right only on the
            moved base (LoftQ's quantised base needs this). loraredux's own format always stores the initial
            factors and moves the base again when loading.

    Returns:
        The directory.

    Raises:
        ValueError: an unknown format, a model without adapters, a method without a PEFT form (with
            `format="peft"`), or layers whose configs differ in more than rank and alpha.
    """
    if format not in ("auto", "peft", "native"):
        raise ValueError(f"format must be 'auto', 'peft' or 'native', got {format!r}")
    if format == "auto":
        format = "peft" if peft.supports(model, convert_to_lora) else "native"
    if format == "peft":
        config, tensors = peft.to_files(model, convert=convert_to_lora)
    else:
        config, tensors = native.to_files(model)
    return write_adapter(directory, config, tensors)


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Adapt a bare model as the saved config in `directory` says, then load the saved weights into it.

    Reads either format. The weights are loaded into the new adapters before they are swapped in, so any error
    leaves the model exactly as it was.

    Args:
        model: the base model the adapter was trained on (not yet adapted at the saved layers).
        directory: a directory written by `lx.save_adapter` or PEFT's `save_pretrained`.

    Returns:
        The same model, adapted and loaded.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        AdapterFileError: only a pickle is present (never unpickled), or a file is corrupt or of unknown format.
        ValueError: the config names an unknown method or fields loraredux does not read, or the tensors' keys
            or shapes do not fit the model.
    """
    fields, tensors = read_adapter(directory)
    kind = fields.get("format")
    if kind == native.FORMAT:
        return native.load(model, fields, tensors)
    if kind is None and "peft_type" in fields:
        return peft.load(model, fields, tensors)
    raise AdapterFileError(
        f"{Path(directory) / CONFIG_NAME} is neither a PEFT config (no 'peft_type') nor a loraredux one "
        f"(format={kind!r})"
    )
