"""The `sp` suite: signal-processing problems with known answers: `sensing` and `teacher`.

`sensing`: low-rank matrix sensing of the update. A frozen random W0 (out, in) is adapted; the planted update M*
has rank `true_rank` and singular values from 1 down to 1 / `kappa` (log-spaced); the data are m = `oversample`
x true_rank (out + in) Gaussian measurements y_i = <X_i, M*> + `noise` e_i (the entries of X_i and e_i i.i.d.
N(0, 1), so E <X_i, M>^2 = ||M||_F^2). The loss is the mean squared residual
(<X_i, W' - W0> - y_i)^2, whatever the method's W' is (its `effective_weight()`). Metrics, against the truth:
`relative_error` ||W' - W0 - M*||_F / ||M*||_F, `steps_to_tol` (the first step with relative error <= `tol`, or None),
`subspace_angle` (degrees, the largest principal angle between the top-true_rank left singular subspaces of
W' - W0 and of M*), and the final `loss`; curves of the relative error and the loss every `every` steps.
A non-finite loss (a learning rate past the stable range) raises FloatingPointError: the runner stores a failed run.

Data-aware inits calibrate on the problem's own data: in `teacher`, on the training inputs (activations for EVA and
CorDA, the gradient of the loss at W0 for LoRA-GA and LoRA-One); in `sensing`, which has no layer inputs, only the
gradient-based ones apply (the gradient at W0 is -2/m sum_i y_i X_i, the classical spectral initialisation of
matrix sensing), and an activation-based init is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import loraredux as lx

from ..runner import Outcome
from ..trial import Trial, problem_options

__all__ = [
    "SENSING_DEFAULTS",
    "TEACHER_DEFAULTS",
    "planted_update",
    "sensing",
    "sensing_data",
    "subspace_angle",
    "teacher",
    "teacher_data",
    "teacher_weights",
]

SENSING_DEFAULTS: dict[str, Any] = {
    "out": 24,
    "in": 20,
    "true_rank": 3,
    "kappa": 10.0,
    "noise": 0.0,
    "oversample": 5,
    "tol": 1e-3,
    "every": 10,
}


def planted_update(
    out: int, inp: int, rank: int, kappa: float, gen: torch.Generator
) -> torch.Tensor:
    """U diag(s) V^T (out, in) with orthonormal U, V and s log-spaced from 1 to 1 / kappa (float64)."""
    U, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), rank, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T


def subspace_angle(P: torch.Tensor, Q: torch.Tensor, rank: int) -> float:
    """The largest principal angle, in degrees, between the top-`rank` left singular subspaces of P and Q."""
    Up = torch.linalg.svd(P, full_matrices=False).U[:, :rank]
    Uq = torch.linalg.svd(Q, full_matrices=False).U[:, :rank]
    cosines = torch.linalg.svdvals(Up.T @ Uq).clamp(max=1.0)
    return math.degrees(math.acos(float(cosines.min())))


def sensing_data(
    o: dict[str, Any], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sensing problem's W0 (out, in), planted update M* (out, in), measurement matrices X (m, out, in) and
    measurements y (m,), drawn from `seed` (the options as `SENSING_DEFAULTS`)."""
    gen = torch.Generator().manual_seed(seed)
    out, inp, k = int(o["out"]), int(o["in"]), int(o["true_rank"])
    truth = planted_update(out, inp, k, float(o["kappa"]), gen)  # (out, in)
    m = int(o["oversample"]) * k * (out + inp)
    X = torch.randn(m, out, inp, generator=gen, dtype=torch.float64)  # (m, out, in)
    y = torch.einsum("moi,oi->m", X, truth) + float(o["noise"]) * torch.randn(
        m, generator=gen, dtype=torch.float64
    )
    W0 = 0.3 * torch.randn(out, inp, generator=gen, dtype=torch.float64)  # (out, in)
    return W0, truth, X, y


