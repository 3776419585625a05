"""What every kernel module shares: the compile-gate configuration type, the interpreter check
and the Triton names of torch dtypes. Imports nothing but the standard library and torch, so
``lorafast.ops`` can read the interpreter flag without importing triton."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

# Triton's pointer element type of each floating dtype a kernel takes ("*fp16", ...).
TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, which must be
    set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One configuration of one kernel, as it is launched, for the AOT compile gate.

    ``signature`` maps every argument name to a Triton type string ("*fp16", "i32", "fp32",
    "constexpr", ...); ``constexprs`` gives the value of each constexpr argument;
    ``aligned`` names the pointer/int arguments that the launcher guarantees divisible by 16
    (what Triton's launch-time specialisation would see for contiguous tensors).
    ``needs_mma``: its main loop must run on tensor cores (HGMMA on sm_90, HMMA on sm_80).
    ``allow_spills``: set only with a comment at the declaration saying why a spill is accepted.
    ``options``: compile options the launcher passes besides warps and stages (e.g.
    ``enable_fp_fusion=False``), so that the gate builds the binary that is launched.
    ``exp2_per_iteration``: the ``exp2`` (SASS ``MUFU.EX2``) one thread needs per main-loop
    iteration for the tile (elements of the tile that take an exp2, divided by the threads of
    the program, plus per-row rescales); None for kernels without a softmax. The static report
    compares the binary against it, so that duplicated work (two warpgroups computing the same
    tile) fails the gate.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    needs_mma: bool = False
    allow_spills: bool = False
    archs: tuple[int, ...] = (90, 80)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # further compile options, as launched
    exp2_per_iteration: int | None = None
