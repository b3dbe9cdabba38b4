"""JSON-schema requests against plain ones, on the same server in the same session.

What structured output costs: each profile's server is started once; then, for ``--rounds``
rounds in alternating order, the harness (``bench.runner``) sends the same image chats
plain (``ignore_eos``, a fixed output length) and asking for product tags as JSON
(``response_format`` with ``fixtures.schemas.PRODUCT_TAGS``; the model stops when the JSON
is complete). The grammar's cost is per token (vLLM masks the logits every step), so the
figure to compare is output tokens/s and TPOT; request throughput follows the output length.
The plain requests' lengths are spread uniformly around the JSON requests' mean from round 1
(half to one and a half times it), so both sides generate about as many tokens and their
requests finish, and the next ones arrive, at staggered times. (A fixed length made every
plain request finish in the same step: the next eight then arrived together and were
prefilled as one batch, which tripled the plain side's TTFT and said nothing of the grammar.)

    python -m bench.structured --out runs/structured      # tiny (c=8) and small (c=4)
    python -m bench.structured --presets tiny --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.launch import REPO, ServerProcess, engine_command, free_port
from bench.runner import RunSettings, run_benchmark
from engine.config import load_config

PRESETS = {  # profile, concurrency, requests per run
    "tiny": (REPO / "configs/cpu-tiny.yaml", 8, 96),
    "small": (REPO / "configs/cpu-small.yaml", 4, 24),
}
KEYS = (
    "request_throughput",
    "output_throughput",
    "p50_ttft_ms",
    "p50_tpot_ms",
    "mean_e2el_ms",
    "completed",
    "failed",
    "total_output_tokens",
)


def measure(url: str, model: str, kind: str, concurrency: int, requests: int, tokens: str) -> dict:
    workload = "product:size=448x448" + (",schema=product" if kind == "json" else "")
    with tempfile.TemporaryDirectory() as out:
        run = run_benchmark(
            RunSettings(
                url=url,
                model=model,
                profile=f"concurrency:{concurrency}",
                workload=workload,
                num_requests=requests,
                output_tokens=tokens,
                warmup=concurrency,
                progress=False,
                label=kind,
            ),
            Path(out),
        )
    (stage,) = run.stages
    return {key: stage[key] for key in KEYS}


def run_preset(name: str, rounds: int, log_dir: Path) -> list[dict]:
    profile_path, concurrency, requests = PRESETS[name]
    port = free_port()
    profile = yaml.safe_load(profile_path.read_text())
    profile["server"]["port"] = port
    path = log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(profile))
    model = load_config(path).primary.name
    rows: list[dict] = []
    json_tokens = "256"  # the JSON requests' cap; they stop when the JSON is complete
    plain_tokens = ""
    log = log_dir / f"{name}-{time.time_ns()}.log"
    with ServerProcess(engine_command(path), f"http://127.0.0.1:{port}", log) as server:
        for round_no in range(1, rounds + 1):
            order = ["json", "plain"] if round_no % 2 else ["plain", "json"]
            for kind in order:
                tokens = json_tokens if kind == "json" else plain_tokens
                row = measure(server.base_url, model, kind, concurrency, requests, tokens)
                row |= {"preset": name, "round": round_no, "kind": kind, "concurrency": concurrency}
                if kind == "json" and not plain_tokens:  # plain requests: as long as JSON ones
                    mean = round(row["total_output_tokens"] / max(1, row["completed"]))
                    plain_tokens = f"{max(1, mean // 2)}-{mean + mean // 2}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | round | requests | req/s | output tok/s | TTFT p50 ms | TPOT p50 ms "
        "| mean output tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mean_tokens = r["total_output_tokens"] / max(1, r["completed"])
        lines.append(
            f"| {r['preset']} (c={r['concurrency']}) | {r['round']} | {r['kind']} "
            f"| {r['request_throughput']:.2f} | {r['output_throughput']:.0f} "
            f"| {r['p50_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} | {mean_tokens:.0f} |"
        )
    lines.append("")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        pairs = [
            (j, p)
            for j in rows
            for p in rows
            if j["preset"] == p["preset"] == preset
            and j["round"] == p["round"]
            and (j["kind"], p["kind"]) == ("json", "plain")
        ]

        def ratio(key: str, pairs=pairs) -> float:
            return statistics.mean(j[key] / p[key] for j, p in pairs if p[key])

        lines.append(
            f"- {preset}, JSON / plain, mean of {len(pairs)} rounds: output tok/s "
            f"{ratio('output_throughput'):.2f}x, TPOT p50 {ratio('p50_tpot_ms'):.2f}x, "
            f"TTFT p50 {ratio('p50_ttft_ms'):.2f}x, req/s {ratio('request_throughput'):.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "structured")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [row for preset in args.presets for row in run_preset(preset, args.rounds, args.out)]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
