"""The optimizers' mathematics as pure functions over tensors; the classes in `loraredux.optim` stay thin.

One module per family, all re-exported here (`from loraredux.optim.functional import riemannian_precondition`):

- `riemannian`: the r x r preconditioners of scaled GD (Zhang & Pilanci) and LoRA-FA's projected gradient.
- `pro`: LoRA-Pro's equivalent gradient, its best-fit factor gradients and Sylvester X (Wang et al.), Adam on it.
- `alternating`: AltLoRA's projected low-rank momentum (Yu et al.), exact ALS block solves for matrix sensing, CG.
- `rite`: LoRA-RITE's unmagnified, basis-transported matrix-Adam step of a pair (Yen et al., arXiv 2410.20625).
- `refactor`: RefLoRA's refactoring / preconditioning and RefLoRA-S's scale (Zhang et al.), BaLoRA's balanced
  projection (Castin et al.): an equivalent, balanced pair with the same B A.
- `balance`: balancedness 1/2 (||B||^2 - ||A||^2), the Gram imbalance B^T B - A A^T, BAR's regularizer (Li et al.).
"""

from .alternating import (
    CGResult,
    als_block_solve,
    als_matrix_sensing,
    altlora_momentum,
    conjugate_gradient,
)
from .balance import (
    BAR_SCHEDULES,
    BAR_VARIANTS,
    balancedness,
    bar_coefficient,
    bar_gradient,
    bar_regularizer,
    bar_sign,
    gram_imbalance,
)
from .pro import (
    LoraProGrams,
    adam_direction,
    equivalent_gradient,
    lora_pro_adam,
    lora_pro_gradients,
    lora_pro_grams,
    lora_pro_x,
)
from .refactor import (
    balanced_projection,
    balanced_transform,
    reflora_precondition,
    reflora_refactor,
    reflora_s_factor,
    reflora_transform,
)
from .riemannian import lora_fa_gradient, riemannian_precondition, solve_spd, spd_inverse
from .rite import (
    RiteState,
    corrected_decay,
    escaped_mass,
    gram_inverse_root,
    lora_rite_step,
    rite_factor_direction,
)

__all__ = [
    "BAR_SCHEDULES",
    "BAR_VARIANTS",
    "CGResult",
    "LoraProGrams",
    "RiteState",
    "adam_direction",
    "als_block_solve",
    "als_matrix_sensing",
    "altlora_momentum",
    "balanced_projection",
    "balanced_transform",
    "balancedness",
    "bar_coefficient",
    "bar_gradient",
    "bar_regularizer",
    "bar_sign",
    "conjugate_gradient",
    "corrected_decay",
    "equivalent_gradient",
    "escaped_mass",
    "gram_imbalance",
    "gram_inverse_root",
    "lora_fa_gradient",
    "lora_pro_adam",
    "lora_pro_gradients",
    "lora_pro_grams",
    "lora_pro_x",
    "lora_rite_step",
    "reflora_precondition",
    "reflora_refactor",
    "reflora_s_factor",
    "reflora_transform",
    "riemannian_precondition",
    "rite_factor_direction",
    "solve_spd",
    "spd_inverse",
]
