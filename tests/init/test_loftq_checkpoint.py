"""LoftQ on a loaded (quantized) model from its checkpoint: `init/checkpoint_weights.py`, `init/loftq_checkpoint.py`.

The quantized base is simulated on a dense model: each adapted layer's base weight becomes deq(q(W0)) through
bitsandbytes' NF4 (transcribed here from `bitsandbytes.functional`), so W0 - base is the real NF4 error. Then:

- T = 1 (the base fixed): s B A = SVD_r(W0 - deq(Q)), so by Eckart-Young the error is the tail of the spectrum of
  W0 - deq(Q), and rank(B A) <= r;
- T > 1 with a quantizer: Algorithm 1 of LoftQ (arXiv 2310.08659) started from the loaded Q, i.e. the library's
  `init="loftq"` on W0;
- rollback restores the adapter (and the base) bit for bit; any exception leaves the model as it was.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file, save_model
from transformers import BertModel

import loraredux as lx
from loraredux.init import CheckpointError, SafetensorsCheckpoint, dense_weights
from loraredux.init.loftq import nf4_roundtrip
from tiny_models import assert_unchanged, snapshot, tiny_bert, tiny_gpt2, tiny_llama

bnbF = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def q_nf4(X: torch.Tensor) -> torch.Tensor:
    """deq(q_N(X)): bitsandbytes NF4, blocks of 64 over the row-major weight, in X's dtype."""
    codes, state = bnbF.quantize_4bit(
        X.reshape(-1).float().contiguous(), blocksize=64, quant_type="nf4"
    )
    return bnbF.dequantize_4bit(codes, state).reshape(X.shape).to(X.dtype)


def llama(**cfg):
    return tiny_llama(hidden=64, intermediate_size=128, layers=1, **cfg)


