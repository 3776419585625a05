"""The accelerated model against the reference: same API and state_dict, same numbers.

Under ``TRITON_INTERPRET=1`` (set by conftest) the accelerated model runs the Triton kernels on
CPU tensors: attention, fused linear cross-entropy / softmax and the one-launch redraw.
Tolerances (fp32): logits and loss rtol 1e-4 / atol 1e-5; gradients atol 1e-4 relative to
their scale; 20-step training losses relative 1e-4 — the kernels accumulate in fp32 in another
order than PyTorch. Local draws are bit-identical between the kernel and the PyTorch path.
"""

import pytest
import torch

import lorafast
from lorafast import reference
from lorafast.config import LocalConfig, LocalRule
from lorafast.init_laws import Normal, Uniform
from lorafast.train import clear_optimizer_state

CONFIGS = {
    # name: (V, E, H, L, kwargs)
    "plain": (61, 32, 32, 1, dict(num_heads=2, local="none")),
    "emb-proj-ffn-alt": (50, 24, 32, 2, dict(num_heads=2, local="ffn-alt")),
    "branch": (40, 32, 32, 2, dict(num_heads=2, local="branch", ffn_dim=48)),
    "merge": (40, 32, 32, 2, dict(num_heads=2, local="merge")),
    "frozen-uniform": (33, 16, 32, 2, dict(num_heads=2, local=LocalConfig((
        LocalRule("blocks.*.mlp.fc_in.weight", mode="frozen", law=Uniform(-0.1, 0.1)),
        LocalRule("blocks.0.attn.qkv.weight", law=Normal(0.0, 0.05)))))),
}


def pair(name, seed=0, max_seq_len=64):
    V, E, H, L, kw = CONFIGS[name]
    ref = reference.LoRA(V, E, H, L, max_seq_len=max_seq_len, seed=seed, **kw)
    acc = lorafast.LoRA(V, E, H, L, max_seq_len=max_seq_len, seed=seed, **kw)
    return ref, acc


def assert_grads_close(ref, acc, rtol=1e-4):
    gr = dict(ref.named_parameters())
    for n, p in acc.named_parameters():
        if p.grad is None:
            assert gr[n].grad is None, n
            continue
        g, r = p.grad, gr[n].grad
        scale = r.abs().max().clamp_min(1e-6)
        err = (g - r).abs().max()
        assert err <= rtol * scale + 1e-6, f"{n}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 13])
