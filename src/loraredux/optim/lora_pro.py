"""LoRA-Pro: Adam on each pair's full-size equivalent gradient, mapped back to the factors by the best fit.

    g~  = s (B g^A + g^B A)   with (g^A, g^B) of Theorem 2.1 on the LoRA gradients    (out, in)
    g^  = m^ / (sqrt(v^) + eps)   Adam's moments m, v of g~, full size                 (out, in)
    (g^A, g^B) = Theorem 2.1 with the X of Theorem 2.3 on grad_A = s B^T g^, grad_B = s g^ A^T
    A <- sqrt(1 - lr wd) A - lr g^A,   B <- sqrt(1 - lr wd) B - lr g^B

Wang, Liang, He, Wang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025, arXiv 2407.18242.
The maths is `functional.pro` (its docstring gives the theorems). Where each detail was confirmed:

- The closed form of Theorem 2.1 and the Sylvester equation of Theorem 2.3 (B^T B X + X A A^T =
  -(1/s^2) (B^T B)^{-1} grad_A A^T, the X closest to the LoRA gradients): the paper's §2 (only its abstract pages
  could be read here, so the formulas were taken from the authors' code, github.com/mrflogs/LoRA-Pro
  `peta/optim.py`, `X_mode="sylvester"`, their default), re-derived (the cross terms grad_A A^T and B^T grad_B
  cancel, B^T [I - P_B] = 0) and checked by brute-force least squares in the tests.
- Adam: the moments are kept for the full-size equivalent gradient, and the Adam direction is treated as the full
  gradient and mapped back to the factors (the paper's Algorithm 1; the authors' `AdamW.step_full` in
  `peta/optim.py` and their DeepSpeed ZeRO integration used for the paper's LLM runs, `lorapro_full_adjustment`).
  The authors also ship an "efficient" mode (Adam on the adjusted factor gradients); it is not this optimizer.
- B = 0 at LoRA's init makes B^T B singular. The authors add 1e-8 I to both r x r matrices and use a
  pseudo-inverse (their DeepSpeed path skips (B^T B)^{-1} and sets X = 0 on the first step). Here `delta`
  (default 1e-8, the authors' value) damps both inverses; at B = 0 the LoRA gradient of A is exactly 0, so the first
  step equals the authors' special case (g^A = 0, X = 0). delta = 0 is exact but needs full-rank factors: a
  singular B^T B or A A^T raises a ValueError naming it, never a pseudo-inverse fallback.
- Weight decay (`weight_decay`, default 0 as the authors'): decoupled, each factor scaled by sqrt(1 - lr wd) so
  that s B A decays by (1 - lr wd), as the authors' `step_full` does; their code also decays the frozen base weight,
  which is not done here (it is frozen). Other parameters take plain AdamW (p <- (1 - lr wd) p - lr g^).

Memory: each pair keeps exp_avg and exp_avg_sq of size (out, in) in the factor dtype (the authors keep them in
bf16) plus a scalar step: 2 * out * in * itemsize bytes per pair (LoRA's AdamW: 2 * r * (out + in) * itemsize),
and the step makes two transient (out, in) tensors (g~ and g^). This is the price of Adam on the equivalent
gradient: close to full fine-tuning's optimizer state, without its full-size gradient and weights.

Options beyond Adam's: `delta`, and `x` ("sylvester", the default and the paper's Theorem 2.3; "zero", X = 0).

Deviations: the Sylvester equation is solved with the damped Gram matrices (the authors use undamped ones; O(delta)
apart, identical at delta = 0) so that it is solvable whenever the inverses exist; no amsgrad.

Gauge: with delta = 0 the equivalent gradient P_B g + (I - P_B) g P_A depends only on B's column space and A's row
space, so g~, the moments and the first-order change of W' do not depend on the gauge (A, B) ~ (G A, B G^{-1}).
The step itself does with the paper's X: it minimises a distance in the factors' Euclidean metric, which is not gauge
invariant (X does not transform as G X G^{-1}), and the second-order term lr^2 s g^B g^A depends on X; one step's
W' differs by O(lr) relative (tests/optim/test_lora_pro.py). With `x="zero"` (the authors' `X_mode="zero"`) and
delta = 0 the factor steps transform as (G g^A, g^B G^{-1}) and the whole step is gauge invariant: those are the
options in GAUGE_INVARIANT. The paper itself makes no invariance claim.

Each pair is its own parameter group (`{"params": [A, B], "pair": layer path, "scale": s, "lr", "delta", ...}`);
the pair's state (`step`, `exp_avg`, `exp_avg_sq`, the last two (out, in)) is held under its A. Other trainable
tensors form one group with `"pair": None`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional.pro import X_CHOICES, LoraProGrams, adam_direction, lora_pro_adam, lora_pro_grams
from .groups import check_finite, check_options, evaluate, pair_groups
from .pairs import Pair, split_model

__all__ = ["DEFAULT_DELTA", "LoraPro", "state_bytes"]

DEFAULT_DELTA = 1e-8


def _check_adam(betas: Sequence[float], eps: float, weight_decay: float) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}") from None
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    return beta1, beta2


def state_bytes(A: Tensor, B: Tensor) -> int:
    """Bytes of LoRA-Pro's state for one pair: two (out, in) moments in the factors' dtype and a float32 step."""
    return 2 * B.shape[0] * A.shape[1] * A.element_size() + 4


class LoraPro(torch.optim.Optimizer):
    """LoRA-Pro with Adam (see the module docstring): full-size Adam moments of each pair's equivalent gradient.

    Args:
        pairs: the model's factor pairs (`pairs.find_pairs(model)`).
        others: other trainable parameters (plain AdamW).
        lr: learning rate (> 0).
        betas: Adam's (beta1, beta2), each in [0, 1).
        eps: Adam's epsilon (>= 0).
        weight_decay: decoupled weight decay (>= 0); on a pair it decays s B A by (1 - lr wd).
        delta: damping of the r x r inverses (>= 0; the default handles B = 0 at LoRA's init).
        x: the free r x r matrix of Theorem 2.1: "sylvester" (Theorem 2.3, the paper's) or "zero" (the authors'
            `X_mode="zero"`; with delta = 0 the whole step is gauge invariant).

    Raises:
        ValueError: no parameters, a pair whose shapes do not match, or a bad option.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = DEFAULT_DELTA,
        x: str = "sylvester",
    ) -> None:
        check_options(lr, delta)
        betas = _check_adam(betas, eps, weight_decay)
        if x not in X_CHOICES:
            raise ValueError(f"x must be one of {X_CHOICES}, got {x!r}")
        groups = pair_groups(pairs, others)
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "delta": delta,
            "x": x,
        }
        super().__init__(groups, defaults)

    def _moments(self, p: Tensor, shape: tuple[int, ...]) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step. Every gradient is checked (finite) and every pair's r x r matrices are factored (a singular one
        refused) before any parameter or moment changes."""
        loss = evaluate(closure)
        check_finite(self.param_groups)
        ready = []
        for group in self.param_groups:
            if group["pair"] is None:
                continue
            A, B = group["params"]
            if A.grad is None and B.grad is None:
                continue  # the pair took no part in the loss
            if group["lr"] * group["weight_decay"] > 1:
                raise ValueError(
                    f"{group['pair']}: lr * weight_decay must be <= 1, got {group['lr']} * "
                    f"{group['weight_decay']}; no parameter was changed"
                )
            try:
                ready.append((group, lora_pro_grams(A, B, group["delta"])))
            except ValueError as err:
                raise ValueError(f"{group['pair']}: {err}; no parameter was changed") from None
        for group, k in ready:
            self._pair_step(group, k)
        for group in self.param_groups:
            if group["pair"] is None:
                self._plain_adamw(group)
        return loss

    def _pair_step(self, group: dict[str, Any], k: LoraProGrams) -> None:
        A, B = group["params"]
        grad_A = A.grad if A.grad is not None else torch.zeros_like(A)
        grad_B = B.grad if B.grad is not None else torch.zeros_like(B)
        state = self._moments(A, (B.shape[0], A.shape[1]))
        step = int(state["step"].item()) + 1
        dA, dB = lora_pro_adam(
            grad_A,
            grad_B,
            A,
            B,
            group["scale"],
            state["exp_avg"],
            state["exp_avg_sq"],
            step,
            group["betas"],
            group["eps"],
            group["delta"],
            group["x"],
            precomputed=k,
        )
        state["step"].fill_(step)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            shrink = math.sqrt(1 - lr * wd)  # both factors, so s B A shrinks by (1 - lr wd)
            A.mul_(shrink)
            B.mul_(shrink)
        A.add_(dA, alpha=-lr)
        B.add_(dB, alpha=-lr)

    def _plain_adamw(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._moments(p, tuple(p.shape))
            step = int(state["step"].item()) + 1
            direction = adam_direction(
                p.grad, state["exp_avg"], state["exp_avg_sq"], step, group["betas"], group["eps"]
            )
            state["step"].fill_(step)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(direction, alpha=-group["lr"])


def _lora_pro(
    model: nn.Module,
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    delta: float = DEFAULT_DELTA,
    x: str = "sylvester",
) -> torch.optim.Optimizer:
    """LoRA-Pro (arXiv 2407.18242) with Adam on the full-size equivalent gradients (see `LoraPro`)."""
    pairs, others = split_model(model, "lora_pro")
    return LoraPro(
        pairs, others, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, x=x
    )
