"""Export CLI: quantized and ONNX variants of a Qwen3-VL checkpoint, and their check against
the base.

python -m export quantize --model DIR --scheme w8a8-int8 --out DIR
python -m export onnx --model DIR --out DIR [--int8 | --int4 [--block-size 32]]
python -m export compare --base DIR --variant DIR [--out result.json]   # either kind
python -m export verify DIR        # files against manifest.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from export.quantize import SCHEMES

    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    q = commands.add_parser("quantize", help="write a compressed-tensors variant")
    q.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    q.add_argument("--scheme", choices=sorted(SCHEMES), required=True)
    q.add_argument("--group-size", type=int, help="w4a16 group size (default 128)")
    q.add_argument("--out", type=Path, required=True)
    o = commands.add_parser("onnx", help="write vision, embedding and decoder ONNX graphs")
    o.add_argument("--model", type=Path, required=True, help="base checkpoint directory")
    o.add_argument("--out", type=Path, required=True)
    kind = o.add_mutually_exclusive_group()
    kind.add_argument("--int8", action="store_true", help="dynamic INT8 (MatMul, per channel)")
    kind.add_argument("--int4", action="store_true", help="weight-only INT4 decoder (MatMulNBits)")
    o.add_argument("--block-size", type=int, default=32, choices=(32, 64, 128))
    c = commands.add_parser("compare", help="greedy agreement and KL of a variant vs its base")
    c.add_argument("--base", type=Path, required=True)
    c.add_argument("--variant", type=Path, required=True)
    c.add_argument("--tokens", type=int, default=32)
    c.add_argument("--min-agreement", type=float, default=0.9)
    c.add_argument("--max-kl", type=float, default=0.05)
    c.add_argument("--out", type=Path, help="JSON result (default: VARIANT/compare.json)")
    v = commands.add_parser("verify", help="check a variant's files against its manifest")
    v.add_argument("directory", type=Path)
    args = parser.parse_args(argv)

    if args.command == "quantize":
        from export.quantize import quantize

        print(quantize(args.model, args.scheme, args.out, args.group_size))
        return 0
    if args.command == "onnx":
        from export.onnx import export_onnx

        quantization = "int8" if args.int8 else "int4" if args.int4 else None
        print(export_onnx(args.model, args.out, quantization, args.block_size))
        return 0
    if args.command == "compare":
        from export.compare import compare, table

        out = args.out or args.variant.parent / f"{args.variant.name}.compare.json"
        result = compare(args.base, args.variant, args.tokens, args.min_agreement, args.max_kl, out)
        print(table(result))
        return 0 if result["passed"] else 1
    from export.manifest import verify_manifest

    problems = verify_manifest(args.directory)
    print("\n".join(problems) or "manifest matches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
