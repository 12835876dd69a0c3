"""Every file written in PEFT's format holds only fields of the PEFT config class for its method, so the PEFT that
loraredux is tested with reads it without calling it a file from a newer PEFT."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest

import loraredux as lx
from loraredux.core import available_methods, config_class
from tiny_models import tiny_llama

pytestmark = pytest.mark.parity

# Options that let each method adapt tiny_llama's 16 x 8 projections and be saved in PEFT's format.
OPTIONS: dict[str, dict[str, Any]] = {"adalora": {"init_r": 4, "target_r": 2, "total_step": 10}}
PEFT_METHODS = [m for m in available_methods() if getattr(config_class(m), "peft_type", None)]


def test_the_methods_with_a_peft_form_are_covered() -> None:
    assert {"lora", "dora", "vera", "loha", "lokr", "adalora", "hira"} <= set(PEFT_METHODS)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_written_fields_are_peft_config_fields(method: str, tmp_path: Path) -> None:
    model = lx.adapt_(
        tiny_llama(), lx.config(method, **OPTIONS.get(method, {})), ["q_proj", "v_proj"]
    )
    lx.save_adapter(model, tmp_path, format="peft")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_class = peft.PEFT_TYPE_TO_CONFIG_MAPPING[written["peft_type"]]
    assert set(written) <= {f.name for f in dataclasses.fields(peft_class)}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*higher version of the library")
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_vera_refuses_a_rank_pattern_peft_cannot_hold(tmp_path: Path) -> None:
    config = lx.config("vera", rank=4)
    model = lx.adapt_(tiny_llama(), config, ["q_proj", "v_proj"])
    files = lx.io.peft.to_files(model)[0]
    assert "rank_pattern" not in files and "exclude_modules" not in files
    # The drop is refused, not silent, when the field would carry something.
    with pytest.raises(ValueError, match="VERA config has no rank_pattern"):
        lx.io.peft._drop_absent_fields(config, {"rank_pattern": {"q_proj": 2}})
