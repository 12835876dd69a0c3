"""Initialisers (Axis 2a): where the factors of an additive low-rank adapter start.

The survey reads initialisation as subspace estimation: the first factors pick the subspace the update explores,
estimated from the weights (PiSSA, MiLoRA, OLoRA, NoRA), from gradients (LoRA-GA, LoRA-One), from activations (EVA,
CorDA) or from the quantisation error (LoftQ). Each initialiser is a pure function registered by name (see
`registry.py`); a method with a LoRA form picks one with its config's `init` field, and `lx.adapt_` passes the
calibration statistics (`calibrate.py`) to the data-aware ones.

    lx.init.available()                       # the names
    lx.adapt_(model, lx.config("lora", rank=16, init="pissa", init_options={"niter": 4}), targets="all-linear")
    lx.adapt_(model, lx.config("lora", init="lora_ga"), targets=..., calibration=batches, loss_fn=fn)

A model loaded in 4-bit has lost its dense weights; `loftq_from_checkpoint_` reads them from its checkpoint folder
(`checkpoint_weights.py`) and puts the best rank-r correction of the quantisation error into the adapters:

    lx.adapt_(model_4bit, lx.config("lora", rank=16), targets="all-linear")
    report = lx.init.loftq_from_checkpoint_(model_4bit, "path/to/model")   # report.aggregate(), .rolled_back
"""

from . import activation, gradient, loftq, random, sketch, weights  # noqa: F401  (registers the initialisers)
from .calibrate import default_loss, gather
from .checkpoint_weights import CheckpointError, SafetensorsCheckpoint, dense_weights
from .loftq_checkpoint import LayerReport, LoftQReport, loftq_from_checkpoint_
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
    "CheckpointError",
    "Factors",
    "Initialiser",
    "LayerData",
    "LayerReport",
    "LoftQReport",
    "SafetensorsCheckpoint",
    "available",
    "calibration_data",
    "data_for",
    "default_loss",
    "dense_weights",
    "gather",
    "get",
    "loftq_from_checkpoint_",
    "register_init",
]
