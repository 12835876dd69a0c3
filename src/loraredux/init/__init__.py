"""Initialisers (Axis 2a): where the factors of an additive low-rank adapter start.

The survey reads initialisation as subspace estimation: the first factors pick the subspace the update explores,
estimated from the weights (PiSSA, MiLoRA, OLoRA, NoRA), from gradients (LoRA-GA, LoRA-One), from activations (EVA,
CorDA) or from the quantisation error (LoftQ). Each initialiser is a pure function registered by name (see
`registry.py`); a method with a LoRA form picks one with its config's `init` field, and `lx.adapt_` passes the
calibration statistics (`calibrate.py`) to the data-aware ones.

    lx.init.available()                       # the names
    lx.adapt_(model, lx.config("lora", rank=16, init="pissa", init_options={"niter": 4}), targets="all-linear")
    lx.adapt_(model, lx.config("lora", init="lora_ga"), targets=..., calibration=batches, loss_fn=fn)
"""

from . import activation, gradient, loftq, random, sketch, weights  # noqa: F401  (registers the initialisers)
from .calibrate import default_loss, gather
from .registry import (
    Factors,
    Initialiser,
    LayerData,
    available,
    calibration_data,
    data_for,
    get,
    register_init,
)

__all__ = [
    "Factors",
    "Initialiser",
    "LayerData",
    "available",
    "calibration_data",
    "data_for",
    "default_loss",
    "gather",
    "get",
    "register_init",
]
