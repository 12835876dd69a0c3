"""The activation part of the memory model: a training step replayed on the meta device, against the peak measured on
real tiny models (Llama with sdpa and with eager attention, GPT-2, GPT-NeoX, a BERT classifier); its scaling, its
argument checks, the storage identity it relies on, and `measure_peak_bytes` against known allocations."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import loraredux as lx
from loraredux import assets
from loraredux.advisor import memory, replay
from loraredux.advisor.memory import estimate_memory, measure_peak_bytes
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

BATCH, SEQ = 4, 128
VOCAB = 1000


def real_model(name: str) -> tuple[nn.Module, str]:
    """A tiny fp32 model with random weights, from a transformers config, and its `estimate_memory` kind."""
    sizes = {"vocab_size": VOCAB, "max_position_embeddings": 256}
    if name.startswith("llama"):  # grouped-query attention: 4 query heads, 2 key / value heads
        attention = "eager" if name == "llama-eager" else "sdpa"
        model = tiny_llama(hidden=128, dtype=torch.float32, intermediate_size=256,
                           attn_implementation=attention, **sizes)  # fmt: skip
        return model, "causal-lm"
    if (
        name == "neox"
    ):  # q, k, v split from one projection: the CPU flash kernel's output follows q's layout
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        torch.manual_seed(0)
        config = GPTNeoXConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, **sizes)  # fmt: skip
        return GPTNeoXForCausalLM(config), "causal-lm"
    if name == "gpt2":  # attention dropout 0.1: sdpa takes the math path on the CPU
        return tiny_gpt2(
            n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=256
        ).float(), "causal-lm"
    return tiny_bert(
        hidden_size=128, num_attention_heads=4, intermediate_size=256, **sizes
    ).float(), ("classification")


def training_step(
    model: nn.Module, kind: str, targets: str | list[str] = "all-linear", keep_outputs: bool = False,
    batch: int = BATCH, seq: int = SEQ,
) -> tuple[int, int]:  # fmt: skip
    """(bytes of the parameters before the step, peak bytes of one step above them): forward with the loss,
    backward, and an AdamW step that creates its states; LoRA r=8 on `targets`, the head left out. Only the loss
    goes on into backward (as in `train.fit` and transformers' Trainer), unless `keep_outputs`: then the model's
    outputs are held through backward (`out = model(...); out.loss.backward()`)."""
    head = "classifier" if kind == "classification" else "lm_head"
    lx.adapt_(model, lx.config("lora", rank=8), targets, exclude=[head])
    model.train()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = ids if kind == "causal-lm" else torch.randint(0, 3, (batch,), generator=generator)
    optimizer = torch.optim.AdamW(lx.trainable_parameters(model).values(), lr=1e-3)

    def step() -> None:
        if keep_outputs:
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
        else:
            model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, measure_peak_bytes(step, "cpu")


@pytest.mark.parametrize("name", ["llama", "llama-eager", "gpt2", "neox", "bert"])
def test_the_estimate_matches_the_measured_peak_of_a_training_step(name):
    model, kind = real_model(name)
    config = model.config
    weights, peak = training_step(model, kind)
    est = estimate_memory(config, kind=kind, base="fp32", method_fields={"rank": 8},
                          batch_size=BATCH, seq_len=SEQ, device="cpu")  # fmt: skip
    measured = weights + peak
    assert peak > 0.8 * measured  # the activations are most of it: an estimate without them fails
    assert est.total_bytes == pytest.approx(measured, rel=0.15)  # the criterion
    # tighter: the step's peak (before AdamW's states exist) holds the activations and at most the gradients
    assert est.activation_bytes <= 1.005 * peak
    assert peak <= 1.005 * (est.activation_bytes + est.gradient_bytes)
    assert est.base_bytes + est.adapter_bytes == weights


def test_the_outputs_die_before_backward_with_some_layers_adapted():
    """Regression: only the loss goes on into backward, so the logits die with the model's outputs before it; the
    replay once held them through backward, one fp32 logits tensor (batch x seq x vocab x 4 bytes) above the
    measured peak of `model(...).loss.backward()`. LoRA on q_proj / v_proj only, a vocabulary whose logits are
    about a third of the peak."""
    vocab, batch, seq = 8192, 4, 64
    logits = batch * seq * vocab * 4

    def llama() -> nn.Module:
        return tiny_llama(hidden=64, dtype=torch.float32, intermediate_size=128, vocab_size=vocab,
                          max_position_embeddings=seq)  # fmt: skip

    model = llama()
    est = estimate_memory(model.config, base="fp32", method_fields={"rank": 8}, targets=["q_proj", "v_proj"],
                          batch_size=batch, seq_len=seq, device="cpu")  # fmt: skip
    weights, peak = training_step(model, "causal-lm", ["q_proj", "v_proj"], batch=batch, seq=seq)
    assert logits > 0.1 * peak
    assert est.total_bytes == pytest.approx(weights + peak, rel=0.02)
    assert est.activation_bytes == pytest.approx(peak, abs=1024)
    # a loop that holds the outputs through backward keeps the logits one logits tensor longer
    _, held = training_step(
        llama(), "causal-lm", ["q_proj", "v_proj"], keep_outputs=True, batch=batch, seq=seq
    )
    assert held - peak == pytest.approx(logits, abs=1024)


def test_activations_scale_with_the_batch_and_are_zero_without_one():
    config = tiny_llama(hidden=128, max_position_embeddings=256).config
    plain = estimate_memory(config)
    four = estimate_memory(config, batch_size=4, seq_len=64)
    eight = estimate_memory(config, batch_size=8, seq_len=64)
    assert plain.activation_bytes == 0 and plain.batch_size is None and plain.seq_len is None
    assert plain.breakdown()["activations"] == 0
    assert eight.activation_bytes / four.activation_bytes == pytest.approx(2, rel=0.03)
    assert (four.batch_size, four.seq_len) == (4, 64)
    assert four.breakdown()["activations"] == four.activation_bytes > 0
    assert four.total_bytes == plain.total_bytes + four.activation_bytes
    assert four.fits(four.total_bytes) and not four.fits(four.total_bytes - 1)
    for field in ("base_bytes", "adapter_bytes", "gradient_bytes", "optimizer_bytes"):
        assert getattr(four, field) == getattr(plain, field)
    fp32 = estimate_memory(config, base="fp32", batch_size=4, seq_len=64)
    assert estimate_memory(config, base="nf4", batch_size=4, seq_len=64).activation_bytes == (
        four.activation_bytes  # int8 / nf4 compute in bf16
    )
    # 4 bytes a value instead of 2, but for the loss's log-softmax and its gradient, fp32 in both (1.80 on this
    # config while the outputs were held through backward, 1.799 since they die before it)
    assert fp32.activation_bytes > 1.75 * four.activation_bytes


def test_the_attention_kernel_follows_the_training_device():
    # GPT-2's attention dropout: PyTorch's CPU flash kernel has none, so sdpa stores seq x seq probabilities there
    gpt2 = tiny_gpt2(n_embd=128, n_head=4, n_positions=256).config
    cpu = estimate_memory(gpt2, batch_size=2, seq_len=256, device="cpu")
    cuda = estimate_memory(gpt2, batch_size=2, seq_len=256, device="cuda")
    probabilities = 2 * 2 * 256 * 256 * 2  # one layer's (batch, heads, seq, seq) in bf16
    assert cpu.activation_bytes > cuda.activation_bytes + probabilities
    # grouped-query attention in fp32: no fused CUDA kernel (flash is 16-bit, memory-efficient needs equal heads)
    llama = tiny_llama(hidden=128, max_position_embeddings=256).config
    cpu = estimate_memory(llama, base="fp32", batch_size=2, seq_len=256, device="cpu")
    cuda = estimate_memory(llama, base="fp32", batch_size=2, seq_len=256, device="cuda")
    assert cuda.activation_bytes > cpu.activation_bytes + 2 * 4 * 256 * 256 * 4
    bf16 = [estimate_memory(llama, batch_size=2, seq_len=256, device=d) for d in ("cpu", "cuda")]
    assert bf16[0].activation_bytes == pytest.approx(bf16[1].activation_bytes, rel=0.02)
    same = estimate_memory(llama, batch_size=2, seq_len=256, device=torch.device("cuda", 1))
    assert same.activation_bytes == bf16[1].activation_bytes  # a device's type is what counts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0, "seq_len": 8}, "batch_size must be a positive int, got 0"),
        ({"batch_size": 2.5, "seq_len": 8}, "batch_size must be a positive int, got 2.5"),
        ({"batch_size": True, "seq_len": 8}, "batch_size must be a positive int, got True"),
        ({"batch_size": 2, "seq_len": -1}, "seq_len must be a positive int, got -1"),
        ({"batch_size": 2, "seq_len": "8"}, "seq_len must be a positive int, got '8'"),
        ({"batch_size": 2}, "batch_size and seq_len go together"),
        ({"seq_len": 8}, "batch_size and seq_len go together"),
        (
            {"batch_size": 2, "seq_len": 33},
            "seq_len 33 exceeds the config's max_position_embeddings 32",
        ),
        ({"batch_size": 2, "seq_len": 8, "device": "tpu"}, "device must be one of"),
    ],
)
def test_bad_batch_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate_memory(tiny_llama().config, **kwargs)


def test_a_step_that_cannot_run_on_meta_is_a_clear_error(monkeypatch):
    class NeedsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, input_ids, labels=None):
            return (self.proj.weight.sum() * input_ids.sum().item(),)  # .item() needs values

    def build(config, kind="causal-lm", num_labels=None):
        with torch.device("meta"):
            return NeedsValues()

    monkeypatch.setattr(memory, "meta_model", build)
    with pytest.raises(RuntimeError, match="NeedsValues cannot run on the meta device"):
        estimate_memory(tiny_llama().config, batch_size=2, seq_len=8)


def test_rank_and_alpha_patterns_reach_the_adapters():
    real = tiny_llama()
    pattern = {"q_proj": 2, "down_proj": 6}
    est = estimate_memory(real.config, method_fields={"rank": 4}, rank_pattern=pattern,
                          alpha_pattern={"q_proj": 4.0})  # fmt: skip
    lx.adapt_(
        real, lx.config("lora", rank=4), "all-linear", exclude=["lm_head"], rank_pattern=pattern
    )
    assert est.trainable_parameters == sum(
        p.numel() for p in lx.trainable_parameters(real).values()
    )


def test_meta_storages_have_an_identity_that_views_share_and_autograd_keeps():
    """What the replay relies on: on meta every data_ptr is 0, but each storage has one Python object for as long
    as it lives, shared by its views, and a weak reference to it dies exactly when the storage does."""
    x = torch.empty(4, 8, device="meta")
    assert x.data_ptr() == 0 == torch.empty(3, device="meta").data_ptr()
    storage = x.untyped_storage()
    assert storage is x.untyped_storage() is x[1:].untyped_storage() is x.t().untyped_storage()
    assert x.view(32).untyped_storage()._cdata == storage._cdata
    assert torch.empty(4, 8, device="meta").untyped_storage() is not storage
    died = []
    ref = weakref.ref(storage, lambda _: died.append("x"))
    del storage  # the tensor still holds it
    view = x[1:]
    del x
    assert not died and ref() is not None
    del view
    assert died == ["x"]
    a = torch.empty(4, 8, device="meta", requires_grad=True)
    b = a * 2
    c = b.sin()  # saves b for backward
    ref = weakref.ref(b.untyped_storage(), lambda _: died.append("b"))
    del b
    assert died == ["x"]
    c.sum().backward()  # frees what it saved
    assert died == ["x", "b"]


def test_the_timeline_counts_a_storage_once_and_frees_it_when_it_dies():
    with replay.Allocations() as timeline:
        x = torch.empty(1000, device="meta")  # 4,000 bytes
        rows = x.view(10, 100)  # a view: nothing new
        y = x * 2  # 8,000 alive
        x.mul_(3)  # in place: nothing new
        del x  # its view keeps it
        z = y + rows.view(1000)  # 12,000 alive: the peak
        del rows  # x's storage dies
        w = z + 1  # 12,000 again
        del y, z, w
    assert timeline.peak(set()) == 12_000
    assert sum(delta for _, delta in timeline.events) == 0


def test_measure_peak_bytes_sees_known_allocations():
    def one_then_another() -> None:
        big = torch.empty(10_000_000, dtype=torch.uint8).fill_(1)
        del big
        torch.empty(2_000_000, dtype=torch.uint8).fill_(1)

    assert measure_peak_bytes(one_then_another, "cpu") == pytest.approx(10_000_000, rel=0.01)

    def two_together() -> None:
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(1_000_000)
        del a, b

    assert measure_peak_bytes(two_together, torch.device("cpu")) == pytest.approx(
        8_000_000, rel=0.01
    )
    held = torch.ones(2_000_000)  # allocated before: not counted
    assert measure_peak_bytes(lambda: held.sum(), "cpu") < 10_000
    for device in ("meta", "tpu"):
        with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
            measure_peak_bytes(lambda: None, device)


@pytest.mark.gpu
def test_measure_peak_bytes_on_cuda():
    def allocate() -> None:
        x = torch.empty(10_000_000, dtype=torch.uint8, device="cuda")
        del x

    assert measure_peak_bytes(allocate, "cuda") == pytest.approx(10_000_000, rel=0.01)


@pytest.mark.slow
def test_smollm2_config_gets_activations_and_keeps_its_other_numbers():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(assets.smollm2_dir())
    before = config.to_dict()
    plain = estimate_memory(config)
    est = estimate_memory(config, batch_size=8, seq_len=512)
    assert config.to_dict() == before
    for field in (
        "base_bytes",
        "adapter_bytes",
        "gradient_bytes",
        "optimizer_bytes",
        "trainable_parameters",
    ):
        assert getattr(est, field) == getattr(plain, field)
    # at least the bf16 logits and the loss's fp32 log-softmax of 8 x 512 tokens over 49,152 words are alive
    logits = 8 * 512 * config.vocab_size
    assert est.activation_bytes > logits * (2 + 4)
    assert est.total_bytes == plain.total_bytes + est.activation_bytes
