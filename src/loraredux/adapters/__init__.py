"""Axis 1 of the taxonomy: one file per method. Importing this package registers every method."""

from .abba import ABBA, ABBAConfig
from .adalora import AdaLoRA, AdaLoRAConfig
from .dora import DoRA, DoRAConfig
from .hira import HiRA, HiRAConfig
from .krona import KronA, KronAConfig
from .loha import LoHa, LoHaConfig
from .lokr import LoKr, LoKrConfig
from .lora import LoRA, LoRAConfig
from .lora_xs import LoRAXS, LoRAXSConfig
from .lorta import LoRTA, LoRTAConfig
from .lotr import LoTR, LoTRConfig
from .mora import MoRA, MoRAConfig
from .polar import PoLAR, PoLARConfig
from .svft import SVFT, SVFTConfig
from .tensor_train import TensorTrain, TensorTrainConfig
from .tied_lora import TiedLoRA, TiedLoRAConfig
from .tucker import Tucker, TuckerConfig
from .vera import VeRA, VeRAConfig

__all__ = [
    "ABBA",
    "SVFT",
    "ABBAConfig",
    "AdaLoRA",
    "AdaLoRAConfig",
    "DoRA",
    "DoRAConfig",
    "HiRA",
    "HiRAConfig",
    "KronA",
    "KronAConfig",
    "LoHa",
    "LoHaConfig",
    "LoKr",
    "LoKrConfig",
    "LoRA",
    "LoRAConfig",
    "LoRAXS",
    "LoRAXSConfig",
    "LoRTA",
    "LoRTAConfig",
    "LoTR",
    "LoTRConfig",
    "MoRA",
    "MoRAConfig",
    "PoLAR",
    "PoLARConfig",
    "SVFTConfig",
    "TensorTrain",
    "TensorTrainConfig",
    "TiedLoRA",
    "TiedLoRAConfig",
    "Tucker",
    "TuckerConfig",
    "VeRA",
    "VeRAConfig",
]
