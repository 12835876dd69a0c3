"""Alternating solvers on LoRA factor pairs (Axis 2b): AltLoRA and alternating least squares (ALS).

Both update one factor of each pair per `step()`, alternating A, B, A, ... (`first="B"` starts with B, which suits
LoRA's B = 0 initialization, where the A step has nothing to do). The pair's step count is a tensor in the state of
its A, so `state_dict` round-trips and a resumed run alternates as if it had never stopped.

altlora: Yu, Wang, Chen, Xue, "AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with
Alternating Projections", NeurIPS 2025, arXiv 2505.12455. With W' = W0 + s B A, the A step fits s B X to the full
gradient G by least squares, A~ = (1 / s^2) (B^T B + delta I)^{-1} grad_A, and keeps its momentum in the (r, in)
space, carried into the current subspace of B before the new A~ is mixed in (B' is B at A's previous update):

    M_A <- beta (B^T B + delta I)^{-1} B^T B' M_A + (1 - beta) A~,        A <- A (1 - lr wd) - lr M_A

and the B step mirrors it with (A A^T + delta I)^{-1} on the right (`functional.altlora_momentum`). With delta = 0
a step is gauge invariant, the paper's transformation invariance (tests/optim); decoupled weight decay keeps it
(a scalar factor commutes with the gauge). Other trainable tensors take the same momentum step without projection
(M <- beta M + (1 - beta) g).
Where each detail comes from: the stored copy of the paper gave its abstract only (alternating projections, momentum
in the low-rank space, transformation invariance; AltLoRA+ with a second moment loses the invariance, Appendix D.2,
so it is not offered here). The formulas were read from the authors' code (github.com/LucasXinYu/AltLoRA,
`optimizer_new.py`, class `altlora`: (B^T B + reg I)^{-1} grad_A, the momentum carried by (B^T B + reg I)^{-1} B^T
B_old, reg = 1e-3 by default) and from an independent transcription that states it was checked against the paper's
equations (LLaMA-Factory `lora_variants/altlora_attn.py`: the 1 / s^2 of the least-squares fit, one factor per
optimizer step, no bias correction, decoupled weight decay). Deviations, each a choice among those two sources:
one factor per step with a fresh gradient (the authors' script updates both factors from one backward pass);
no Adam-style bias correction of the momentum (their script divides lr by 1 - beta^t); delta is also the damping of
the momentum's carrying solve, as in both. The gradient of the idle factor is computed by autograd and ignored: the
paper's saving of half the backward pass is not claimed.

als: alternating minimization over the blocks {all A} and {all B} (classical ALS for low-rank matrix sensing; e.g.
Jain, Netrapalli, Sanghavi, STOC 2013). Two modes:

- `step(closure)`: the exact minimization of the loss over the current block (each pair's active factor; the other
  factors and all other parameters fixed), exact when the loss is quadratic in the block (least squares through a
  linear adapted layer). It solves (H + damping I) d = -g by conjugate gradients. The Hessian-vector products come
  from the closure by gradient differences, H v = (grad(x + t v) - grad(x)) / t, exact for a quadratic block
  because its gradient is affine, and they need only the usual closure (zero_grad, loss, backward, return loss)
  rather than a double-backward graph (which the usual closure frees). A backtracking (Armijo) line search on
  d then guards the step on losses that are not quadratic in the block: on a quadratic the full step is accepted.
  The CG guard stops at non-positive curvature (falling back to -g at the first iteration) and a direction that is
  not a descent direction is replaced by -g. No learning rate enters this step; a group with lr = 0 is held fixed.
  Other trainable tensors take an SGD step with their gradient at the start.
- `step()` (inside `lx.fit` or HF Trainer): block-coordinate gradient descent, a plain SGD step on each pair's
  active factor while the other factor stays frozen for that step; other tensors take SGD steps every time.
  (SGD keeps the mode stateless, so it is exactly the gradient twin of the closure mode's block structure.)

Options: `first` ("A" or "B"), `cg_tol` (relative residual), `cg_iters` (Hessian-vector products per half-step),
`damping` (added to H). One step is one half-sweep, so one full sweep is two steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import altlora_momentum, conjugate_gradient
from .groups import check_finite, check_options, checked_grad, evaluate, pair_groups
from .pairs import Pair, split_model

__all__ = ["ALTLORA_DELTA", "AltLoRA", "AlternatingLeastSquares"]

ALTLORA_DELTA = 1e-3  # the authors' default `reg` (optimizer_new.py, class altlora)
_ARMIJO = 1e-4  # sufficient decrease constant of the line search (Nocedal & Wright, §3.1)
_BACKTRACKS = 40  # halvings of the line search before it gives up
_PROBE = 1e-2  # ||t v|| / max(1, ||x||): the displacement of a gradient-difference Hessian-vector product


def _check_first(first: str) -> None:
    if first not in ("A", "B"):
        raise ValueError(
            f"first must be 'A' or 'B' (the factor updated at the first step), got {first!r}"
        )


def _active(group: dict[str, Any], step: Tensor) -> int:
    """The index in group["params"] ([A, B]) of the factor this step updates."""
    start = 0 if group["first"] == "A" else 1
    return (start + int(step.item())) % 2


def _step_count(state: dict[str, Tensor], like: Tensor) -> Tensor:
    if "step" not in state:
        state["step"] = torch.zeros(
            (), dtype=torch.float32
        )  # on the CPU, as torch's Adam: no device sync
    return state["step"]


class AltLoRA(torch.optim.Optimizer):
    """AltLoRA: one factor per step, its gradient fitted by least squares in the low-rank space, momentum carried
    across subspaces (see the module docstring).

    Args:
        pairs: the model's factor pairs (`pairs.find_pairs(model)`).
        others: other trainable parameters (momentum SGD).
        lr: learning rate (> 0).
        beta: momentum coefficient in [0, 1).
        delta: damping of the r x r metrics (>= 0; 0 is exactly gauge invariant).
        first: the factor updated at the first step, "A" (the order of the authors' code) or "B" (for B = 0).
        weight_decay: decoupled weight decay (>= 0; it keeps the gauge invariance).

    Raises:
        ValueError: no parameters, a bad option, or a pair whose shapes do not match.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        beta: float = 0.9,
        delta: float = ALTLORA_DELTA,
        first: str = "A",
        weight_decay: float = 0.0,
    ) -> None:
        check_options(lr, delta)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        _check_first(first)
        groups = pair_groups(pairs, others)
        defaults = {
            "lr": lr,
            "beta": beta,
            "delta": delta,
            "first": first,
            "weight_decay": weight_decay,
        }
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One AltLoRA step: every gradient is checked and every new momentum computed before anything changes."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        # (parameter, its state, new momentum, new basis or None, group) for every update, all computed before
        # any is applied, so that an error (a singular metric) leaves parameters and state as they were
        pending: list[tuple[Tensor, dict[str, Tensor], Tensor, Tensor | None, dict[str, Any]]] = []
        counters: list[Tensor] = []
        for group in self.param_groups:
            beta = group["beta"]
            if group["pair"] is None:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    M = state["momentum"] if "momentum" in state else torch.zeros_like(p)
                    pending.append((p, state, beta * M + (1 - beta) * p.grad, None, group))
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue  # the pair took no part in the loss
            step = _step_count(self.state[A], A)
            index = _active(group, step)
            p, other = (A, B) if index == 0 else (B, A)
            state = self.state[p]
            momentum = state["momentum"] if "momentum" in state else torch.zeros_like(p)
            basis = state["basis"] if "basis" in state else torch.zeros_like(other)
            factor = "A" if index == 0 else "B"
            grad = checked_grad(p, f"{group['pair']}.{factor}")
            M = altlora_momentum(
                factor, grad, A, B, momentum, basis, group["scale"], beta, group["delta"]
            )
            # the opposite factor now is the basis the next momentum of this factor is carried from
            pending.append((p, state, M, other.detach().clone(), group))
            counters.append(step)
        for p, state, M, basis, group in pending:
            state["momentum"] = M
            if basis is not None:
                state["basis"] = basis
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(M, alpha=-group["lr"])
        for step in counters:
            step.add_(1)
        return loss


