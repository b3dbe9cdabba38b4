"""The harness against vLLM's own benchmark client: same server, same requests, same session.

    python -m bench.crosscheck --target vllm --out bench/results/crosscheck-vllm
    python -m bench.crosscheck --target fake --out bench/results/client-speed

1. Start the target: ``engine`` is this project's server on the default CPU profile (tiny
   Qwen3-VL); ``vllm`` is vLLM's own OpenAI server with the same engine settings; ``fake`` is
   ``bench.fake_server`` answering instantly (what the clients themselves sustain).
2. Draw vLLM's requests (``random-mm``, one random image, or ``random`` text for ``fake``) and
   write the very same requests as the harness's ``jsonl:`` workload.
3. Warm up, then alternate the two clients for ``--rounds`` rounds at the same concurrency.
4. Report request throughput, output tokens/s, median TTFT and median TPOT of both and the
   median over rounds of their paired ratio; for ``engine`` the check is that every ratio is within 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.compare_servers import vllm_server_command
from bench.launch import ServerProcess, engine_command, free_port
from bench.runner import RunSettings, machine, run_benchmark
from bench.vllm_client import run_vllm_bench, vllm_bench_args, write_vllm_samples
from engine.config import DEFAULT_PROFILE, load_config

# harness summary key, vLLM result key
METRICS = {
    "request_throughput": ("request_throughput", "request_throughput"),
    "output_throughput": ("output_throughput", "output_throughput"),
    "median_ttft_ms": ("p50_ttft_ms", "median_ttft_ms"),
    "median_tpot_ms": ("p50_tpot_ms", "median_tpot_ms"),
}
TOLERANCE = 0.10


def _target(name: str, port: int) -> tuple[list[str], dict, str, str]:
    """(command, environment, served model name, tokenizer path)"""
    model = load_config(DEFAULT_PROFILE).primary
    tokenizer = model.resolved_model_path()
    if name == "engine":
        return engine_command(DEFAULT_PROFILE, port), {}, model.name, tokenizer
    if name == "vllm":  # vLLM's own OpenAI server, same engine settings
        command = vllm_server_command(model, port)
        return command, dict(model.env), model.name, tokenizer
    command = [sys.executable, "-m", "bench.fake_server", "--port", str(port)]
    return command, {}, "fake-model", tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("engine", "vllm", "fake"), default="engine")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200, help="vLLM-client requests sent first")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fake = args.target == "fake"
    num_prompts = args.num_prompts or (5000 if fake else 200)
    concurrency = args.concurrency or (128 if fake else 32)
    output_len = args.output_len or (16 if fake else 64)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        command, env, model, tokenizer = _target(args.target, port)
        bench_kwargs = dict(
            num_prompts=num_prompts,
            concurrency=concurrency,
            output_len=output_len,
            input_len=64,
            image_size=None if fake else 336,
        )
        requests = tmp / "requests.jsonl"
        write_vllm_samples(
            vllm_bench_args(base, model, tokenizer, seed=0, **bench_kwargs), requests
        )
        with ServerProcess(command, base, tmp / "server.log", env=env):
            run_vllm_bench(
                base, model, tokenizer, **{**bench_kwargs, "num_prompts": args.warmup}, seed=1
            )
            for round_no in range(1, args.rounds + 1):
                order = ("vllm", "harness") if round_no % 2 else ("harness", "vllm")
                for client in order:
                    if client == "vllm":
                        result = run_vllm_bench(base, model, tokenizer, seed=0, **bench_kwargs)
                        values = {k: result[v] for k, (_, v) in METRICS.items()}
                    else:
                        settings = RunSettings(
                            url=base,
                            model=model,
                            profile=f"concurrency:{concurrency}",
                            workload=f"jsonl:{requests}",
                            num_requests=num_prompts,
                            warmup=0,
                            progress=False,
                            label=f"harness-{round_no}",
                        )
                        stage = run_benchmark(settings, tmp / f"harness-{round_no}").stages[0]
                        values = {k: stage[h] for k, (h, _) in METRICS.items()}
                    rows.append({"round": round_no, "client": client, **values})
                    print(json.dumps(rows[-1]), flush=True)
    # Paired ratios: each round runs both clients back to back, so slow drift of the machine
    # cancels within a pair; the median over pairs resists one noisy round.
    ratios = {}
    for key in METRICS:
        pairs = []
        for round_no in range(1, args.rounds + 1):
            ours, theirs = (
                next(r[key] for r in rows if r["round"] == round_no and r["client"] == c)
                for c in ("harness", "vllm")
            )
            pairs.append(ours / theirs if theirs else None)
        ratios[key] = None if None in pairs else statistics.median(pairs)
    passed = all(r is not None and abs(r - 1) <= TOLERANCE for r in ratios.values())
    meta = {
        "target": args.target,
        "machine": machine(),
        "num_prompts": num_prompts,
        "concurrency": concurrency,
        "output_len": output_len,
        "input_len": 64,
        "image": None if fake else "336x336 random (vLLM random-mm)",
        "rounds": args.rounds,
        "warmup": args.warmup,
    }
    report = {
        "meta": meta,
        "rows": rows,
        "ratio_harness_over_vllm": ratios,
        "within_10_percent": passed,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [
        "| round | client | req/s | output tok/s | median TTFT ms | median TPOT ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['client']} | {r['request_throughput']:.1f} | "
            f"{r['output_throughput']:.0f} | {r['median_ttft_ms']:.1f} | {r['median_tpot_ms']:.2f} |"
        )
    lines += [
        "",
        "harness / vLLM (median of per-round ratios): "
        + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items() if v is not None),
    ]
    if not fake:
        lines.append(f"every ratio within 10%: {'yes' if passed else 'NO'}")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
