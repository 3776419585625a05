"""lorafast: a Transformer LM trained with Local Random Initialization, and fused Triton kernels for it.

"LoRA" here is *Local Random Initialization* (some parameters are randomly re-initialised at
every batch), not low-rank adaptation. ``lorafast.LoRA`` is the accelerated model, a drop-in for
the pure-PyTorch reference ``lorafast.reference.LoRA``.
"""
from lorafast.classification import LoRAForSequenceClassification
from lorafast.config import ModelConfig
from lorafast.local import PRESETS, LocalConfig, LocalRule
from lorafast.model import LoRA, accelerate

__version__ = "0.1.0"
__all__ = ["LoRA", "LoRAForSequenceClassification", "accelerate", "LocalConfig", "LocalRule", "ModelConfig", "PRESETS"]