class AlternatingLeastSquares(torch.optim.Optimizer):
    """Alternating minimization over the A block and the B block: exact block solves with a closure, block
    gradient steps without one (see the module docstring).

    Args:
        pairs: the model's factor pairs.
        others: other trainable parameters (SGD).
        lr: the SGD step size of the mode without closure and of the other parameters (> 0).
        first: the block of the first step, "A" or "B".
        cg_tol: conjugate gradients stop at this relative residual (> 0); None: 100 eps of the working dtype
            (2.2e-14 in float64, 1.2e-5 in float32), i.e. the block solve is exact to working precision.
        cg_iters: at most this many Hessian-vector products (closure evaluations) per half-step (>= 1).
        damping: added to the block Hessian in the CG system (>= 0).

    Raises:
        ValueError: no parameters, a bad option, or a pair whose shapes do not match.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        first: str = "A",
        cg_tol: float | None = None,
        cg_iters: int = 100,
        damping: float = 0.0,
    ) -> None:
        check_options(lr, 0.0)
        _check_first(first)
        if not (cg_tol is None or (isinstance(cg_tol, (int, float)) and cg_tol > 0)):
            raise ValueError(f"cg_tol must be None or a number > 0, got {cg_tol!r}")
        if not (isinstance(cg_iters, int) and not isinstance(cg_iters, bool) and cg_iters >= 1):
            raise ValueError(f"cg_iters must be an integer >= 1, got {cg_iters!r}")
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        defaults = {
            "lr": lr,
            "first": first,
            "cg_tol": cg_tol,
            "cg_iters": cg_iters,
            "damping": damping,
        }
        super().__init__(pair_groups(pairs, others), defaults)

    def _blocks(self) -> tuple[list[tuple[dict[str, Any], Tensor]], list[Tensor]]:
        """(group, active factor) of every pair that got a gradient, and those pairs' step counters."""
        active: list[tuple[dict[str, Any], Tensor]] = []
        counters: list[Tensor] = []
        for group in self.param_groups:
            if group["pair"] is None:
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue
            step = _step_count(self.state[A], A)
            active.append((group, group["params"][_active(group, step)]))
            counters.append(step)
        return active, counters

    def _others(self) -> list[tuple[Tensor, Tensor, float]]:
        return [
            (p, p.grad.clone(), group["lr"])
            for group in self.param_groups
            if group["pair"] is None
            for p in group["params"]
            if p.grad is not None
        ]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One half-sweep: an exact block solve with a closure, a block gradient step without one."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        active, counters = self._blocks()
        others = self._others()
        if closure is None:
            for group, p in active:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        else:
            if loss is None:
                raise ValueError(
                    "als: the closure must return the loss (zero_grad, loss, backward, return loss)"
                )
            if not (active or others):
                raise ValueError(
                    "als: after the closure no parameter has a gradient; the closure must call "
                    "loss.backward() (zero_grad, loss, backward, return loss)"
                )
            block = [p for group, p in active if group["lr"] != 0]  # lr = 0 holds a pair fixed
            if block:
                self._solve_block(block, closure, float(loss.detach()))
        for p, g, lr in others:
            p.add_(g, alpha=-lr)
        for step in counters:
            step.add_(1)
        return loss

    def _solve_block(self, block: list[Tensor], closure: Callable[[], Tensor], f0: float) -> None:
        """Minimize the loss over the block by CG on gradient-difference Hessian-vector products, then a
        backtracking line search; the block's parameters end at the accepted point, or unchanged on an error.
        The CG options (cg_tol, cg_iters, damping) are those of the group of the block's first factor: the block
        is solved jointly."""
        group = next(g for g in self.param_groups if any(p is block[0] for p in g["params"]))
        work = torch.promote_types(block[0].dtype, torch.float32)
        x0 = [p.detach().clone() for p in block]
        flat = lambda ts: torch.cat([t.reshape(-1).to(work) for t in ts])  # noqa: E731
        g0 = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in block])  # (n,)
        x = flat(x0)
        reach = _PROBE * max(1.0, float(torch.linalg.vector_norm(x)))

        def place(v: Tensor) -> None:
            """Set the block to x0 + v (v flat)."""
            offset = 0
            for p, start in zip(block, x0, strict=True):
                n = p.numel()
                p.copy_(start + v[offset : offset + n].view_as(p).to(p.dtype))
                offset += n

        def evaluate_at(v: Tensor) -> tuple[float, Tensor]:
            """The loss and the block's gradient at x0 + v (gradients zeroed first, so none accumulate)."""
            place(v)
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = None
            value = evaluate(closure)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block]
            return (math.nan if value is None else float(value.detach())), flat(grads)

        def hvp(v: Tensor) -> Tensor:
            t = reach / max(float(torch.linalg.vector_norm(v)), torch.finfo(work).tiny)
            _, g = evaluate_at(t * v)
            if not torch.isfinite(g).all():
                raise FloatingPointError(
                    "als: a gradient in the conjugate-gradient solve has non-finite entries; no parameter was changed"
                )
            return (g - g0) / t

        try:
            tol = group["cg_tol"] if group["cg_tol"] is not None else 100 * torch.finfo(work).eps
            result = conjugate_gradient(hvp, g0, tol, group["cg_iters"], group["damping"])
            d = result.solution
            slope = float(g0 @ d)  # < 0 for a descent direction
            if not slope < 0:
                # possible only on a non-quadratic block, where the secant operator is not symmetric
                d, slope = -g0, -float(g0 @ g0)
            if slope == 0:
                # the block gradient is exactly zero: the block is already minimal
                place(torch.zeros_like(x))
                return
            t = 1.0
            for _ in range(_BACKTRACKS):
                f, _ = evaluate_at(t * d)
                if f <= f0 + _ARMIJO * t * slope:
                    return  # accepted: the block stays at x0 + t d
                t /= 2
            if -slope <= 64 * torch.finfo(work).eps * max(abs(f0), torch.finfo(work).tiny):
                # the predicted decrease is below rounding: the block is minimal to working precision
                place(torch.zeros_like(x))
                return
            raise RuntimeError(
                f"als: the line search found no decrease of the loss along the block direction in {_BACKTRACKS} "
                f"halvings (loss {f0:.6g}, slope {slope:.3g}); no parameter was changed"
            )
        except BaseException:
            place(torch.zeros_like(x))
            raise


def _altlora(
    model: nn.Module,
    lr: float,
    beta: float = 0.9,
    delta: float = ALTLORA_DELTA,
    first: str = "A",
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """AltLoRA (Yu et al., NeurIPS 2025, arXiv 2505.12455): one factor per step, least-squares projected
    gradients and low-rank momentum; gauge invariant with delta = 0."""
    pairs, others = split_model(model, "altlora")
    return AltLoRA(
        pairs, others, lr=lr, beta=beta, delta=delta, first=first, weight_decay=weight_decay
    )


def _als(
    model: nn.Module,
    lr: float,
    first: str = "A",
    cg_tol: float | None = None,
    cg_iters: int = 100,
    damping: float = 0.0,
) -> torch.optim.Optimizer:
    """Alternating least squares: with a closure each step minimizes the loss exactly over the A block or the B
    block (CG; exact for least squares), without one a block-coordinate SGD step."""
    pairs, others = split_model(model, "als")
    return AlternatingLeastSquares(
        pairs, others, lr=lr, first=first, cg_tol=cg_tol, cg_iters=cg_iters, damping=damping
    )
