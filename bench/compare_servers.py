"""Our stack vs vLLM's own OpenAI server: same machine, same engine settings, same session.

Each round starts every server in turn (the order alternates from round to round, so machine
drift hits all alike), warms it up, then measures every workload with vLLM's own benchmark
client (``vllm.benchmarks.serve``, openai-chat backend, streaming, ``random-mm`` images):

    tiny-c1 / tiny-c8 / tiny-c32   one 336x336 image, 64 input / 64 output tokens
    phone-c8                       one 4032x3024 JPEG (a phone photo), 64 / 64

Each server is measured in steady state: ``--settle-s`` (90 s) after /health at the earliest,
warm-up included, once the cores are quiet (``settle``); ``--settle-s 0`` measures right after
the warm-up, start-up bursts included.

Per run: request throughput, TTFT and ITL (p50, p99), the SSE content events per stream
(vLLM's client records one inter-token gap per event after the first, so events = gaps + 1;
a stream whose deltas were merged has fewer events than tokens; vLLM's server sends a
role-only chunk first, so its full stream is 65 events, ours 64), and the mean TTFT split
into the engine's part (vLLM's own TTFT histogram) and the time before the engine (HTTP,
JSON, images, chat template, multimodal processing), and the CPU each part of the server
used per request (``bench.cpu_account``: the HTTP process, the engine, Ray's daemons).
Writes results.json and
results.md (one table per workload, ratios to vLLM's server in the same round) to --out.

    python -m bench.compare_servers --out runs/compare            # 3 rounds, all workloads
    python -m bench.compare_servers --servers vllm ours ours-haproxy ours-proxy   # every front
    python -m bench.compare_servers --servers vllm ours ours-no-lane --interleave  # render_lane
    python -m bench.compare_servers --servers vllm ours --workloads tiny-c32 --rounds 1
    python -m bench.compare_servers --before /tmp/old    # + ours-before: the checkout in /tmp/old
    python -m bench.compare_servers --interleave         # all servers up at once, one measured
                                                         # at a time, the others paused

``--interleave`` starts each server once, on ports ``--port``, ``--port``+10, ..., and measures
them in turn workload by workload while the others are paused (SIGSTOP): this machine's speed
drifts by +-25% over minutes, more than the differences measured, and a server start per round
compares servers minutes apart.

``--before DIR`` adds ``ours-before``: the same server run from another checkout of this
project (``git worktree add /tmp/old REV``) with that checkout's copy of the profile, so a
change (code and engine settings) is measured against what was there before it, in the same
rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import yaml

from bench import cpu_account
from bench.launch import ServerProcess
from bench.vllm_client import run_vllm_bench
from engine.config import DEFAULT_PROFILE, ModelConfig, load_config

REPO = Path(__file__).resolve().parent.parent
BASELINE = "vllm"


def baseline_of(rows: list[dict]) -> str:
    """What the ratios are taken against: vLLM's server when it ran, else the checkout
    before (``--servers ours --before DIR``), else the first server."""
    names = list(dict.fromkeys(r["server"] for r in rows))
    for name in (BASELINE, "ours-before"):
        if name in names:
            return name
    return names[0]


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    image_size: tuple[int, int]
    output_len: int = 64
    input_len: int = 64


WORKLOADS = {
    w.name: w
    for w in (
        Workload("tiny-c1", 1, 40, (336, 336)),
        Workload("tiny-c8", 8, 160, (336, 336)),
        Workload("tiny-c32", 32, 400, (336, 336)),
        Workload("phone-c8", 8, 48, (4032, 3024)),
    )
}


def vllm_cli_args(engine_kwargs: dict) -> list[str]:
    """A profile's ``engine_kwargs`` as vLLM server flags."""
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