def linear_paths(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama, its linear weights W0 by path, and its checkpoint folder."""
    model = llama()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    weights = {p: model.get_submodule(p).weight.detach().clone() for p in linear_paths(model)}
    return weights, folder


def quantized_lora(rank: int = 4, alpha: float = 12.0, seed: int = 0, **cfg):
    """The tiny Llama adapted with LoRA on its decoder projections, each base replaced by deq(q_N(W0))."""
    model = llama(**cfg)
    lx.adapt_(
        model, lx.config("lora", rank=rank, alpha=alpha), targets="all-linear", exclude=["lm_head"]
    )
    for _, adapter in lx.adapters(model):
        adapter.replace_base_weight_(q_nf4(adapter.base_weight().detach()))
    return model


def update(adapter) -> torch.Tensor:
    A, B, s = adapter.lora_form()
    return s * B @ A


# -- the checkpoint reader --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_reader_returns_the_saved_weights_from_one_file_or_shards(tmp_path, shard):
    model = llama()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (len(files) > 2) == bool(shard)  # the sharded case really is sharded
    ckpt = SafetensorsCheckpoint(tmp_path)
    paths = linear_paths(model)
    got = dense_weights(ckpt, model, paths)
    assert list(got) == paths
    for path in paths:
        want = model.get_submodule(path).weight
        assert got[path].dtype == want.dtype and torch.equal(got[path], want), path
        assert ckpt.shape(ckpt.key_for(model, path)) == tuple(want.shape)
    if shard:  # the index is read as written: every key to the shard that holds it
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert {k: p.name for k, p in ckpt._files.items()} == index["weight_map"]
        assert len(set(index["weight_map"].values())) == len(files)
        assert (
            SafetensorsCheckpoint(tmp_path / "model.safetensors.index.json").keys() == ckpt.keys()
        )


def test_reader_maps_the_base_model_prefix_both_ways(tmp_path):
    head = tiny_bert()  # BertForSequenceClassification: modules under "bert."
    head.bert.save_pretrained(tmp_path / "bare")  # keys without the prefix
    head.save_pretrained(tmp_path / "head")  # keys with it
    bare = BertModel(head.config).double()
    bare.load_state_dict(head.bert.state_dict())
    inner = [p for p in linear_paths(head) if p.startswith("bert.")]
    # the head model against the bare checkpoint: "bert.encoder..." -> "encoder..."
    got = dense_weights(tmp_path / "bare", head, inner)
    ckpt = SafetensorsCheckpoint(tmp_path / "bare")
    assert ckpt.key_for(head, inner[0]) == inner[0][len("bert.") :] + ".weight"
    # the bare model against the head checkpoint: "encoder..." -> "bert.encoder..."
    outer = [p[len("bert.") :] for p in inner]
    back = dense_weights(tmp_path / "head", bare, outer)
    for path, short in zip(inner, outer, strict=True):
        assert torch.equal(got[path], head.get_submodule(path).weight)
        assert torch.equal(back[short], head.get_submodule(path).weight)
    # a key present under both names is taken as the loaded path has it
    assert SafetensorsCheckpoint(tmp_path / "head").key_for(head, inner[0]) == inner[0] + ".weight"


def test_reader_finds_a_tied_weight_under_the_name_the_checkpoint_kept(tmp_path):
    model = llama(tie_word_embeddings=True)
    table = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "hf")  # transformers keeps model.embed_tokens.weight only
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    save_file(state, str(tmp_path / "head.safetensors"))  # only lm_head.weight, no metadata
    # the tie now runs through the adapter's base
    lx.adapt_(model, lx.config("lora", rank=2), targets=["lm_head"])
    for where in (tmp_path / "hf", tmp_path / "head.safetensors"):
        ckpt = SafetensorsCheckpoint(where)
        assert len({"lm_head.weight", "model.embed_tokens.weight"} & set(ckpt.keys())) == 1
        for path in ("lm_head", "model.embed_tokens"):
            assert torch.equal(ckpt.tensor(ckpt.key_for(model, path)), table), (where, path)


def test_reader_follows_the_duplicate_names_save_model_records(tmp_path):
    model = llama(tie_word_embeddings=True)
    save_model(
        model, str(tmp_path / "st.safetensors")
    )  # keeps one name, records the other in the metadata
    untied = llama(tie_word_embeddings=False)  # the same weights, but no tie to follow in memory
    ckpt = SafetensorsCheckpoint(tmp_path / "st.safetensors")
    for path in ("lm_head", "model.embed_tokens"):
        assert torch.equal(ckpt.tensor(ckpt.key_for(untied, path)), model.lm_head.weight), path


def test_reader_names_the_folder_and_key_that_are_missing(tmp_path):
    llama().save_pretrained(tmp_path / "one")
    bigger = tiny_llama(hidden=64, intermediate_size=128, layers=2)
    with pytest.raises(CheckpointError, match=r"one.*'model\.layers\.1\.mlp\.up_proj'.*tried"):
        dense_weights(tmp_path / "one", bigger, ["model.layers.1.mlp.up_proj"])
    with pytest.raises(ValueError, match=r"no module 'model\.nope'"):
        dense_weights(tmp_path / "one", bigger, ["model.nope"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(
        FileNotFoundError, match=r"bin: no model\.safetensors.*pytorch_model\.bin.*pickle"
    ):
        SafetensorsCheckpoint(tmp_path / "bin")
    llama().save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name)):
        SafetensorsCheckpoint(tmp_path / "sharded")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="elsewhere"):
        SafetensorsCheckpoint(tmp_path / "sharded")


# -- LoftQ from the checkpoint ---------------------------------------------------------------------------------


def test_one_pass_reaches_the_eckart_young_error_of_the_nf4_residual(saved):
    weights, folder = saved
    model = quantized_lora(rank=4, alpha=12.0)  # s = 3
    bases = {p: a.base_weight().detach().clone() for p, a in lx.adapters(model)}
    report = lx.init.loftq_from_checkpoint_(model, folder)
    assert [r.path for r in report.layers] == [p for p, _ in lx.adapters(model)]
    num = den = base_num = 0.0
    for r, (path, adapter) in zip(report.layers, lx.adapters(model), strict=True):
        W, Q = weights[path], bases[path]
        assert torch.equal(adapter.base_weight(), Q)  # T = 1 never touches the base
        assert torch.equal(Q, q_nf4(W)) and not torch.equal(Q, W)  # a real NF4 error
        S = torch.linalg.svdvals(W - Q)
        error = torch.linalg.matrix_norm(W - Q - update(adapter))
        torch.testing.assert_close(error, S[4:].norm(), rtol=1e-10, atol=0)  # the rank-4 optimum
        assert (torch.linalg.svdvals(update(adapter))[4:] < 1e-12 * S[0]).all()  # rank <= r
        A, B, _ = adapter.lora_form()
        torch.testing.assert_close(
            A @ A.T, B.T @ B, rtol=1e-9, atol=1e-12
        )  # split evenly, s divided out
        # the report, by hand
        norm = torch.linalg.matrix_norm(W).item()
        assert r.rank == 4 and r.kept and r.key == path + ".weight"
        assert r.norm == pytest.approx(norm, rel=1e-12)
        assert r.base_error == pytest.approx((W - Q).norm().item() / norm, rel=1e-12)
        assert r.error_before == pytest.approx(r.base_error, rel=1e-12)  # B = 0 before
        assert r.error_after == pytest.approx(S[4:].norm().item() / norm, rel=1e-9)
        num, den, base_num = (
            num + (S[4:].norm().item()) ** 2,
            den + norm**2,
            base_num + (W - Q).norm().item() ** 2,
        )
    assert report.aggregate() == pytest.approx(math.sqrt(num / den), rel=1e-9)
    assert report.aggregate("base_error") == pytest.approx(math.sqrt(base_num / den), rel=1e-12)
    assert report.aggregate() < report.aggregate("base_error") and report.rolled_back == []


def test_more_passes_with_a_quantizer_are_loftqs_algorithm_from_the_loaded_base(saved):
    weights, folder = saved
    T, r, s = 3, 4, 3.0
    model = quantized_lora(rank=r, alpha=r * s)
    report = lx.init.loftq_from_checkpoint_(model, folder, iters=T, quantize=nf4_roundtrip)
    for rep, (path, adapter) in zip(report.layers, lx.adapters(model), strict=True):
        W = weights[path]
        fit = torch.zeros_like(W)  # independent transcription of Algorithm 1 with Q_1 = q(W0)
        for _ in range(T):
            Q = q_nf4(W - fit)
            U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
            fit = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        assert torch.equal(adapter.base_weight(), Q), path  # the base holds Q_T
        torch.testing.assert_close(update(adapter), fit, rtol=1e-9, atol=1e-12)
        library = lx.init.get("loftq")(W, r, s, iters=T)  # `init="loftq"` on the dense W0
        assert torch.equal(library.base, Q)
        want = torch.linalg.matrix_norm(W - Q - fit).item() / torch.linalg.matrix_norm(W).item()
        assert rep.error_after == pytest.approx(want, rel=1e-9)


def test_a_rejecting_callback_restores_that_layers_factors_and_base_bit_for_bit(saved):
    weights, folder = saved
    model = quantized_lora()
    for _, adapter in lx.adapters(model):  # nonzero factors as found, so a restore is visible
        torch.nn.init.normal_(adapter.B, std=0.01, generator=torch.Generator().manual_seed(1))
    found = {p: (a.A.clone(), a.B.clone(), a.base.weight) for p, a in lx.adapters(model)}
    rejected = "model.layers.0.self_attn.k_proj"
    calls = []

    def callback(m, path):
        assert m is model
        calls.append(path)
        return path != rejected

    report = lx.init.loftq_from_checkpoint_(
        model, folder, iters=2, quantize=nf4_roundtrip, callback=callback
    )
    assert calls == [p for p, _ in lx.adapters(model)] and report.rolled_back == [rejected]
    for path, adapter in lx.adapters(model):
        A, B, weight = found[path]
        same = torch.equal(adapter.A, A) and torch.equal(adapter.B, B)
        assert same == (path == rejected), path
        assert (adapter.base.weight is weight) == (path == rejected), path  # T = 2 moved the others
    layer = {r.path: r for r in report.layers}[rejected]
    W, Q = weights[rejected], found[rejected][2]
    A, B, s = model.get_submodule(rejected).lora_form()
    now = torch.linalg.matrix_norm(W - Q - s * B @ A).item() / torch.linalg.matrix_norm(W).item()
    assert layer.error == layer.error_before == pytest.approx(now, rel=1e-12)


def test_by_default_only_layers_whose_error_falls_are_kept(saved):
    _, folder = saved
    model = quantized_lora()
    lx.init.loftq_from_checkpoint_(model, folder)  # every layer at its rank-r optimum for its base
    worse = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(worse).A.mul_(0.9)
    before = {p: (a.A.clone(), a.B.clone()) for p, a in lx.adapters(model)}
    report = lx.init.loftq_from_checkpoint_(
        model, folder
    )  # the same optimum again: nothing falls but one
    assert [r.path for r in report.layers if r.kept] == [worse]
    for r in report.layers:
        adapter = model.get_submodule(r.path)
        if r.kept:
            assert r.error_after < r.error_before
            assert not torch.equal(adapter.A, before[r.path][0])
        else:
            assert r.error_after >= r.error_before
            assert torch.equal(adapter.A, before[r.path][0]) and torch.equal(
                adapter.B, before[r.path][1]
            )


def test_conv1d_checkpoints_are_read_in_their_in_out_layout(tmp_path):
    model = tiny_gpt2(n_embd=64)
    model.save_pretrained(tmp_path)
    weights = {n: m.weight.detach().T.clone() for n, m in model.named_modules() if hasattr(m, "nf")}
    lx.adapt_(model, lx.config("lora", rank=3), targets="all-linear", exclude=["lm_head"])
    for _, adapter in lx.adapters(model):
        adapter.replace_base_weight_(q_nf4(adapter.base_weight().detach()))
    report = lx.init.loftq_from_checkpoint_(model, tmp_path)
    assert len(report.layers) == len(weights) == 8
    for path, adapter in lx.adapters(model):
        R = weights[path] - adapter.base_weight()  # (out, in)
        error = torch.linalg.matrix_norm(R - update(adapter))
        torch.testing.assert_close(error, torch.linalg.svdvals(R)[3:].norm(), rtol=1e-10, atol=0)


def test_failures_leave_the_model_as_it_was(saved, tmp_path):
    _, folder = saved
    model = quantized_lora()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not quantize.*quantize="):
        # a dense base stores what it is given, so it cannot re-quantize without a quantizer
        lx.init.loftq_from_checkpoint_(model, folder, iters=2)
    assert_unchanged(model, before)

    def boom(m, path):
        if path.endswith("down_proj"):
            raise RuntimeError("stop")
        return True

    with pytest.raises(RuntimeError, match="stop"):
        lx.init.loftq_from_checkpoint_(
            model, folder, iters=2, quantize=nf4_roundtrip, callback=boom
        )
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match="callback returned int"):
        lx.init.loftq_from_checkpoint_(model, folder, callback=lambda m, p: 1)
    assert_unchanged(model, before)
    other = tiny_llama(hidden=64, intermediate_size=96, layers=1)  # same keys, other MLP shape
    other.save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"gate_proj\.weight' has shape \(96, 64\).*\(128, 64\)"
    ):
        lx.init.loftq_from_checkpoint_(model, tmp_path)
    assert_unchanged(model, before)


def test_refuses_methods_without_a_free_pair_and_moved_bases(saved):
    _, folder = saved
    model = llama()
    with pytest.raises(ValueError, match="no adapted layer"):
        lx.init.loftq_from_checkpoint_(model, folder)
    lx.adapt_(model, lx.config("dora", rank=2), targets=["q_proj"])
    with pytest.raises(ValueError, match=r"\['dora'\] cannot take one"):
        lx.init.loftq_from_checkpoint_(model, folder)
    moved = llama()
    lx.adapt_(moved, lx.config("lora", rank=2, init="pissa"), targets=["q_proj"])
    with pytest.raises(ValueError, match="moved by the adapter's init 'pissa'"):
        lx.init.loftq_from_checkpoint_(moved, folder)
    with pytest.raises(ValueError, match="iters must be an integer >= 1"):
        lx.init.loftq_from_checkpoint_(moved, folder, iters=0)


def test_a_base_view_that_overwrites_its_old_parameter_cannot_be_rolled_back_silently(saved):
    _, folder = saved
    model = quantized_lora()
    path, adapter = next(iter(lx.adapters(model)))
    weight = adapter.base.weight
    adapter.view.set_weight = lambda w: weight.data.copy_(
        w
    )  # breaks set_weight's contract: in place
    with pytest.raises(RuntimeError, match="rolling back did not give the base weight as found"):
        lx.init.loftq_from_checkpoint_(
            model, folder, iters=2, quantize=nf4_roundtrip, callback=lambda m, p: p != path
        )


def test_on_a_bitsandbytes_nf4_base_the_layer_quantizes_and_rolls_back_its_own_codes(tmp_path):
    pytest.importorskip("loraredux.quant")
    r, s, T = 4, 3.0, 3
    model = llama(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    weights = {p: model.get_submodule(p).weight.detach().clone() for p in linear_paths(model)}
    lx.quantize_(model, "nf4", double_quant=False)  # bitsandbytes Linear4bit: Q_1 = q(W0)
    lx.adapt_(model, lx.config("lora", rank=r, alpha=r * s), targets="all-linear")
    found = {
        p: (a.base.weight, a.base.weight.data.clone(), a.base.quant_state)
        for p, a in lx.adapters(model)
    }
    rejected = "model.layers.0.self_attn.k_proj"
    report = lx.init.loftq_from_checkpoint_(
        model, tmp_path, iters=T, callback=lambda m, p: p != rejected
    )
    assert report.rolled_back == [rejected]
    for path, adapter in lx.adapters(model):
        weight, codes, state = found[path]
        if (
            path == rejected
        ):  # the very codes and quantization state, and the factors as found (B = 0)
            assert adapter.base.weight is weight and torch.equal(weight.data, codes)
            assert adapter.base.quant_state is state and not adapter.B.any()
            continue
        W = weights[path]
        fit = torch.zeros_like(
            W
        )  # Algorithm 1 with the layer's own NF4 (blocks of 64, no double quantization)
        for _ in range(T):
            Q = q_nf4(W - fit)
            U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
            fit = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        # the same codes; bitsandbytes' two dequantize paths round the last bit differently
        torch.testing.assert_close(
            adapter.base_weight(), Q, rtol=0, atol=1e-7 * W.abs().max().item()
        )
        torch.testing.assert_close(update(adapter), fit, rtol=0, atol=1e-5 * fit.abs().max().item())
    lx.unadapt_(model)  # the loaded codes come back, not Q_T
    for path, (_, codes, _) in found.items():
        assert torch.equal(model.get_submodule(path).weight.data, codes), path
