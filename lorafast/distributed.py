"""Data-parallel training under ``torchrun``: the process group, and :func:`parallelize`.

PyTorch's own engine does the work: ``torchrun`` starts the processes and the rendezvous
(one node or several), DistributedDataParallel (DDP) averages gradients, and FSDP2
(``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and optimizer state
(NCCL on CUDA, gloo on CPU). Nothing here launches processes or reduces tensors by hand.

Parallelism is applied from outside the model (house style 17): the model is built whole, the
same on every rank (its global initialisation and its local draws are functions of the seed,
not of the rank), then :func:`parallelize` wraps it. The model code knows nothing of ranks.

What each mode holds per rank (N processes, P parameters of which P_loc are local tensors):

DDP
    everything replicated: parameters, gradients, optimizer state, local tensors. One
    all-reduce of the trained gradients per step. Local tensors are redrawn whole on every rank
    (no communication: same seed, same step, same values).
FSDP2 (``--fsdp``)
    parameters, gradients and optimizer state sharded by rows (dim 0) over the N ranks;
    each block's parameters are all-gathered for its forward and backward. Local tensors of
    ``redraw``/``frozen`` rules, which the model keeps as buffers, are turned into frozen
    parameters (``requires_grad=False``) before sharding, so they are sharded too: each rank
    refills exactly its own rows, at their offset in the full tensor
    (:func:`lorafast.local.shard_of`), and the values equal the unsharded draw bit for bit. The
    price: they are all-gathered with the other weights of their block (communication a
    replicated copy would not need); the gain: 1/N of their memory at rest. Merge adapters are
    trained parameters, sharded like any other; merging them (``W += scale * up @ down``) runs
    on the sharded DTensors.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.nn as nn

__all__ = ["World", "init_world", "parallelize", "DataParallelLM", "bare_model", "reshard", "sharded_local_names"]


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, its ``device``, and the
    1-D device mesh over all of them (None in a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None
    owns_group: bool = False  # init_world created the process group (and destroys it in close())

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, prints and commits checkpoints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In place, across ranks (a no-op in a single process); returns ``t``."""
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def init_world(device: str = "auto", timeout_s: float = 600.0) -> World:
    """Join the process group ``torchrun`` set up (``WORLD_SIZE > 1`` in the environment), or
    describe a single process. Backend: NCCL when the device is CUDA, gloo otherwise. Each rank
    takes ``cuda:LOCAL_RANK`` (``device`` "auto" or "cuda"; an explicit ``cuda:N`` is refused under
    torchrun). ``timeout_s``: how long a collective waits for a rank that stopped answering
    before it raises, so the others exit instead of hanging. A process group the caller
    initialised already is used as it is. Raises ValueError for impossible settings."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if initialised else _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World(device=_single_device(device))
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank = dist.get_rank() if initialised else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not initialised:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (size,))
    return World(rank=rank, size=size, local_rank=local_rank, device=dev, mesh=mesh, owns_group=not initialised)


def _single_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return d


class _LossForward(nn.Module):
    """The model with ``loss_unchecked`` as its forward, so that DDP sees the training loss go
    through its own ``forward`` (where it prepares the gradient all-reduce)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss_unchecked(x, y)


class DataParallelLM(nn.Module):
    """A model under DistributedDataParallel, with the methods :func:`lorafast.train.train_step`
    and the evaluation call: ``redraw_local_`` (on the replicated model, no communication) and
    ``loss_unchecked`` (through DDP: gradients are averaged over the ranks in backward)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        # Local tensors are equal on every rank by construction: no per-step buffer broadcast.
        self.ddp = DistributedDataParallel(_LossForward(model), broadcast_buffers=False,
                                           device_ids=[device.index] if device.type == "cuda" else None)

    @property
    def module(self) -> nn.Module:
        """The bare model (the same parameters)."""
        return self.ddp.module.model

    @property
    def config(self):
        return self.module.config

    def redraw_local_(self, step: int) -> list[torch.Tensor]:
        return self.module.redraw_local_(step)

    def loss_unchecked(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.ddp(x, y)


def sharded_local_names(model: nn.Module) -> set[str]:
    """Names of the local tensors that :func:`parallelize` made frozen parameters for FSDP2: they
    are regenerated from (seed, step), so checkpoints leave them out."""
    return set(getattr(model, "_lorafast_sharded_local", ()))


def _local_buffers_to_frozen_parameters(model: nn.Module) -> None:
    names = []
    for t in model.local_tensors.tensors:
        m, attr = t.module, t.attr
        if attr in m._buffers:
            buf = m._buffers.pop(attr)
            m._non_persistent_buffers_set.discard(attr)
            m.register_parameter(attr, nn.Parameter(buf, requires_grad=False))
            names.append(t.name)
    model._lorafast_sharded_local = tuple(names)


def parallelize(model: nn.Module, world: World, fsdp: bool = False) -> nn.Module:
    """Wrap ``model`` (built whole, the same on every rank) for data-parallel training on
    ``world``: DDP, or FSDP2 when ``fsdp``. Returns what to train: an object with
    ``redraw_local_(step)``, ``loss_unchecked(x, y)``, ``parameters()``, ``train()``/``eval()``
    (the model itself in a single process and under FSDP2, which shards in place; a
    :class:`DataParallelLM` under DDP). Under FSDP2 each Transformer block is one communication
    group and the root holds the embeddings, final LayerNorm and output layer."""
    if not world.distributed:
        return model.to(world.device)
    if not fsdp:
        return DataParallelLM(model.to(world.device), world.device)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    _local_buffers_to_frozen_parameters(model)
    for block in model.blocks:
        fully_shard(block, mesh=world.mesh)  # moves the block to the mesh's device, then shards it
    fully_shard(model, mesh=world.mesh)  # the rest: embeddings, final LayerNorm, output layer
    register_fsdp_forward_method(model, "loss_unchecked")
    return model


def bare_model(net: nn.Module) -> nn.Module:
    """The model inside what :func:`parallelize` returned."""
    return net.module if isinstance(net, DataParallelLM) else net


def reshard(net: nn.Module) -> None:
    """Under FSDP2, put every parameter back to its sharded state (the root keeps its parameters
    gathered after a forward with no backward, e.g. an evaluation); the redraw and the merge
    write to the sharded parameters. A no-op otherwise."""
    if hasattr(net, "reshard"):
        net.reshard()