def vllm_server_command(model: ModelConfig, port: int) -> list[str]:
    """vLLM's own OpenAI server for ``model``, on the same engine settings as our profile."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model.resolved_model_path(), "--served-model-name", model.name,
        "--host", "127.0.0.1", "--port", str(port), *vllm_cli_args(model.engine_kwargs),
    ]  # fmt: skip


def servers(
    profile_path: Path, port: int, tmp: Path, before: Path | None = None
) -> dict[str, tuple[list[str], dict, Path]]:
    """name -> (command, extra environment). ``ours`` is the default ingress of the profile
    (direct: the replica serves the API port); the others show what each hop costs."""
    config = load_config(profile_path)
    model = config.primary
    vllm_cmd = vllm_server_command(model, port)
    found = {"vllm": (vllm_cmd, dict(model.env), REPO)}
    variants = (
        ("ours", None, False),
        ("ours-haproxy", "haproxy", False),
        ("ours-proxy", "proxy", False),
        # the primary rendering through vLLM's render_chat_async (engine.llm.RenderLane off)
        ("ours-no-lane", None, True),
    )
    for name, ingress, no_lane in variants:
        profile = _on_port(profile_path, port)
        if ingress:
            profile["server"]["ingress"] = ingress
        if no_lane:
            for entry in profile["models"]:
                if entry["name"] == model.name:
                    entry["render_lane"] = False
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(profile))
        command = [sys.executable, "-m", "engine", "serve", "--config", str(path)]
        found[name] = (command, {"QWEN3VL_RAY_LOGS": "0"}, REPO)
    if before is not None:  # run from there and ahead of the installed project on every path
        command, env, _ = found["ours"]
        path = tmp / "ours-before.yaml"
        path.write_text(yaml.safe_dump(before_profile(profile_path, before, port)))
        command = [*command[:-1], str(path)]
        found["ours-before"] = (command, {**env, "PYTHONPATH": str(before.resolve())}, before)
    return found


def before_profile(profile_path: Path, before: Path, port: int) -> dict:
    """The profile as the checkout before has it (its engine settings are part of what
    changed), on ``port``; this checkout's copy where that one has none."""
    own = profile_path.resolve()
    theirs = before / own.relative_to(REPO) if own.is_relative_to(REPO) else own
    return _on_port(theirs if theirs.exists() else own, port)


def _on_port(profile_path: Path, port: int) -> dict:
    profile = yaml.safe_load(profile_path.read_text())
    profile.setdefault("server", {})["port"] = port
    return profile


# vLLM's own request histograms (the same in both servers: the engine and its output
# processor record them). Client TTFT minus the engine's TTFT is the time before the engine:
# HTTP, JSON, image decode, chat template, multimodal processing.
ENGINE_HISTOGRAMS = {
    "engine_ttft_ms": "vllm:time_to_first_token_seconds",
    "engine_queue_ms": "vllm:request_queue_time_seconds",
    "engine_prefill_ms": "vllm:request_prefill_time_seconds",
    # Ours only (nan for vLLM's server): from our route's entry to the first delta out of
    # the engine. Client TTFT minus this is the time before our code runs (HTTP parsing,
    # Ray Serve's request wrapping, FastAPI routing) plus the first event's way back.
    "server_ttft_ms": "qwen3vl_time_to_first_token_seconds",
}


def engine_histograms(base_url: str) -> dict[str, tuple[float, float]]:
    """metric -> (sum, count) of vLLM's request histograms, all label sets added up."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    found = {}
    for key, name in ENGINE_HISTOGRAMS.items():
        sums = re.findall(rf"^{re.escape(name)}_sum(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        counts = re.findall(rf"^{re.escape(name)}_count(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        found[key] = (sum(map(float, sums)), sum(map(float, counts)))
    return found


def _mean_ms(before: dict, after: dict) -> dict[str, float]:
    means = {}
    for key in ENGINE_HISTOGRAMS:
        total = after[key][0] - before[key][0]
        count = after[key][1] - before[key][1]
        means[f"mean_{key}"] = 1000 * total / count if count else float("nan")
    return means


def measure(base_url: str, model: str, tokenizer: str, workload: Workload) -> dict:
    """One workload against a running server, with vLLM's client."""
    before = engine_histograms(base_url)
    width, height = workload.image_size
    bucket = ["--random-mm-bucket-config", repr({(height, width, 1): 1.0})]
    cpu_before, started = cpu_account.snapshot(), time.monotonic()
    result = run_vllm_bench(
        base_url,
        model,
        tokenizer,
        num_prompts=workload.num_prompts,
        concurrency=workload.concurrency,
        input_len=workload.input_len,
        output_len=workload.output_len,
        seed=0,
        extra_args=["--save-detailed", *bucket],
    )
    cpu_after = cpu_account.snapshot()
    cpu = cpu_account.cpu_by_part(cpu_before, cpu_after)
    window_s = time.monotonic() - started
    engine_side = _mean_ms(before, engine_histograms(base_url))
    # failed requests have no TTFT (0) and no gaps
    events = [
        len(gaps) + 1 for gaps, ttft in zip(result["itls"], result["ttfts"], strict=True) if ttft
    ]
    return {
        "workload": workload.name,
        "completed": result["completed"],
        "failed": result["failed"],
        "request_throughput": result["request_throughput"],
        "output_throughput": result["output_throughput"],
        **{
            f"{stat}_{metric}_ms": result[f"{stat}_{metric}_ms"]
            for metric in ("ttft", "itl", "tpot")
            for stat in ("median", "p99")
        },
        "mean_ttft_ms": result["mean_ttft_ms"],
        **engine_side,
        # CPU per completed request by part (bench.cpu_account); Ray's daemons as a share
        # of one core over the run (they tick with time, not requests; the window includes
        # the client building its images, ~40 s for phone photos, while the server idles)
        **{
            f"cpu_{part}_ms_per_request": 1000 * cpu[part] / max(1, result["completed"])
            for part in ("api", "engine", "client", "other")
        },
        "cpu_ray_core_share": cpu["ray"] / window_s,
        "cpu_ray_busiest_s": cpu_account.busiest(cpu_before, cpu_after, "ray"),
        "events_per_stream_median": statistics.median(events) if events else 0,
        "events_per_stream_min": min(events, default=0),
        # share of streams with at least 95% of their tokens in separate events
        "full_stream_share": sum(e >= 0.95 * workload.output_len for e in events)
        / max(1, len(events)),
    }


