"""The `sp` suite's sensing problem: it measures against the planted truth (recovered without noise, an error floor
with noise, conditioning slows plain Adam), and a diverging learning rate is a stored failure, not a crash."""

from __future__ import annotations

import math

import pytest
import torch

from loraredux.bench import Store, Trial, expand, run_trials
from loraredux.bench.suites import execute
from loraredux.bench.suites.sp import planted_update, subspace_angle


def trial(optimizer="adamw", lr=1e-2, steps=300, **problem):
    return Trial("sp", "sensing", "lora", 3, optimizer, lr, 0, steps, problem_options=problem)


def test_the_planted_update_has_the_asked_rank_and_condition_number():
    M = planted_update(12, 10, 3, 100.0, torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(M)
    assert torch.allclose(s[:3], torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64))
    assert s[3:].max() < 1e-12


def test_subspace_angle_is_zero_for_one_subspace_and_ninety_for_orthogonal_ones():
    Q, _ = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))
    P = Q[:, :2] @ torch.randn(2, 5, dtype=torch.float64)
    assert subspace_angle(P, Q[:, :2] @ torch.randn(2, 5, dtype=torch.float64), 2) < 1e-5
    assert subspace_angle(P, Q[:, 2:] @ torch.randn(2, 5, dtype=torch.float64), 2) == pytest.approx(
        90.0
    )


def test_noise_free_sensing_is_recovered_and_noise_leaves_a_floor():
    clean = execute(trial(kappa=1.0))
    assert clean.metrics["relative_error"] < 1e-3 and clean.metrics["subspace_angle"] < 1.0
    assert clean.metrics["steps_to_tol"] is not None
    assert clean.curves["relative_error"][0] == pytest.approx(1.0)  # LoRA starts at Delta W = 0
    assert clean.trainable_parameters == 3 * (24 + 20)
    noisy = execute(trial(kappa=1.0, noise=0.3))
    assert noisy.metrics["relative_error"] > 10 * clean.metrics["relative_error"]
    assert noisy.metrics["steps_to_tol"] is None


def test_conditioning_slows_plain_adam_on_the_smallest_direction():
    easy = execute(trial(kappa=1.0)).metrics
    hard = execute(trial(kappa=100.0)).metrics
    assert hard["relative_error"] > 5 * easy["relative_error"]


def test_a_diverging_learning_rate_is_stored_as_a_failed_run(tmp_path):
    spec = {
        "suite": "sp",
        "problems": ["sensing"],
        "optimizers": ["scaled_sgd"],
        "ranks": [3],
        "lrs": [0.05, 5.0],
        "steps": 60,
    }
    store = Store(tmp_path / "results.sqlite")
    summary = run_trials(expand(spec), store, execute, progress=False)
    assert (summary.finished, summary.failed) == (1, 1)
    (failed,) = store.runs("sp", status="failed")
    assert failed.trial.lr == 5.0 and failed.error.startswith(
        "FloatingPointError: sensing: the loss is"
    )
    (ok,) = store.runs("sp")
    assert (
        math.isfinite(ok.metrics["loss"]) and ok.peak_memory_bytes is None
    ) or ok.peak_memory_bytes >= 0


def test_unknown_problem_options_and_problems_are_named():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kapa'\]"):
        execute(trial(kapa=3))
    with pytest.raises(ValueError, match="has no problem 'nosuch'"):
        execute(Trial("sp", "nosuch", "lora", 3, "adamw", 1e-2, 0, 1))


@pytest.mark.parametrize(
    ("subspace", "good", "bad"), [("principal", "pissa", "milora"), ("minor", "milora", "pissa")]
)
def test_teacher_student_rewards_the_init_whose_subspace_holds_the_update(subspace, good, bad):
    """The planted update lies in W0's principal (or minor) singular directions: PiSSA (MiLoRA) starts there and
    ends far closer to it after the same 100 AdamW steps than the init aimed at the other end of the spectrum."""

    def error(init):
        t = Trial("sp", "teacher", "lora", 3, "adamw", 1e-2, 0, 100, init=init,
                  problem_options={"subspace": subspace})  # fmt: skip
        return execute(t).metrics["relative_error"]

    assert error(good) < error(bad) / 3


