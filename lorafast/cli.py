"""The ``train``, ``generate`` and ``finetune`` commands of ``lorafast``.

Each command parses its flags straight into a dataclass (:class:`lorafast.train.TrainConfig`,
:class:`GenerateConfig`: one flag per field, same name with dashes, the field's help and
checks), so the CLI and the importable code cannot drift apart. The ``lorafast`` command itself
(:mod:`lorafast.__main__`) sends ``lorafast bench`` to the benchmark package, which sits above
this layer; this module does not import it.

Every failure is one line on stderr, ``lorafast: error: <what>``, naming the file or flag at
fault, with exit status 2; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import traceback
import typing

from lorafast.checks import SEED_RANGE
from lorafast.train import flag, option

_EPILOG = """\
several processes (one node, or several: see the README):
  torchrun --nproc_per_node=N -m lorafast train [flags]   # DDP; add --fsdp to shard
  --batch-size is the global batch: each process takes batch-size / N sequences."""


@dataclasses.dataclass
class GenerateConfig:
    """The flags of ``lorafast generate``."""

    checkpoint: str = option(None, "run folder or checkpoint written by lorafast train (--out), or a model "
                             "folder", required=True)
    prompt: str = option("", "text to continue (default: a newline)")
    max_new_tokens: int = option(200, "tokens to generate", range=(0, 1 << 31))
    temperature: float = option(0.8, "sampling temperature (0 picks the most likely token)",
                                real=(0.0, float("inf"), "[)"))
    top_k: int | None = option(None, "sample among the k most likely tokens only (default: no cut)",
                               range=(1, 1 << 31))
    seed: int = option(0, "seed of the sampling generator", range=SEED_RANGE)
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    reference: bool = option(False, "load into the pure-PyTorch reference model")
    threads: int | None = option(None, "CPU threads of PyTorch's ops (default: PyTorch's choice, one per core)",
                                 range=(1, 1 << 16))

    def __post_init__(self) -> None:
        from lorafast.train import check_options

        check_options(self)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``lorafast: error: message (see prog --help)``, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"lorafast: error: {message} (see {self.prog} --help)\n")


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type, given_only: bool = False) -> None:
    """One flag per field of ``cls``; its help ends with the default, exactly once.
    ``given_only``: no defaults, so that parsing yields only the flags typed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        md = f.metadata
        default = argparse.SUPPRESS if given_only else f.default
        kind = hints[f.name]
        if kind is bool:
            a = p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=md.get("help", ""))
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            a = p.add_argument(flag, type=base, default=default, choices=md.get("choices"),
                               required=md.get("required", False) and not given_only, help=md.get("help", ""),
                               metavar=None if "choices" in md else f.name.upper())
        if not md.get("required") and "default" not in a.help.lower() and "%(default)" not in a.help:
            a.help += " (default: %(default)s)"


def _fields(cls: type, ns: argparse.Namespace) -> dict[str, typing.Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from lorafast.train import TrainConfig, resume_config, train

    if args.resume:  # the run's saved settings, then the flags typed on the command line
        given = _fields(TrainConfig, build_parser(given_only=True).parse_args(argv))
        cfg = resume_config(given)
    else:
        cfg = TrainConfig(**_fields(TrainConfig, args))
    train(cfg)
    return 0


def _generate(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    cfg = GenerateConfig(**_fields(GenerateConfig, args))
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _sample_text(cfg)
    finally:
        torch.set_num_threads(threads)  # main() also runs inside other programs (and tests)


def _sample_text(cfg: GenerateConfig) -> int:
    import torch

    from lorafast.train import load_checkpoint, resolve_device, thread_count

    device = resolve_device(cfg.device)
    model, meta = load_checkpoint(cfg.checkpoint, device, reference=cfg.reference)
    tok = model.tokenizer  # the checkpoint's own (bytes for old folders of vocabulary 256)
    if tok is None:
        raise ValueError(f"{cfg.checkpoint}: the checkpoint names no tokenizer, so the prompt cannot be encoded")
    print(f"lorafast: {cfg.checkpoint} (step {meta['step']}), device {device}, {thread_count()}",
          file=sys.stderr)
    prompt = tok.encode(cfg.prompt or "\n")[None].to(device)  # [1, P]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen)
    print(tok.decode(out[0]))
    return 0


def _finetune(args: argparse.Namespace, argv: list[str]) -> int:
    from lorafast.finetune import FinetuneConfig, finetune

    finetune(FinetuneConfig(**_fields(FinetuneConfig, args)))
    return 0


def build_parser(given_only: bool = False) -> argparse.ArgumentParser:
    from lorafast.finetune import FinetuneConfig
    from lorafast.train import TrainConfig

    p = _Parser(prog="lorafast", description="Train and use a Transformer LM with Local Random "
                "Initialization (not low-rank adaptation). On a GPU its ops run lorafast's fused Triton "
                "kernels; on a CPU, their PyTorch paths.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the built-in corpus or --data FILE", epilog=_EPILOG,
                       description="Train a model (one process, or one per rank under torchrun).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_dataclass_flags(t, TrainConfig, given_only)
    t.set_defaults(func=_train)
    g = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="Sample text from a checkpoint or model folder.")
    _add_dataclass_flags(g, GenerateConfig, given_only)
    g.set_defaults(func=_generate)
    f = sub.add_parser("finetune", help="fine-tune a checkpoint for text classification (--data CSV/JSONL, or the "
                       "built-in demo task)",
                       description="Fine-tune a language-model checkpoint (lorafast train --out) for sequence "
                       "classification; report held-out accuracy and macro-F1 beside the majority class.")
    _add_dataclass_flags(f, FinetuneConfig, given_only)
    f.set_defaults(func=_finetune)
    for s in (t, g, f):
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if given_only else False,
                       help="show the traceback of an error (default: off)")
    sub.add_parser("bench", help="benchmarks and the static compile report (see lorafast bench --help)",
                   add_help=False)
    sub.add_parser("study", help="the preset study: every preset against all-global training and GPT-2 "
                   "(see lorafast study --help)", add_help=False)
    return p


def _setting_names() -> set[str]:
    """The field names of every command's settings (each is the flag ``--name-with-dashes``)."""
    from lorafast.finetune import FinetuneConfig
    from lorafast.train import TrainConfig

    return {f.name for c in (TrainConfig, GenerateConfig, FinetuneConfig) for f in dataclasses.fields(c)}


def _one_line(e: BaseException) -> str:
    """The message of an error, on one line: known kinds (bad settings, files or checkpoints,
    a stopped run) as they are, which name the file or flag; anything else with its type."""
    from lorafast.train import NonFiniteLossError, RankFailure

    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(e, (ValueError, TypeError)):
        # a setting's check names its field ("batch_size = 0 is out of range ..."): name the flag
        m = re.match(r"([a-z][a-z0-9_]*)( = | must )", first)
        if m and m.group(1) in _setting_names():
            first = flag(m.group(1)) + first[len(m.group(1)):]
    if isinstance(e, (ValueError, TypeError, OSError, NonFiniteLossError, RankFailure)) and first:
        return first
    return f"{type(e).__name__}: {first} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args, argv)
    except KeyboardInterrupt:
        print("lorafast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure: one line, exit status 2
        if args.debug:
            traceback.print_exc()
        print(f"lorafast: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
