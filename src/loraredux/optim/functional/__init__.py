"""The optimizers' mathematics as pure functions over tensors; the classes in `loraredux.optim` stay thin.

One module per family, all re-exported here (`from loraredux.optim.functional import riemannian_precondition`):

- `riemannian`: the r x r preconditioners of scaled GD (Zhang & Pilanci) and LoRA-FA's projected gradient.
"""

from .riemannian import lora_fa_gradient, riemannian_precondition, solve_spd

__all__ = ["lora_fa_gradient", "riemannian_precondition", "solve_spd"]
