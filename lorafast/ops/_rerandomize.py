"""``rerandomize_``: refill a list of tensors in place from the counter-based Philox stream.

The values are defined by :mod:`lorafast.philox` (generator, key, counter layout, words to floats)
and :mod:`lorafast.init_laws` (law -> fp32 affine map). ``impl="torch"`` computes them with integer
PyTorch ops on the tensors' own device; ``impl="triton"`` refills every tensor of the list in ONE
launch of ``lorafast.kernels.rerandomize`` (imported lazily: this module needs no triton). Both give
the same bits for every law, normals included (see :mod:`lorafast.philox`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lorafast import philox
from lorafast.checks import SEED_RANGE, check_int
from lorafast.init_laws import LAW_NORMAL, LAW_ZEROS, LAWS
from lorafast.ops._dispatch import select_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GLOBAL_INDEX = 1 << 62  # offset + numel bound: group index (< 2^60) splits into two 32-bit words


def _int_list(name: str, values, n: int, lo: int, hi: int) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"rerandomize_: {name} must be a list of ints, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"rerandomize_: {name} has {len(values)} entries for {n} tensors")
    return [check_int(f"rerandomize_: {name}[{i}]", v, lo, hi) for i, v in enumerate(values)]


def _check_no_overlap(tensors: list[torch.Tensor]) -> None:
    """Two tensors writing the same bytes would race in the one-launch kernel (and give other
    values than the PyTorch path): reject aliases and overlapping views."""
    spans = sorted((t.untyped_storage().data_ptr(), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for i, t in enumerate(tensors) if t.numel())
    for (s0, _, e0, i), (s1, b1, _, j) in zip(spans, spans[1:]):
        if s0 == s1 and b1 < e0:
            raise ValueError(f"rerandomize_: tensors[{min(i, j)}] and tensors[{max(i, j)}] overlap in memory")


def _validate(tensors, init, ids, offsets, rounds):
    """Checks everything before any computation; returns (tensors, codes, shifts, scales, ids, offsets)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"rerandomize_: tensors must be a list of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    n = len(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rerandomize_: tensors[{i}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"rerandomize_: tensors[{i}] has dtype {t.dtype}; supported: fp32, fp16, bf16")
        if not t.is_contiguous():
            raise ValueError(f"rerandomize_: tensors[{i}] (shape {tuple(t.shape)}) is not contiguous")
        if t.device != tensors[0].device:
            raise ValueError(f"rerandomize_: tensors[{i}] is on {t.device}, tensors[0] on {tensors[0].device}; "
                             "all tensors must be on one device")
    _check_no_overlap(tensors)
    laws = list(init) if isinstance(init, (list, tuple)) else [init] * n
    if len(laws) != n:
        raise ValueError(f"rerandomize_: init has {len(laws)} laws for {n} tensors")
    for i, law in enumerate(laws):
        if not isinstance(law, LAWS):
            raise TypeError(f"rerandomize_: init[{i}] must be one of {[c.__name__ for c in LAWS]}, "
                            f"got {type(law).__name__}")
    ids = list(range(n)) if ids is None else _int_list("ids", ids, n, 0, 1 << 32)
    offsets = [0] * n if offsets is None else _int_list("offsets", offsets, n, 0, MAX_GLOBAL_INDEX)
    for i, (t, o) in enumerate(zip(tensors, offsets)):
        if o + t.numel() > MAX_GLOBAL_INDEX:
            raise ValueError(f"rerandomize_: offsets[{i}] + numel = {o + t.numel()} exceeds 2^62")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rerandomize_: rounds must be a positive int, got {rounds!r}")
    lowered = [law.lower(tuple(t.shape)) for law, t in zip(laws, tensors)]
    codes = [c for c, _, _ in lowered]
    shifts = [s for _, s, _ in lowered]
    scales = [s for _, _, s in lowered]
    return tensors, codes, shifts, scales, ids, offsets


