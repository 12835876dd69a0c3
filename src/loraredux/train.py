"""One small training loop: AdamW, warmup + cosine, gradient accumulation, evaluation, atomic checkpoints, exact resume.

    for step in 1 .. steps:
        g = (1/k) sum_j grad loss_fn(model, batches((step - 1) k + j))    j = 0 .. k-1 (k = accumulation)
        stop on a non-finite loss or gradient (`NonFiniteError`, nothing changed)
        clip g to max_grad_norm (optional); optimizer step at lr * lr_factor(step - 1); hooks; eval; checkpoint
        stop there if asked (`should_stop`: a graceful Ctrl-C or SIGTERM), with a checkpoint of that step

Data order is a pure function of the micro-step index, and a checkpoint holds everything else that decides what
comes next (trainable tensors and adapter buffers such as AdaLoRA's importance scores and masks, optimizer and
scheduler state, the RNG states), so a run killed at any moment (even during a checkpoint write) and resumed is
bitwise the same as one that never stopped. Only safetensors and JSON are written: nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from . import checkpoint
from .verbs import adapters, penalty_of

__all__ = [
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "epoch_batches",
    "fit",
    "lr_factor",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")
Batch = Any
# Fields that decide the trajectory: a resumed run must agree on them (eval/checkpoint cadence may change).
_MUST_MATCH = ("steps", "lr", "weight_decay", "warmup_steps", "schedule", "accumulation")
_MUST_MATCH += ("max_grad_norm", "seed")


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        orness = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= {low}{orness}, got {value!r}")


def _check_number(name: str, value: Any, positive: bool, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """What `fit` does. Steps count optimizer steps; each one sees `accumulation` micro-batches.

    Args:
        steps: optimizer steps in all.
        lr: the peak learning rate (of the default AdamW; a custom optimizer's own lrs are the peaks).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: linear warmup steps, 0 <= warmup_steps <= steps.
        schedule: "cosine" (warmup, then cosine to 0) or "constant" (warmup, then flat); see `lr_factor`.
        accumulation: micro-batches per optimizer step (their losses are averaged).
        max_grad_norm: clip the total gradient norm to this; None = no clipping.
        eval_every: evaluate every this many steps (and after the last one); None = only after the last.
        checkpoint_every: checkpoint every this many steps (and after the last one); None = only at the end.
        seed: seeds torch, `random` and numpy when a run starts (not when it resumes).
    """

    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    accumulation: int = 1
    max_grad_norm: float | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("TrainConfig.steps", self.steps, 1)
        _check_number("TrainConfig.lr", self.lr, positive=True)
        _check_number("TrainConfig.weight_decay", self.weight_decay, positive=False)
        _check_int("TrainConfig.warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps={self.warmup_steps} exceeds steps={self.steps}"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(
                f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}"
            )
        _check_int("TrainConfig.accumulation", self.accumulation, 1)
        _check_number("TrainConfig.max_grad_norm", self.max_grad_norm, positive=True, optional=True)
        _check_int("TrainConfig.eval_every", self.eval_every, 1, optional=True)
        _check_int("TrainConfig.checkpoint_every", self.checkpoint_every, 1, optional=True)
        _check_int("TrainConfig.seed", self.seed, 0)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiple of the peak lr used by optimizer step `step` (0-based, as `LambdaLR` counts).

    Warmup (nanoGPT's): (step + 1) / (W + 1) for step < W, so no step is wasted at lr 0. Then 1 ("constant"), or
    the cosine 0.5 (1 + cos(pi (step - W) / (steps - W))): 1 at step W, 0 at step `steps` (one past the last).
    """
    w = config.warmup_steps
    if step < w:
        return (step + 1) / (w + 1)
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, config.steps - w))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    """The history of a run; entry i of the lists belongs to optimizer step i + 1.

    Attributes:
        losses: mean loss over each step's micro-batches.
        lrs: the learning rate (first parameter group) each step used.
        grad_norms: the total gradient norm before clipping (only when `max_grad_norm` is set).
        evals: (step, metrics) after each evaluation.
        seconds: wall time spent training, summed over resumed runs; a resumed run counts the time up to the
            checkpoint it resumed from (the work after it, redone, is counted once), so it is the only entry
            that differs from an uninterrupted run's.
    """

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """Optimizer steps done."""
        return len(self.losses)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        """Inverse of `dataclasses.asdict` after a JSON round trip (evals come back as lists)."""
        data = dict(data, evals=[(int(s), dict(m)) for s, m in data["evals"]])
        return cls(**data)


