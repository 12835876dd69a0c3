"""Calibration statistics: the mean full-weight gradient and the input moments, checked against autograd and
against the inputs computed by hand; bounded memory (grouped passes) changes nothing; the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from loraredux.init import gather
from tiny_models import tiny_gpt2, tiny_llama, token_ids

TARGETS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
]


def batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    ids = token_ids()
    out = []
    for i in range(n):
        x = torch.roll(ids, shifts=i, dims=1)
        out.append({"input_ids": x, "labels": x})
    return out


def modules(model, paths=TARGETS):
    return {p: model.get_submodule(p) for p in paths}


def test_mean_gradient_equals_autograd_of_each_batch():
    model = tiny_llama()
    data = gather(model, modules(model), {"grad", "grads"}, batches(), progress=False)
    for path in TARGETS:
        W = model.get_submodule(path).weight
        expected = []
        for b in batches():
            (g,) = torch.autograd.grad(model(**b).loss, W)
            expected.append(g)
        torch.testing.assert_close(data[path].grad, torch.stack(expected).mean(0))
        assert len(data[path].grads) == 3
        torch.testing.assert_close(data[path].grads[1], expected[1])


def test_grouped_passes_give_the_same_gradients_and_leave_the_model_as_it_was():
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj.weight.grad = torch.ones_like(
        model.model.layers[0].self_attn.q_proj.weight
    )
    model.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    one = gather(model, modules(model), {"grad"}, batches(), progress=False)
    tiny = gather(model, modules(model), {"grad"}, batches(), max_grad_bytes=1, progress=False)
    for path in TARGETS:
        torch.testing.assert_close(one[path].grad, tiny[path].grad)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.grad, torch.ones(16, 16))
    assert all(
        p.grad is None for n, p in model.named_parameters() if "layers.0.self_attn.q_proj" not in n
    )
    assert not model.training  # tiny_llama is in eval mode and stays there


def test_input_moments_equal_the_layer_inputs_and_skip_padding():
    model = tiny_llama()
    data_batches = batches(2)
    data_batches[1]["attention_mask"] = torch.ones(2, 7, dtype=torch.long)
    data_batches[1]["attention_mask"][0, 5:] = 0
    data = gather(model, modules(model), {"inputs"}, data_batches, progress=False)
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in TARGETS}
    hooks = [
        model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen[p].append(a[0]))
        for p in TARGETS
    ]
    with torch.no_grad():
        for b in data_batches:
            model(**b)
    for h in hooks:
        h.remove()
    for path in TARGETS:
        first = seen[path][0].reshape(-1, seen[path][0].shape[-1])
        second = seen[path][1][data_batches[1]["attention_mask"].bool()]
        X = torch.cat([first, second])  # (rows, in): padding rows left out
        d = data[path]
        assert d.rows == 14 + 12
        torch.testing.assert_close(d.second_moment, X.T @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d.input_sum, X.sum(0), rtol=1e-12, atol=1e-12)
        mu = X.mean(0)
        centered = (X - mu).T @ (X - mu) / X.shape[0]
        torch.testing.assert_close(d.covariance(centered=True), centered, rtol=1e-10, atol=1e-12)
    # q and k read the same input tensor: one accumulator, the same statistics
    q, k = TARGETS[:2]
    torch.testing.assert_close(data[q].second_moment, data[k].second_moment, rtol=0, atol=0)


def test_conv1d_gradient_is_in_the_out_in_orientation():
    model = tiny_gpt2()
    path = "transformer.h.0.attn.c_attn"
    layer = model.get_submodule(path)
    data = gather(model, {path: layer}, {"grad"}, batches(1), progress=False)
    (g,) = torch.autograd.grad(
        model(**batches(1)[0]).loss, layer.weight
    )  # (in, out) as Conv1D stores it
    torch.testing.assert_close(data[path].grad, g.T)


def test_bad_calibration_is_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration is empty"):
        gather(model, modules(model), {"grad"}, [], progress=False)
    with pytest.raises(ValueError, match="not mappings: pass loss_fn"):
        gather(model, modules(model), {"grad"}, [token_ids()], progress=False)
    with pytest.raises(ValueError, match=r"has no \.loss"):
        gather(model, modules(model), {"grad"}, [{"input_ids": token_ids()}], progress=False)
    with pytest.raises(FloatingPointError, match="calibration loss"):
        gather(
            model,
            modules(model),
            {"grad"},
            batches(1),
            loss_fn=lambda m, b: m(**b).loss * float("nan"),
            progress=False,
        )
    with pytest.raises(ValueError, match="dense input"):
        gather(model, {"e": model.model.embed_tokens}, {"inputs"}, batches(1), progress=False)
    stray = torch.nn.Linear(16, 16).double()  # not part of the model: the batches never reach it
    with pytest.raises(ValueError, match="never reached layer"):
        gather(model, {"stray": stray}, {"inputs"}, batches(1), progress=False)
