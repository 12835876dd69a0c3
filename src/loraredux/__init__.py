"""loraredux: low-rank adaptation read through signal processing.

import loraredux as lx
lx.adapt_(model, lx.config("lora", rank=8, alpha=16), targets=["q_proj", "v_proj"])
rec = lx.advise(model, batches, loss_fn)     # measured rank per layer, init, optimizer, method, base format
"""

from . import assets, init, optim, quant, tasks, train
from .adapters import LoRA, LoRAConfig
from .advisor import Recommendation, advise
from .core import (
    Adapter,
    AdapterConfig,
    SavedModule,
    available_methods,
    config,
    config_from_dict,
    register,
)
from .io import load_adapter, save_adapter
from .quant import quantize_
from .verbs import (
    adapt_,
    adapter_state_dict,
    adapters,
    banks,
    disabled,
    load_adapter_state_dict,
    merge_,
    penalty,
    trainable_parameters,
    unadapt_,
)

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "LoRA",
    "LoRAConfig",
    "Recommendation",
    "SavedModule",
    "__version__",
    "adapt_",
    "adapter_state_dict",
    "adapters",
    "advise",
    "assets",
    "available_methods",
    "banks",
    "config",
    "config_from_dict",
    "disabled",
    "init",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_",
    "optim",
    "penalty",
    "quant",
    "quantize_",
    "register",
    "save_adapter",
    "tasks",
    "train",
    "trainable_parameters",
    "unadapt_",
]
