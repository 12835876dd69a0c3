"""AdamW that moves each factor pair to an equivalent, balanced factorization: RefLoRA, RefLoRA-S and BaLoRA.

    reflora    (mode="precondition", the default)  grad_A <- S^{-1} grad_A,  grad_B <- grad_B S,  then AdamW;
               S = P P^T = (A A^T + delta I)^{-1} # (B^T B + delta I)
    reflora    (mode="refactor")  A <- P^T A,  B <- B P^{-T}  (grad_A <- P^{-1} grad_A, grad_B <- grad_B P), AdamW
    reflora_s  s = ||B||_F / ||A||_F:  A <- sqrt(s) A,  B <- B / sqrt(s),  AdamW's moments rescaled, then AdamW
    balora     AdamW, then (A, B) <- the balanced pair with the same B A (A A^T = B^T B)

RefLoRA / RefLoRA-S: Zhang, Li, Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of
Large Models", NeurIPS 2025, arXiv 2505.18877. The paper's text beyond its abstract could not be reached here; every
detail below is from the authors' code (github.com/zhangyilang/RefLoRA, `reflora/reflora.py`, `reflora/trainer.py`,
`NLU/run_glue.py`, the run scripts). P and S: see `functional.refactor`.
- Base optimizer: AdamW. `RefTrainer` hooks the `Refactorer` into the HF `Trainer`'s own optimizer (torch AdamW,
  weight decay 0 in their scripts and the Trainer's default), so `weight_decay` defaults to 0 here.
- RefLoRA runs as preconditioning (`dummy_step`, a step pre-hook): AdamW's moments accumulate the preconditioned
  gradients. `mode="refactor"` is their `Refactorer.step` (the literal refactoring, which their hooks do not use):
  the pair itself is replaced and, as there, AdamW's moments are left as they are (no exact transport of Adam's
  second moment through a matrix P exists). The gradient already computed at the old pair is carried to the new one
  by the chain rule. The signs of P's columns (eigh's, arbitrary) are chosen so the refactored pair is nearest the
  current one, so that repeated refactors do not flip rows against the moments.
- RefLoRA-S refactors (a step post-hook, plus once when attached) and rescales AdamW's moments: exp_avg by 1/sqrt(s)
  (A) and sqrt(s) (B), exp_avg_sq by 1/s and s (and max_exp_avg_sq with amsgrad, which they do not use).
- `warmup_steps` (their default 0; their scripts use 100 and 200) plain AdamW steps first, then a refactor every
  `interval` steps (default 1). Their post-hook refactor after step t - 1 happens here at the start of step t, with
  the gradient carried over by the chain rule (grad_A / sqrt(s), sqrt(s) grad_B): the same iterates, and creating
  the optimizer changes nothing. So step t refactors iff t - 1 >= warmup_steps and (t - 1 - warmup_steps) is a
  multiple of interval, for both variants, counted per pair over the steps in which it had a gradient.
- Degenerate pairs: with LoRA's B = 0 no refactoring exists (their scripts warm up or re-initialise B). Here a pair
  with a rank-deficient factor (to working precision; with delta = 0) or a zero factor (RefLoRA-S) takes the plain
  AdamW step on that step: nothing is divided by zero, and the refactoring starts once B has full rank (after one
  step from LoRA's initialisation). `delta > 0` damps both Gram matrices instead (their code adds machine epsilon to
  the singular values it divides by); the refactored pair is then balanced only up to delta.

BaLoRA: Castin, Nadjahi, Ablin, Peyre, "Balanced LoRA: Removing Parameter Invariance to Accelerate Convergence",
ICML 2026, arXiv 2605.31484 (the paper text beyond its abstract could not be reached; the details are from the
authors' code, github.com/vcastin/balora, `callbacks.py`, `train.py`, `experiments/configs`).
- Base optimizer: torch's AdamW with its defaults (`torch.optim.AdamW(model.parameters(), lr)`, weight decay 0.01).
- After the optimizer step t, every pair is projected if t >= `start_step` and t is a multiple of `project_every`
  (their runs: 0 and 1). AdamW's moments are left as they are (their callback only replaces the weights).
- `projection="svd"` (their BaLoRA, `ProjectionCallback`): the balanced pair of the SVD of B A; we fix the sign of
  each singular pair to the nearer one (the SVD leaves it free). `projection="closest"` (`BestProjectionCallback`):
  the balanced pair nearest the current one (orthogonal Procrustes, exact instead of their Newton-Schulz).
- A pair whose product has rank < r is not projected (its balanced pairs have zero rows/columns that no gradient can
  revive; their code would project it). LoRA's B = 0 never meets the projection: it runs after a step.

Gauge invariance ((A, B) -> (G A, B G^{-1}), one step from a fresh state): `reflora` with mode="refactor",
delta = 0 and no warmup is invariant: the refactored pair is the SVD-balanced pair of B A, the same for every gauge
up to the signs and order of its rows, and AdamW's elementwise step commutes with those. The preconditioning mode
would be invariant under SGD (S transforms as G^{-T} S G^{-1}), not under AdamW; RefLoRA-S only under scalar G;
BaLoRA projects after a plain AdamW step. tests/optim checks all four claims.

Each pair is its own group (`{"params": [A, B], "pair": layer path, ...}`, options per group); other trainable
tensors (a head, DoRA's magnitude) form a `"pair": None` group with plain AdamW steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional.refactor import balanced_from_grams, grams, reflora_s_factor, transform_from_grams
from .groups import (
    check_choice,
    check_count,
    check_finite,
    check_options,
    evaluate,
    pair_groups,
    set_group_defaults,
)
from .pairs import Pair, split_model

__all__ = ["BaLoRA", "RefLoRA", "RefLoRAS"]

REFLORA_MODES = ("precondition", "refactor")
BALORA_PROJECTIONS = ("svd", "closest")


class _PairAdamW(torch.optim.AdamW):
    """AdamW over one group per pair (plus the others); subclasses change the pairs around AdamW's step."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        options: dict[str, Any],
        **adamw: Any,
    ) -> None:
        check_options(lr, options.get("delta", 0.0))
        super().__init__(pair_groups(pairs, others), lr=lr, **adamw)
        set_group_defaults(self, **options)

    def _stepping_pairs(self) -> list[tuple[dict[str, Any], Tensor, Tensor, int]]:
        """(group, A, B, t) for each pair with a gradient, t the 1-based index of this step for the pair (AdamW's
        own count, before it increments). A factor without a gradient gets zeros, so both factors step together."""
        out = []
        for group in self.param_groups:
            if group["pair"] is None:
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue  # the pair took no part in the loss
            for p in (A, B):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            state = self.state[A]
            out.append((group, A, B, int(state["step"]) + 1 if "step" in state else 1))
        return out


