"""Named initialisers (`lx.init`) for every method whose update is a free low-rank pair: the shared machinery.

A method opts in with two config fields (`init`, `init_options`, checked by `check_init_fields`) and the
`FactorInit` mixin on its adapter, which needs only `lora_form()` and `set_lora_form_(A, B)`: write a pair with
W' = W0 + s B A into the method's own parameters (LoRA copies them; AdaLoRA takes the SVD of B A as P Λ Q;
PoLAR puts orthonormal bases of B's columns and A's rows in X and Y and the rest in Θ).

An init that moves the base (PiSSA, MiLoRA, OLoRA, LoRA-GA, CorDA, LoftQ) makes the frozen base W_res, and the
adapter keeps the initial pair as persistent buffers A0, B0, so the original weight is known: W0 = W_res + s B0 A0
for the exact inits, a kept copy for LoftQ (whose quantisation error is not low rank). Then `lx.disabled`
computes the original model, `lx.unadapt_` restores W0, loading saved tensors moves the base again from the loaded
A0, B0, and LoRA's PEFT export writes the equivalent plain rank-2r LoRA on the original base.

On a quantized base (`BaseView.keeps_original`) the moved base is W_res quantized like the original (PiSSA then is
QPiSSA: Meng et al., arXiv 2404.02948), and the view keeps the original quantized weight itself: W0 is its
dequantization (no dense copy, not deq(q(W_res)) + s B0 A0), `lx.disabled` computes with it, and `lx.unadapt_`
puts that very parameter back, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import init as inits
from ..core import Adapter, accumulate_, initialising, nonfinite_count

__all__ = ["FactorInit", "check_init_fields"]


def check_init_fields(method: str, init: Any, init_options: Any) -> None:
    """Validate a config's `init` (a registered name, or None for the method's own) and `init_options`.

    Raises:
        ValueError: an unknown name (listing the available ones), options that are not a dict or that the init
            does not have.
    """
    if init is None:
        if init_options:
            raise ValueError(f"{method}: init_options need an init name")
        return
    if not isinstance(init, str):
        raise ValueError(f"{method}: init must be a name, got {init!r}")
    try:
        spec = inits.get(init)
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None
    if not isinstance(init_options, dict):
        raise ValueError(
            f"{method}: init_options must be a dict, got {type(init_options).__name__}"
        )
    try:
        spec.check_options(init_options)
    except ValueError as err:
        raise ValueError(f"{method}: {err}") from None


def _check_move(
    init: str,
    W0: Tensor,
    new_base: Tensor,
    B0: Tensor | None = None,
    A0: Tensor | None = None,
    scale: float = 1.0,
) -> None:
    """Refuse a loaded move of the base that would write NaN / Inf into it, or (exact moves, given B0, A0)
    one whose W_res + s B0 A0 no longer gives W0 back: factors far larger than the base cancel catastrophically,
    and `lx.unadapt_` restores W0 from exactly that sum.

    Raises:
        ValueError: naming the init and the problem (the loader adds the layer).
    """
    bad = nonfinite_count(new_base)
    if bad:
        raise ValueError(
            f"init {init!r}: the base weight the loaded A0, B0 give (W0 - s B0 A0) has {bad} NaN or infinite "
            f"value(s) of {new_base.numel()}; nothing was changed"
        )
    if B0 is None or A0 is None:
        return
    wide = torch.promote_types(W0.dtype, torch.float32)
    back = torch.addmm(new_base, B0, A0, alpha=scale).to(wide)
    # max norms: a sum of squares would overflow where the factors are huge
    gap = float((back - W0.to(wide)).abs().max())
    size = float(W0.abs().max())
    # Rounding alone stays within a few eps of W0 for factors of W0's size (PiSSA's are at most its norm).
    tolerance = max(1e-3, 64 * torch.finfo(W0.dtype).eps) * size + torch.finfo(W0.dtype).tiny
    if not gap <= tolerance:
        raise ValueError(
            f"init {init!r}: the loaded A0, B0 are too large for this base weight: (W0 - s B0 A0) + s B0 A0 "
            f"is off W0 by up to {gap:.3g} (max |W0| = {size:.3g}), so lx.unadapt_ could not restore W0; the "
            "adapter was made on another base model or its file is corrupt"
        )


class FactorInit(Adapter):
    """Adapter mixin: initialise the method's low-rank pair by `config.init` and handle a moved base.

    The adapter calls `setup_init(rank)` after creating its parameters and `init_factors_(rank)` at the end of
    its `reset_parameters` (a no-op when `config.init` is None or while loading); subclasses implement
    `set_lora_form_`.
    """

    scale: float
    initialiser: inits.Initialiser | None = None
    _moved: bool = False

    def converts_moved_base(self) -> bool:
        """Whether the PEFT export can write a moved base as a plain LoRA on the original base (LoRA's rank-2r
        conversion); False for methods whose PEFT type cannot hold it."""
        return False

    def needs_native_format(self, convert: bool = True) -> bool:
        """Whether only loraredux's own format can hold this adapter for the original base (`save_adapter`'s
        "auto" then picks it)."""
        return self._moved and convert and not self.converts_moved_base()

    def peft_export(self, convert: bool = True) -> tuple[Any, dict[str, Tensor]]:
        """The config and tensors to write in PEFT's format (the method's own, for an unmoved base).

        Raises:
            ValueError: `convert` after an init moved the base and the method cannot write that as a plain LoRA.
        """
        if self.needs_native_format(convert):
            raise ValueError(
                f"{self.config.method} with init {self.config.init!r} moved the base weight, and PEFT's format "
                "of this method cannot hold that on the original base: save with format='native' (loraredux "
                "moves the base again when loading) or convert_to_lora=False (the factors for the moved base)"
            )
        return self.config, self.peft_tensors()  # type: ignore[attr-defined]

    def setup_init(self, rank: int) -> None:
        """Resolve `config.init`, check the base kind, and allocate A0 (r, in), B0 (out, r) for a moving init."""
        name = getattr(self.config, "init", None)
        self._moved = False  # whether the base layer holds a moved weight now
        self._original: Tensor | None = None  # W0 itself, kept only for an inexact move (LoftQ)
        self.initialiser = None if name is None else inits.get(name)
        if self.initialiser is None:
            return
        if self.view.kind not in self.initialiser.kinds:
            raise TypeError(
                f"init {name!r} does not support a {self.view.kind} base (it supports "
                f"{', '.join(self.initialiser.kinds)} layers)"
            )
        if self.view.quantized and self.initialiser.quantized_reason:
            raise ValueError(
                f"init {name!r} cannot run on this {self.view.format} quantized base: "
                f"{self.initialiser.quantized_reason}"
            )
        if self.initialiser.moves_base:
            W0 = self.base_weight()
            like = {"dtype": W0.dtype, "device": W0.device}
            self.register_buffer("A0", torch.zeros(rank, self.in_features, **like))
            self.register_buffer("B0", torch.zeros(self.out_features, rank, **like))

    def set_lora_form_(self, A: Tensor, B: Tensor) -> None:
        """Write the pair A (r, in), B (out, r) into the method's parameters, so that `lora_form()` gives the same
        s B A (the method's scale s is unchanged)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_factors_(self, rank: int) -> None:
        """Run the named initialiser on W0 (with the layer's calibration statistics) and apply its result;
        under `skip_initialisation` (loading saved tensors) nothing is computed."""
        spec = self.initialiser
        if spec is None or not initialising():
            return
        if self._moved:
            raise RuntimeError("the base was already moved by an init: unadapt and adapt again")
        factors = spec(
            self.base_weight().detach(),
            rank,
            self.scale,
            data=inits.data_for(self.base),
            **self.config.init_options,
        )
        self.set_lora_form_(factors.A, factors.B)
        if spec.moves_base:
            if factors.base is None:
                raise RuntimeError(f"init {spec.name!r} moves the base but returned no new base")
            self.A0.copy_(factors.A)
            self.B0.copy_(factors.B)
            if not spec.exact and not self.view.keeps_original:
                self._original = self.base_weight().detach()
            self.replace_base_weight_(factors.base.to(self.base_weight().dtype))
            self._moved = True

    # -- the original weight ------------------------------------------------------------------------------
    def original_weight(self) -> Tensor:
        """W0 (out, in) of the layer before adaptation: W_res + s B0 A0 after an exact base-moving init, the
        kept copy after LoftQ, the original weight the view keeps for a quantized base, else the base weight."""
        if not self._moved:
            return self.base_weight()
        if self.view.keeps_original:
            return self.view.original_weight()
        if self._original is not None:
            return self._original
        return torch.addmm(self.base_weight(), self.B0, self.A0, alpha=self.scale)

    def released(self) -> nn.Module:
        if self._moved:
            # a quantized base's view keeps the original weight: super() puts it back
            if not self.view.keeps_original:
                with torch.no_grad():
                    self.view.set_weight(self.original_weight())
            self._moved = False
        return super().released()

    def before_load_(self) -> None:
        if self._moved:  # back to W0, so that after_load_ moves it by the loaded A0, B0
            with torch.no_grad():
                self.replace_base_weight_(self.original_weight())
            self._moved = False

    @torch.no_grad()
    def after_load_(self) -> None:
        """Move the base by the loaded A0, B0 (W_res = W0 - s B0 A0), or recompute an inexact move (LoftQ).

        Under `deferring_base_changes` (`lx.load_adapter`, `lx.load_adapter_state_dict`) the new base is only
        recorded; the caller commits it once every layer has loaded.

        Raises:
            ValueError: the new base would not be finite, the exact move would not give W0 back (factors far
                larger than the base: `lx.unadapt_` could not restore it), or LoftQ's recomputed factors differ
                from the saved ones (another base model).
        """
        spec = self.initialiser
        if spec is None or not spec.moves_base:
            return
        W0 = self.base_weight().detach()
        if spec.exact:
            new_base = torch.addmm(W0, self.B0, self.A0, alpha=-self.scale)
            _check_move(spec.name, W0, new_base, self.B0, self.A0, self.scale)
        else:  # the move is not a function of A0, B0 alone: recompute it (deterministic) and check it
            factors = spec(W0, self.A0.shape[0], self.scale, **self.config.init_options)
            saved = self.B0 @ self.A0
            gap = torch.linalg.matrix_norm(factors.B @ factors.A - saved)
            if not gap <= 1e-3 * torch.linalg.matrix_norm(saved) + 1e-12:
                raise ValueError(
                    f"init {spec.name!r} on this base gives other initial factors than the saved A0, B0 "
                    f"(gap {gap.item():.2e}): the adapter was made on another base model"
                )
            new_base = factors.base
            _check_move(spec.name, W0, new_base)
            self._original = None if self.view.keeps_original else W0
        self.replace_base_weight_(new_base)
        self._moved = True

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled or not self._moved:
            return super().forward(x)
        # disabled after a base-moving init: the original model, W_res + s B0 A0 (or the kept W0)
        if self.view.keeps_original:
            return self.view.forward_with(x, self.view.original_weight())
        if self._original is not None:
            return self.view.forward_with(x, self._original)
        h, lead = self.flatten(x)
        y = accumulate_(self.base(h), self.view.project(h, self.A0), self.B0, self.scale)
        return y.reshape(*lead, y.shape[-1])
