"""Scenarios of tests/test_distributed.py, run in every process of a 2-process job.

``torchrun --nproc_per_node=2 tests/dist_scenarios.py DIR`` runs them all (in one launch, so
that the job starts once); ``die`` runs under two plain processes (no torchrun agent that
would kill the survivor first). Results go to DIR for the test to compare with one-process runs.
"""
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_common import TINY, patch_merge_preset, record_redraws  # noqa: E402

from lorafast.train import TrainConfig, train  # noqa: E402


def flags(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        f = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(f if v else "--no-" + f[2:])
        elif v is not None:
            out += [f, str(v)]
    return out


def main(root: str, which: str) -> None:
    rank = int(os.environ["RANK"])
    patch_merge_preset()
    data = os.path.join(root, "data.txt")
    if which == "die":
        import lorafast.train as lt

        real = lt.train_step

        def dying(*a, **k):  # rank 1 dies (like kill -9) in its third step
            if rank == 1 and a[4] == 2:
                os._exit(9)
            return real(*a, **k)

        lt.train_step = dying
        try:
            train(TrainConfig(out=os.path.join(root, "die"), data=data, steps=6, dist_timeout=60, **TINY))
        except Exception as e:  # noqa: BLE001
            with open(os.path.join(root, f"die-rank{rank}.txt"), "w") as f:
                f.write(f"{type(e).__name__}: {e}")
        return

    # One process group for every scenario (train() uses it; a process group created by
    # train() itself, from torchrun's environment, is what the `die` scenario runs on).
    dist.init_process_group("gloo")
    # 1. DDP through the command line, as `torchrun -m lorafast train` runs it.
    from lorafast import cli

    with record_redraws(os.path.join(root, f"ddp-rank{rank}.pt")):
        rc = cli.main(["train", *flags({**TINY, "sample_tokens": 4}), "--data", data, "--steps", "6",
                       "--out", os.path.join(root, "ddp")])
    assert rc == 0, rc
    # 2. FSDP2, uninterrupted.
    with record_redraws(os.path.join(root, f"fsdp-rank{rank}.pt")):
        s = train(TrainConfig(out=os.path.join(root, "fsdp"), data=data, steps=6, fsdp=True, **TINY))
    # 3. FSDP2 interrupted at step 3 (a 3-step run), resumed on 2 ranks; a copy is resumed by the
    #    test on 1 rank. The one-process checkpoint the test wrote is resumed on 2 ranks.
    train(TrainConfig(out=os.path.join(root, "fsdp-cut"), data=data, steps=3, fsdp=True, **TINY))
    if rank == 0:
        shutil.copytree(os.path.join(root, "fsdp-cut"), os.path.join(root, "fsdp-cut-for-1"), symlinks=True)
    dist.barrier()
    r2 = train(TrainConfig(out=os.path.join(root, "fsdp-cut"), data=data, steps=6, fsdp=True, resume=True, **TINY))
    r12 = train(TrainConfig(out=os.path.join(root, "single-cut"), data=data, steps=6, fsdp=True, resume=True, **TINY))
    # 4. A NaN loss on rank 1 only, with --skip-nonfinite: both ranks skip that batch.
    import lorafast.reference as reference

    real = reference.LoRA.loss_unchecked
    calls = {"n": 0}

    def nan_on_rank1(self, *a, **k):
        loss = real(self, *a, **k)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if rank == 1 and calls["n"] == 2:
                return loss * float("nan")
        return loss

    reference.LoRA.loss_unchecked = nan_on_rank1
    import lorafast.train as lt

    nets, real_step = [], lt.train_step
    lt.train_step = lambda *a, **k: (nets.append(a[0]), real_step(*a, **k))[1]
    skip = train(TrainConfig(out=os.path.join(root, "skip"), data=data, steps=3, skip_nonfinite=True, **TINY))
    lt.train_step, reference.LoRA.loss_unchecked = real_step, real
    params = torch.cat([p.detach().reshape(-1) for p in nets[-1].parameters()])
    digest = hashlib.sha256(params.numpy().tobytes()).hexdigest()
    # 5. Merge on sharded weights: W += scale * up @ down with W, up, down sharded DTensors.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lorafast.reference import LocalLinear

    torch.manual_seed(0)
    lin = LocalLinear(12, 10)
    lin.add_lowrank(3, "adapter", 0.5)
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape))
    want = (lin.weight + 0.5 * lin.up @ lin.down).detach().clone()
    fully_shard(lin, mesh=init_device_mesh("cpu", (2,)))
    lin.merge_()
    got = lin.weight.full_tensor()
    with open(os.path.join(root, f"results-rank{rank}.json"), "w") as f:
        json.dump({"fsdp": s["losses"], "fsdp_val": s["val_losses"], "resumed2": r2["losses"],
                   "single_resumed2": r12["losses"], "skip": skip["losses"], "skipped": skip["skipped_steps"], "skip_params": digest,
                   "merge_max_err": float((got - want).abs().max()), "merge_scale": float(want.abs().max())}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "all")
