"""The advisor (issue 8, in progress): measure a model and its data, then prescribe rank, init, optimizer and
method with the measured reason. `measure.py` holds the pure measurement functions (spectra, Gavish-Donoho ranks,
gradient noise, subspace alignment), `model.py` measures every target layer of a model from calibration batches,
and `memory.py` is the memory model from a transformers config."""

from . import measure, memory, model

__all__ = ["measure", "memory", "model"]
