"""VeRA: each layer's W' is W0 + Λ_b B_l Λ_d A_l with one frozen random pair shared by all layers; the pair is
PEFT's draw, lives once in the model, and files go both ways with PEFT with identical outputs."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import loraredux as lx
from loraredux.adapters import VeRA
from tiny_models import logits, randomize, tiny_bert, tiny_gpt2, tiny_llama, token_ids

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_each_layer_is_w0_plus_its_scaled_block_of_the_shared_pair():
    model = lx.adapt_(tiny_llama(), lx.config("vera", rank=6, projection_prng_key=3), LLAMA_TARGETS)
    randomize(lx.trainable_parameters(model).values())
    # PEFT's draw, written out: U(-sqrt(6 / fan_in), +) from a CPU generator, A (r, max_in) then B (max_out, r)
    g = torch.Generator().manual_seed(3)
    max_out, max_in = 32, 32  # gate/up: 16 -> 32, down: 32 -> 16
    A = torch.empty(6, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=g)
    B = torch.empty(max_out, 6).uniform_(-math.sqrt(6 / 6), math.sqrt(6 / 6), generator=g)
    layers = dict(lx.adapters(model))
    assert len(layers) == 2 * 7
    for path, a in layers.items():
        out, inp = a.out_features, a.in_features
        expected = a.base_weight() + torch.einsum(
            "o,or,r,ri->oi", a.lambda_b, B[:out].double(), a.lambda_d, A[:, :inp].double()
        )
        torch.testing.assert_close(a.effective_weight(), expected, rtol=1e-12, atol=1e-12, msg=path)
    assert len({id(a.bank) for a in layers.values()}) == 1


def test_the_bank_is_stored_once_and_the_layers_train_only_their_vectors(tmp_path: Path):
    model = lx.adapt_(tiny_llama(), lx.config("vera", rank=4), LLAMA_TARGETS)
    state = lx.adapter_state_dict(model)
    shared = [k for k in state if k.startswith("loraredux_banks.")]
    assert shared == ["loraredux_banks.vera.A", "loraredux_banks.vera.B"]
    assert sum(k.startswith("loraredux_banks.") for k in model.state_dict()) == 2
    assert list(lx.banks(model)) == ["vera"]
    # trainable: b (out) and d (r) per layer, nothing shared
    trainable = lx.trainable_parameters(model)
    layers = dict(lx.adapters(model))
    assert sum(p.numel() for p in trainable.values()) == sum(
        a.out_features + 4 for a in layers.values()
    )
    randomize(trainable.values())
    model(input_ids=token_ids()).logits.square().sum().backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    assert not any(b.requires_grad for b in lx.banks(model)["vera"].buffers())
    # the native file holds the bank once and loads exactly
    lx.save_adapter(model, tmp_path / "native", format="native")
    saved = load_file(tmp_path / "native" / "adapter_model.safetensors")
    assert sum("loraredux_banks" in k for k in saved) == 2
    loaded = lx.load_adapter(tiny_llama(), tmp_path / "native")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_merge_and_unadapt_take_the_bank_away_and_a_second_vera_is_refused():
    model = lx.adapt_(tiny_llama(), lx.config("vera", rank=4), ["q_proj"])
    with pytest.raises(ValueError, match=r"already has the shared module\(s\) \['vera'\]"):
        lx.adapt_(model, lx.config("vera", rank=4), ["v_proj"])
    assert [p for p, _ in lx.adapters(model)] == ["model.layers.0.self_attn.q_proj",
                                                  "model.layers.1.self_attn.q_proj"]  # fmt: skip
    randomize(lx.trainable_parameters(model).values())
    expected = logits(model)
    lx.merge_(model)
    assert not hasattr(model, "loraredux_banks") and not lx.banks(model)
    torch.testing.assert_close(logits(model), expected, rtol=1e-10, atol=1e-10)
    other = lx.adapt_(tiny_llama(), lx.config("vera", rank=4), ["q_proj"])
    lx.unadapt_(other)
    assert not lx.banks(other)
    torch.testing.assert_close(logits(other), logits(tiny_llama()), rtol=0, atol=0)


def test_a_per_layer_rank_is_refused_by_name():
    with pytest.raises(ValueError, match="vera: every layer shares one bank of rank 4"):
        lx.adapt_(
            tiny_llama(),
            lx.config("vera", rank=4),
            ["q_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2},
        )


def peft_vera(make, targets, rank, seed=0, save_projection=True, saved=None):
    config = peft.VeraConfig(r=rank, target_modules=list(targets), projection_prng_key=seed,
                             save_projection=save_projection, modules_to_save=saved)  # fmt: skip
    return peft.get_peft_model(make(), config)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("make", "targets"),
    [
        (tiny_llama, LLAMA_TARGETS),
        (tiny_gpt2, ["c_attn", "c_proj"]),
        (tiny_bert, ["query", "value"]),
    ],
)
def test_same_draw_and_same_outputs_as_peft(make, targets):
    ours = lx.adapt_(make(), lx.config("vera", rank=5, projection_prng_key=7), targets)
    theirs = peft_vera(make, targets, rank=5, seed=7)
    bank = lx.banks(ours)["vera"]
    torch.testing.assert_close(
        bank.A, theirs.base_model.vera_A["default"].to(bank.A.dtype), rtol=0, atol=0
    )
    torch.testing.assert_close(
        bank.B, theirs.base_model.vera_B["default"].to(bank.B.dtype), rtol=0, atol=0
    )
    randomize(lx.trainable_parameters(ours).values())
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.vera.layer.VeraLayer)}  # fmt: skip
    with torch.no_grad():
        for path, a in lx.adapters(ours):
            peft_layers[path].vera_lambda_b["default"].copy_(a.lambda_b)
            peft_layers[path].vera_lambda_d["default"].copy_(a.lambda_d)
    theirs.eval()
    x = token_ids()
    with torch.no_grad():
        expected, got = theirs(input_ids=x), ours(input_ids=x)
    key = "logits"
    torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-10)


@pytest.mark.parity
@pytest.mark.parametrize("save_projection", [True, False])
def test_files_both_ways_with_peft(save_projection, tmp_path: Path):
    cfg = lx.config("vera", rank=4, projection_prng_key=2, save_projection=save_projection)
    model = lx.adapt_(tiny_llama(), cfg, LLAMA_TARGETS)
    randomize(lx.trainable_parameters(model).values())
    expected = logits(model)
    lx.save_adapter(model, tmp_path / "ours", format="peft")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)

    theirs = peft_vera(tiny_llama, LLAMA_TARGETS, rank=4, seed=2, save_projection=save_projection)
    randomize([p for p in theirs.parameters() if p.requires_grad], seed=4)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = lx.load_adapter(tiny_llama(), tmp_path / "theirs")
    assert {type(a) for _, a in lx.adapters(ours)} == {VeRA}
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-10, atol=1e-10)