def rerandomize_(tensors: Sequence[torch.Tensor], *, seed: int, step: int, init, impl: str = "auto",
                 ids: Sequence[int] | None = None, offsets: Sequence[int] | None = None,
                 rounds: int = philox.DEFAULT_ROUNDS) -> None:
    """Mutates every tensor of ``tensors`` in place into its draw ``step`` of the stream ``seed``.

    ``init``: one law (:mod:`lorafast.init_laws`) or one law per tensor. ``ids``: per-tensor 32-bit
    stream ids (default: list position; pass stable ids, e.g. the crc32 of a parameter name, so a
    tensor's values do not depend on which other tensors are in the list). ``offsets``: per-tensor
    global index of the first element (default 0): a shard holding elements [o, o + n) of a tensor
    gets exactly that slice of the full tensor's values. ``rounds``: Philox rounds (10; 7 is the
    faster variant used by fused dropout kernels). Values depend only on (seed, step, id, global
    element index). Runs under ``no_grad``; returns None. Tensors: fp32/fp16/bf16, contiguous,
    one device. ``seed`` and ``step`` are ints in [0, 2^64) (the 64-bit words of the key; out of
    range raises ValueError rather than wrapping onto another seed's draws). Bad input raises
    TypeError/ValueError before anything is written.
    """
    tensors, codes, shifts, scales, ids, offsets = _validate(tensors, init, ids, offsets, rounds)
    check_int("rerandomize_: seed", seed, *SEED_RANGE)
    check_int("rerandomize_: step", step, 0, 1 << 64)  # a draw index: any 64-bit word
    key = philox.derive_key(seed, step)
    if not tensors:
        return
    fill = _BACKENDS[select_backend("rerandomize_", impl, *tensors)]
    with torch.no_grad():
        fill(tensors, key[0], key[1], codes, shifts, scales, ids, offsets, rounds)


# --------------------------------------------------------------------------- PyTorch path
def _rerandomize_torch(tensors, k0, k1, codes, shifts, scales, ids, offsets, rounds) -> None:
    """The reference: all tensors' groups walked in chunks of ``philox.chunk_groups(device)``
    groups, so that many small tensors share one vectorised Philox evaluation."""
    device = tensors[0].device
    if device.type == "cpu" and philox.fill_cpu_(tensors, (k0, k1), rounds, codes, shifts, scales, ids, offsets):
        return                                # the C++ extension; else the numpy path below
    chunk_size = philox.chunk_groups(device)
    pieces: list[tuple[int, int, int]] = []   # (tensor index, first group, number of groups)
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        if codes[i] == LAW_ZEROS:
            t.zero_()
            continue
        g0, g1 = offsets[i] // 4, (offsets[i] + t.numel() + 3) // 4
        for gs in range(g0, g1, chunk_size):
            pieces.append((i, gs, min(chunk_size, g1 - gs)))
    chunk: list[tuple[int, int, int]] = []
    size = 0
    for p in pieces + [None]:
        if p is None or (chunk and size + p[2] > chunk_size):
            if chunk:
                _fill_chunk(chunk, tensors, (k0, k1), rounds, codes, shifts, scales, ids, offsets, device)
            chunk, size = [], 0
        if p is not None:
            chunk.append(p)
            size += p[2]


def _fill_chunk(chunk, tensors, key, rounds, codes, shifts, scales, ids, offsets, device) -> None:
    g = torch.cat([torch.arange(gs, gs + ng, dtype=torch.int64, device=device) for _, gs, ng in chunk])
    s = torch.cat([torch.full((ng,), ids[i], dtype=torch.int64, device=device) for i, _, ng in chunk])
    words = torch.stack(philox.philox4x32(g & philox.MASK32, g >> 32, s, 0, key, rounds), dim=1)  # [G, 4]
    pos = 0
    for i, gs, ng in chunk:
        w = words[pos:pos + ng]
        pos += ng
        t, off = tensors[i], offsets[i]
        base = (philox.words_to_normal(w) if codes[i] == LAW_NORMAL else philox.words_to_uniform(w)).view(-1)
        e_lo, e_hi = max(4 * gs, off), min(4 * (gs + ng), off + t.numel())   # global element range
        vals = base[e_lo - 4 * gs: e_hi - 4 * gs].mul_(scales[i]).add_(shifts[i])  # fp32, two roundings
        t.view(-1)[e_lo - off: e_hi - off].copy_(vals)                             # round to t.dtype


# --------------------------------------------------------------------------- Triton path
@torch.library.custom_op("lorafast::rerandomize_triton_", mutates_args=("tensors",))
def _rerandomize_triton(tensors: list[torch.Tensor], k0: int, k1: int, codes: list[int],
                        shifts: list[float], scales: list[float], ids: list[int], offsets: list[int],
                        rounds: int) -> None:
    from lorafast.kernels.rerandomize import rerandomize_launch  # lazy: keeps triton optional

    rerandomize_launch(tensors, k0=k0, k1=k1, codes=codes, shifts=shifts, scales=scales, ids=ids,
                       offsets=offsets, rounds=rounds)


@_rerandomize_triton.register_fake
def _(tensors, k0, k1, codes, shifts, scales, ids, offsets, rounds) -> None:
    return None



_BACKENDS = {"triton": _rerandomize_triton, "torch": _rerandomize_torch}