class NonFiniteError(FloatingPointError):
    """Training stopped on a non-finite loss, gradient or parameter; the step that met it changed nothing.

    Attributes:
        step: the optimizer step (1-based) that met it.
        what: "loss", "gradient" or "parameter".
        parameter: the first trainable parameter (in model order) whose gradient (its value, for "parameter") is
            non-finite, e.g. "model.layers.0.self_attn.q_proj.A"; None where every one is finite (a non-finite
            loss whose gradients are all finite).
        layer: the module path of `parameter` (None with it).
        checkpoint: the folder of the last good checkpoint, None where none was written.
        checkpoint_step: the step that checkpoint holds, None with it.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        what: str,
        parameter: str | None,
        checkpoint: Path | None,
        checkpoint_step: int | None,
    ) -> None:
        super().__init__(message)
        self.step, self.what, self.parameter = step, what, parameter
        self.layer = None if parameter is None else parameter.rpartition(".")[0]
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step


class TrainingStopped(KeyboardInterrupt):
    """Training ended at a step boundary because `fit`'s `should_stop` asked (a Ctrl-C or SIGTERM handled
    gracefully); a KeyboardInterrupt, so code that handles Ctrl-C handles it too.

    Attributes:
        step: the last optimizer step done.
        checkpoint: the folder of that step's checkpoint, None without a checkpoint_dir.
    """

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"; its checkpoint is {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training stopped after step {step} as asked{where}")
        self.step, self.checkpoint = step, checkpoint


def _first_non_finite(named: Sequence[tuple[str, nn.Parameter]], grads: bool) -> str | None:
    """The name of the first parameter (in model order) whose gradient (or value) has a NaN or an infinity.

    Called only after a fused check failed, so the per-tensor syncs are paid only then."""
    for name, p in named:
        t = p.grad if grads else p
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


def _seed_everything(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)  # also every CUDA device
    random.seed(seed)
    np.random.seed(seed)


def _evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], dict[str, Any]]) -> dict[str, float]:
    """eval_fn in eval mode without gradients; the RNG states are put back so evaluating never changes training."""
    tensors, plain = checkpoint.rng_state()
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        model.train()
        checkpoint.set_rng_state(tensors, plain)
    try:
        return {str(k): float(v) for k, v in metrics.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise TypeError(f"eval_fn must return a dict of numbers, got {metrics!r}") from err


def epoch_batches(
    examples: Sequence[T], batch_size: int, collate: Callable[[list[T]], Batch], seed: int
) -> Callable[[int], Batch]:
    """Micro-step index -> batch, shuffled per epoch with a permutation seeded by (seed, epoch).

    An epoch is len(examples) // batch_size full batches (the remainder is reshuffled into later epochs); with
    fewer examples than batch_size every batch holds all of them. Batch i is the same in every process.
    """
    import numpy as np

    _check_int("epoch_batches: batch_size", batch_size, 1)
    _check_int("epoch_batches: seed", seed, 0)
    if len(examples) == 0:
        raise ValueError("epoch_batches: no examples")
    n = len(examples)
    size = min(batch_size, n)
    per_epoch = n // size

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> list[int]:
        return np.random.default_rng([seed, epoch]).permutation(n).tolist()

    def batch(i: int) -> Batch:
        if i < 0:
            raise ValueError(f"micro-step index must be >= 0, got {i}")
        epoch, j = divmod(i, per_epoch)
        return collate([examples[k] for k in order(epoch)[j * size : (j + 1) * size]])

    return batch


def _start(
    model: nn.Module,
    params: list[nn.Parameter],
    config: TrainConfig,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
    root: Path | None,
    resume: bool,
    saved_config: dict[str, Any],
    must_match: tuple[str, ...],
) -> tuple[torch.optim.Optimizer, Any, TrainResult]:
    """`fit`'s optimizer, schedule and history: new and seeded, or from the checkpoint; then the space check."""
    if optimizer is None:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned a {type(opt).__name__}, not an Optimizer"
            )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, config=config))
    if resume:
        history = checkpoint.load(root, model, opt, scheduler, saved_config, must_match)
        result = TrainResult.from_dict(history)
    else:
        _seed_everything(config.seed)
        result = TrainResult()
    if root is not None:
        checkpoint.check_space(root, checkpoint.estimate_bytes(model, opt))
    return opt, scheduler, result


