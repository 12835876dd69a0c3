"""BAR: balancedness-aware regularization, an explicit and cheap stand-in for SAM's implicit pull on LoRA pairs.

    s_t = nBAR: +1 if ||grad_B||_F^2 < ||grad_A||_F^2 else -1      oBAR: +1 if ||B||_F >= ||A||_F else -1
    B <- (1 - lr mu_t s_t) B,   A <- (1 + lr mu_t s_t) A            (decoupled, like AdamW's weight decay)
    then AdamW's step on the loss gradients

Li, Zhang, He, "Implicit Regularization of Sharpness-Aware Minimization for Scale-Invariant Problems", NeurIPS 2024,
arXiv 2410.14802, §5.2 and App. A.6; LoRA's W0 + X Y^T there is W0 + s B A here (X = B, Y = A^T). Gradient flow keeps
the balancedness 𝓑 = 1/2 (||B||^2 - ||A||^2) fixed (Theorem 1), SAM shrinks |𝓑| at a rate set by the gradient
imbalance ||g_X||^2 - ||g_Y||^2 (Theorem 2), so the data (outliers, low SNR) set how strongly. BAR adds the
regularizer mu_t s_t (||X||^2 - ||Y||^2) per layer, with the sign chosen as SAM's flow would move 𝓑: nBAR (the
non-overparametrized rule, for LoRA) by which factor's gradient is larger, oBAR (from the overparametrized analysis,
Lemma 2) by which factor is larger, i.e. mu_t |X^T X - Y^T Y|. One forward/backward per step, not SAM's two, and it
works per layer (Theorem 5: SAM's pull on one layer weakens with the number of layers; BAR's does not).

Confirmed from the paper's text (the extracted full text: §5.2, App. A.6, App. D): the regularizer and both sign
rules; "implemented in the same manner as weight decay" in AdamW (Loshchilov & Hutter), i.e. decoupled from Adam's
moments; AdamW as the base optimizer in every experiment; per-layer application; a decreasing schedule for mu_t
(cosine and linear "work smoothly"; GLUE runs pick linear or constant); mu_0 tuned in {0.2, 0.5, 1.0} (0.05 for QQP),
and weight decay 0 working best on some tasks. Not readable (the algorithm boxes, Algs. 2 and 3, are images in every
source found; the authors' repository github.com/BingcongLi/BAR is not in the index): the constant in front of the
decay and the order of the two multiplications. This module takes AdamW's convention, regularizer
(mu_t / 2) s_t (||B||^2 - ||A||^2) so the decay factor is (1 - lr mu_t s_t) as AdamW's is (1 - lr lambda), applied
before AdamW's step as torch applies its weight decay; with the paper's alpha_t |x^T x - y^T y| this is alpha_t =
mu_t / 2. PEFT has no BAR, so there is no parity test.

Options (each per group, so per pair):
    mu: mu_0 >= 0, the coefficient (default 0.5, the middle of the paper's grid); 0 gives plain AdamW.
    variant: "nbar" (default; LoRA is non-overparametrized, and nBAR's average gain beat oBAR's in each of the
        paper's experiments, §6) or "obar".
    schedule: "constant" (default), "linear" mu_0 (1 - t/T) or "cosine" mu_0 (1 + cos(pi t/T)) / 2, with t this
        pair's step count (AdamW's) and T = total_steps (required by the last two).
    decoupled: True (default, the paper's weight-decay form); False adds the regularizer's gradient to the loss
        gradient instead, so it passes through Adam's moments (L2-style; not the paper's method).
    **adamw: `betas`, `eps`, `weight_decay` (torch's default 0.01), ... of `torch.optim.AdamW`.

Not gauge invariant: the regularizer prefers the balanced representative of (G A, B G^-1) and AdamW is not
invariant either (tests/optim checks it fails the gauge test, as AdamW does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import BAR_SCHEDULES, BAR_VARIANTS, bar_coefficient, bar_gradient, bar_sign
from .groups import check_finite, evaluate, pair_groups, set_group_defaults
from .pairs import Pair, split_model

__all__ = ["BAR", "DEFAULT_MU"]

DEFAULT_MU = 0.5


def check_bar_options(
    mu: float, variant: str, schedule: str, total_steps: int | None, decoupled: bool
) -> None:
    """Raises ValueError naming the option unless each is valid (see the module docstring)."""
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"bar: mu must be a finite number >= 0, got {mu!r}")
    if variant not in BAR_VARIANTS:
        raise ValueError(f"bar: variant must be one of {BAR_VARIANTS}, got {variant!r}")
    if schedule not in BAR_SCHEDULES:
        raise ValueError(f"bar: schedule must be one of {BAR_SCHEDULES}, got {schedule!r}")
    if total_steps is not None and not (
        isinstance(total_steps, int) and not isinstance(total_steps, bool) and total_steps > 0
    ):
        raise ValueError(f"bar: total_steps must be an int > 0 or None, got {total_steps!r}")
    if schedule != "constant" and total_steps is None:
        raise ValueError(f"bar: schedule {schedule!r} needs total_steps (the T of mu_0 (1 - t/T))")
    if not isinstance(decoupled, bool):
        raise ValueError(f"bar: decoupled must be True or False, got {decoupled!r}")


class BAR(torch.optim.AdamW):
    """AdamW with balancedness-aware regularization on each factor pair (see the module docstring).

    Args:
        pairs: the model's factor pairs (`pairs.find_pairs(model)`).
        others: other trainable parameters (plain AdamW).
        lr: learning rate (> 0).
        mu: mu_0 (>= 0).
        variant: "nbar" or "obar".
        schedule: "constant", "linear" or "cosine".
        total_steps: T for the decreasing schedules.
        decoupled: the weight-decay form (True) or the regularizer's gradient added to the loss gradient.
        **adamw: `betas`, `eps`, `weight_decay`, ... of `torch.optim.AdamW`.

    Raises:
        ValueError: no parameters, a pair whose shapes do not match, a bad option.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        others: Sequence[nn.Parameter],
        lr: float,
        mu: float = DEFAULT_MU,
        variant: str = "nbar",
        schedule: str = "constant",
        total_steps: int | None = None,
        decoupled: bool = True,
        **adamw: Any,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"bar: lr must be > 0, got {lr!r}")
        check_bar_options(mu, variant, schedule, total_steps, decoupled)
        super().__init__(pair_groups(pairs, others), lr=lr, **adamw)
        set_group_defaults(
            self,
            mu=mu,
            variant=variant,
            schedule=schedule,
            total_steps=total_steps,
            decoupled=decoupled,
        )

    def _steps_taken(self, A: Tensor, B: Tensor) -> int:
        """t: the steps this pair has taken (AdamW's own counter, so it round-trips with state_dict)."""
        state = self.state.get(A) or self.state.get(B) or {}
        step = state.get("step")
        return 0 if step is None else int(step)

    def _regularizer_gradients(self) -> list[tuple[dict[str, Any], Tensor, Tensor]]:
        """(group, parameter, gradient of the regularizer) for every regularized factor; all signs are taken
        from the loss gradients before anything changes."""
        out: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        for group in self.param_groups:
            if group["pair"] is None:
                continue
            check_bar_options(
                group["mu"],
                group["variant"],
                group["schedule"],
                group["total_steps"],
                group["decoupled"],
            )  # a user may have edited the group since construction
            A, B = group["params"]
            if (A.grad is None and B.grad is None) or group["mu"] == 0:
                continue  # no part in the loss this step, or plain AdamW for this pair
            gA = A.grad if A.grad is not None else torch.zeros_like(A)
            gB = B.grad if B.grad is not None else torch.zeros_like(B)
            mu_t = bar_coefficient(
                group["mu"],
                self._steps_taken(A, B) if group["schedule"] != "constant" else 0,
                group["total_steps"],
                group["schedule"],
            )
            sign = bar_sign(group["variant"], A, B, gA, gB)  # 0-dim, on the device: no host sync
            rA, rB = bar_gradient(A, B, sign, mu_t)  # (r, in), (out, r)
            out += [(group, A, rA), (group, B, rB)]
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Check every gradient, apply BAR to each pair (decoupled or through the gradient), then AdamW's step."""
        loss = evaluate(closure)
        check_finite(self.param_groups)  # before any parameter or state changes
        for group, p, r in self._regularizer_gradients():
            if group["decoupled"]:
                # p <- (1 -+ lr mu_t s_t) p, in the form of AdamW's weight decay
                p.add_(r, alpha=-group["lr"])
            elif p.grad is None:
                p.grad = r.clone()
            else:
                p.grad.add_(r)
        super().step()
        return loss


def _bar(
    model: nn.Module,
    lr: float,
    mu: float = DEFAULT_MU,
    variant: str = "nbar",
    schedule: str = "constant",
    total_steps: int | None = None,
    decoupled: bool = True,
    **adamw: Any,
) -> torch.optim.Optimizer:
    """BAR (Li, Zhang, He, arXiv 2410.14802): AdamW plus balancedness-aware regularization per factor pair."""
    pairs, others = split_model(model, "bar")
    return BAR(
        pairs,
        others,
        lr=lr,
        mu=mu,
        variant=variant,
        schedule=schedule,
        total_steps=total_steps,
        decoupled=decoupled,
        **adamw,
    )
