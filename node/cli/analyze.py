"""``swarmnode analyze PATH|ARCH``: parameters, FLOPs per sample and training memory per block and in total.

    swarmnode analyze gpt2 --set n_layer=12 --set n_embd=768 --set n_head=12 --batch 8 --seq 128 --precision bf16
    swarmnode analyze ./my-model --batch 4 --seq 512 --json

The numbers are node/ml/analyze.py's, the same a node checks before it takes a job. Nothing is downloaded and no
weights are read: a folder's config.json is enough.
"""

from __future__ import annotations

import argparse

from node.runtime.errors import EXIT_USAGE, NodeError


def parse_set(items: list[str] | None) -> dict:
    """``--set k=v`` values as TOML scalars (n_layer=2 -> 2, dropout=0.1 -> 0.1, tie_word_embeddings=false)."""
    from node.runtime.config import parse_toml

    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise NodeError(f"--set {item!r:.60}: expected KEY=VALUE", EXIT_USAGE)
        parsed = parse_toml(f"v = {value.strip()}", f"--set {key.strip()}")
        out[key.strip()] = parsed["v"]
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    from node.ml.analyze import analysis_json, analyze, format_analysis

    overrides = parse_set(args.set)
    try:
        result = analyze(args.model, overrides, batch=args.batch, seq=args.seq)
        text = (analysis_json(result, args.precision, args.optimizer) if args.json
                else format_analysis(result, args.precision, args.optimizer))
    except ValueError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NodeError(f"analyze: {first}", EXIT_USAGE) from None
    print(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="parameters, FLOPs and training memory of a model, per block and in total")
    p.add_argument("model", help="a built-in architecture (gpt2, llama, bert, minilm, mlp, cnn) or a local Hugging "
                                 "Face folder (config.json)")
    p.add_argument("--batch", type=int, default=8, help="samples per step (default 8)")
    p.add_argument("--seq", type=int, help="tokens per sample (default: the model's context, at most 512 for folders)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="shown beside fp32 (autocast: activations and weight copies at 16 bits)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="optimizer state counted: adamw 2 fp32 copies, sgd (momentum) 1 (default adamw)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of a built-in arch, repeatable "
                                                                       "(e.g. --set n_layer=2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


__all__ = ["add_parser", "cmd_analyze", "parse_set"]
