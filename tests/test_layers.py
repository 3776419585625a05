"""Imports run one way: kernels -> ops -> Local Random Initialization -> models -> training/CLI
-> benchmarks (CONTRIBUTING.md). A module may import its own layer or lower ones, never higher."""
import ast
import os
import sys

import lorafast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = [  # lowest first; a dotted prefix names every module below it
    {"lorafast.kernels"},
    {"lorafast.checks", "lorafast.init_laws", "lorafast.philox", "lorafast._cpu_ext", "lorafast.provenance"},
    {"lorafast.ops"},
    {"lorafast.local", "lorafast.config"},
    {"lorafast.reference", "lorafast.model", "lorafast.hub", "lorafast.gpt2", "lorafast.tokenizer",
     "lorafast.classification"},
    {"lorafast.corpus", "lorafast.train", "lorafast.finetune", "lorafast.cli", "lorafast.compile_gate",
     "lorafast.checkpoint", "lorafast.distributed", "lorafast.study"},
    {"lorafast.bench", "lorafast.__main__"},
]
SOURCES = {"lorafast": "lorafast", "lorafast.kernels": "kernels", "lorafast.bench": "bench"}


def layer(module: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    return None if best is None else best[0]


def modules():
    """(module name, path, is a package __init__) of every source file of the three packages."""
    for pkg, folder in SOURCES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in (f for f in files if f.endswith(".py")):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))[:-3]
                parts = [p for p in rel.split(os.sep) if p != "__init__"]
                yield ".".join([pkg, *parts]), os.path.join(dirpath, f), f == "__init__.py"


def imported(path: str, name: str, is_pkg: bool):
    tree = ast.parse(open(path).read())
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


def test_imports_point_down():
    checked = 0
    for name, path, is_pkg in modules():
        if name == "lorafast":  # the package root re-exports the public API
            continue
        src = layer(name)
        assert src is not None, f"{name} is in no layer of this test: place it"
        for target in imported(path, name, is_pkg):
            if target and target.split(".")[0] == "lorafast" and layer(target) is not None:
                assert layer(target) <= src, f"{name} (layer {src}) imports {target} (layer {layer(target)})"
                checked += 1
    assert checked > 20


def test_kernel_package_imports_only_torch_and_triton():
    for name, path, is_pkg in modules():
        if not name.startswith("lorafast.kernels"):
            continue
        for target in imported(path, name, is_pkg):
            root = target.split(".")[0]
            assert root in {"torch", "triton", "lorafast"} or root in sys.stdlib_module_names, \
                f"{name} imports {target}: the kernel package takes torch, triton and the standard library only"
            if root == "lorafast":
                assert target.startswith("lorafast.kernels"), f"{name} imports {target}"


def test_model_imports_no_private_module():
    path = os.path.join(ROOT, "lorafast", "model.py")
    for target in imported(path, "lorafast.model", False):
        assert not any(part.startswith("_") for part in target.split(".")[1:]), target
    assert lorafast.LoRA.__module__ == "lorafast.model"
