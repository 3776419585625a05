"""Shared by tests/test_distributed.py and the processes it starts (tests/dist_scenarios.py)."""
import contextlib

import torch

# A tiny run: constant learning rate after a 2-step warmup, so that a 3-step run resumed to 6
# steps follows the schedule of an uninterrupted 6-step run; every step logged.
TINY = dict(batch_size=8, seq_len=16, embedding_dim=32, hidden_dim=32, num_layers=2, warmup=2, lr=3e-3,
            min_lr=3e-3, eval_every=3, eval_batches=2, log_every=1, sample_tokens=0, progress=False,
            reference=True, preset="merge", checkpoint_every=0, threads=1)


def write_data(path) -> None:
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jumbo plums".split()
    text = " ".join(f"{words[(i * 7) % len(words)]}{i % 13}" for i in range(4000))
    with open(path, "w") as f:
        f.write(text)


def merge_preset(num_layers: int):
    """Dense local FFN weights (redrawn every step) and rank-3 merge adapters on the attention
    projections (merged every 2 steps): sharded unevenly (3 rows over 2 ranks) under FSDP2."""
    from lorafast.local import LocalRule, _ffn_alt

    return _ffn_alt(num_layers) + tuple(LocalRule(f"blocks.*.attn.{m}", mode="merge", rank=3, period=2)
                                        for m in ("qkv", "proj"))


def patch_merge_preset() -> None:
    from lorafast.local import PRESETS

    PRESETS["merge"] = merge_preset


@contextlib.contextmanager
def record_redraws(path=None):
    """Record (step, name, offset, full shape, values this process holds) of every local tensor
    each redraw refills; saved to ``path`` (torch.save of plain tensors and tuples) on exit."""
    from lorafast.local import LocalTensors, shard_of

    real = LocalTensors.redraw_
    records = []

    def redraw_(self, step, impl="torch"):
        before = dict(self.current_draw)
        out = real(self, step, impl)
        for t in self.tensors:
            if before.get(t.name) != self.current_draw.get(t.name):
                local, offset = shard_of(t.tensor)
                records.append((step, t.name, offset, tuple(t.tensor.shape), local.detach().clone().cpu()))
        return out

    LocalTensors.redraw_ = redraw_
    try:
        yield records
    finally:
        LocalTensors.redraw_ = real
        if path is not None:
            torch.save(records, path)
