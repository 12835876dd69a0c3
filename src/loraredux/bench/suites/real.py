"""The suites on real models: `classify` (MiniLM on Rotten Tomatoes, test accuracy) and `lm` (SmolLM2-135M
on the King James Bible, held-out perplexity).

Each run is what `loraredux train` does, from the same code (`loraredux.tasks.build_task`, `adapt_for_task` and
`loraredux.train.fit`): the packaged model (a new classification head drawn from the trial's seed), the trial's
method at its rank with its init and method options on the task's default targets, the trial's optimizer at its
learning rate under linear warmup (`warmup` of the steps) and a cosine decay, for `steps` optimizer steps; then the
metric on the fixed held-out set (the same for every trial with the same problem options). The training sample
and the data order follow the seed. A non-finite loss (a learning rate past the stable range) raises
FloatingPointError before that step changes anything: the runner stores a failed run.

A trial with a quantized base (`base`: "nf4", "fp4", "int8") quantizes the model's linear layers before the adapter
goes on (QLoRA; `quantized.py` says how, and how an init that moves the base is computed on the dense weights).

Metrics: the task's metric (`accuracy`, or `perplexity` with the held-out `loss`), `train_loss` (the mean loss over
the last tenth of the steps), `step_seconds` (training time over the steps: forward, backward and optimizer step)
and `adapter_bytes` (the size of the adapter file `lx.save_adapter` writes); on a quantized base also `init_error`
(the adapted layers' relative weight error against the dense model when training starts, `quantized.init_error`).
Curves: `train_loss`, the loss of each step averaged over windows of `every` steps, and the task's metric at every
`eval_every` steps (0: only after the last step).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

import loraredux as lx

from ...tasks import adapt_for_task, build_task
from ...train import TrainConfig, fit
from ..runner import Outcome
from ..trial import Trial, problem_options
from .quantized import adapt_on_base

__all__ = ["CLASSIFY_DEFAULTS", "LM_DEFAULTS", "kjv", "rotten_tomatoes"]

# A problem's own data file (`data`: a path, read as `loraredux train --data PATH` reads it) and its columns.
_DATA_FILE_OPTIONS: dict[str, Any] = {
    "text_column": None,
    "label_column": None,
    "messages_column": None,
    "eval_split": None,
    "eval_fraction": None,
}
CLASSIFY_DEFAULTS: dict[str, Any] = {
    "model": "minilm",
    "data": "rotten_tomatoes",  # or the path of a classification file
    **_DATA_FILE_OPTIONS,
    "train_examples": 2000,
    "eval_examples": 500,
    "batch_size": 32,
    "max_length": 64,
    "targets": None,  # the task's: query, value (and the classifier head is trained)
    "warmup": 0.1,
    "calibration_batches": 8,
    "eval_every": 0,
    "every": 5,
}
LM_DEFAULTS: dict[str, Any] = {
    "model": "smollm2",
    "data": "kjv",  # or the path of a text or chat file
    **_DATA_FILE_OPTIONS,
    "max_tokens": 100_000,
    "eval_examples": 16,  # held-out blocks
    "batch_size": 4,
    "max_length": 128,
    "targets": None,  # the task's: q_proj, v_proj
    "warmup": 0.1,
    "calibration_batches": 4,
    "eval_every": 0,
    "every": 5,
}


def _options(trial: Trial, defaults: dict[str, Any]) -> dict[str, Any]:
    o = problem_options(trial, defaults)
    if not (isinstance(o["warmup"], (int, float)) and 0 <= o["warmup"] <= 1):
        raise ValueError(
            f"{trial.problem}: warmup is a fraction of the steps in [0, 1], got {o['warmup']!r}"
        )
    for name in ("every", "calibration_batches"):
        if not isinstance(o[name], int) or o[name] < 1:
            raise ValueError(f"{trial.problem}: {name} must be an integer >= 1, got {o[name]!r}")
    if not isinstance(o["eval_every"], int) or o["eval_every"] < 0:
        raise ValueError(
            f"{trial.problem}: eval_every must be an integer >= 0, got {o['eval_every']!r}"
        )
    return o


def _finetune(trial: Trial, o: dict[str, Any], kind: str, **build: Any) -> Outcome:
    fields = {"rank": trial.rank, **trial.method_options}
    if trial.init is not None:
        fields["init"] = trial.init
    config = lx.config(trial.method, **fields)  # a bad field fails before any loading
    torch.manual_seed(trial.seed)  # the new classification head
    model, task, _ = build_task(
        o["model"],
        o["data"],
        eval_examples=o["eval_examples"],
        batch_size=o["batch_size"],
        max_length=o["max_length"],
        seed=trial.seed,
        progress=False,
        **{k: o[k] for k in _DATA_FILE_OPTIONS},
        **build,
    )
    if task.kind != kind:
        raise ValueError(
            f"{trial.problem}: data {o['data']!r} is a {task.kind} task; this suite trains {kind}"
        )
    adapt = {
        "steps": trial.steps,
        "targets": o["targets"],
        "calibration_batches": o["calibration_batches"],
    }
    extra: dict[str, float | None] = {}
    if trial.base is None:
        adapt_for_task(model, config, task, progress=False, **adapt)
    else:  # QLoRA and friends: quantize the base, an init that moves it computed on the dense weights
        extra["init_error"] = adapt_on_base(model, config, task, trial.base, **adapt)
    result = fit(
        model,
        task.batches,
        task.loss_fn,
        TrainConfig(
            steps=trial.steps,
            lr=trial.lr,
            warmup_steps=round(o["warmup"] * trial.steps),
            eval_every=o["eval_every"] or None,
            seed=trial.seed,
        ),
        optimizer=lambda _: lx.optim.create(
            trial.optimizer, model, lr=trial.lr, **trial.optimizer_options
        ),
        eval_fn=task.evaluate,
        progress=False,
    )
    final = result.evals[-1][1]  # fit evaluates after the last step
    losses, every = result.losses, o["every"]
    tail = losses[-max(1, len(losses) // 10) :]
    metrics: dict[str, float | None] = {
        **final,
        "train_loss": statistics.fmean(tail),
        "step_seconds": result.seconds / max(1, result.steps),
        "adapter_bytes": _adapter_bytes(model),
        **extra,
    }
    curves: dict[str, list[float | None]] = {
        "train_loss": [
            statistics.fmean(losses[i : i + every]) for i in range(0, len(losses), every)
        ],
        task.metric: [m[task.metric] for _, m in result.evals],
    }
    return Outcome(
        metrics=metrics,
        curves=curves,
        trainable_parameters=sum(p.numel() for p in lx.trainable_parameters(model).values()),
    )


def _adapter_bytes(model: torch.nn.Module) -> float:
    """The size of the adapter file `lx.save_adapter` writes (its default format), in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = lx.save_adapter(model, Path(tmp) / "adapter")
        return float((path / "adapter_model.safetensors").stat().st_size)


def rotten_tomatoes(trial: Trial) -> Outcome:
    """Fine-tune MiniLM (or the classifier folder in `model`) on `train_examples` Rotten Tomatoes snippets (or
    rows of the classification file in `data`, with its column options) and measure the accuracy on
    `eval_examples` test snippets (see the module docstring).

    Raises:
        ValueError: an unknown or bad problem option, or a bad method field.
        FloatingPointError: the loss became non-finite.
    """
    o = _options(trial, CLASSIFY_DEFAULTS)
    return _finetune(trial, o, "classification", train_examples=o["train_examples"])


def kjv(trial: Trial) -> Outcome:
    """Fine-tune SmolLM2-135M (or the causal-LM folder in `model`) on blocks of `max_length` tokens from the first
    `max_tokens` tokens of the King James Bible (or of the text or chat file in `data`, with its column options)
    and measure the perplexity of `eval_examples` held-out blocks (see the module docstring).

    Raises:
        ValueError: an unknown or bad problem option, or a bad method field.
        FloatingPointError: the loss became non-finite.
    """
    o = _options(trial, LM_DEFAULTS)
    return _finetune(trial, o, "causal-lm", max_tokens=o["max_tokens"])
