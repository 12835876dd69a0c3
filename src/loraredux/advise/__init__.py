"""The advisor (issue 8, in progress): measure a model and its data, then prescribe rank, init, optimizer and
method with the measured reason. `measure.py` holds the pure measurement functions (spectra, Gavish-Donoho ranks,
gradient noise, subspace alignment); `memory.py` the memory model from a transformers config."""

from . import measure, memory

__all__ = ["measure", "memory"]
