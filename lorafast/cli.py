"""The ``train``, ``generate`` and ``finetune`` commands of ``lorafast``.

``lorafast train`` parses its flags straight into :class:`lorafast.train.TrainConfig` (one flag
per field, same name with dashes), so the CLI and the importable loop cannot drift apart. The
``lorafast`` command itself (:mod:`lorafast.__main__`) sends ``lorafast bench`` to the benchmark
package, which sits above this layer; this module does not import it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing


def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        p.add_argument(flag, type=base, default=f.default, choices=f.metadata.get("choices"),
                       help=help_, metavar=None if "choices" in f.metadata else f.name.upper())


def _train(args: argparse.Namespace) -> int:
    from lorafast.train import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    train(cfg)
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from lorafast.train import load_checkpoint, resolve_device

    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device, reference=args.reference)
    tok = model.tokenizer  # the checkpoint's own (bytes for old folders of vocabulary 256)
    if tok is None:
        raise ValueError(f"{args.checkpoint}: the checkpoint names no tokenizer, so the prompt cannot be encoded")
    prompt = tok.encode(args.prompt or "\n")[None].to(device)  # [1, P]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    print(tok.decode(out[0]))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from lorafast.finetune import FinetuneConfig, finetune

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    finetune(FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lorafast.finetune import FinetuneConfig
    from lorafast.train import TrainConfig

    p = argparse.ArgumentParser(prog="lorafast", description="Transformer LM with Local Random Initialization "
                                "(not low-rank adaptation), on fused Triton kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on the built-in corpus or --data FILE",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataclass_flags(t, TrainConfig)
    t.set_defaults(func=_train)
    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="folder written by lorafast train (--out)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--reference", action="store_true", help="load into the pure-PyTorch reference model")
    g.set_defaults(func=_generate)
    f = sub.add_parser("finetune", help="fine-tune a checkpoint for text classification (--data CSV/JSONL, or the "
                       "built-in demo task)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataclass_flags(f, FinetuneConfig)
    f.set_defaults(func=_finetune)
    sub.add_parser("bench", help="benchmarks and the static compile report (see lorafast bench --help)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"lorafast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