def fit(
    model: nn.Module,
    batches: Callable[[int], Batch] | Sequence[Batch],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    config: TrainConfig,
    *,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    signature: Mapping[str, Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the parameters of `model` that require a gradient; see the module docstring for the loop.

    The adapters' regularisers (`lx.penalty(model)`, e.g. AdaLoRA's orthogonality term) are added to each
    micro-batch's loss before backward; `TrainResult.losses` records the task loss alone. Methods that act around
    the optimizer step are called on every module of the model that defines the hook (each module once, shared
    ones too): `module.before_optimizer_step(step)` after clipping and before `optimizer.step()` (PoLAR's landing
    field), and `module.on_optimizer_step(step)` after it, while the gradients are still there (AdaLoRA's rank
    allocator). Their state belongs in buffers, which the checkpoint holds for adapters. Evaluation and
    checkpoints follow each step at the cadence of the config.

    Every step checks the loss and the gradients with one fused norm (one device sync, shared with the loss
    and the clipping) before anything changes; a NaN or an infinity stops the run with a `NonFiniteError` naming
    the step, the first parameter whose gradient is not finite and the last good checkpoint, which is kept. A
    checkpoint is written only from finite parameters. With a `checkpoint_dir`, the folder is created and a file
    written and removed in it, and the free space is compared with a checkpoint's size, before the first step.

    Args:
        model: the model (left in the train/eval mode it came in).
        batches: micro-step index -> batch (data order as a pure function of the step: exact resume), or a
            sequence indexed modulo its length.
        loss_fn: (model, batch) -> scalar loss, the mean over the batch.
        config: the `TrainConfig`.
        optimizer: None for AdamW(lr, weight_decay) over the trainable parameters, or a factory called with
            their list; the schedule scales each group's own lr.
        eval_fn: model -> {metric: number}, run in eval mode under no_grad without disturbing any RNG.
        checkpoint_dir: where `checkpoint/` is written (needed for `checkpoint_every` and `resume`).
        resume: continue from the checkpoint in `checkpoint_dir` (its config must agree on the trajectory).
        signature: JSON values naming what else decides the trajectory (the model, the data, the adapter, the
            optimizer and its options: the caller knows); kept in each checkpoint, and a resume whose signature
            differs is refused, naming the keys.
        should_stop: asked after each step; True ends the run there, at a step boundary: a checkpoint of that
            step is written (with a `checkpoint_dir`), from which `resume=True` continues exactly, and
            `TrainingStopped` is raised. For a graceful Ctrl-C or SIGTERM (`loraredux train` sets a flag in its
            signal handlers).
        progress: a tqdm bar (loss, lr) where stderr is a terminal; elsewhere (a log) a line of the step, loss
            and lr every tenth of the run, through `logging` (INFO, logger `loraredux.train`).

    Raises:
        ValueError: no trainable parameter, a non-scalar loss, a missing `checkpoint_dir`, a checkpoint that
            does not fit the model, the config or the signature. FileNotFoundError: resume without a checkpoint.
        NonFiniteError: a non-finite loss or gradient (raised before that step changes any parameter), or
            non-finite parameters where a checkpoint is due (not written). A `FloatingPointError`.
        TrainingStopped: `should_stop` said so (a KeyboardInterrupt).
        OSError: `checkpoint_dir` cannot be created or written, or its disk has no room for a checkpoint (before
            the first step), or a checkpoint write failed (the previous checkpoint is kept).
    """
    from tqdm.auto import tqdm

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if callable(batches):
        get_batch = batches
    elif isinstance(batches, Sequence) and len(batches) > 0:
        get_batch = lambda i: batches[i % len(batches)]  # noqa: E731
    else:
        raise TypeError("batches must be a callable (micro-step -> batch) or a non-empty sequence")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (adapt it with lx.adapt_)"
        )
    root = None if checkpoint_dir is None else Path(checkpoint_dir)
    if root is None and (resume or config.checkpoint_every is not None):
        raise ValueError("resume and checkpoint_every need a checkpoint_dir")
    saved_config = dataclasses.asdict(config)
    if signature is not None:
        saved_config["signature"] = checkpoint._json_safe(dict(signature), "signature")
    must_match = _MUST_MATCH + ("signature",) * (signature is not None)
    created = root is not None and not root.exists()
    try:
        if root is not None:  # before the optimizer, the model load and the first step
            checkpoint.check_writable(root)
        opt, scheduler, result = _start(
            model, params, config, optimizer, root, resume, saved_config, must_match
        )
    except BaseException:
        if created:  # a refused start leaves no empty folder behind
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    before = [m for m in model.modules() if callable(getattr(m, "before_optimizer_step", None))]
    hooks = [m for m in model.modules() if callable(getattr(m, "on_optimizer_step", None))]
    layers = [
        a for _, a in adapters(model)
    ]  # found once: their penalties join every micro-batch's loss
    wrote_one = resume  # whether root holds a checkpoint of this run (not one of an earlier run)

    def stop(what: str, step: int, parameter: str | None, detail: str) -> NonFiniteError:
        found = checkpoint.find(root) if root is not None and wrote_one else None
        kept = (
            f"the last good checkpoint is {found.path} (step {found.step})"
            if found is not None
            else "no checkpoint was written"
        )
        of = "parameter" if what == "parameter" else "gradient"
        where = "" if parameter is None else f"; the first non-finite {of} is {parameter}"
        done = (
            "no checkpoint was written at this step"
            if what == "parameter"
            else "no parameter was updated at this step"
        )
        return NonFiniteError(
            f"{detail} at step {step}{where}; {done}; {kept}",
            step=step,
            what=what,
            parameter=parameter,
            checkpoint=None if found is None else found.path,
            checkpoint_step=None if found is None else found.step,
        )

    k, start, was_training = config.accumulation, result.steps, model.training
    bar = tqdm(
        total=config.steps, initial=start, disable=None if progress else True, desc="training"
    )
    # where stderr is no terminal (a log), tqdm shows nothing: one logged line per tenth of the run instead
    plain_every = max(1, config.steps // 10) if progress and not sys.stderr.isatty() else 0
    t0, seconds_before = time.perf_counter(), result.seconds
    model.train()
    try:
        for step in range(start + 1, config.steps + 1):
            opt.zero_grad(set_to_none=True)
            total: Tensor | float = 0.0
            for j in range(k):
                loss = loss_fn(model, get_batch((step - 1) * k + j))
                if loss.ndim != 0:
                    raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
                extra = penalty_of(layers)
                ((loss if extra is None else loss + extra) / k).backward()
                low = loss.dtype in (torch.float16, torch.bfloat16)
                total = total + (loss.detach().float() if low else loss.detach())
            # One fused norm over every gradient and one sync per step for it and the loss together.
            summed = torch.as_tensor(total)
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            common = torch.promote_types(
                summed.dtype, norm.dtype
            )  # exact for both; no float64 forced
            both = torch.stack([summed.to(common), norm.to(summed.device, common)])
            loss_sum, norm_value = both.tolist()
            mean_loss = loss_sum / k
            if not math.isfinite(mean_loss):
                bad = _first_non_finite(named, grads=True)
                raise stop("loss", step, bad, f"the loss is {mean_loss}")
            if not math.isfinite(norm_value):
                bad = _first_non_finite(named, grads=True)
                if bad is not None:  # else every gradient is finite and only their norm overflowed
                    raise stop("gradient", step, bad, "a gradient is not finite")
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, config.max_grad_norm, norm)
                result.grad_norms.append(norm_value)
            for module in before:
                module.before_optimizer_step(step)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            scheduler.step()
            result.losses.append(mean_loss)
            result.lrs.append(lr)
            for module in hooks:
                module.on_optimizer_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            last = step == config.steps
            if plain_every and (
                last or step % plain_every == 0
            ):  # a log has no bar: a line instead
                logger.info("step %d/%d: loss %.4f, lr %.2e", step, config.steps, mean_loss, lr)
            if eval_fn is not None and (
                last or (config.eval_every and step % config.eval_every == 0)
            ):
                result.evals.append((step, _evaluate(model, eval_fn)))
                logger.info("step %d: %s", step, result.evals[-1][1])
            result.seconds = seconds_before + time.perf_counter() - t0
            every = config.checkpoint_every
            asked = should_stop is not None and not last and bool(should_stop())
            if root is not None and (last or asked or (every and step % every == 0)):
                finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
                if not bool(finite):  # never replace a good checkpoint by a broken state
                    bad = _first_non_finite(named, grads=False)
                    raise stop("parameter", step, bad, "a parameter is not finite after the update")
                checkpoint.save(
                    root,
                    model,
                    opt,
                    scheduler,
                    saved_config,
                    dataclasses.asdict(result),
                    result.steps,
                )
                wrote_one = True
            if asked:
                saved = None if root is None else checkpoint.find(root)
                raise TrainingStopped(step, None if saved is None else saved.path)
    finally:
        bar.close()
        model.train(was_training)
    return result