def run_server(
    name: str,
    command: list[str],
    env: dict,
    port: int,
    profile_path: Path,
    workloads: list[Workload],
    warmup: int,
    log_dir: Path,
    cwd: Path = REPO,
    settle_s: float = 0.0,
) -> list[dict]:
    model, tokenizer = _model_of(profile_path)
    log = log_dir / f"{name}-{time.time_ns()}.log"
    rows = []
    with ServerProcess(command, f"http://127.0.0.1:{port}", log, env=env, cwd=cwd) as server:
        ready_at = time.monotonic()
        warm_up(server.base_url, model, tokenizer, workloads, warmup)
        settled_s = settle(ready_at, settle_s)
        for workload in workloads:
            rows.append(
                {
                    "server": name,
                    "ready_s": round(server.ready_s, 1),
                    "settled_s": round(settled_s, 1),
                    **measure(server.base_url, model, tokenizer, workload),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    time.sleep(3)  # let the port and the cores settle before the next server
    return rows


def _model_of(profile_path: Path) -> tuple[str, str]:
    primary = load_config(profile_path).primary
    return primary.name, primary.resolved_model_path()


def warm_up(
    base_url: str, model: str, tokenizer: str, workloads: list[Workload], warmup: int
) -> None:
    """Every workload's shapes once (vLLM on CPU compiles per batch shape)."""
    for workload in workloads:
        warm = replace(workload, num_prompts=max(2 * workload.concurrency, warmup))
        measure(base_url, model, tokenizer, warm)


def run_interleaved(
    found: dict[str, tuple[list[str], dict, Path]],
    ports: dict[str, int],
    profile_path: Path,
    workloads: list[Workload],
    warmup: int,
    log_dir: Path,
    settle_s: float,
    rounds: int,
) -> list[dict]:
    """Every server up at once, each on its own port; one measured at a time while the
    others are paused (SIGSTOP: no CPU at all), servers alternating workload by workload.
    A server start costs minutes and this machine's speed drifts by +-25% over minutes, so
    one server start per round compares servers at different times; here a server's run of
    a workload is a minute or less from the others' run of it."""
    model, tokenizer = _model_of(profile_path)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        running, settled_s = start_side_by_side(
            stack, found, ports, profile_path, workloads, warmup, log_dir, settle_s
        )
        for server in running.values():
            server.pause()
        names = list(running)
        for round_no in range(1, rounds + 1):
            order = names if round_no % 2 else names[::-1]
            for workload in workloads:
                for name in [n for n in order if n in running]:
                    server = running[name]
                    server.resume()
                    time.sleep(RESUME_S)
                    try:
                        row = measure(server.base_url, model, tokenizer, workload)
                    except Exception as exc:  # noqa: BLE001 - the others' rows still count
                        # e.g. three servers and phone photos outgrow the memory and Ray's
                        # monitor kills one's actors: go on without it.
                        print(f"{name} failed on {workload.name} ({exc!r}); dropped", flush=True)
                        del running[name]
                        continue
                    server.pause()
                    rows.append(
                        {
                            "round": round_no,
                            "server": name,
                            "ready_s": round(server.ready_s, 1),
                            "settled_s": round(settled_s, 1),
                            **row,
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def start_side_by_side(
    stack: contextlib.ExitStack,
    found: dict[str, tuple[list[str], dict, Path]],
    ports: dict[str, int],
    profile_path: Path,
    workloads: list[Workload],
    warmup: int,
    log_dir: Path,
    settle_s: float,
) -> tuple[dict[str, ServerProcess], float]:
    """Every server of ``found`` started on its port (leaving ``stack`` stops it, resumed
    first: ServerProcess.stop) and warmed up; all left running until the last has settled
    (start-up bursts included). The servers by name, and the seconds settled."""
    model, tokenizer = _model_of(profile_path)
    running: dict[str, ServerProcess] = {}
    ready_at: dict[str, float] = {}
    for name, (command, env, cwd) in found.items():
        log = log_dir / f"{name}-{time.time_ns()}.log"
        url = f"http://127.0.0.1:{ports[name]}"
        server = stack.enter_context(ServerProcess(command, url, log, env=env, cwd=cwd))
        running[name], ready_at[name] = server, time.monotonic()
        warm_up(url, model, tokenizer, workloads, warmup)
    return running, settle(max(ready_at.values()), settle_s)


# after a pause: the server's timers that fell due meanwhile run before the load starts
RESUME_S = 3.0


def settle(
    ready_at: float, settle_s: float, quiet_core_share: float = 0.25, sample_s: float = 3.0
) -> float:
    """Wait until ``settle_s`` after the server answered /health (warm-up included), then
    until the machine's cores are quiet (at most ``settle_s`` more); the seconds since
    /health. Ray Serve's controller spends 2-3 s of CPU in one burst within a minute or so
    of start in about half the starts (BENCHMARKS.md), a one-off that would otherwise land
    in the first measured workload of our server only."""
    if settle_s <= 0:
        return time.monotonic() - ready_at
    time.sleep(max(0.0, ready_at + settle_s - time.monotonic()))
    give_up = time.monotonic() + settle_s
    before = cpu_account.snapshot()
    while time.monotonic() < give_up:
        time.sleep(sample_s)
        after = cpu_account.snapshot()
        used = cpu_account.cpu_by_part(before, after)
        if sum(used.values()) - used["client"] < sample_s * quiet_core_share:
            break
        before = after
    return time.monotonic() - ready_at


def markdown(rows: list[dict]) -> str:
    lines = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        baseline = baseline_of([r for r in rows if r["workload"] == workload])
        lines += [
            f"**{workload}**",
            "",
            f"| round | server | req/s | vs {baseline} | TTFT p50 / p99 ms | ITL p50 / p99 ms "
            "| events/stream (median, min) | full streams "
            "| mean TTFT ms: client / in engine / before engine "
            "| of which outside our route "
            "| CPU ms/request: HTTP process / engine; Ray's daemons |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        these = [r for r in rows if r["workload"] == workload]
        base = {r["round"]: r for r in these if r["server"] == baseline}
        for r in these:
            ref = base.get(r["round"])
            ratio = r["request_throughput"] / ref["request_throughput"] if ref else float("nan")
            lines.append(
                f"| {r['round']} | {r['server']} | {r['request_throughput']:.2f} | {ratio:.2f}x "
                f"| {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} "
                f"| {r['median_itl_ms']:.2f} / {r['p99_itl_ms']:.1f} "
                f"| {r['events_per_stream_median']:.0f}, {r['events_per_stream_min']} "
                f"| {r['full_stream_share']:.0%} "
                f"| {r['mean_ttft_ms']:.0f} / {r['mean_engine_ttft_ms']:.0f} "
                f"/ {r['mean_ttft_ms'] - r['mean_engine_ttft_ms']:.0f} "
                f"| {_outside_route(r)} | {_cpu(r)} |"
            )
        lines.append("")
        lines += summary_lines(these)
        lines.append("")
    return "\n".join(lines)


def _outside_route(row: dict) -> str:
    """Client TTFT minus our route's TTFT (ms), or a dash for a server without our metric."""
    ours = row.get("mean_server_ttft_ms", math.nan)
    return "-" if math.isnan(ours) else f"{row['mean_ttft_ms'] - ours:.0f}"


def _cpu(row: dict) -> str:
    """CPU per request of the HTTP process and the engine, and Ray's share of a core."""
    if "cpu_api_ms_per_request" not in row:  # rows of a run before CPU was recorded
        return "-"
    return (
        f"{row['cpu_api_ms_per_request']:.1f} / {row['cpu_engine_ms_per_request']:.1f}; "
        f"{row['cpu_ray_core_share']:.1%}"
    )


def summary_lines(rows: list[dict]) -> list[str]:
    """Per server: the mean over rounds of each same-round ratio to the baseline (vLLM's
    server when it ran)."""
    baseline = baseline_of(rows)
    base = {r["round"]: r for r in rows if r["server"] == baseline}
    out = []
    for name in dict.fromkeys(r["server"] for r in rows):
        if name == baseline:
            continue
        pairs = [(r, base[r["round"]]) for r in rows if r["server"] == name and r["round"] in base]
        if not pairs:
            continue
        ratio = {
            key: _mean_ratio(pairs, key)
            for key in ("request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms")
        }
        cpu = ""
        if all("cpu_api_ms_per_request" in r for pair in pairs for r in pair):
            cpu = f", HTTP process CPU/request {_mean_ratio(pairs, 'cpu_api_ms_per_request'):.2f}x"
        out.append(
            f"- {name} / {baseline}, mean of {len(pairs)} rounds: req/s {ratio['request_throughput']:.2f}x, "
            f"TTFT p50 {ratio['median_ttft_ms']:.2f}x, p99 {ratio['p99_ttft_ms']:.2f}x, "
            f"ITL p50 {ratio['median_itl_ms']:.2f}x{cpu}"
        )
    return out


def _mean_ratio(pairs: list[tuple[dict, dict]], key: str) -> float:
    return statistics.mean(r[key] / b[key] for r, b in pairs if b[key])


def run_rounds(
    found: dict[str, tuple[list[str], dict, Path]],
    names: list[str],
    workloads: list[Workload],
    args: argparse.Namespace,
) -> list[dict]:
    """One start of every server per round, in turn (the order alternating by round)."""
    rows: list[dict] = []
    for round_no in range(1, args.rounds + 1):
        order = names if round_no % 2 else list(reversed(names))
        for name in order:
            command, env, cwd = found[name]
            for row in run_server(
                name,
                command,
                env,
                args.port,
                args.config,
                workloads,
                args.warmup,
                args.out,
                cwd,
                args.settle_s,
            ):
                rows.append({"round": round_no, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=16, help="warm-up requests per workload")
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["vllm", "ours"],
        help="vllm, ours, ours-haproxy, ours-proxy, ours-no-lane (render_lane off)",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--before", type=Path, help="another checkout, served as ours-before")
    parser.add_argument(
        "--settle-s",
        type=float,
        default=90.0,
        help="measure each server this long after /health at the earliest (warm-up included), "
        "once its cores are quiet: steady state, not start-up (0: right after warm-up)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start every server once, side by side on ports --port, --port+10, ..., and "
        "measure them in turn, workload by workload, the others paused (run_interleaved)",
    )
    args = parser.parse_args()
    if args.before and "ours-before" not in args.servers:
        args.servers.append("ours-before")
    args.out.mkdir(parents=True, exist_ok=True)
    workloads = [WORKLOADS[w] for w in args.workloads]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        found = servers(args.config, args.port, Path(tmp), args.before)
        names = [s for s in args.servers if s in found]
        if args.interleave:
            ports = {name: args.port + 10 * i for i, name in enumerate(names)}
            at_port = {}
            for name, port in ports.items():
                (Path(tmp) / name).mkdir()
                at_port[name] = servers(args.config, port, Path(tmp) / name, args.before)[name]
            rows = run_interleaved(
                at_port,
                ports,
                args.config,
                workloads,
                args.warmup,
                args.out,
                args.settle_s,
                args.rounds,
            )
        else:
            rows = run_rounds(found, names, workloads, args)
    meta = {
        "machine": f"{platform.node()} {platform.machine()}",
        "profile": str(args.config),
        "client": "vllm.benchmarks.serve (openai-chat, random-mm, ignore_eos)",
        "workloads": {w.name: w.__dict__ for w in workloads},
        "settle_s": args.settle_s,
        "interleave": args.interleave,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows)
    (args.out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
