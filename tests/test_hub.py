"""Saving and loading the way the Hugging Face ecosystem does, and the local state (issue 13 item 10).

A model's weights never meet local tensors of another draw: the state dict carries the seed,
the local rules and the step of the local draws (``_extra_state``), and every way of loading
weights (``load_state_dict``, ``from_pretrained``, checkpoints) checks the seed and rules and
redraws for the step. Round trips are bit for bit. No test touches the network: the Hub's
download and upload calls are replaced by local stand-ins.

The tests of the local state use only APIs that existed before it (``lorafast.LoRA``,
``lorafast.reference.LoRA``, ``load_state_dict``), so that they fail, rather than error, on a
lorafast without it.
"""
import json
import os
import shutil

import pytest
import torch

import lorafast
from lorafast import reference

SMALL = dict(num_heads=2, max_seq_len=32)
PRESETS = ["ffn-alt", "reservoir", "branch", "merge", "none"]
MODELS = {"reference": reference.LoRA, "accelerated": lorafast.LoRA}


def make(cls, seed=0, local="ffn-alt", V=48, **kw):
    return cls(V, 24, 32, 2, local=local, seed=seed, **SMALL, **kw)


def trained_like(model, gen_seed=1):
    """Move every trained tensor away from its initialisation, as training would."""
    gen = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def ids(V=48, B=2, T=11, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ issue 13 item 10: the local state
@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_of_another_seed_is_refused(name):
    cls = MODELS[name]
    saved = make(cls, seed=3)
    other = make(cls, seed=4)
    with pytest.raises(ValueError, match="seed 3.*seed 4"):
        other.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="seed"):  # strict=False skips missing keys, not the seed
        other.load_state_dict(saved.state_dict(), strict=False)
    same = make(cls, seed=3)
    same.load_state_dict(saved.state_dict())  # the same seed loads


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_of_other_local_rules_is_refused(name):
    # ffn-alt and reservoir have the same parameter names and shapes; only the draws differ
    cls = MODELS[name]
    saved = make(cls, local="ffn-alt")
    other = make(cls, local="reservoir")
    assert list(saved.state_dict()) == list(other.state_dict())
    with pytest.raises(ValueError, match="local rules"):
        other.load_state_dict(saved.state_dict())


# The accelerated model runs its kernels in the interpreter here: one case of it is enough.
REF_ALL_ACC_ONE = [("reference", p) for p in ("ffn-alt", "branch", "merge")] + [("accelerated", "merge")]


@pytest.mark.parametrize("name,local", REF_ALL_ACC_ONE)
def test_state_dict_carries_the_step_of_the_draws(name, local):
    cls = MODELS[name]
    saved = trained_like(make(cls, seed=5, local=local))
    saved.redraw_local_(45)  # merge: two merges and a redraw of the adapters on the way
    fresh = make(cls, seed=5, local=local)  # holds the draws of step 0
    fresh.load_state_dict(saved.state_dict())
    for (n, a), b in zip(saved.named_local_parameters(), fresh.local_parameters()):
        assert torch.equal(a, b), n
    x = ids()
    assert torch.equal(fresh(x), saved(x))


def test_state_dict_check_reaches_a_model_inside_another_module():
    # load_state_dict of an outer module: the check and the redraw run in the inner model too
    saved = torch.nn.ModuleDict({"lm": trained_like(make(reference.LoRA, seed=2))})
    saved["lm"].redraw_local_(9)
    fresh = torch.nn.ModuleDict({"lm": make(reference.LoRA, seed=2)})
    fresh.load_state_dict(saved.state_dict())
    x = ids()
    assert torch.equal(fresh["lm"](x), saved["lm"](x))
    with pytest.raises(ValueError, match="seed"):
        torch.nn.ModuleDict({"lm": make(reference.LoRA, seed=7)}).load_state_dict(saved.state_dict())


def test_local_state_entry_is_checked():
    from lorafast.hub import LOCAL_STATE_KEY, local_state

    m = make(reference.LoRA, seed=(1 << 64) - 1)  # the largest seed survives the int64 encoding
    state = m.state_dict()
    assert torch.equal(state[LOCAL_STATE_KEY], local_state(m.config, 0))
    make(reference.LoRA, seed=(1 << 64) - 1).load_state_dict(state)
    for bad in (torch.zeros(5, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), torch.zeros(5)):
        with pytest.raises(ValueError, match="local state|_extra_state"):
            make(reference.LoRA).load_state_dict({**state, LOCAL_STATE_KEY: bad})


# ------------------------------------------------------------------ save_pretrained / from_pretrained
def _local_names(model):
    """Names of local tensors that are not stored (redraw/frozen)."""
    return {t.name for t in model.local_tensors.tensors if t.rule.mode != "merge"}


@pytest.mark.parametrize("name,local", [("reference", p) for p in PRESETS] + [("accelerated", "branch")])
def test_save_pretrained_round_trip_is_bit_for_bit(tmp_path, name, local):
    from safetensors.torch import load_file

    cls = MODELS[name]
    model = trained_like(make(cls, seed=11, local=local))
    model.redraw_local_(23)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    stored = load_file(tmp_path / "model.safetensors")
    assert not _local_names(model) & set(stored), "redraw/frozen local tensors must not be stored"
    meta = json.load(open(tmp_path / "config.json"))
    assert meta["format"] == "lorafast-2" and meta["architecture"] == "LoRA" and meta["step"] == 23
    assert meta["model"]["seed"] == 11 and meta["model"]["local"]["name"] == local
    assert "local-random-initialization" in open(tmp_path / "README.md").read()

    loaded = cls.from_pretrained(tmp_path)
    assert not loaded.training  # eval mode, as transformers and PyTorchModelHubMixin return models
    assert loaded.local_step == 23 and loaded.config == model.config
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(model.named_local_parameters(), loaded.local_parameters()):
        assert torch.equal(a, b), k  # regenerated from (seed, step), bit for bit
    x = ids()
    assert torch.equal(loaded(x), model.eval()(x))