def test_teacher_weights_plant_the_update_where_asked():
    from loraredux.bench.suites.sp import TEACHER_DEFAULTS, teacher_weights

    for subspace, index in (("principal", slice(0, 3)), ("minor", slice(17, 20))):
        W0, truth = teacher_weights(
            {**TEACHER_DEFAULTS, "subspace": subspace}, torch.Generator().manual_seed(0)
        )
        U0 = torch.linalg.svd(W0).U[:, index]
        U = torch.linalg.svd(truth).U[:, :3]
        assert (
            torch.linalg.svdvals(U0.T @ U).min() > 1 - 1e-9
        )  # the same 3-dimensional column space
    with pytest.raises(ValueError, match="subspace must be one of"):
        execute(
            Trial(
                "sp",
                "teacher",
                "lora",
                3,
                "adamw",
                1e-2,
                0,
                1,
                problem_options={"subspace": "middle"},
            )
        )


@pytest.mark.parametrize("problem", ["sensing", "teacher"])
def test_a_data_aware_init_is_given_the_gradient_of_the_problems_own_loss(problem, monkeypatch):
    """What the init sees: the calibration loss at W0 is the problem's loss of a zero update, and its gradient is the
    analytic one: -2/m sum_i y_i X_i (sensing), -2/(n out) target^T x (teacher), here with the noise that makes the
    target more than the planted update."""
    import loraredux as lx

    seen = {}
    real = lx.adapt_

    def spy(model, config, targets, **kw):
        seen.update(kw, W0=model[0].weight.detach().clone())
        return real(model, config, targets, **kw)

    monkeypatch.setattr(lx, "adapt_", spy)
    options = {"noise": 0.1, **({"subspace": "random"} if problem == "teacher" else {})}
    t = Trial(
        "sp", problem, "lora", 3, "adamw", 1e-2, 0, 1, init="lora_ga", problem_options=options
    )
    execute(t)
    probe = torch.nn.Sequential(torch.nn.Linear(20, 24, bias=False)).double()
    probe[0].weight = torch.nn.Parameter(
        seen["W0"].clone()
    )  # the model as the init sees it: W' = W0
    (batch,) = seen["calibration"]
    loss = seen["loss_fn"](probe, batch)
    loss.backward()
    # rebuild the problem's data from its seed, as the suite does
    from loraredux.bench.suites import sp

    gen = torch.Generator().manual_seed(0)
    if problem == "sensing":
        o = {**sp.SENSING_DEFAULTS, **options}
        truth = planted_update(24, 20, 3, o["kappa"], gen)
        m = o["oversample"] * 3 * (24 + 20)
        X = torch.randn(m, 24, 20, generator=gen, dtype=torch.float64)
        y = torch.einsum("moi,oi->m", X, truth) + 0.1 * torch.randn(
            m, generator=gen, dtype=torch.float64
        )
        assert loss.item() == pytest.approx(float((y**2).mean()), rel=1e-12)
        expected = -2.0 / m * torch.einsum("m,moi->oi", y, X)
    else:
        o = {**sp.TEACHER_DEFAULTS, **options}
        _, truth = sp.teacher_weights(o, gen)
        x = torch.randn(160, 20, generator=gen, dtype=torch.float64)
        target = x @ truth.T + 0.1 * torch.randn(160, 24, generator=gen, dtype=torch.float64)
        assert torch.equal(batch, x)
        assert loss.item() == pytest.approx(float((target**2).mean()), rel=1e-12)
        expected = -2.0 / (160 * 24) * target.T @ x
    torch.testing.assert_close(probe[0].weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_a_gradient_init_starts_in_the_updates_subspace():
    """LoRA-One's start is a rank-3 step along -G, whose top subspace is the planted update's: after one step its
    update lies far closer to the truth's subspace than Kaiming's (which has only that one step)."""

    def angle(problem, init, **options):
        t = Trial("sp", problem, "lora", 3, "adamw", 3e-3, 0, 1, init=init, problem_options=options)
        return execute(t).metrics["subspace_angle"]

    for problem, options in (("teacher", {"subspace": "random"}), ("sensing", {"kappa": 1.0})):
        assert angle(problem, "lora_one", **options) < angle(problem, "kaiming", **options) / 2
    with pytest.raises(ValueError, match="matrix sensing has none"):
        execute(Trial("sp", "sensing", "lora", 3, "adamw", 1e-2, 0, 1, init="eva"))
