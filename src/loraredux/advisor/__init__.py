"""The advisor: measure a model and its data, then prescribe rank, init, optimizer, method, base format and
serving, each with the measured reason.

- `measure.py`: pure measurements over tensors (spectra, Gavish-Donoho ranks, gradient noise, subspace alignment);
- `model.py`: every target layer of a model measured from calibration batches;
- `memory.py`: the memory model from a transformers config (base, adapters, gradients, optimizer, activations),
  `replay.py` the activations, a training step replayed on the meta device;
- `rules.py`: measurements to choices, each with its reason;
- `recommend.py`: `advise(model, batches, loss_fn, ...)` (`lx.advise`) -> `Recommendation` (`recommendation.py`);
- `verify.py`: train the recommendation against plain LoRA on a task (`loraredux advise --verify`);
- `report.py`: recommendation.json, report.md and report.html; `plots.py` the plots; `formatting.py` the numbers.
"""

from . import measure, memory, model, rules
from .recommend import advise
from .recommendation import LayerAdvice, Recommendation, parse_bytes
from .verify import verify

__all__ = [
    "LayerAdvice",
    "Recommendation",
    "advise",
    "measure",
    "memory",
    "model",
    "parse_bytes",
    "rules",
    "verify",
]