def sensing(trial: Trial) -> Outcome:
    """One run of low-rank matrix sensing of the update (see the module docstring).

    Raises:
        ValueError: an unknown problem option (naming it and the known ones).
        FloatingPointError: the loss became non-finite.
    """
    o = problem_options(trial, SENSING_DEFAULTS)
    W0, truth, X, y = sensing_data(o, trial.seed)

    def loss_of(update: torch.Tensor) -> torch.Tensor:
        return ((torch.einsum("moi,oi->m", X, update) - y) ** 2).mean()

    if trial.init is not None and "inputs" in lx.init.get(trial.init).needs:
        raise ValueError(
            f"sensing: init {trial.init!r} needs the layer's inputs, and matrix sensing has none (its data are "
            "measurements of the weight); use a gradient-based init (lora_ga, lora_one) or a data-free one"
        )
    # A gradient-based init sees the gradient of the loss at W0 (the model before it is adapted): -2/m sum y_i X_i,
    # whose top subspace is matrix sensing's classical spectral initialisation.
    calibration = ([None], lambda model, _: loss_of(model[0].weight - W0))
    return _fit(trial, W0, truth, loss_of, o, calibration)


TEACHER_DEFAULTS: dict[str, Any] = {
    "out": 24,
    "in": 20,
    "true_rank": 3,
    "subspace": "principal",
    "spectrum": "decaying",
    "amplitude": 0.3,
    "kappa": 1.0,
    "samples": 160,
    "noise": 0.0,
    "tol": 1e-3,
    "every": 10,
}
SUBSPACES = ("principal", "minor", "random")
SPECTRA = ("decaying", "flat")


