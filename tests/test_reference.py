"""The reference model: shapes, causality, Local Random Initialization semantics, bad input."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lorafast.config import LocalConfig, LocalRule, ModelConfig
from lorafast.init_laws import Normal, Uniform
from lorafast.train import clear_optimizer_state
from lorafast.reference import LoRA

SMALL = dict(num_heads=2, max_seq_len=32)


@pytest.mark.parametrize("V,E,H,L,preset", [
    (50, 16, 16, 1, "none"),
    (37, 12, 32, 2, "ffn-alt"),   # embedding_dim != hidden_dim: projection E -> H
    (64, 32, 16, 3, "branch"),
    (11, 16, 16, 2, "merge"),
    (20, 16, 24, 2, "reservoir"),
])
def test_shapes(V, E, H, L, preset):
    m = LoRA(V, E, H, L, local=preset, **SMALL)
    x = torch.randint(0, V, (3, 7))
    logits = m(x)
    assert logits.shape == (3, 7, V) and logits.dtype == torch.float32
    p = m.probs(x)
    assert p.shape == (3, 7, V)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 7))
    torch.testing.assert_close(p, torch.softmax(logits, -1))
    assert (m.emb_proj is None) == (E == H)
    loss = m.loss(x[:, :-1], x[:, 1:])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    # the loss on the first 6 positions equals cross-entropy of the full logits there (causality)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(m.loss(x), ref)  # targets default to the ids shifted by one


def test_positional_document_arguments():
    # LoRA(vocab_size, embedding_dim, hidden_dim, num_layers): the document's order, corrected.
    m = LoRA(100, 64, 128, 3)
    assert (m.config.vocab_size, m.config.embedding_dim, m.config.hidden_dim, m.config.num_layers) == (100, 64, 128, 3)
    assert len(m.blocks) == 3 and m.config.num_heads == 2 and m.config.ffn_dim == 512
    assert m.tok_emb.weight.shape == (100, 64) and m.emb_proj.weight.shape == (128, 64)
    assert m.head.weight.shape == (100, 128) and m.head.bias.shape == (100,)  # W_o h + b_o


def test_causality():
    m = LoRA(40, 16, 16, 2, local="branch", **SMALL)
    x = torch.randint(0, 40, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % 40
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_attention_matches_sdpa():
    m = LoRA(10, 32, 32, 1, num_heads=4, max_seq_len=16)
    q, k, v = torch.randn(3, 2, 4, 9, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(m.blocks[0].attn.attend(q, k, v), ref)


def test_same_seed_same_model_and_state_dict_keys():
    a, b = LoRA(30, 16, 16, 2, seed=3, **SMALL), LoRA(30, 16, 16, 2, seed=3, **SMALL)
    c = LoRA(30, 16, 16, 2, seed=4, **SMALL)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.head.weight, c.head.weight)
    # default preset ffn-alt: blocks.1.mlp.fc_in.weight is local, so it is not in the checkpoint
    keys = set(a.state_dict())
    assert "blocks.1.mlp.fc_in.weight" not in keys and "blocks.0.mlp.fc_in.weight" in keys
    assert [n for n, _ in a.named_local_parameters()] == ["blocks.1.mlp.fc_in.weight"]


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("preset", ["ffn-alt", "branch"])
def test_redraw_local_redraws_every_step_and_leaves_globals(preset):
    m = LoRA(30, 16, 16, 3, local=preset, **SMALL)
    glob0 = _snapshot(m.global_parameters())
    m.redraw_local_(1)
    s1 = _snapshot(m.local_parameters())
    m.redraw_local_(2)
    s2 = _snapshot(m.local_parameters())
    m.redraw_local_(1)
    s1b = _snapshot(m.local_parameters())
    for a, b, c in zip(s1, s2, s1b):
        assert torch.equal(a, c)  # same (seed, step) -> bit-identical
        assert not torch.equal(a, b)  # another step -> other values
        assert a.std() > 0
    for g0, g in zip(glob0, m.global_parameters()):
        assert torch.equal(g0, g)
    # a second model with the same seed draws the same local values at step 2; another seed differs
    other = LoRA(30, 16, 16, 3, local=preset, **SMALL)
    other.redraw_local_(2)
    for a, b in zip(s2, other.local_parameters()):
        assert torch.equal(a, b)
    third = LoRA(30, 16, 16, 3, local=preset, seed=1, **SMALL)
    third.redraw_local_(2)
    assert not torch.equal(s2[0], next(third.local_parameters()))


def test_local_law_and_period():
    rules = (LocalRule("blocks.0.mlp.fc_in.weight", law=Uniform(-0.5, 0.5), period=3),
             LocalRule("blocks.1.attn.qkv.weight", law=Normal(1.0, 0.1)))
    m = LoRA(30, 16, 16, 2, local=LocalConfig(rules), **SMALL)
    w = m.blocks[0].mlp.fc_in.weight
    assert w.min() >= -0.5 and w.max() < 0.5
    q = m.blocks[1].attn.qkv.weight
    assert abs(q.mean().item() - 1.0) < 0.02 and abs(q.std().item() - 0.1) < 0.02
    before = w.clone()
    m.redraw_local_(2)
    assert torch.equal(w, before)  # still the draw of period 0 (steps 0..2)
    m.redraw_local_(3)
    assert not torch.equal(w, before)


@pytest.mark.parametrize("preset", ["ffn-alt", "reservoir", "branch"])
def test_local_tensors_take_no_gradient_and_no_optimizer_state(preset):
    m = LoRA(30, 16, 16, 2, local=preset, **SMALL)
    local = list(m.local_parameters())
    assert local and all(not t.requires_grad for t in local)
    ids = {id(t) for t in local}
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert not any(id(p) in ids for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = torch.randint(0, 30, (2, 9))
    m.loss(x).backward()
    opt.step()
    assert all(t.grad is None for t in local)
    assert not any(id(p) in ids for p in opt.state)
    assert all(p.grad is not None for p in trainable)


def test_frozen_is_drawn_once():
    m = LoRA(30, 16, 16, 4, local="reservoir", **SMALL)
    s0 = _snapshot(m.local_parameters())
    m.redraw_local_(5)
    m.redraw_local_(17)
    assert all(torch.equal(a, b) for a, b in zip(s0, m.local_parameters()))


def test_merge_trains_adapters_merges_and_redraws():
    rule = LocalRule("blocks.*.mlp.fc_in", mode="merge", rank=2, period=2)
    m = LoRA(30, 16, 16, 2, local=LocalConfig((rule,)), **SMALL)
    fc = m.blocks[0].mlp.fc_in
    assert not fc.weight.requires_grad and fc.down.requires_grad and fc.up.requires_grad
    assert torch.count_nonzero(fc.up) == 0 and fc.down.std() > 0
    trainable = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5)
    x = torch.randint(0, 30, (4, 10))
    w0 = fc.weight.clone()
    for step in range(2):
        clear_optimizer_state(opt, m.redraw_local_(step))
        m.loss(x).backward()
        opt.step()
        opt.zero_grad()
    assert torch.count_nonzero(fc.up) > 0
    expected = w0 + fc.scale * (fc.up @ fc.down)
    down_before = fc.down.clone()
    logits_before = m(x)
    clear_optimizer_state(opt, m.redraw_local_(2))  # a new period: merge, redraw down, zero up, reset state
    torch.testing.assert_close(fc.weight, expected)
    assert not torch.equal(fc.weight, w0)
    assert torch.count_nonzero(fc.up) == 0 and not torch.equal(fc.down, down_before)
    assert fc.down not in opt.state and fc.up not in opt.state
    torch.testing.assert_close(m(x), logits_before, rtol=1e-5, atol=1e-5)  # merging keeps the function
    clear_optimizer_state(opt, m.redraw_local_(2))  # idempotent
    torch.testing.assert_close(fc.weight, expected)
    # adapters and their draw index are in the checkpoint; a reloaded model continues identically
    sd = m.state_dict()
    assert "blocks.0.mlp.fc_in.down" in sd and "blocks.0.mlp.fc_in.draw" in sd
    m2 = LoRA(30, 16, 16, 2, local=LocalConfig((rule,)), **SMALL)
    m2.load_state_dict(sd)
    m2.redraw_local_(3)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_checkpoint_roundtrip_regenerates_local():
    m = LoRA(30, 16, 16, 2, **SMALL)
    m.redraw_local_(7)
    sd = m.state_dict()
    m2 = LoRA(30, 16, 16, 2, **SMALL)
    m2.load_state_dict(sd)
    m2.redraw_local_(7)
    x = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


def test_generate():
    m = LoRA(30, 16, 16, 2, max_seq_len=8, num_heads=2)
    ids = torch.randint(0, 30, (2, 3))
    out = m.generate(ids, 10, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 13) and torch.equal(out[:, :3], ids)
    assert out.min() >= 0 and out.max() < 30
    greedy = m.generate(ids, 2, temperature=0)
    assert torch.equal(greedy[:, 3], m(ids)[:, -1].argmax(-1))


def test_reference_imports_no_triton():
    code = "import sys, lorafast.reference, lorafast.train; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([[0, 30]]), ValueError, "outside"),
    (torch.tensor([[-1, 3]]), ValueError, "outside"),
    (torch.zeros(2, 3), TypeError, "integer"),
    (torch.zeros(2, 3, dtype=torch.bool), TypeError, "integer"),
    (torch.zeros(0, 3, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(3, dtype=torch.long), ValueError, "shape"),
    (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "shape"),
    (torch.zeros(1, 33, dtype=torch.long), ValueError, "max_seq_len"),
    ([[1, 2]], TypeError, "Tensor"),
])
def test_bad_ids(bad, exc, match):
    m = LoRA(30, 16, 16, 1, **SMALL)
    with pytest.raises(exc, match=match):
        m(bad)
    with pytest.raises(exc, match=match):
        m.probs(bad)


def test_bad_targets():
    m = LoRA(30, 16, 16, 1, **SMALL)
    x = torch.randint(0, 30, (2, 4))
    with pytest.raises(ValueError, match="outside"):
        m.loss(x, torch.full((2, 4), 30))
    with pytest.raises(ValueError, match="shape"):
        m.loss(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        m.loss(x, torch.zeros(2, 4))
    t = torch.randint(0, 30, (2, 4))
    t[0, 0] = -100
    assert torch.isfinite(m.loss(x, t))
    with pytest.raises(ValueError, match="seq_len >= 2"):
        m.loss(x[:, :1])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_heads=3), ValueError, "does not divide"),
    (dict(local="nope"), ValueError, "unknown local preset"),
    (dict(local=LocalConfig((LocalRule("blocks.*.attn.qkv", law=Normal(0.0, 1.0), rank=2),))), None, None),
    (dict(local=LocalConfig((LocalRule("no.such.weight"),))), ValueError, "matches no"),
    (dict(local=LocalConfig((LocalRule("blocks.0.mlp.fc_in.weight"), LocalRule("blocks.*.mlp.fc_in.weight")))),
     ValueError, "more than one"),
    (dict(local=LocalConfig((LocalRule("blocks.0.mlp.fc_in.weight"),
                             LocalRule("blocks.0.mlp.fc_in", mode="merge", rank=2)))), ValueError, "base weight"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(max_seq_len=0), ValueError, "max_seq_len"),
    (dict(local=3), TypeError, "local"),
])
def test_bad_config(kwargs, exc, match):
    if exc is None:
        LoRA(30, 16, 16, 2, **kwargs)
        return
    with pytest.raises(exc, match=match):
        LoRA(30, 16, 16, 2, **kwargs)


def test_bad_laws_and_rules():
    with pytest.raises(ValueError):
        Normal(0.0, -1.0)
    with pytest.raises(ValueError, match="merge"):
        LocalRule("blocks.*.mlp.fc_in", mode="merge")
    with pytest.raises(ValueError, match="mode"):
        LocalRule("x", mode="sometimes")
    with pytest.raises(ValueError, match="period"):
        LocalRule("x", period=0)
    with pytest.raises(ValueError, match="scale"):
        LocalRule("x", rank=2, scale=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        LoRA(30, 16, 16, 1, **SMALL).generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=float("nan"))
    with pytest.raises(ValueError):
        LoRA(0, 16, 16, 1)
    with pytest.raises(ValueError, match="step"):
        LoRA(30, 16, 16, 1).redraw_local_(-1)


def test_config_roundtrip():
    cfg = ModelConfig(30, 16, 24, 2, local="merge", seed=5)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.local.rules[0].rank == 8 and math.isclose(again.local.rules[0].scale, 1.0)


@pytest.mark.parametrize("seed,exc,says", [
    (2 ** 64, ValueError, r"seed = 18446744073709551616 is out of range \[0, 2\^64\)"),
    (-1, ValueError, r"seed = -1 is out of range"),
    (1.5, ValueError, "seed must be an int"),  # the config's type errors are ValueErrors, as before
])
@pytest.mark.parametrize("accelerated", [False, True])
def test_out_of_range_seed_and_step_raise_in_both_models(seed, exc, says, accelerated):
    # Issue 13 item 2: LoRA(seed=2**64) passed validation, then failed inside torch (Overflow
    # when unpacking long long); a redraw step outside the int64 step buffer is refused too.
    import lorafast

    cls = lorafast.LoRA if accelerated else LoRA
    with pytest.raises(exc, match=says):
        cls(30, 16, 16, 2, seed=seed)
    m = cls(30, 16, 16, 2, seed=2 ** 64 - 1)  # the largest seed works
    for step in (2 ** 63, -1):
        with pytest.raises(ValueError, match=r"step = .* is out of range \[0, 2\^63\)"):
            m.redraw_local_(step)