def _refactor_due(t: int, warmup_steps: int, interval: int) -> bool:
    """RefLoRA's schedule (the authors' `skip_steps` counter): step t refactors after warmup, every interval."""
    return t - 1 >= warmup_steps and (t - 1 - warmup_steps) % interval == 0


def _work(p: Tensor, like: Tensor) -> Tensor:
    return p.detach().to(like.dtype)


class RefLoRA(_PairAdamW):
    """RefLoRA: AdamW on each pair after its optimal refactoring (see the module docstring).

    Args:
        pairs: the model's factor pairs (`pairs.find_pairs(model)`).
        others: other trainable parameters (plain AdamW).
        lr: learning rate (> 0).
        warmup_steps: plain AdamW steps before the first refactor (>= 0).
        interval: refactor every `interval` steps after the warmup (>= 1).
        delta: damping of A A^T and B^T B (>= 0; 0 is the paper's refactoring, exactly balanced).
        mode: "precondition" (the authors' runs: S^{-1} grad_A, grad_B S) or "refactor" (the pair itself).
        **adamw: `betas`, `eps`, `weight_decay` (default 0), ... of `torch.optim.AdamW`.

    Raises:
        ValueError: no parameters, a pair whose shapes do not match, a bad option.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        warmup_steps: int = 0,
        interval: int = 1,
        delta: float = 0.0,
        mode: str = "precondition",
        **adamw: Any,
    ) -> None:
        check_count("warmup_steps", warmup_steps, 0)
        check_count("interval", interval, 1)
        check_choice("mode", mode, REFLORA_MODES)
        options = {"warmup_steps": warmup_steps, "interval": interval, "delta": delta, "mode": mode}
        super().__init__(pairs, others, lr, options, **{"weight_decay": 0.0, **adamw})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Check every gradient, refactor (or precondition) the pairs that are due, then AdamW's step."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        for group, A, B, t in self._stepping_pairs():
            if not _refactor_due(t, group["warmup_steps"], group["interval"]):
                continue
            gram_A, gram_B = grams(A, B)  # (r, r) each, computed once per pair
            P, P_inv_T, _ = transform_from_grams(gram_A, gram_B, group["delta"])  # I if degenerate
            gA, gB = _work(A.grad, P), _work(B.grad, P)  # (r, in), (out, r)
            if group["mode"] == "precondition":
                A.grad.copy_((P_inv_T @ P_inv_T.T) @ gA)  # S^{-1} grad_A, S^{-1} = P^{-T} P^{-1}
                B.grad.copy_(gB @ (P @ P.T))  # grad_B S
                continue
            P, P_inv_T = _nearest_signs(P, P_inv_T, gram_A, gram_B)
            A.copy_(P.T @ _work(A, P))  # (r, in)
            B.copy_(_work(B, P) @ P_inv_T)  # (out, r)
            A.grad.copy_(P_inv_T.T @ gA)  # the gradient at the new pair: P^{-1} grad_A
            B.grad.copy_(gB @ P)  # grad_B P
        super().step()
        return loss


def _nearest_signs(
    P: Tensor, P_inv_T: Tensor, gram_A: Tensor, gram_B: Tensor
) -> tuple[Tensor, Tensor]:
    """P D and P^{-T} D with D = diag(+-1) making (D P^T A, B P^{-T} D) nearest to (A, B): d_i = sign of
    <row i of P^T A, row i of A> + <column i of B P^{-T}, column i of B> = (P^T A A^T + P^{-1} B^T B)_ii."""
    agree = (P.T @ gram_A).diagonal() + (P_inv_T.T @ gram_B).diagonal()  # (r,)
    d = torch.where(agree < 0, -1.0, 1.0).to(P.dtype)
    return P * d, P_inv_T * d


class RefLoRAS(_PairAdamW):
    """RefLoRA-S: AdamW on each pair after the scalar refactoring to equal Frobenius norms (module docstring).

    Args:
        pairs: the model's factor pairs.
        others: other trainable parameters (plain AdamW).
        lr: learning rate (> 0).
        warmup_steps: plain AdamW steps before the first refactor (>= 0).
        interval: refactor every `interval` steps after the warmup (>= 1).
        **adamw: `betas`, `eps`, `weight_decay` (default 0), ... of `torch.optim.AdamW`.

    Raises:
        ValueError: no parameters, a pair whose shapes do not match, a bad option.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        warmup_steps: int = 0,
        interval: int = 1,
        **adamw: Any,
    ) -> None:
        check_count("warmup_steps", warmup_steps, 0)
        check_count("interval", interval, 1)
        options = {"warmup_steps": warmup_steps, "interval": interval}
        super().__init__(pairs, others, lr, options, **{"weight_decay": 0.0, **adamw})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Check every gradient, rescale the pairs that are due (weights, gradients, moments), then AdamW's step."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        for group, A, B, t in self._stepping_pairs():
            if not _refactor_due(t, group["warmup_steps"], group["interval"]):
                continue
            c, _ = reflora_s_factor(A, B)  # sqrt(s); 1 where a factor is zero
            for p, k in ((A, c), (B, 1 / c)):  # A <- sqrt(s) A, B <- B / sqrt(s)
                k = k.to(p.dtype)
                p.mul_(k)
                p.grad.div_(k)  # the chain rule: the gradient at the new pair
                state = self.state[p]
                if "exp_avg" in state:  # the moments of the gradients at the new pair
                    state["exp_avg"].div_(k)
                    state["exp_avg_sq"].div_(k * k)
                    if "max_exp_avg_sq" in state:
                        state["max_exp_avg_sq"].div_(k * k)
        super().step()
        return loss


