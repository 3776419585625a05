"""lorafast: a Transformer LM trained with Local Random Initialization, on fused Triton kernels.

"LoRA" here is *Local Random Initialization* (some parameters are randomly re-initialised at
every batch), not low-rank adaptation.
"""
from lorafast.config import LocalConfig, LocalRule, ModelConfig, PRESETS
from lorafast.reference import LoRA  # replaced by the accelerated model once it lands

__version__ = "0.1.0"
__all__ = ["LoRA", "LocalConfig", "LocalRule", "ModelConfig", "PRESETS"]
