"""Throughput of our stack vs vLLM's own OpenAI server, same machine, same session.

Each server is started in turn on the same profile's engine settings, warmed up, then
measured with vLLM's own benchmark client (``vllm.benchmarks.serve``: openai-chat
backend, random-mm dataset, one image per request). Rounds alternate the order so
machine drift hits every server alike. Writes results.json and results.md to --out.

    python -m bench.compare_servers --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.launch import ServerProcess
from bench.vllm_client import run_vllm_bench
from engine.config import DEFAULT_PROFILE, load_config

REPO = Path(__file__).resolve().parent.parent
METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "median_itl_ms", "completed")  # fmt: skip


def vllm_cli_args(engine_kwargs: dict) -> list[str]:
    args: list[str] = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def _servers(profile_path: Path, port: int, tmp: Path) -> dict[str, tuple[list[str], dict]]:
    """name -> (command, extra environment)."""
    config = load_config(profile_path)
    model = config.primary
    vllm_cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model.resolved_model_path(), "--served-model-name", model.name,
        "--host", "127.0.0.1", "--port", str(port), *vllm_cli_args(model.engine_kwargs),
    ]  # fmt: skip
    profile = yaml.safe_load(profile_path.read_text())
    profile.setdefault("server", {})["port"] = port
    ours = tmp / "ours.yaml"
    ours.write_text(yaml.safe_dump(profile))
    # The same stack through Ray Serve's default Python HTTP proxy actor (no throughput mode).
    profile["server"]["ray_env"] = {"RAY_worker_niceness": "0"}
    proxied = tmp / "ours-proxy.yaml"
    proxied.write_text(yaml.safe_dump(profile))
    serve = [sys.executable, "-m", "engine", "serve", "--config"]
    return {
        "vllm-openai-server": (vllm_cmd, dict(model.env)),
        "ours (Ray Serve, HAProxy + direct ingress)": (
            [*serve, str(ours)],
            {"QWEN3VL_RAY_LOGS": "0"},
        ),
        "ours (Ray Serve, default proxy actor)": (
            [*serve, str(proxied)],
            {"QWEN3VL_RAY_LOGS": "0"},
        ),
    }


def _measure(name, cmd, env, port, model, tokenizer, args, log_dir: Path) -> dict:
    log = log_dir / f"{name.split()[0]}-{time.time_ns()}.log"
    with ServerProcess(cmd, f"http://127.0.0.1:{port}", log, env=env) as server:
        base = server.base_url
        run_vllm_bench(
            base, model, tokenizer, num_prompts=args.warmup, concurrency=args.concurrency, seed=1
        )
        result = run_vllm_bench(base, model, tokenizer, num_prompts=args.num_prompts,
                                concurrency=args.concurrency, seed=0)  # fmt: skip
    time.sleep(3)
    return {
        "server": name,
        "ready_s": round(server.ready_s, 1),
        **{k: result.get(k) for k in METRICS},
    }


def _markdown(rows: list[dict], baseline: str) -> str:
    base = {r["round"]: r["request_throughput"] for r in rows if r["server"] == baseline}
    lines = [
        "| round | server | req/s | ratio vs vLLM | output tok/s | median TTFT ms | p99 TTFT ms | median TPOT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["request_throughput"] / base[r["round"]]
        lines.append(
            f"| {r['round']} | {r['server']} | {r['request_throughput']:.1f} | {ratio:.2f}x | "
            f"{r['output_throughput']:.0f} | {r['median_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | "
            f"{r['median_tpot_ms']:.1f} |"
        )
    lines.append("")
    for name in dict.fromkeys(r["server"] for r in rows):
        ratios = [r["request_throughput"] / base[r["round"]] for r in rows if r["server"] == name]
        lines.append(
            f"- {name}: mean ratio {statistics.mean(ratios):.2f}x over {len(ratios)} rounds"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="substrings of server names to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    tokenizer = config.primary.resolved_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        servers = _servers(args.config, args.port, Path(tmp))
        if args.only:
            servers = {k: v for k, v in servers.items() if any(s in k for s in args.only)}
        rows = []
        for round_no in range(1, args.rounds + 1):
            order = list(servers) if round_no % 2 else list(reversed(servers))
            for name in order:
                cmd, env = servers[name]
                row = _measure(
                    name, cmd, env, args.port, config.primary.name, tokenizer, args, args.out
                )
                rows.append({"round": round_no, **row})
                print(json.dumps(rows[-1]), flush=True)
    meta = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus {platform.processor() or platform.machine()}",
        "profile": str(args.config), "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "dataset": "random-mm, 1 image 336x336, 64 input / 64 output tokens, ignore_eos",
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = _markdown(rows, "vllm-openai-server")
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
