"""Data-parallel training on CPU with gloo, two processes (DDP and FSDP2), against one process.

One ``torchrun --nproc_per_node=2`` job runs every two-process scenario (tests/dist_scenarios.py)
so that the processes start once; the tests below compare its results with one-process runs
of the same tiny configuration (tests/dist_common.py: fp32, 6 steps, dense local FFN weights
redrawn every step and rank-3 merge adapters merged every 2 steps).
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from dist_common import TINY, merge_preset, record_redraws, write_data  # noqa: E402

from lorafast.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
TOL = 1e-5  # fp32 losses of 2 processes against 1: the same math, summed in another order


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = str(root / "data.txt")
    write_data(data)
    t0 = time.perf_counter()
    mp = pytest.MonkeyPatch()
    from lorafast.local import PRESETS

    mp.setitem(PRESETS, "merge", merge_preset)
    try:
        with record_redraws() as one_draws:
            one = train(TrainConfig(out=str(root / "one"), data=data, steps=6, **TINY))
        train(TrainConfig(out=str(root / "single-cut"), data=data, steps=3, **TINY))  # resumed on 2 ranks
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "dist_scenarios.py"), str(root)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
        one_resumed = train(TrainConfig(out=str(root / "fsdp-cut-for-1"), data=data, steps=6, fsdp=True,
                                        resume=True, **TINY))
    finally:
        mp.undo()
    res = [json.load(open(root / f"results-rank{i}.json")) for i in range(2)]
    print(f"\n2-process job and its 1-process baselines: {time.perf_counter() - t0:.1f} s")
    return dict(root=root, one=one, one_draws=one_draws, one_resumed=one_resumed, res=res, log=r.stdout + r.stderr)


def _close(a, b, tol=TOL):
    assert [s for s, _ in a] == [s for s, _ in b], (a, b)
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    assert worst <= tol, (worst, a, b)


def _metrics(folder):
    recs = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    return ([(r["step"], r["loss"]) for r in recs if r["loss"] is not None],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def _draws(records, first=0, steps=6):
    """{(step, name): (shape, [(offset, values)])} of the training redraws from step ``first``."""
    out = {}
    for step, name, offset, shape, values in records:
        if first <= step < steps:
            out.setdefault((step, name), (shape, []))[1].append((offset, values))
    return out


def _full(shape, pieces):
    flat = torch.cat([v.reshape(-1) for _, v in sorted(pieces, key=lambda p: p[0])])
    return flat.reshape(shape)


def test_ddp_equals_one_process(job):
    losses, vals = _metrics(job["root"] / "ddp")  # written by rank 0 of `torchrun -m lorafast train`
    _close(losses, job["one"]["losses"])
    _close(vals, job["one"]["val_losses"])
    assert len(losses) == 6 and len(vals) == 3


def test_local_draws_bit_identical_on_both_ranks(job):
    ranks = [_draws(torch.load(job["root"] / f"ddp-rank{i}.pt", weights_only=True)) for i in range(2)]
    one = _draws(job["one_draws"])
    assert set(ranks[0]) == set(ranks[1]) == set(one) and len(one) > 12
    for key, (shape, [(_, v0)]) in ranks[0].items():
        (_, [(_, v1)]) = ranks[1][key]
        assert torch.equal(v0, v1) and torch.equal(v0, one[key][1][0][1]), key


def test_fsdp_shards_equal_the_unsharded_draws_and_its_loss_matches_ddp(job):
    shards = [torch.load(job["root"] / f"fsdp-rank{i}.pt", weights_only=True) for i in range(2)]
    merged = _draws(shards[0] + shards[1], first=1)  # step 0: drawn whole by the constructor, before sharding
    one = _draws(job["one_draws"], first=1)
    assert set(merged) == set(one)
    split = 0
    for key, (shape, pieces) in merged.items():
        assert len(pieces) == 2, key  # each rank refilled its own rows only...
        split += all(v.numel() for _, v in pieces) and pieces[0][1].numel() != pieces[1][1].numel()
        assert sum(v.numel() for _, v in pieces) == one[key][1][0][1].numel(), key  # ...and nothing more
        assert torch.equal(_full(shape, pieces), one[key][1][0][1]), key
    assert split > 0  # uneven shards (3 adapter rows over 2 ranks) are covered
    ddp, _ = _metrics(job["root"] / "ddp")
    for res in job["res"]:
        _close([tuple(x) for x in res["fsdp"]], ddp)


def test_merge_on_sharded_weights(job):
    for res in job["res"]:
        assert res["merge_max_err"] <= 1e-6 * res["merge_scale"], res


def test_dcp_checkpoint_of_2_ranks_resumes_on_2_and_on_1(job):
    root = job["root"]
    ck = root / "fsdp-cut" / "checkpoints" / "step-00000006"
    meta = json.load(open(ck / "config.json"))
    assert meta["sharded"] and meta["world_size"] == 2
    assert sorted(meta["files"]) == ["model.safetensors", "shards/shard-00001-model-00001-of-00001.safetensors",
                                     "shards/shard-00002-model-00001-of-00001.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in [*meta["files"], "config.json"]:  # every rank's shard follows the umask too
        assert os.stat(ck / name).st_mode & 0o777 == 0o666 & ~umask, name
    full = [tuple(x) for x in job["res"][0]["fsdp"]]
    for res in job["res"]:
        assert [tuple(x) for x in res["resumed2"]] == full[3:]  # 2 ranks -> 2 ranks: bit for bit
    _close(job["one_resumed"]["losses"], full[3:])  # 2 ranks -> 1 process
    _close([tuple(x) for x in job["res"][0]["single_resumed2"]], job["one"]["losses"][3:])  # 1 process -> 2 ranks
    from lorafast.train import load_checkpoint

    model, meta = load_checkpoint(str(root / "fsdp"), reference=True)  # generate reads sharded checkpoints too
    x = torch.randint(0, 256, (1, 8))
    assert meta["step"] == 6 and torch.isfinite(model(x)).all()
    from lorafast.reference import LoRA

    whole = LoRA.from_pretrained(str(root / "fsdp"))  # the run's final weights, gathered into a model folder
    assert torch.equal(whole(x), model(x))
    import shutil  # a checkpoint from the middle of a run has the shards only: generate reads them

    shards_only = root / "shards-only"
    shutil.copytree(ck, shards_only)
    os.remove(shards_only / "model.safetensors")
    meta = json.load(open(shards_only / "config.json"))
    del meta["files"]["model.safetensors"]
    json.dump(meta, open(shards_only / "config.json", "w"))
    from_shards, _ = load_checkpoint(str(shards_only), reference=True)
    full_cut = LoRA.from_pretrained(str(root / "fsdp-cut"))
    assert torch.equal(from_shards(x), full_cut(x))


def test_only_rank_0_prints(job):
    log = job["log"]
    assert log.count("--- sample ---") == 1
    assert log.count("2 processes (DDP, global batch 8 = 2 x 4)") == 2  # the CLI run and the skip run
    assert log.count("2 processes (FSDP2") == 4


def test_skip_nonfinite_agrees_across_ranks(job):
    a, b = job["res"]
    assert a["skipped"] == b["skipped"] == 1
    assert a["skip_params"] == b["skip_params"]  # both ranks skipped the same update
    assert [s for s, _ in a["skip"]] == [1, 3]


def test_a_dead_rank_stops_the_other(tmp_path):
    write_data(tmp_path / "data.txt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_scenarios.py"), str(tmp_path), "die"],
                              env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    t0 = time.perf_counter()
    outs = [p.communicate(timeout=600) for p in procs]
    assert procs[1].returncode == 9
    msg = (tmp_path / "die-rank0.txt").read_text()
    assert msg.startswith("RankFailure: rank 0: a collective failed after step 2"), (msg, outs[0][1][-2000:])
    assert time.perf_counter() - t0 < 600
