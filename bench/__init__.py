"""Benchmark suite of lorafast (installed as ``lorafast.bench``)."""
