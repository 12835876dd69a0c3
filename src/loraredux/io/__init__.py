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

    Wherever the process is killed, `directory` holds the complete old adapter or the complete new one (never the
    config of one beside the weights of the other), with every other file and folder it held: the new directory is
    built beside it, as `.<name>.loraredux-save-<random>`, and swapped in by one atomic rename. The next save
    removes what a killed one left. Limits (a reader opening the two files either side of the swap, platforms
    without an atomic exchange of two directories): `loraredux.io.atomic.replace_directory_files`.

    Args:
        model: an adapted model (`lx.adapt_`).
        directory: created if needed (with the usual permissions; an existing one keeps its own); an adapter
            already there is replaced only once the new one is complete, and other files are kept. Its parent
            must be writable.
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


def load_adapter(
    model: nn.Module, directory: str | os.PathLike[str], *, allow_nonfinite: bool = False
) -> nn.Module:
    """Adapt a bare model as the saved config in `directory` says, then load the saved weights into it.

    Reads either format. Every file, field and tensor is checked before anything is written, the weights go
    into new adapters before they are swapped in, and a base weight that the load changes (PiSSA's residual
    from the saved A0, B0; an embedding table saved by PEFT) is applied last: any error leaves the model
    exactly as it was, and `lx.unadapt_` after a load gives back the original weights.

    Refused, each with an error naming the file and the field or tensor:
    - a missing directory or file, or only a pickle (never unpickled);
    - an entry that is not a regular file (a FIFO is never opened), or a symlink leaving the directory;
    - a config that is empty, not UTF-8, not a JSON object, deeply nested, or has duplicate keys;
    - a safetensors file that is truncated or malformed (header length, header JSON, duplicate keys,
      dtypes, shapes, data_offsets that overlap or run past the file);
    - config fields of the wrong type (`r` as a string, `use_rslora: "false"`, `lora_alpha` as a list,
      `target_modules` as a number; a native config missing `config` / `layers`), an unknown method or
      PEFT type, fields loraredux does not read, a native `format_version` other than this one;
    - tensors whose names, shapes or dtypes do not fit the model (an integer, bool or complex tensor for a
      floating-point one);
    - unless `allow_nonfinite`, a tensor holding NaN or Inf; and always, a saved base move (PiSSA's A0, B0)
      that would write NaN / Inf into the base or could not be undone by `lx.unadapt_`.

    Args:
        model: the base model the adapter was trained on (not yet adapted at the saved layers).
        directory: a directory written by `lx.save_adapter` or PEFT's `save_pretrained`.
        allow_nonfinite: load tensors holding NaN or Inf anyway (to inspect a diverged adapter).

    Returns:
        The same model, adapted and loaded.

    Raises:
        FileNotFoundError: the directory or one of its two files is missing.
        AdapterFileError: a file is not a regular file, corrupt, of an unknown format, malformed (a field
            of the wrong type), holds NaN / Inf, or only a pickle is present.
        ValueError: the config names an unknown method or fields loraredux does not read, or the tensors do
            not fit the model.
        TypeError: a config that selects layers the method cannot adapt.
    """
    fields, tensors = read_adapter(directory, allow_nonfinite=allow_nonfinite)
    kind = fields.get("format")
    try:
        if kind == native.FORMAT:
            return native.load(model, fields, tensors)
        if kind is None and "peft_type" in fields:
            return peft.load(model, fields, tensors)
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError, AdapterFileError):
            raise
        # The message names the file and field; say which adapter, too.
        raise type(err)(f"cannot load the adapter in {directory}: {err}") from err
    raise AdapterFileError(
        f"{Path(directory) / CONFIG_NAME} is neither a PEFT config (no 'peft_type') nor a loraredux one "
        f"(format={kind!r})"
    )
