"""The harness against vLLM's own benchmark client: same server, same requests, same session.

    python -m bench.crosscheck --target timed --out runs/crosscheck-timed   # the definitions
    python -m bench.crosscheck --target vllm --out bench/results/crosscheck-vllm
    python -m bench.crosscheck --target fake --out bench/results/client-speed

1. Start the target: ``timed`` is ``bench.fake_server`` with a fixed time to first token and
   inter-token gap (both clients must measure the same thing: a difference in how TTFT, TPOT or
   ITL is defined shows at once, with no server noise to hide it); ``engine`` is this project's
   server on the default CPU profile (tiny Qwen3-VL); ``vllm`` is vLLM's own OpenAI server with
   the same engine settings; ``fake`` is ``bench.fake_server`` answering instantly (what the
   clients themselves sustain).
2. Draw vLLM's requests (``random-mm``, one random image, or ``random`` text for ``fake``) and
   write the very same requests as the harness's ``jsonl:`` workload.
3. Warm up, then alternate the two clients for ``--rounds`` rounds at the same concurrency.
4. Report request throughput, output tokens/s, median TTFT, TPOT and ITL of both and the
   median over rounds of their paired ratio; the check (all but ``fake``) is that every ratio
   is within 5%.
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
    "median_itl_ms": ("p50_itl_ms", "median_itl_ms"),
}
TOLERANCE = 0.05
# The timed fake server's. TTFT well above what a client itself adds (vLLM's client measured
# ~3 ms more than the harness at 60 ms: 0.947x, a failed CI run) and the gap from the role
# chunk to the first content large against 5% of it (counting TTFT there is +13%).
TIMED_TTFT_MS, TIMED_ITL_MS = 150, 20


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
    if name == "timed":
        timing = ["--ttft-ms", str(TIMED_TTFT_MS), "--itl-ms", str(TIMED_ITL_MS)]
        command += [*timing, "--role-chunk"]
    return command, {}, "fake-model", tokenizer


def crosscheck(
    target: str,
    out: Path,
    num_prompts: int | None = None,
    concurrency: int | None = None,
    output_len: int | None = None,
    rounds: int = 4,
    warmup: int = 200,
) -> dict:
    """Both clients on the same requests, ``rounds`` times; the report (also written to
    ``out``: results.json, results.md)."""
    fake = target in ("fake", "timed")
    num_prompts = num_prompts or (5000 if target == "fake" else 200)
    concurrency = concurrency or (128 if target == "fake" else 32 if not fake else 8)
    output_len = output_len or (16 if target == "fake" else 64 if not fake else 32)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        command, env, model, tokenizer = _target(target, port)
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
            if warmup:
                run_vllm_bench(
                    base, model, tokenizer, **{**bench_kwargs, "num_prompts": warmup}, seed=1
                )
            for round_no in range(1, rounds + 1):
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
        for round_no in range(1, rounds + 1):
            ours, theirs = (
                next(r[key] for r in rows if r["round"] == round_no and r["client"] == c)
                for c in ("harness", "vllm")
            )
            pairs.append(ours / theirs if theirs else None)
        ratios[key] = None if None in pairs else statistics.median(pairs)
    passed = all(r is not None and abs(r - 1) <= TOLERANCE for r in ratios.values())
    meta = {
        "target": target,
        "machine": machine(),
        "num_prompts": num_prompts,
        "concurrency": concurrency,
        "output_len": output_len,
        "input_len": 64,
        "image": None if fake else "336x336 random (vLLM random-mm)",
        "rounds": rounds,
        "warmup": warmup,
    }
    if target == "timed":
        meta["server_timing_ms"] = {"ttft": TIMED_TTFT_MS, "itl": TIMED_ITL_MS}
    report = {
        "meta": meta,
        "rows": rows,
        "ratio_harness_over_vllm": ratios,
        "within_5_percent": passed,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [
        "| round | client | req/s | output tok/s | median TTFT ms | median TPOT ms "
        "| median ITL ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['client']} | {r['request_throughput']:.1f} | "
            f"{r['output_throughput']:.0f} | {r['median_ttft_ms']:.1f} | "
            f"{r['median_tpot_ms']:.2f} | {r['median_itl_ms']:.2f} |"
        )
    lines += [
        "",
        "harness / vLLM (median of per-round ratios): "
        + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items() if v is not None),
    ]
    if target != "fake":
        lines.append(f"every ratio within 5%: {'yes' if passed else 'NO'}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("engine", "vllm", "fake", "timed"), default="engine")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200, help="vLLM-client requests sent first")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    crosscheck(
        args.target,
        args.out,
        args.num_prompts,
        args.concurrency,
        args.output_len,
        args.rounds,
        args.warmup,
    )


if __name__ == "__main__":
    main()
