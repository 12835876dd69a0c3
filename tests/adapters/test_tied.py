"""Tied-LoRA and LoTR: factors shared by the layers of a group (one bank per shape, or per module kind and shape),
per-layer vectors or cores; each layer's W' equals the tensor model written out here, the counts equal the papers'
formulas, and the bank is stored once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraredux as lx
from tiny_models import logits, randomize, tiny_bert, tiny_llama, token_ids

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# tiny_llama: hidden 16, 4 heads, 2 KV heads (k, v: 16 -> 8), MLP 32, two layers
SHAPE_GROUPS = {"16x16": ["q_proj", "o_proj"], "8x16": ["k_proj", "v_proj"],
                "32x16": ["gate_proj", "up_proj"], "16x32": ["down_proj"]}  # fmt: skip


@pytest.mark.parametrize("method", ["tied_lora", "lotr"])
@pytest.mark.parametrize("group", ["shape", "kind"])
def test_layers_are_grouped_into_one_bank_per_shape_or_kind(method, group):
    model = lx.adapt_(tiny_llama(), lx.config(method, rank=3, group=group), LLAMA_TARGETS)
    layers = dict(lx.adapters(model))
    banks = lx.banks(model)
    if group == "shape":
        assert sorted(banks) == sorted(f"{method}_{g}" for g in SHAPE_GROUPS)
        for g, kinds in SHAPE_GROUPS.items():
            users = {p for p, a in layers.items() if a.bank is banks[f"{method}_{g}"]}
            assert users == {p for p in layers if p.rpartition(".")[2] in kinds}
    else:  # one bank per module name: each shared by that projection's two layers
        assert len(banks) == 7
        for kind in LLAMA_TARGETS:
            users = [a for p, a in layers.items() if p.endswith(kind)]
            assert len(users) == 2 and users[0].bank is users[1].bank


def test_tied_lora_is_w0_plus_the_scaled_tied_pair():
    model = lx.adapt_(tiny_llama(), lx.config("tied_lora", rank=3, alpha=6), LLAMA_TARGETS)
    randomize(lx.trainable_parameters(model).values())
    for path, a in lx.adapters(model):
        A, B = a.bank.A, a.bank.B
        expected = a.base_weight() + 2.0 * torch.einsum("o,or,r,ri->oi", a.v, B, a.u, A)
        torch.testing.assert_close(a.effective_weight(), expected, rtol=1e-12, atol=1e-12, msg=path)


def test_lotr_stacks_into_a_tucker2_tensor_of_multilinear_rank_r():
    model = lx.adapt_(tiny_llama(layers=3), lx.config("lotr", rank=3, alpha=3, group="kind"),
                      ["q_proj"])  # fmt: skip
    randomize(lx.trainable_parameters(model).values())
    layers = [a for _, a in lx.adapters(model)]
    U, V = layers[0].bank.U, layers[0].bank.V
    cores = torch.stack([a.G for a in layers])  # (L, r, r)
    stacked = torch.einsum("or,lrs,is->oil", U, cores, V)  # the (out, in, L) update tensor, s = 1
    for l, a in enumerate(layers):
        torch.testing.assert_close(a.delta_weight(), stacked[:, :, l], rtol=1e-12, atol=1e-12)
    # Tucker-2: the mode-1 and mode-2 unfoldings have rank r, the layer mode is not compressed
    assert torch.linalg.matrix_rank(stacked.reshape(16, -1)) == 3
    assert torch.linalg.matrix_rank(stacked.permute(1, 0, 2).reshape(16, -1)) == 3
    assert torch.linalg.matrix_rank(stacked.permute(2, 0, 1).reshape(3, -1)) == 3


@pytest.mark.parametrize(("method", "per_layer"), [("tied_lora", lambda r, o: r + o),
                                                   ("lotr", lambda r, o: r * r)])  # fmt: skip
def test_trainable_parameters_are_the_papers_count(method, per_layer):
    r = 3
    model = lx.adapt_(tiny_llama(), lx.config(method, rank=r), LLAMA_TARGETS)
    layers = dict(lx.adapters(model))
    banks = {(a.out_features, a.in_features) for a in layers.values()}
    expected = sum(r * (o + i) for o, i in banks) + sum(
        per_layer(r, a.out_features) for a in layers.values()
    )
    assert sum(p.numel() for p in lx.trainable_parameters(model).values()) == expected
    # LoRA at the same rank: r (in + out) per layer
    lora = sum(r * (a.in_features + a.out_features) for a in layers.values())
    assert expected < lora


@pytest.mark.parametrize("method", ["tied_lora", "lotr"])
def test_gradients_reach_the_shared_and_the_per_layer_parts(method):
    model = lx.adapt_(tiny_llama(), lx.config(method, rank=3), LLAMA_TARGETS)
    randomize(lx.trainable_parameters(model).values())
    model(input_ids=token_ids()).logits.square().sum().backward()
    trainable = lx.trainable_parameters(model)
    assert any(n.startswith("loraredux_banks.") for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("method", ["tied_lora", "lotr"])
def test_saved_once_loaded_exactly_and_merged(method, tmp_path: Path):
    model = lx.adapt_(tiny_llama(), lx.config(method, rank=3), LLAMA_TARGETS)
    randomize(lx.trainable_parameters(model).values())
    expected = logits(model)
    path = lx.save_adapter(model, tmp_path / "a")  # no PEFT form: loraredux's format
    saved = load_file(path / "adapter_model.safetensors")
    shared = sorted(k for k in saved if k.startswith("loraredux_banks."))
    assert len(shared) == 2 * 4  # two factors of each of the four shape banks, once
    loaded = lx.load_adapter(tiny_llama(), path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    lx.merge_(loaded)
    assert not lx.banks(loaded)
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["tied_lora", "lotr"])
def test_per_layer_ranks_are_refused_by_name(method):
    with pytest.raises(ValueError, match=f"{method}: layers share their factors"):
        lx.adapt_(tiny_llama(), lx.config(method, rank=3), ["q_proj"],
                  rank_pattern={"layers.0.self_attn.q_proj": 2})  # fmt: skip
    with pytest.raises(ValueError, match="group must be one of"):
        lx.config(method, group="layer")


def test_bert_query_and_value_share_one_bank_by_shape():
    model = lx.adapt_(tiny_bert(), lx.config("lotr", rank=2), ["query", "value"])
    assert list(lx.banks(model)) == ["lotr_16x16"]
    assert len(list(lx.adapters(model))) == 4