class BaLoRA(_PairAdamW):
    """BaLoRA: AdamW, then each pair projected onto the balanced manifold with B A unchanged (module docstring).

    Args:
        pairs: the model's factor pairs.
        others: other trainable parameters (plain AdamW).
        lr: learning rate (> 0).
        project_every: project after every `project_every`-th step (>= 1).
        start_step: no projection before this step (>= 0).
        projection: "svd" (the authors' BaLoRA) or "closest" (the nearest balanced pair).
        **adamw: `betas`, `eps`, `weight_decay` (torch's default 0.01), ... of `torch.optim.AdamW`.

    Raises:
        ValueError: no parameters, a pair whose shapes do not match, a bad option.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        project_every: int = 1,
        start_step: int = 0,
        projection: str = "svd",
        **adamw: Any,
    ) -> None:
        check_count("project_every", project_every, 1)
        check_count("start_step", start_step, 0)
        check_choice("projection", projection, BALORA_PROJECTIONS)
        options = {
            "project_every": project_every,
            "start_step": start_step,
            "projection": projection,
        }
        super().__init__(pairs, others, lr, options, **adamw)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Check every gradient, AdamW's step, then project the pairs that are due."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        due = [
            (group, A, B)
            for group, A, B, t in self._stepping_pairs()
            if t >= group["start_step"] and t % group["project_every"] == 0
        ]
        super().step()
        for group, A, B in due:
            closest = group["projection"] == "closest"
            P, P_inv_T, _ = balanced_from_grams(*grams(A, B), closest)
            A.copy_(P.T @ _work(A, P))  # (r, in); unchanged where B A is rank deficient (P = I)
            B.copy_(_work(B, P) @ P_inv_T)  # (out, r)
        return loss


def _reflora(
    model: nn.Module,
    lr: float,
    warmup_steps: int = 0,
    interval: int = 1,
    delta: float = 0.0,
    mode: str = "precondition",
    **adamw: Any,
) -> torch.optim.Optimizer:
    """RefLoRA (arXiv 2505.18877): AdamW after the optimal refactoring of each pair."""
    pairs, others = split_model(model, "reflora")
    return RefLoRA(pairs, others, lr, warmup_steps, interval, delta, mode, **adamw)


def _reflora_s(
    model: nn.Module, lr: float, warmup_steps: int = 0, interval: int = 1, **adamw: Any
) -> torch.optim.Optimizer:
    """RefLoRA-S (arXiv 2505.18877): AdamW after the scalar refactoring (equal norms, moments rescaled)."""
    pairs, others = split_model(model, "reflora_s")
    return RefLoRAS(pairs, others, lr, warmup_steps, interval, **adamw)


def _balora(
    model: nn.Module,
    lr: float,
    project_every: int = 1,
    start_step: int = 0,
    projection: str = "svd",
    **adamw: Any,
) -> torch.optim.Optimizer:
    """BaLoRA (arXiv 2605.31484): AdamW, then each pair projected onto the balanced manifold."""
    pairs, others = split_model(model, "balora")
    return BaLoRA(pairs, others, lr, project_every, start_step, projection, **adamw)