def test_reference_and_accelerated_load_each_others_folders(tmp_path):
    ref = trained_like(make(reference.LoRA, seed=4, local="branch"))
    ref.redraw_local_(3)
    ref.save_pretrained(tmp_path)
    acc = lorafast.LoRA.from_pretrained(tmp_path, impl="torch")
    assert acc.impl == "torch"
    for (k, a), b in zip(ref.named_local_parameters(), acc.local_parameters()):
        assert torch.equal(a, b), k
    x = ids()
    torch.testing.assert_close(acc(x), ref(x), rtol=1e-4, atol=1e-5)


def test_training_folder_loads_with_one_call(tmp_path):
    from lorafast.train import TrainConfig, load_checkpoint, train

    train(TrainConfig(steps=6, batch_size=4, seq_len=16, embedding_dim=16, hidden_dim=16, num_layers=2, warmup=2,
                      eval_every=0, eval_batches=1, sample_tokens=0, progress=False, reference=True, out=str(tmp_path),
                      preset="branch"))
    model = reference.LoRA.from_pretrained(tmp_path)
    want, meta = load_checkpoint(str(tmp_path), reference=True)
    assert model.local_step == meta["step"] == 6
    assert model.tokenizer.kind == "bytes" and meta["tokenizer"]["type"] == "bytes"
    x = ids(V=256)
    assert torch.equal(model(x), want.eval()(x))


def test_folder_without_local_state_still_loads(tmp_path):
    # folders written before the local state existed: seed, rules and step come from config.json
    from safetensors.torch import load_file, save_file

    model = trained_like(make(reference.LoRA, seed=8))
    model.redraw_local_(5)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["_extra_state"]
    save_file(state, tmp_path / "model.safetensors")
    loaded = reference.LoRA.from_pretrained(tmp_path)
    x = ids()
    assert torch.equal(loaded(x), model.eval()(x))


def test_from_pretrained_refuses_what_config_json_fixes(tmp_path):
    from lorafast.hub import load_model

    make(reference.LoRA, seed=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="seed"):
        reference.LoRA.from_pretrained(tmp_path, seed=2)
    with pytest.raises(ValueError, match="strict"):
        reference.LoRA.from_pretrained(tmp_path, strict=False)
    with pytest.raises(ValueError, match="num_labels"):
        lorafast.LoRAForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"LoRAForSequenceClassification.from_pretrained\(path, num_labels"):
        load_model(str(tmp_path), lorafast.LoRAForSequenceClassification)
    clf = lorafast.LoRAForSequenceClassification(make(reference.LoRA), 3)
    clf.save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="holds a LoRAForSequenceClassification"):
        reference.LoRA.from_pretrained(tmp_path / "clf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        reference.LoRA.from_pretrained(tmp_path / "none")


def _fake_hub(monkeypatch, repos, requested):
    """Replace hf_hub_download by a copy out of local folders (repos: repo id -> folder)."""
    import huggingface_hub
    import huggingface_hub.hub_mixin

    def download(repo_id, filename, cache_dir=None, **kw):
        if repo_id not in repos:
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} (offline test)", response=None)
        requested.append((repo_id, filename))
        snapshot = os.path.join(str(cache_dir), repo_id.replace("/", "--"), "snapshot")
        os.makedirs(snapshot, exist_ok=True)
        shutil.copy(os.path.join(repos[repo_id], filename), os.path.join(snapshot, filename))
        return os.path.join(snapshot, filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", download)


def test_from_pretrained_of_a_repo_id_downloads_through_the_hub(tmp_path, monkeypatch):
    from lorafast.tokenizer import BPETokenizer

    model = trained_like(make(reference.LoRA, seed=6, V=300, local="branch"))
    model.tokenizer = BPETokenizer.train(["def f(x):\n    return x + 1\n" * 50], vocab_size=300)
    model.redraw_local_(4)
    model.save_pretrained(tmp_path / "repo")
    requested = []
    _fake_hub(monkeypatch, {"someone/tiny-lorafast": str(tmp_path / "repo")}, requested)
    loaded = reference.LoRA.from_pretrained("someone/tiny-lorafast", cache_dir=tmp_path / "cache")
    assert sorted(f for _, f in requested) == ["config.json", "config.json", "model.safetensors", "tokenizer.json"]
    x = ids(V=300)
    assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("return x")) == "return x"


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    class Repo:
        repo_id = "someone/tiny-lorafast"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["config"] = json.load(open(os.path.join(folder_path, "config.json")))
        return "https://example.invalid/commit"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = make(lorafast.LoRA, seed=2)
    model.redraw_local_(7)
    assert model.push_to_hub("someone/tiny-lorafast") == "https://example.invalid/commit"
    assert uploaded["files"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["config"]["step"] == 7 and uploaded["config"]["model"]["seed"] == 2
    assert model.save_pretrained(tmp_path, push_to_hub=False) is None
