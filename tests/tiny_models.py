"""Tiny random transformers models (built from configs, nothing downloaded) and model snapshots for the tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import loraredux as lx


def tiny_llama(hidden: int = 16, layers: int = 2, dtype: torch.dtype = torch.float64, **cfg: Any):
    """A 2-layer Llama with grouped-query attention (k/v are 16 -> 8), seeded, in eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            "vocab_size": 64,
            "hidden_size": hidden,
            "intermediate_size": 32,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32,
            **cfg,
        }
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_bert(**cfg: Any):
    """A 2-layer BERT classifier with 3 labels, seeded, float64, in eval mode."""
    torch.manual_seed(0)
    config = BertConfig(
        **{
            "vocab_size": 64,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 32,
            "num_labels": 3,
            **cfg,
        }
    )
    return BertForSequenceClassification(config).double().eval()


def tiny_gpt2(**cfg: Any):
    """A 2-layer GPT-2 (transformers' Conv1D layers), seeded, float64, in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(
        **{
            "vocab_size": 64,
            "n_embd": 16,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 32,
            "bos_token_id": 0,
            "eos_token_id": 0,
            **cfg,
        }
    )
    return GPT2LMHeadModel(config).double().eval()


Snapshot = tuple[dict[str, torch.Tensor], list[tuple[str, type]], dict[str, bool]]


def snapshot(model: torch.nn.Module) -> Snapshot:
    """Everything a failed call must leave as it was: the state, the module types and the requires_grad flags."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    return state, kinds, {n: p.requires_grad for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: Snapshot) -> None:
    state, kinds, flags = snapshot(model)
    assert kinds == before[1]
    assert flags == before[2]
    assert list(state) == list(before[0])
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key


def adapted_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in lx.adapters(model)]


def token_ids() -> torch.Tensor:
    """A fixed (2, 7) batch of token ids below 64 (the tiny models' vocabulary)."""
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The model's logits on `token_ids()`, without autograd."""
    with torch.no_grad():
        return model(input_ids=token_ids()).logits


@torch.no_grad()
def randomize(target: torch.nn.Module | Iterable[torch.Tensor], seed: int = 2) -> None:
    """Nonzero random values, 0.3 N(0, 1), in a model's trainable parameters (or in the given tensors), so that
    an adapter matters (B starts at 0) and a wrong load cannot pass."""
    params = (
        lx.trainable_parameters(target).values() if isinstance(target, torch.nn.Module) else target
    )
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def assert_same_adapter(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same adapter state (keys, dtypes and values, exactly), the same layer configs and the same logits."""
    state_a, state_b = lx.adapter_state_dict(a), lx.adapter_state_dict(b)
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype and torch.equal(
            state_a[key], state_b[key]
        ), key
    assert {p: m.config for p, m in lx.adapters(a)} == {p: m.config for p, m in lx.adapters(b)}
    torch.testing.assert_close(logits(a), logits(b), rtol=0, atol=0)


A = TypeVar("A", bound=torch.nn.Module)


@torch.no_grad()
def randomized(adapter: A, seed: int = 0) -> A:
    """The adapter with N(0, 1) values in every trainable parameter (so the update is generic, not zero)."""
    generator = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return adapter
