"""LoRTA (CP) and Tucker over the stacked (out, in, layer, kind) update tensor: every layer's update is its slice of
the tensor written out here with einsum, the tensor has the promised multilinear ranks, and the counts, storage and
gradients are those of one shared decomposition per shape."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraredux as lx
from tiny_models import logits, randomize, tiny_llama, token_ids

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stacked(method: str, bank) -> torch.Tensor:
    """The (out, in, layer, kind) update tensor of a bank, unscaled, from its factors alone."""
    if method == "lorta":
        return torch.einsum("or,ir,lr,kr->oilk", bank.A, bank.B, bank.C, bank.D)
    return torch.einsum(
        "abcd,oa,ib,lc,kd->oilk", bank.G, bank.U_out, bank.U_in, bank.U_layer, bank.U_kind
    )


def adapted(method: str, layers: int = 3, **fields):
    config = lx.config(method, rank=3, alpha=6, **fields)
    model = lx.adapt_(tiny_llama(layers=layers), config, ["q_proj", "o_proj", "k_proj", "v_proj"])
    randomize(lx.trainable_parameters(model).values())
    return model


@pytest.mark.parametrize("method", ["lorta", "tucker"])
def test_each_layer_is_its_slice_of_the_stacked_tensor(method):
    model = adapted(method)
    banks = lx.banks(model)
    assert sorted(banks) == [f"{method}_16x16", f"{method}_8x16"]
    for path, a in lx.adapters(model):
        block = int(path.split(".")[2])  # model.layers.<block>.self_attn.<kind>
        kind = {"q_proj": 0, "o_proj": 1, "k_proj": 0, "v_proj": 1}[path.rpartition(".")[2]]
        T = 2.0 * stacked(method, a.bank)  # s = alpha / r = 2
        assert T.shape[2:] == (3, 2)  # three blocks, two kinds in each shape group
        torch.testing.assert_close(a.delta_weight(), T[:, :, block, kind], rtol=1e-12, atol=1e-12)


def unfolding_ranks(T: torch.Tensor) -> list[int]:
    return [
        int(torch.linalg.matrix_rank(T.movedim(n, 0).reshape(T.shape[n], -1))) for n in range(4)
    ]


def test_lorta_tensor_has_cp_rank_at_most_r_in_every_unfolding():
    model = adapted("lorta")
    T = stacked("lorta", lx.banks(model)["lorta_16x16"])
    assert unfolding_ranks(T) == [3, 3, 3, 2]  # each unfolding's rank is min(r, the mode's size)


def test_tucker_has_a_rank_per_mode_capped_at_the_mode_size():
    model = adapted("tucker", layer_rank=2, kind_rank=5)
    bank = lx.banks(model)["tucker_16x16"]
    assert tuple(bank.G.shape) == (3, 3, 2, 2)  # kind_rank 5 capped at the two kinds
    assert unfolding_ranks(stacked("tucker", bank)) == [3, 3, 2, 2]
    assert "ranks (out, in, layer, kind) = (3, 3, 2, 2)" in repr(bank)


@pytest.mark.parametrize("method", ["lorta", "tucker"])
def test_trainable_parameters_are_one_decomposition_per_shape(method):
    model = adapted(method)
    config = next(a for _, a in lx.adapters(model)).config
    expected = sum(
        config.bank_parameter_count(i, o, 3, 2) for o, i in ((16, 16), (8, 16))
    )  # three blocks x two kinds in each group
    assert sum(p.numel() for p in lx.trainable_parameters(model).values()) == expected
    assert all(n.startswith("loraredux_banks.") for n in lx.trainable_parameters(model))
    if method == "lorta":
        assert expected == 3 * (16 + 16 + 3 + 2) + 3 * (8 + 16 + 3 + 2)


@pytest.mark.parametrize("method", ["lorta", "tucker"])
def test_gradients_reach_every_factor_and_the_start_is_w0(method):
    fresh = lx.adapt_(tiny_llama(), lx.config(method, rank=3), TARGETS)
    torch.testing.assert_close(logits(fresh), logits(tiny_llama()), rtol=0, atol=0)
    model = adapted(method)
    model(input_ids=token_ids()).logits.square().sum().backward()
    for name, p in lx.trainable_parameters(model).items():
        assert p.grad is not None and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("method", ["lorta", "tucker"])
def test_saved_once_loaded_exactly_and_merged(method, tmp_path: Path):
    model = adapted(method)
    expected = logits(model)
    path = lx.save_adapter(model, tmp_path / "a")
    saved = load_file(path / "adapter_model.safetensors")
    assert {k.split(".")[1] for k in saved} == {
        f"{method}_16x16",
        f"{method}_8x16",
    }  # only the banks
    loaded = lx.load_adapter(tiny_llama(layers=3), path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    lx.merge_(loaded)
    assert not lx.banks(loaded)
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["lorta", "tucker"])
def test_group_by_kind_gives_each_projection_its_own_tensor(method):
    model = lx.adapt_(tiny_llama(), lx.config(method, rank=2, group="kind"), TARGETS)
    banks = lx.banks(model)
    assert len(banks) == 7
    first = banks[f"{method}_q_proj_16x16"]
    assert first.kinds == ["q_proj"] and len(first.parents) == 2


def train_tensor(bank) -> torch.Tensor:
    """The full tensor of a train, (o_1, .., o_p, layer, kind, i_1, .., i_q), by one einsum over its cores."""
    cores = [*bank.out_cores, bank.layer_core, bank.kind_core, *bank.in_cores]
    bonds, modes = "abcdefghij", "ABCDEFGHIJ"
    spec = ",".join(f"{bonds[j]}{modes[j]}{bonds[j + 1]}" for j in range(len(cores)))
    return torch.einsum(f"{spec}->{bonds[0]}{modes[: len(cores)]}{bonds[len(cores)]}", *cores)[
        0, ..., 0
    ]


def test_tensor_train_layers_are_slices_of_one_train_with_tensorized_out_and_in():
    model = lx.adapt_(tiny_llama(layers=3), lx.config("tensor_train", rank=3, alpha=6),
                      ["q_proj", "o_proj", "k_proj", "v_proj"])  # fmt: skip
    randomize(lx.trainable_parameters(model).values())
    bank = lx.banks(model)["tensor_train_8x16"]
    assert bank.sizes == [2, 4, 3, 2, 4, 4]  # out 8 = 2 x 4, three blocks, two kinds, in 16 = 4 x 4
    for path, a in lx.adapters(model):
        T = train_tensor(a.bank)  # (o_1, o_2, layer, kind, i_1, i_2)
        block = int(path.split(".")[2])
        kind = {"q_proj": 0, "o_proj": 1, "k_proj": 0, "v_proj": 1}[path.rpartition(".")[2]]
        out, inp = a.out_features, a.in_features
        expected = 2.0 * T[:, :, block, kind].reshape(
            out, inp
        )  # row-major (o_1, o_2) and (i_1, i_2)
        torch.testing.assert_close(a.delta_weight(), expected, rtol=1e-12, atol=1e-12, msg=path)
    # the train's bond ranks bound the unfoldings: rank of (modes 1..j) x (modes j+1..) <= r_j
    T = train_tensor(bank)
    for j, r in enumerate([2, 3, 3, 3, 3]):  # r_1 = min(3, 2), then 3
        left = math.prod(T.shape[: j + 1])
        assert torch.linalg.matrix_rank(T.reshape(left, -1)) <= r


def test_tensor_train_counts_and_storage(tmp_path: Path):
    config = lx.config("tensor_train", rank=3)
    model = lx.adapt_(tiny_llama(layers=3), config, TARGETS)
    randomize(lx.trainable_parameters(model).values())
    shapes = {(16, 16): (3, 2), (8, 16): (3, 2), (32, 16): (3, 2), (16, 32): (3, 1)}
    expected = sum(config.bank_parameter_count(i, o, l, k) for (o, i), (l, k) in shapes.items())
    assert sum(p.numel() for p in lx.trainable_parameters(model).values()) == expected
    # 16 x 16, 3 blocks, 2 kinds: modes (4, 4, 3, 2, 4, 4), bonds (1, 3, 3, 3, 3, 3, 1)
    assert (
        config.bank_parameter_count(16, 16, 3, 2)
        == 4 * 3 + 3 * 4 * 3 + 3 * 3 * 3 + 3 * 2 * 3 + 3 * 4 * 3 + 3 * 4
    )
    path = lx.save_adapter(model, tmp_path / "tt")
    loaded = lx.load_adapter(tiny_llama(layers=3), path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    fresh = lx.adapt_(tiny_llama(), config, TARGETS)  # the layer core starts at zero: W' = W0
    torch.testing.assert_close(logits(fresh), logits(tiny_llama()), rtol=0, atol=0)
    fresh(input_ids=token_ids()).logits.square().sum().backward()
    grads = {n: p.grad for n, p in lx.trainable_parameters(fresh).items()}
    assert all(g is not None for g in grads.values())
    assert all(
        (g.abs().max() > 0) == ("layer_core" in n) for n, g in grads.items()
    )  # only L moves first


@pytest.mark.parametrize("method", ["tied_lora", "lotr", "lorta", "tucker", "tensor_train"])
def test_smollm2_all_linear_gets_one_bank_per_shape(method):
    """SmolLM2's Llama layout: q/o (576 -> 576), grouped-query k/v (576 -> 192), gate/up (576 -> 1536) and down
    (1536 -> 576) over 30 blocks: four banks, each layer in its own, and the model starts where it was."""
    from loraredux import assets

    model, _ = assets.load_smollm2()
    x = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits
    lx.adapt_(model, lx.config(method, rank=4), "all-linear", exclude=["lm_head"])
    banks = lx.banks(model)
    assert sorted(banks) == sorted(
        f"{method}_{s}" for s in ("576x576", "192x576", "1536x576", "576x1536")
    )
    layers = dict(lx.adapters(model))
    assert len(layers) == 30 * 7
    for path, a in layers.items():
        assert a.bank is banks[f"{method}_{a.out_features}x{a.in_features}"], path
    if method in ("lorta", "tucker", "tensor_train"):
        assert len(banks[f"{method}_576x576"].parents) == 30
        assert banks[f"{method}_576x576"].kinds == ["q_proj", "o_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