def test_parity_logits_loss_grads(name, T):
    ref, acc = pair(name)
    assert list(ref.state_dict()) == list(acc.state_dict())
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in acc.named_parameters()]
    for (n, a), b in zip(ref.state_dict().items(), acc.state_dict().values()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(ref.named_local_parameters(), acc.local_parameters()):
        assert torch.equal(b, a), n  # kernel draw == PyTorch Philox, bit for bit
    V = ref.config.vocab_size
    x = torch.randint(0, V, (2, T))
    y = torch.randint(0, V, (2, T))
    y[0, 0] = -100
    torch.testing.assert_close(acc(x), ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acc.probs(x, temperature=0.7), ref.probs(x, temperature=0.7), rtol=1e-4, atol=1e-6)
    lr, la = ref.loss(x, y), acc.loss(x, y)
    torch.testing.assert_close(la, lr, rtol=1e-5, atol=1e-6)
    lr.backward()
    la.backward()
    assert_grads_close(ref, acc)


def test_redraw_in_accelerated_matches_reference_every_step():
    ref, acc = pair("branch")
    for step in (1, 2, 9):
        ref.redraw_local_(step)
        acc.redraw_local_(step)
        for (n, a), b in zip(ref.named_local_parameters(), acc.local_parameters()):
            assert torch.equal(b, a), f"{n} step {step}"


def test_checkpoints_load_both_ways():
    ref, acc = pair("merge", seed=3)
    acc2 = lorafast.LoRA.from_config(ref.config)
    acc2.load_state_dict(ref.state_dict())
    ref2 = reference.LoRA.from_config(acc.config)
    ref2.load_state_dict(acc.state_dict())
    x = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(acc2(x), ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref2(x), ref(x), rtol=0, atol=0)


def test_accelerate_in_place():
    ref = reference.LoRA(50, 32, 32, 2, num_heads=2, max_seq_len=32)
    x = torch.randint(0, 50, (2, 11))
    want = ref(x).detach()
    params = {n: p for n, p in ref.named_parameters()}
    out = lorafast.accelerate(ref)
    assert out is ref and isinstance(ref, lorafast.LoRA)
    assert all(p is params[n] for n, p in ref.named_parameters())  # no copy
    assert all(type(b.attn) is lorafast.model.FusedCausalSelfAttention for b in ref.blocks)
    torch.testing.assert_close(ref(x), want, rtol=1e-4, atol=1e-5)
    assert type(torch.nn.functional.scaled_dot_product_attention).__module__ == "builtins"  # nothing patched
    with pytest.raises(TypeError):
        lorafast.accelerate(torch.nn.Linear(2, 2))


def _train(model, steps, seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    data = torch.randint(0, V, (2, 2, 12), generator=gen)  # two fixed batches: learnable by heart
    losses = []
    for step in range(steps):
        clear_optimizer_state(opt, model.redraw_local_(step))
        x = data[step % 2]
        loss = model.loss(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["emb-proj-ffn-alt", "merge"])
def test_convergence_20_steps(name):
    ref, acc = pair(name)
    if name == "merge":  # merge every 5 steps so that 20 steps see merges and redraws
        rules = tuple(LocalRule(r.pattern, mode="merge", rank=4, period=5) for r in ref.config.local.rules)
        V, E, H, L, kw = CONFIGS[name]
        kw = {**kw, "local": LocalConfig(rules)}
        ref, acc = reference.LoRA(V, E, H, L, max_seq_len=64, **kw), lorafast.LoRA(V, E, H, L, max_seq_len=64, **kw)
    lr, la = _train(ref, 20), _train(acc, 20)
    assert lr[-1] < lr[0] - 0.3  # it learns
    for i, (a, b) in enumerate(zip(lr, la)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {i}: reference {a} vs accelerated {b}"
    for (n, p), q in zip(ref.state_dict().items(), acc.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=n)


def test_generate_kv_cache_matches_reference():
    ref, acc = pair("emb-proj-ffn-alt", max_seq_len=16)
    ids = torch.randint(0, 50, (2, 5))
    a = ref.generate(ids, 14, temperature=0)  # runs past max_seq_len: the window slides
    b = acc.generate(ids, 14, temperature=0)
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = ref.generate(ids, 6, temperature=1.0, top_k=10, generator=g1)
    s2 = acc.generate(ids, 6, temperature=1.0, top_k=10, generator=g2)
    assert torch.equal(s1, s2)


def test_small_head_dim_warns_and_works():
    with pytest.warns(UserWarning, match="head dim 8"):
        m = lorafast.LoRA(20, 16, 16, 1, num_heads=2, max_seq_len=8)
    r = reference.LoRA(20, 16, 16, 1, num_heads=2, max_seq_len=8)
    x = torch.randint(0, 20, (1, 8))
    torch.testing.assert_close(m(x), r(x), rtol=1e-4, atol=1e-5)


def test_accelerated_bad_input_raises_before_kernels():
    _, acc = pair("plain")
    with pytest.raises(ValueError, match="outside"):
        acc(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match="outside"):
        acc.loss(torch.tensor([[0, 1]]), torch.tensor([[1, 99]]))


def test_bf16_under_interpreter_uses_exact_paths():
    # The interpreter's bf16 tl.dot is wrong (triton 3.9): "auto" takes the PyTorch path for the
    # fused linear cross-entropy, and an explicit impl="triton" refuses.
    from lorafast.ops import linear_cross_entropy

    h = torch.randn(8, 32, dtype=torch.bfloat16)
    w = torch.randn(40, 32, dtype=torch.bfloat16)
    t = torch.randint(0, 40, (8,))
    want = torch.nn.functional.cross_entropy((h.float() @ w.float().T), t)
    torch.testing.assert_close(linear_cross_entropy(h, w, None, t), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="bf16"):
        linear_cross_entropy(h, w, None, t, impl="triton")
    _, acc = pair("plain")
    acc = acc.bfloat16()
    x = torch.randint(0, 61, (2, 9))
    assert acc.loss(x).item() < 10


def test_training_uses_accelerated_by_default():
    from lorafast.train import TrainConfig, model_class

    assert model_class(TrainConfig().reference) is lorafast.LoRA
    assert model_class(True) is reference.LoRA


# ------------------------------------------------------------------ GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["emb-proj-ffn-alt", "branch"])
def test_cuda_bf16_parity(name):
    """bf16 on CUDA, FlashAttention rule: the error of the accelerated model against an fp32
    reference is at most 2x the error of the bf16 reference (+ atol), for logits, loss and every
    gradient."""
    V, E, _, L, kw = CONFIGS[name]
    kw = {**kw, "num_heads": 2}
    ref32 = reference.LoRA(V, E, 128, L, max_seq_len=256, **kw).cuda()
    ref16 = reference.LoRA(V, E, 128, L, max_seq_len=256, **kw).cuda().bfloat16()
    acc16 = lorafast.LoRA(V, E, 128, L, max_seq_len=256, **kw).cuda().bfloat16()
    x = torch.randint(0, V, (4, 200), device="cuda")
    want = ref32(x)
    e_ref = (ref16(x).float() - want).abs().max()
    e_acc = (acc16(x).float() - want).abs().max()
    assert e_acc <= 2 * e_ref + 1e-2, (e_acc, e_ref)
    l32, l16, la = ref32.loss(x), ref16.loss(x), acc16.loss(x)
    assert (la - l32).abs() <= 2 * (l16 - l32).abs() + 1e-2
    for m, l in ((ref32, l32), (ref16, l16), (acc16, la)):
        l.backward()
    g16, ga = dict(ref16.named_parameters()), dict(acc16.named_parameters())
    for n, p in ref32.named_parameters():
        if p.grad is None:
            continue
        e_ref = (g16[n].grad.float() - p.grad).abs().max()
        e_acc = (ga[n].grad.float() - p.grad).abs().max()
        assert e_acc <= 2 * e_ref + 1e-3 * p.grad.abs().max() + 1e-5, (n, e_acc, e_ref)


@pytest.mark.cuda
def test_cuda_torch_compile_matches():
    torch.manual_seed(0)
    m = lorafast.LoRA(1000, 128, 128, 2, max_seq_len=256).cuda()
    x = torch.randint(0, 1000, (2, 129), device="cuda")
    want = m.loss_unchecked(x[:, :-1], x[:, 1:])
    want.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    compiled = torch.compile(m.loss_unchecked, fullgraph=True)
    got = compiled(x[:, :-1], x[:, 1:])
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for n, p in m.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-4, msg=n)
    logits = torch.compile(m)(x)
    torch.testing.assert_close(logits, m(x), rtol=1e-4, atol=1e-4)


def test_signature_is_the_reference_signature_plus_impl():
    import inspect

    ref = list(inspect.signature(reference.LoRA).parameters.values())
    acc = list(inspect.signature(lorafast.LoRA).parameters.values())
    assert [(p.name, p.kind, p.default) for p in acc[:-1]] == [(p.name, p.kind, p.default) for p in ref]
    assert (acc[-1].name, acc[-1].kind, acc[-1].default) == ("impl", inspect.Parameter.KEYWORD_ONLY, "auto")
    with pytest.raises(ValueError, match="impl"):
        lorafast.LoRA(20, 16, 16, 1, impl="cuda")
    with pytest.raises(ValueError, match="head dim 8"):
        lorafast.LoRA(20, 16, 16, 1, num_heads=2, impl="triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_impl_reaches_every_op(impl, monkeypatch):
    from lorafast.ops import _attention, _linear_ce, _rerandomize

    calls = []
    tables = {"attention": (_attention, "_BACKENDS"), "linear_ce": (_linear_ce, "_CE_BACKENDS"),
              "linear_softmax": (_linear_ce, "_SOFTMAX_BACKENDS"), "rerandomize": (_rerandomize, "_BACKENDS")}
    for op, (mod, name) in tables.items():
        def record(fn, tag):
            return lambda *a, **k: (calls.append(tag), fn(*a, **k))[1]
        monkeypatch.setattr(mod, name, {b: record(fn, (op, b)) for b, fn in getattr(mod, name).items()})
    m = lorafast.LoRA(40, 32, 32, 2, num_heads=2, max_seq_len=16, local="branch", impl=impl)
    x = torch.randint(0, 40, (2, 9))
    m.loss(x).backward()
    m.probs(x)
    m.generate(x[:, :3], 2, temperature=0)
    m.redraw_local_(3)
    assert {op for op, _ in calls} == set(tables)
    assert {b for _, b in calls} == {impl}
    # accelerate() takes the same setting
    r = lorafast.accelerate(reference.LoRA(40, 32, 32, 1, num_heads=2, max_seq_len=16), impl=impl)
    assert r.impl == impl and all(b.attn.impl == impl for b in r.blocks)


def test_torch_compile_whole_model_trains_without_graph_breaks():
    """torch.compile(lorafast.LoRA(...)): the training forward model(ids, targets) is one graph,
    the lorafast ops single nodes in it; compiled training steps equal eager ones."""
    from lorafast.train import train_step

    V, kw = 40, dict(num_heads=2, max_seq_len=16, local="branch", seed=2)
    x = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(0))
    m = lorafast.LoRA(V, 32, 32, 2, **kw)
    ex = torch._dynamo.explain(m)(x[:, :-1], x[:, 1:])
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
    targets = {str(n.target) for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("lorafast.linear_ce_fwd") for t in targets), targets
    eager, base = lorafast.LoRA(V, 32, 32, 2, **kw), lorafast.LoRA(V, 32, 32, 2, **kw)
    compiled = torch.compile(base, backend="aot_eager")  # autograd through the custom ops, no codegen
    opts = [torch.optim.AdamW([p for p in mm.parameters() if p.requires_grad], lr=3e-3) for mm in (eager, base)]
    for step in range(4):
        a = train_step(eager, opts[0], x[:, :-1], x[:, 1:], step, 3e-3)
        b = train_step(compiled, opts[1], x[:, :-1], x[:, 1:], step, 3e-3)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
