"""lorafast: a Transformer LM trained with Local Random Initialization, on fused Triton kernels."""
__version__ = "0.1.0"
