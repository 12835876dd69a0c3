"""The training loop: exact resume, accumulation, the schedule, atomic checkpoints, evaluation and hooks."""

import dataclasses
import errno
import math
import os
import random
import re

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loraredux as lx
from loraredux import checkpoint, train
from loraredux.train import TrainConfig, epoch_batches, fit, lr_factor
from tiny_models import assert_unchanged, snapshot

N_IN, N_OUT, N_EXAMPLES = 6, 3, 48
gen = torch.Generator().manual_seed(123)
X = torch.randn(N_EXAMPLES, N_IN, generator=gen, dtype=torch.float64)
Y = torch.randn(N_EXAMPLES, N_OUT, generator=gen, dtype=torch.float64)


class Tiny(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(N_IN, 16)
        self.drop = nn.Dropout(dropout)
        self.down = nn.Linear(16, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.drop(torch.tanh(self.up(x))))


def make(dropout: float = 0.2, lora: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny(dropout).double()
    if lora:
        lx.adapt_(model, lx.config("lora", rank=2, dropout=dropout), targets=["up", "down"])
    return model


def collate(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return X[idx], Y[idx]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def noisy_mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Draws from python's and numpy's RNGs too, so resume must restore every RNG."""
    return mse(model, batch) * (1 + 0.1 * random.random() + 0.1 * float(np.random.rand()))


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lx.trainable_parameters(model).items()}


def assert_same_run(a: train.TrainResult, b: train.TrainResult) -> None:
    assert (a.losses, a.lrs, a.grad_norms, a.evals) == (b.losses, b.lrs, b.grad_norms, b.evals)


class Crash(RuntimeError):
    pass


def crash_at(micro: int):
    batches = epoch_batches(list(range(N_EXAMPLES)), 4, collate, seed=1)

    def get(i: int):
        if i == micro:
            raise Crash(f"killed at micro-step {i}")
        return batches(i)

    return get


BATCHES = epoch_batches(list(range(N_EXAMPLES)), 4, collate, seed=1)


def test_resume_is_bitwise_identical_with_dropout_and_accumulation(tmp_path):
    cfg = TrainConfig(
        steps=14,
        lr=1e-2,
        warmup_steps=3,
        accumulation=3,
        max_grad_norm=0.5,
        checkpoint_every=4,
        eval_every=5,
        seed=7,
    )
    evals = lambda m: {"noise": float(torch.rand(()))}  # noqa: E731  (consumes RNG: must not matter)
    model = make()
    full = fit(
        model, BATCHES, noisy_mse, cfg, eval_fn=evals, checkpoint_dir=tmp_path / "a", progress=False
    )

    with pytest.raises(Crash):  # dies during step 10: the last checkpoint is step 8
        fit(
            make(),
            crash_at(9 * 3 + 1),
            noisy_mse,
            cfg,
            eval_fn=evals,
            checkpoint_dir=tmp_path / "b",
            progress=False,
        )
    again = make()
    resumed = fit(
        again,
        BATCHES,
        noisy_mse,
        cfg,
        eval_fn=evals,
        checkpoint_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )

    assert_same_run(full, resumed)
    assert [s for s, _ in resumed.evals] == [5, 10, 14]
    for name, value in trainable(model).items():
        assert torch.equal(value, trainable(again)[name]), name
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint"]
    # Only safetensors and JSON on disk.
    assert sorted(os.listdir(tmp_path / "b" / "checkpoint")) == [
        "state.json",
        "tensors.safetensors",
    ]


def test_evaluation_does_not_change_training():
    cfg = TrainConfig(steps=6, lr=1e-2, eval_every=1, seed=2)
    a, b = make(), make()
    noise = lambda m: {"r": float(torch.rand(())) + random.random() + np.random.rand()}  # noqa: E731
    fit(a, BATCHES, noisy_mse, cfg, eval_fn=noise, progress=False)
    fit(b, BATCHES, noisy_mse, cfg, progress=False)
    for name, value in trainable(a).items():
        assert torch.equal(value, trainable(b)[name]), name


def test_micro_steps_are_asked_for_in_order_and_resume_continues_them(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, accumulation=3, checkpoint_every=2)
    asked: list[int] = []

    def recorded(i: int):
        asked.append(i)
        if len(asked) == 8:  # dies in step 3, after the step-2 checkpoint
            raise Crash
        return BATCHES(i)

    with pytest.raises(Crash):
        fit(make(), recorded, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    asked.clear()
    fit(
        make(),
        lambda i: asked.append(i) or BATCHES(i),
        mse,
        cfg,
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert asked == list(range(6, 12))
    fixed = [collate([0, 1]), collate([2, 3])]  # a sequence is indexed modulo its length
    seq = fit(make(dropout=0.0), fixed, mse, TrainConfig(steps=2, lr=1e-2), progress=False)
    assert seq.losses[1] != seq.losses[0]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_accumulating_k_micro_batches_equals_one_step_on_their_concatenation(optimizer):
    factory = None if optimizer == "adamw" else (lambda ps: torch.optim.SGD(ps, lr=0.1))
    k, b = 4, 3
    micro = lambda i: collate(list(range(i * b, (i + 1) * b)))  # noqa: E731
    whole = lambda i: collate(list(range(i * k * b, (i + 1) * k * b)))  # noqa: E731
    models = make(dropout=0.0), make(dropout=0.0)
    fit(
        models[0],
        micro,
        mse,
        TrainConfig(steps=3, lr=0.05, schedule="constant", accumulation=k),
        optimizer=factory,
        progress=False,
    )
    fit(
        models[1],
        whole,
        mse,
        TrainConfig(steps=3, lr=0.05, schedule="constant"),
        optimizer=factory,
        progress=False,
    )
    before = trainable(make(dropout=0.0))
    assert not all(torch.equal(v, before[n]) for n, v in trainable(models[0]).items())
    for name, value in trainable(models[0]).items():
        torch.testing.assert_close(value, trainable(models[1])[name], rtol=1e-10, atol=1e-12)


def test_warmup_then_cosine_follows_the_formula():
    cfg = TrainConfig(steps=20, lr=0.1, warmup_steps=4, seed=0)
    result = fit(make(), BATCHES, mse, cfg, progress=False)
    assert result.lrs[:4] == pytest.approx([0.1 * (s + 1) / 5 for s in range(4)], rel=1e-12)
    for s in range(4, 20):
        expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        assert result.lrs[s] == pytest.approx(expected, rel=1e-12)
    assert result.lrs[4] == pytest.approx(0.1)  # the peak right after warmup
    assert lr_factor(12, cfg) == pytest.approx(0.5)  # half way down
    assert lr_factor(20, cfg) == 0.0  # reaches 0 one past the last step
    assert all(x > y for x, y in zip(result.lrs[4:], result.lrs[5:], strict=False))


def test_constant_schedule_after_warmup():
    cfg = TrainConfig(steps=6, lr=0.1, warmup_steps=2, schedule="constant")
    assert fit(make(), BATCHES, mse, cfg, progress=False).lrs == pytest.approx(
        [0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.1, 0.1]
    )


def test_a_disk_full_mid_write_keeps_the_previous_checkpoint_and_leaves_nothing(
    tmp_path, monkeypatch
):
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2, seed=1)
    full = fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    tmp_path = tmp_path / "run"
    real, calls = safetensors.torch.save_file, []

    def failing(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint dies half written
            with open(path, "wb") as fh:
                fh.write(b"\x00" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="checkpoint of step 4") as caught:
        fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert caught.value.errno == errno.ENOSPC
    assert f"the checkpoint of step 2 is kept in {tmp_path / 'checkpoint'}" in str(caught.value)
    assert "No space left on device" in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]  # no temporary folder left behind
    assert checkpoint.find(tmp_path).step == 2
    resumed = fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same_run(full, resumed)


def test_a_disk_without_room_for_a_checkpoint_is_found_before_training(tmp_path, monkeypatch):
    asked: list[int] = []
    model = make()
    before = trainable(model)
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    cfg = TrainConfig(steps=4, lr=1e-2, checkpoint_every=2)
    with pytest.raises(
        OSError, match=r"not enough room for a checkpoint in .*MiB needed"
    ) as caught:
        fit(
            model,
            lambda i: asked.append(i) or BATCHES(i),
            mse,
            cfg,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
        )
    assert caught.value.errno == errno.ENOSPC
    assert asked == [] and not (tmp_path / "ckpt").exists()  # no step, no empty folder
    for name, value in trainable(model).items():
        assert torch.equal(value, before[name])
    # the estimate: trainable tensors and two AdamW moments, before the first step creates them
    opt = torch.optim.AdamW(list(lx.trainable_parameters(model).values()))
    n_bytes = sum(p.numel() * 8 for p in lx.trainable_parameters(model).values())
    assert checkpoint.estimate_bytes(model, opt) >= 3 * n_bytes


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(
    tmp_path, monkeypatch
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = TrainConfig(steps=2, lr=1e-2, checkpoint_every=1)
    with pytest.raises(OSError, match=f"{re.escape(str(blocker))} is a file, not a directory"):
        fit(make(), BATCHES, mse, cfg, checkpoint_dir=blocker / "ckpt", progress=False)
    with pytest.raises(OSError, match="is a file, not a directory"):
        fit(make(), BATCHES, mse, cfg, checkpoint_dir=blocker, progress=False)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "TemporaryFile", denied)
    with pytest.raises(OSError, match=r"ckpt is not writable \(Permission denied\)"):
        fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_checkpoint_folder_is_refused_before_training(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match="is not writable"):
            fit(
                make(),
                BATCHES,
                mse,
                TrainConfig(steps=2, lr=1e-2, checkpoint_every=1),
                checkpoint_dir=folder,
                progress=False,
            )
    finally:
        folder.chmod(0o755)


def test_a_failure_between_the_renames_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2, seed=1)
    full = fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    tmp_path = tmp_path / "run"
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # second checkpoint: `checkpoint` moved aside, the new one not yet in
            raise OSError("power cut")
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match=r"power cut.*checkpoint of step 2 is kept"):
        fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert checkpoint.find(tmp_path).step == 2
    resumed = fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same_run(full, resumed)


def test_resume_reads_what_a_kill_between_the_renames_leaves_and_removes_the_leftovers(tmp_path):
    """A process killed after `checkpoint/` was moved aside and before the new one was renamed in leaves the
    previous checkpoint as `.checkpoint.old/` and the new one as a temporary folder (no cleanup ran)."""
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2, seed=1)
    full = fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path / "full", progress=False)
    run = tmp_path / "run"
    with pytest.raises(Crash):  # dies in step 3, after the step-2 checkpoint
        fit(make(), crash_at(2), mse, cfg, checkpoint_dir=run, progress=False)
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    (run / ".checkpoint.tmp-dead").mkdir()
    (run / ".checkpoint.tmp-dead" / "tensors.safetensors").write_bytes(b"\x00" * 8)
    assert checkpoint.find(run).path == run / ".checkpoint.old"
    resumed = fit(make(), BATCHES, mse, cfg, checkpoint_dir=run, resume=True, progress=False)
    assert_same_run(full, resumed)
    assert sorted(os.listdir(run)) == ["checkpoint"]


def test_eval_fn_runs_at_the_right_steps_in_eval_mode():
    seen = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        seen.append((model.training, torch.is_grad_enabled()))
        return {"loss": float(mse(model, collate(list(range(8)))))}

    model = make()
    result = fit(
        model,
        BATCHES,
        mse,
        TrainConfig(steps=7, lr=1e-2, eval_every=3),
        eval_fn=evaluate,
        progress=False,
    )
    assert [s for s, _ in result.evals] == [3, 6, 7]
    assert seen == [(False, False)] * 3
    assert model.training  # left in the mode it came in
    in_eval_mode = make().eval()
    only_last = fit(
        in_eval_mode, BATCHES, mse, TrainConfig(steps=4, lr=1e-2), eval_fn=evaluate, progress=False
    )
    assert [s for s, _ in only_last.evals] == [4]
    assert not in_eval_mode.training


def test_lora_fits_a_low_rank_regression():
    torch.manual_seed(0)
    base = nn.Linear(12, 8).double()
    teacher = base.weight.detach() + 0.5 * torch.randn(8, 2, dtype=torch.float64) @ torch.randn(
        2, 12, dtype=torch.float64
    )
    x = torch.randn(256, 12, dtype=torch.float64)
    y = x @ teacher.T + base.bias.detach()
    model = nn.Sequential(base)
    lx.adapt_(model, lx.config("lora", rank=2, alpha=2), targets=["0"])
    batches = epoch_batches(list(range(256)), 32, lambda i: (x[i], y[i]), seed=0)
    result = fit(
        model, batches, mse, TrainConfig(steps=150, lr=0.05, warmup_steps=10), progress=False
    )
    assert result.losses[-1] < 1e-3 * result.losses[0]


def test_on_optimizer_step_hook_gets_each_step():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[int] = []

        def on_optimizer_step(self, step: int) -> None:
            self.steps.append(step)

    model = make()
    model.counter = Counter()
    fit(model, BATCHES, mse, TrainConfig(steps=5, lr=1e-2, accumulation=2), progress=False)
    assert model.counter.steps == [1, 2, 3, 4, 5]


def test_before_optimizer_step_sees_clipped_gradients_before_the_update_once_per_module():
    class Probe(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            object.__setattr__(self, "model", model)  # a plain reference, not a submodule
            self.calls: list[tuple[int, float, bool]] = []
            self.last: dict[str, torch.Tensor] = {}

        def before_optimizer_step(self, step: int) -> None:
            params = lx.trainable_parameters(self.model)
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params.values()]))
            unchanged = all(torch.equal(p, self.last.get(n, p)) for n, p in params.items())
            self.calls.append((step, float(norm), unchanged))

        def on_optimizer_step(self, step: int) -> None:
            self.last = trainable(self.model)

    model = make(dropout=0.0)
    probe = Probe(model)
    model.first, model.second = probe, probe  # one module at two paths: called once per step
    config = TrainConfig(steps=4, lr=1e-2, max_grad_norm=1e-3)
    fit(model, BATCHES, mse, config, progress=False)
    assert [c[0] for c in probe.calls] == [1, 2, 3, 4]
    assert all(norm <= 1e-3 * (1 + 1e-9) for _, norm, _ in probe.calls)  # after clipping
    assert all(unchanged for _, _, unchanged in probe.calls)  # before the optimizer moved anything


def test_the_adapters_penalty_is_added_to_the_loss_but_not_to_the_recorded_loss():
    class PenalisedLoRA(lx.LoRA):  # not registered: built by hand
        def penalty(self) -> torch.Tensor:
            return 0.5 * self.A.square().sum()

    def build(penalised: bool) -> nn.Module:
        torch.manual_seed(0)
        model = Tiny().double()
        cls = PenalisedLoRA if penalised else lx.LoRA
        model.up = cls(model.up, lx.config("lora", rank=2))
        model.down.requires_grad_(False)
        return model

    batch = collate(list(range(8)))
    plain, penalised = build(False), build(True)
    expected = 0.5 * penalised.up.A.detach().square().sum()
    torch.testing.assert_close(lx.penalty(penalised).detach(), expected, rtol=1e-12, atol=0)
    assert lx.penalty(plain) is None
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    config = TrainConfig(steps=1, lr=0.1, schedule="constant")
    A0 = penalised.up.A.detach().clone()
    r_plain = fit(plain, [batch], mse, config, optimizer=sgd, progress=False)
    r_pen = fit(penalised, [batch], mse, config, optimizer=sgd, progress=False)
    assert r_plain.losses == r_pen.losses  # the task loss alone is recorded
    # SGD on loss + 0.5 ||A||^2 moves A by an extra -lr * A compared with the plain run.
    torch.testing.assert_close(penalised.up.A, plain.up.A - 0.1 * A0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "fields",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"weight_decay": -0.1},
        {"warmup_steps": 11},
        {"warmup_steps": -1},
        {"schedule": "linear"},
        {"accumulation": 0},
        {"accumulation": True},
        {"max_grad_norm": 0.0},
        {"eval_every": 0},
        {"checkpoint_every": -2},
        {"seed": -1},
    ],
)
def test_bad_config_values_raise(fields):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**{"steps": 10, "lr": 1e-3, **fields})


def test_resume_refuses_a_missing_checkpoint_or_another_config(tmp_path):
    cfg = TrainConfig(steps=3, lr=1e-2, checkpoint_every=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    other = TrainConfig(steps=3, lr=2e-2, checkpoint_every=1)
    with pytest.raises(ValueError, match=re.escape("lr: checkpoint 0.01, given 0.02")):
        fit(make(), BATCHES, mse, other, checkpoint_dir=tmp_path, resume=True, progress=False)
    wider = make()
    lx.unadapt_(wider)
    lx.adapt_(wider, lx.config("lora", rank=3), targets=["up", "down"])
    with pytest.raises(ValueError, match="does not fit this model"):
        fit(wider, BATCHES, mse, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(make(), BATCHES, mse, cfg, progress=False)


def test_a_resume_whose_moved_base_would_hold_nan_changes_nothing(tmp_path):
    """PiSSA's checkpoint holds its initial factors, from which a resume moves the base: a NaN there is refused
    before any tensor of the model changes, and unadapt_ still gives the original weights."""

    def pissa() -> nn.Module:
        torch.manual_seed(0)
        return lx.adapt_(
            Tiny(0.0).double(), lx.config("lora", rank=2, init="pissa"), ["up", "down"]
        )

    cfg = TrainConfig(steps=2, lr=1e-2, checkpoint_every=1)
    fit(pissa(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoint" / "tensors.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["model.up.B0"] = torch.full_like(tensors["model.up.B0"], math.nan)
    safetensors.torch.save_file(tensors, path)

    model = pissa()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"up\.B0.*NaN"):
        fit(model, BATCHES, mse, cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_unchanged(model, before)
    torch.manual_seed(0)
    original = Tiny(0.0).double()
    lx.unadapt_(model)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "factory",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    ],
)
def test_optimizer_state_round_trips_through_tensors_and_json(factory):
    model = make()
    opt = factory(list(lx.trainable_parameters(model).values()))
    for _ in range(2):
        opt.zero_grad()
        mse(model, BATCHES(0)).backward()
        opt.step()
    tensors, plain = checkpoint._flatten_optimizer(opt.state_dict())
    fresh = factory(list(lx.trainable_parameters(model).values()))
    fresh.load_state_dict(checkpoint._unflatten_optimizer(tensors, plain, fresh.state_dict()))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, values in a["state"].items():
        for key, value in values.items():
            other = b["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


class TransposedMomentum(torch.optim.SGD):
    """SGD that also keeps a transposed copy of each 2-D gradient (as AltLoRA keeps B's momentum)."""

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.param_groups[0]["params"]:
            if p.grad is not None and p.ndim == 2:
                self.state[p]["t"] = p.grad.T.contiguous().T * 1.0
        return super().step(closure)


def test_restored_state_tensors_keep_their_layout_in_fresh_aligned_memory(tmp_path):
    """CPU BLAS rounds differently on a transposed or a misaligned operand, so an exact resume needs both kept."""
    factory = lambda ps: TransposedMomentum(ps, lr=1e-2)  # noqa: E731
    cfg = TrainConfig(steps=2, lr=1e-2, checkpoint_every=2)
    model = make()
    fit(model, BATCHES, mse, cfg, optimizer=factory, checkpoint_dir=tmp_path, progress=False)
    fresh = make()
    params = list(lx.trainable_parameters(fresh).values())
    opt = factory(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    config = dataclasses.asdict(cfg)
    checkpoint.load(tmp_path, fresh, opt, sched, config, train._MUST_MATCH)
    transposed = [opt.state[p]["t"] for p in params if p.ndim == 2]
    assert transposed and all(t.ndim == 2 and not t.is_contiguous() for t in transposed)
    assert all(t.stride() == (1, t.shape[0]) for t in transposed)
    for p in params:
        assert p.data_ptr() % 64 == 0 and all(t.data_ptr() % 64 == 0 for t in opt.state[p].values())


def test_resume_refuses_another_signature_naming_the_keys(tmp_path):
    cfg = TrainConfig(steps=4, lr=1e-2, checkpoint_every=2)
    sig = {"optimizer": "adamw", "data": {"name": "x", "examples": 48}}
    with pytest.raises(Crash):
        fit(make(), crash_at(2), mse, cfg, checkpoint_dir=tmp_path, signature=sig, progress=False)
    other = {"optimizer": "lora_rite", "data": {"name": "x", "examples": 64}}
    with pytest.raises(ValueError, match="another config") as caught:
        fit(
            make(),
            BATCHES,
            mse,
            cfg,
            checkpoint_dir=tmp_path,
            resume=True,
            signature=other,
            progress=False,
        )
    assert "signature.data.examples: checkpoint 48, given 64" in str(caught.value)
    assert "signature.optimizer: checkpoint 'adamw', given 'lora_rite'" in str(caught.value)
    assert checkpoint.find(tmp_path).config["signature"] == sig
    resumed = fit(
        make(),
        BATCHES,
        mse,
        cfg,
        checkpoint_dir=tmp_path,
        resume=True,
        signature=sig,
        progress=False,
    )
    assert resumed.steps == 4


def test_the_next_save_removes_what_killed_writes_left(tmp_path):
    (tmp_path / ".checkpoint.tmp-dead").mkdir()
    (tmp_path / ".checkpoint.tmp-dead" / "state.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's file")
    cfg = TrainConfig(steps=2, lr=1e-2, checkpoint_every=1)
    fit(make(), BATCHES, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "notes.txt"]


def test_a_non_finite_loss_stops_before_the_update():
    model = make()
    before = trainable(model)
    nan_loss = lambda m, b: mse(m, b) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="step 1"):
        fit(model, BATCHES, nan_loss, TrainConfig(steps=2, lr=1e-2), progress=False)
    for name, value in trainable(model).items():
        assert torch.equal(value, before[name])


class Snapshots(nn.Module):
    """Keeps the trainable parameters after each optimizer step (a plain reference to the model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_optimizer_step(self, step: int) -> None:
        self.after[step] = trainable(self.model)


def test_a_nan_loss_names_the_step_the_first_layer_and_the_last_good_checkpoint(tmp_path):
    model = make()
    model.snapshots = Snapshots(model)

    def nan_at_step_5(m: nn.Module, batch) -> torch.Tensor:  # accumulation 2: micro-steps 8 and 9
        loss = mse(m, batch)
        at_step_5 = m.training and len(m.snapshots.after) == 4
        return loss * float("nan") if at_step_5 else loss

    cfg = TrainConfig(steps=8, lr=1e-2, accumulation=2, checkpoint_every=2, seed=4)
    with pytest.raises(train.NonFiniteError) as caught:
        fit(model, BATCHES, nan_at_step_5, cfg, checkpoint_dir=tmp_path, progress=False)
    err = caught.value
    assert isinstance(err, FloatingPointError)
    assert (err.step, err.what, err.checkpoint_step) == (5, "loss", 4)
    assert err.checkpoint == tmp_path / "checkpoint"
    # every gradient is NaN: the first in model order is named
    assert (err.parameter, err.layer) == ("up.A", "up")
    assert str(err) == (
        "the loss is nan at step 5; the first non-finite gradient is up.A; no parameter was updated at this "
        f"step; the last good checkpoint is {tmp_path / 'checkpoint'} (step 4)"
    )
    for name, value in trainable(model).items():  # as step 4 left them
        assert torch.equal(value, model.snapshots.after[4][name]), name
    assert checkpoint.find(tmp_path).step == 4 and sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_an_infinite_gradient_in_one_layer_is_named_and_changes_nothing():
    model = make()
    model.snapshots = Snapshots(model)
    poison = model.down.B.register_hook(
        lambda g: torch.full_like(g, math.inf) if len(model.snapshots.after) == 2 else g
    )
    with pytest.raises(train.NonFiniteError) as caught:
        fit(model, BATCHES, mse, TrainConfig(steps=5, lr=1e-2, max_grad_norm=1.0), progress=False)
    poison.remove()
    err = caught.value
    assert (err.step, err.what, err.parameter, err.layer) == (3, "gradient", "down.B", "down")
    assert (err.checkpoint, err.checkpoint_step) == (None, None)
    assert str(err) == (
        "a gradient is not finite at step 3; the first non-finite gradient is down.B; no parameter was "
        "updated at this step; no checkpoint was written"
    )
    for name, value in trainable(model).items():
        assert torch.equal(value, model.snapshots.after[2][name]), name


def test_a_non_finite_parameter_is_never_checkpointed(tmp_path):
    class Breaker(
        nn.Module
    ):  # a parameter turns infinite in the update of step 4, a checkpoint step
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            object.__setattr__(self, "model", model)

        @torch.no_grad()
        def on_optimizer_step(self, step: int) -> None:
            if step == 4:
                self.model.down.A[0, 1] = math.inf

    model = make()
    model.breaker = Breaker(model)
    cfg = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2)
    with pytest.raises(train.NonFiniteError) as caught:
        fit(model, BATCHES, mse, cfg, checkpoint_dir=tmp_path, progress=False)
    err = caught.value
    assert (err.step, err.what, err.parameter, err.checkpoint_step) == (4, "parameter", "down.A", 2)
    assert str(err) == (
        "a parameter is not finite after the update at step 4; the first non-finite parameter is down.A; "
        f"no checkpoint was written at this step; the last good checkpoint is {tmp_path / 'checkpoint'} "
        "(step 2)"
    )
    assert checkpoint.find(tmp_path).step == 2 and sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_a_gradient_norm_that_overflows_is_no_error():
    """Finite gradients whose squares overflow make an infinite norm: the per-parameter search finds no
    culprit and training goes on."""
    model = make(dropout=0.0)
    huge = lambda m, b: mse(m, b) * 1e160  # noqa: E731  (gradients ~1e160: their squares overflow float64)
    sgd = lambda ps: torch.optim.SGD(ps, lr=1e-170)  # noqa: E731
    result = fit(
        model, BATCHES, huge, TrainConfig(steps=2, lr=1e-170), optimizer=sgd, progress=False
    )
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_no_trainable_parameter_is_an_error():
    model = make(lora=False).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit(model, BATCHES, mse, TrainConfig(steps=1, lr=1e-2), progress=False)


def test_epoch_batches_are_a_pure_function_of_the_step():
    rows = list(range(10))
    batches = epoch_batches(rows, 3, list, seed=5)
    first_epoch = [batches(i) for i in range(3)]  # 10 // 3 = 3 full batches per epoch
    assert len({x for b in first_epoch for x in b}) == 9
    assert epoch_batches(rows, 3, list, seed=5)(4) == batches(4)  # same in a fresh helper
    assert batches(3) != batches(0) or batches(4) != batches(1)  # a new permutation each epoch
    assert epoch_batches(rows, 3, list, seed=6)(0) != batches(0)
    assert sorted(epoch_batches(rows, 32, list, seed=0)(7)) == rows  # fewer rows than a batch
    with pytest.raises(ValueError, match="no examples"):
        epoch_batches([], 3, list, seed=0)


@given(steps=st.integers(1, 500), data=st.data())
def test_lr_factor_rises_then_falls_within_zero_and_one(steps, data):
    warmup = data.draw(st.integers(0, steps))
    cfg = TrainConfig(steps=steps, lr=1.0, warmup_steps=warmup)
    factors = [lr_factor(s, cfg) for s in range(steps)]
    assert all(0.0 < f <= 1.0 for f in factors)
    assert factors[:warmup] == sorted(factors[:warmup])  # rising
    assert factors[warmup:] == sorted(factors[warmup:], reverse=True)  # then falling
    if warmup < steps:
        assert factors[warmup] == 1.0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_get_the_usual_permissions(tmp_path, umask):
    """Another user (a serving or evaluation process) can read a checkpoint wherever the umask lets it."""
    old = os.umask(umask)
    try:
        fit(
            make(),
            BATCHES,
            mse,
            TrainConfig(steps=1, lr=1e-2),
            checkpoint_dir=tmp_path,
            progress=False,
        )
    finally:
        os.umask(old)
    folder = tmp_path / "checkpoint"
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
    for name in ("tensors.safetensors", "state.json"):
        assert os.stat(folder / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_where_stderr_is_no_terminal_progress_is_a_logged_line_per_tenth(caplog, monkeypatch):
    monkeypatch.setattr(train.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="loraredux.train"):
        fit(make(), BATCHES, mse, TrainConfig(steps=20, lr=1e-2), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in lines] == [f"step {k}/20" for k in range(2, 21, 2)]
    caplog.clear()
    with caplog.at_level("INFO", logger="loraredux.train"):
        fit(make(), BATCHES, mse, TrainConfig(steps=20, lr=1e-2), progress=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]
