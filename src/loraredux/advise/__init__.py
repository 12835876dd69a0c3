"""The advisor (issue 8, in progress): measure a model and its data, then prescribe rank, init, optimizer and
method with the measured reason. `measure.py` holds the pure measurement functions."""

from . import measure

__all__ = ["measure"]
