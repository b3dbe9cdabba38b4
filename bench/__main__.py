"""The load-test harness CLI.

python -m bench run --url URL --model NAME --profile concurrency:8 --workload product --out DIR
python -m bench compare RUN_DIR [RUN_DIR ...] [--baseline LABEL] --out DIR
python -m bench compare variants.yaml --out DIR     # launches each variant's profile in turn
python -m bench soak [--duration-s 600] --out DIR   # bounded overload soak (bench/soak.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.metrics import parse_slo
from bench.profiles import PROFILES


def _run(args: argparse.Namespace) -> None:
    from bench.runner import RunSettings, run_benchmark

    settings = RunSettings(
        url=args.url,
        model=args.model,
        profile=args.profile,
        workload=args.workload,
        num_requests=args.num_requests,
        output_tokens=args.output_tokens,
        ignore_eos=not args.no_ignore_eos,
        slo=parse_slo(args.slo),
        warmup=args.warmup,
        seed=args.seed,
        label=args.label,
        progress=not args.no_progress,
        headers=dict(h.split(":", 1) for h in args.header),
    )
    run = run_benchmark(settings, args.out)
    print((args.out / "report.md").read_text())
    failed = sum(stage["failed"] for stage in run.stages)
    if failed:
        print(f"{failed} requests failed; see errors_by_status in {args.out / 'summary.json'}")


def _compare(args: argparse.Namespace) -> None:
    from bench.compare import compare_runs, compare_variants

    if len(args.inputs) == 1 and args.inputs[0].suffix in (".yaml", ".yml"):
        table = compare_variants(args.inputs[0], args.out, progress=not args.no_progress)
    else:
        table = compare_runs(args.inputs, args.out, args.baseline)
    print(table)


def _autoscale(args: argparse.Namespace) -> None:
    from bench.autoscale import run

    result = run(args)
    print(json.dumps(result["summary"], indent=1))
    print(f"series and plot: {args.out / 'autoscale.json'}, {args.out / 'autoscale.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="one benchmark run against an OpenAI-compatible server")
    run.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    run.add_argument("--model", required=True)
    run.add_argument(
        "--profile",
        required=True,
        help=f"NAME:ARGS, NAME one of {sorted(PROFILES)} (see bench/profiles.py)",
    )
    run.add_argument(
        "--workload",
        default="product",
        help="product | phone | screenshot | mixed | text [:size=WxH,format=..,images=N] | jsonl:FILE",
    )
    run.add_argument("--num-requests", type=int, default=64, help="per stage")
    run.add_argument("--output-tokens", default="64", help="N, or LOW-HIGH (uniform)")
    run.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early")
    run.add_argument("--slo", help="goodput SLOs, e.g. ttft_ms=500,tpot_ms=50")
    run.add_argument("--warmup", type=int, default=4, help="unrecorded requests sent first")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--label", help="name of this run in reports (default: the --out folder)")
    run.add_argument("--header", action="append", default=[], help="K:V sent with every request")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--out", type=Path, required=True)
    run.set_defaults(func=_run)

    compare = commands.add_parser("compare", help="runs side by side, with ratios to a baseline")
    compare.add_argument(
        "inputs", nargs="+", type=Path, help="run directories, or one variants YAML"
    )
    compare.add_argument("--baseline", help="label of the baseline run (default: the first)")
    compare.add_argument("--no-progress", action="store_true")
    compare.add_argument("--out", type=Path, required=True)
    compare.set_defaults(func=_compare)

    sim = commands.add_parser("autoscale-sim", help="a traffic trace through the HPA algorithm")
    from bench.autoscale import add_arguments

    add_arguments(sim)
    sim.set_defaults(func=_autoscale)

    commands.add_parser(
        "soak", add_help=False, help="bounded overload soak: 2x capacity with hostile traffic"
    )

    if sys.argv[1:2] == ["soak"]:  # its own parser (bench/soak.py)
        from bench.soak import main as soak

        raise SystemExit(soak(sys.argv[2:]))
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