def teacher_weights(o: dict[str, Any], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (out, in) = U0 diag(s0) V0^T with s0 log-spaced from 1 to 1e-2 ("decaying") or all 1 ("flat"), and the
    planted update of rank k in W0's top-k singular directions ("principal"), its bottom-k ("minor") or random
    ones, with singular values `amplitude` x (1 ... 1 / kappa)."""
    out, inp, k = int(o["out"]), int(o["in"]), int(o["true_rank"])
    n = min(out, inp)
    U0, _ = torch.linalg.qr(torch.randn(out, n, generator=gen, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(inp, n, generator=gen, dtype=torch.float64))
    s0 = (
        torch.logspace(0, -2, n, dtype=torch.float64)
        if o["spectrum"] == "decaying"
        else torch.ones(n, dtype=torch.float64)
    )
    W0 = U0 @ torch.diag(s0) @ V0.T
    s = float(o["amplitude"]) * torch.logspace(
        0, -math.log10(float(o["kappa"])), k, dtype=torch.float64
    )
    if o["subspace"] == "principal":
        U, V = U0[:, :k], V0[:, :k]
    elif o["subspace"] == "minor":
        U, V = U0[:, n - k :], V0[:, n - k :]
    else:
        U, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen, dtype=torch.float64))
    return W0, U @ torch.diag(s) @ V.T


def teacher_data(
    o: dict[str, Any], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher problem's W0 (out, in), planted update (out, in), inputs x (n, in) and the residual target
    x ΔW*^T + noise (n, out) that the update must explain, drawn from `seed` (the options as `TEACHER_DEFAULTS`)."""
    gen = torch.Generator().manual_seed(seed)
    W0, truth = teacher_weights(o, gen)
    n = int(o["samples"])
    x = torch.randn(n, W0.shape[1], generator=gen, dtype=torch.float64)  # (n, in)
    noise = float(o["noise"]) * torch.randn(n, W0.shape[0], generator=gen, dtype=torch.float64)
    return W0, truth, x, x @ truth.T + noise


def teacher(trial: Trial) -> Outcome:
    """Teacher-student adaptation: the student Linear(W0) is adapted to a teacher W0 + Delta W* from n Gaussian
    inputs x and targets (W0 + Delta W*) x + noise e (mean squared error); Delta W* is planted in W0's principal,
    minor or a random subspace (`teacher_weights`). Where the update lies decides which initialisation helps
    (PiSSA: principal, MiLoRA: minor). Metrics as `sensing`.

    Raises:
        ValueError: an unknown or bad problem option.
        FloatingPointError: the loss became non-finite.
    """
    o = problem_options(trial, TEACHER_DEFAULTS)
    if o["subspace"] not in SUBSPACES or o["spectrum"] not in SPECTRA:
        raise ValueError(
            f"teacher: subspace must be one of {SUBSPACES} and spectrum one of {SPECTRA}, got "
            f"{o['subspace']!r} and {o['spectrum']!r}"
        )
    W0, truth, x, residual_target = teacher_data(o, trial.seed)

    def loss_of(update: torch.Tensor) -> torch.Tensor:
        return ((x @ update.T - residual_target) ** 2).mean()

    # A data-aware init calibrates on the training inputs: their activations (EVA, CorDA) and the gradient of the
    # same loss at W0 (LoRA-GA, LoRA-One), -2/(n out) (residual_target^T x), which holds the planted update.
    calibration = (
        [x],
        lambda model, batch: ((model(batch) - batch @ W0.T - residual_target) ** 2).mean(),
    )
    return _fit(trial, W0, truth, loss_of, o, calibration)


def _fit(
    trial: Trial,
    W0: torch.Tensor,
    truth: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    o: dict[str, Any],
    calibration: tuple[list[Any], Callable[[nn.Module, Any], torch.Tensor]],
) -> Outcome:
    """Adapt Linear(W0) with the trial's method, init and optimizer, minimising `loss_of(W' - W0)`, and measure
    the update W' - W0 against `truth` (see the module docstring). `calibration` (batches, loss_fn) is what a
    data-aware init is given."""
    out, inp = W0.shape
    k = int(o["true_rank"])
    torch.manual_seed(trial.seed)
    model = nn.Sequential(nn.Linear(inp, out, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(W0)
    fields = {"rank": trial.rank, **trial.method_options}
    if trial.init is not None:
        fields["init"] = trial.init
    config = lx.config(trial.method, **fields)
    data: dict[str, Any] = {}
    if isinstance(getattr(config, "init", None), str) and lx.init.get(config.init).needs:
        data = {"calibration": calibration[0], "loss_fn": calibration[1]}
    lx.adapt_(model, config, ["0"], **data)
    layer = model[0]
    opt = lx.optim.create(trial.optimizer, model, lr=trial.lr, **trial.optimizer_options)
    norm = torch.linalg.matrix_norm(truth)

    def loss_now() -> torch.Tensor:
        return loss_of(
            layer.effective_weight() - W0
        )  # W0 the original base, even where an init moved it

    def loss_value() -> float:
        with torch.no_grad():
            return float(loss_now())

    def error_now() -> float:
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(layer.effective_weight() - W0 - truth) / norm)

    curves: dict[str, list[float]] = {"relative_error": [error_now()], "loss": [loss_value()]}
    steps_to_tol = None
    for step in range(1, trial.steps + 1):
        opt.zero_grad()
        loss = loss_now()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{trial.problem}: the loss is {loss.item()} at step {step}")
        loss.backward()
        opt.step()
        err = error_now()
        if steps_to_tol is None and err <= o["tol"]:
            steps_to_tol = step
        if step % int(o["every"]) == 0 or step == trial.steps:
            curves["relative_error"].append(err)
            curves["loss"].append(loss_value())
    final = loss_value()
    if not math.isfinite(final):
        raise FloatingPointError(f"{trial.problem}: the loss is {final} after the last step")
    with torch.no_grad():
        update = layer.effective_weight() - W0
    return Outcome(
        metrics={
            "relative_error": error_now(),
            "steps_to_tol": steps_to_tol,
            "subspace_angle": subspace_angle(update, truth, k),
            "loss": final,
        },
        curves=curves,
        trainable_parameters=sum(p.numel() for p in lx.trainable_parameters(model).values()),
    )
