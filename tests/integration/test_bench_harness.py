"""The harness end to end: its CLI against a fake server with known timing, and one real run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.client import StreamingClient, run_async
from bench.compare import compare_runs
from bench.launch import REPO, ServerProcess, free_port, process_state
from bench.profiles import Concurrency, parse_profile
from bench.report import read_run
from bench.workload import build_requests

TTFT_MS, ITL_MS, TOKENS = 100, 20, 8


def _fake(tmp: Path, *options: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "bench.fake_server", "--port", str(port), *options]
    return ServerProcess(
        command, f"http://127.0.0.1:{port}", tmp / f"fake-{port}.log", timeout_s=30
    )


def _bench(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def timed_server(tmp_path_factory):
    """TTFT 100 ms, then a token every 20 ms; every 5th request 429; served as a, b, a, ..."""
    tmp = tmp_path_factory.mktemp("fake")
    with _fake(
        tmp,
        "--ttft-ms",
        str(TTFT_MS),
        "--itl-ms",
        str(ITL_MS),
        "--served-models",
        "model-a,model-b",
        "--error-every",
        "5",
    ) as server:
        yield server


def test_run_cli_measures_the_known_timing_and_counts_exactly(timed_server, tmp_path):
    out = tmp_path / "run"
    _bench(
        "run",
        "--url",
        timed_server.base_url,
        "--model",
        "m",
        "--profile",
        "concurrency:4",
        "--workload",
        "text",
        "--num-requests",
        "20",
        "--output-tokens",
        str(TOKENS),
        "--warmup",
        "0",
        "--slo",
        "ttft_ms=1000",
        "--out",
        str(out),
    )
    (stage,) = json.loads((out / "summary.json").read_text())["stages"]
    assert (stage["requests"], stage["completed"], stage["failed"]) == (20, 16, 4)
    assert stage["errors_by_status"] == {"429": 4}
    assert stage["served_share"] == {"model-a": 0.5, "model-b": 0.5}
    assert stage["total_output_tokens"] == 16 * TOKENS
    assert stage["mean_ttft_ms"] == pytest.approx(TTFT_MS, abs=25)
    assert stage["p50_tpot_ms"] == pytest.approx(ITL_MS, abs=5)
    assert stage["p50_itl_ms"] == pytest.approx(ITL_MS, abs=5)
    assert stage["p50_e2el_ms"] == pytest.approx(TTFT_MS + (TOKENS - 1) * ITL_MS, abs=40)
    assert stage["goodput"] == pytest.approx(stage["request_throughput"])  # every success is good
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 20 and all(
        len(r["token_times_s"]) == TOKENS for r in records if r["status"] == 200
    )
    assert "| concurrency 4 | 16 / 4 |" in (out / "report.md").read_text()
    for png in ("latency_vs_throughput.png", "ttft_cdf.png", "tpot_cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_closed_loop_keeps_exactly_n_requests_in_flight(timed_server):
    specs = build_requests("text", "m", 12, output_tokens="4")

    async def go():
        async with StreamingClient(timed_server.base_url) as client:
            return await client.run_stage(next(Concurrency(3).stages(12)), specs, progress=False)

    records, _ = run_async(go())
    events = sorted(
        [(r.send_offset_s, 1) for r in records] + [(r.done_offset_s, -1) for r in records]
    )
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak == 3


def test_open_loop_sends_on_the_profile_schedule(timed_server):
    specs = build_requests("text", "m", 30, output_tokens="2")
    stage = next(parse_profile("poisson:20", seed=2).stages(30))

    async def go():
        async with StreamingClient(timed_server.base_url) as client:
            return await client.run_stage(stage, specs, progress=False)

    records, _ = run_async(go())
    lags = [r.send_offset_s - r.scheduled_offset_s for r in records]
    assert [r.scheduled_offset_s for r in records] == list(stage.arrivals_s)
    assert min(lags) >= 0 and max(lags) < 0.05


def test_compare_puts_runs_side_by_side_with_ratios(timed_server, tmp_path):
    for name, concurrency in (("slow", 1), ("fast", 4)):
        _bench(
            "run",
            "--url",
            timed_server.base_url,
            "--model",
            "m",
            "--profile",
            f"concurrency:{concurrency}",
            "--workload",
            "text",
            "--num-requests",
            "8",
            "--output-tokens",
            "4",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / name),
        )
    table = compare_runs([tmp_path / "slow", tmp_path / "fast"], tmp_path / "cmp", baseline="slow")
    slow, fast = read_run(tmp_path / "slow").stages[0], read_run(tmp_path / "fast").stages[0]
    ratio = fast["request_throughput"] / slow["request_throughput"]
    assert ratio > 2  # four in flight instead of one
    assert f"| fast | concurrency 4 | {ratio:.2f}x |" in table
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == table
    assert (tmp_path / "cmp" / "ttft_cdf.png").exists()


def test_harness_sustains_over_500_streamed_requests_per_second(tmp_path):
    """The client is not the bottleneck: 16-token streams from an instant server."""
    with _fake(tmp_path) as server:
        specs = build_requests("text", "fake-model", 2000, output_tokens="16")

        async def go():
            async with StreamingClient(server.base_url) as client:
                started = time.perf_counter()
                records, _ = await client.run_stage(
                    next(Concurrency(128).stages(2000)), specs, progress=False
                )
                return records, time.perf_counter() - started

        records, elapsed = run_async(go())
    assert all(r.success and r.output_tokens == 16 for r in records)
    assert 2000 / elapsed > 500, f"{2000 / elapsed:.0f} req/s"


@pytest.mark.slow
def test_short_real_run_against_the_tiny_model_server(server, tmp_path):
    out = tmp_path / "real"
    _bench(
        "run",
        "--url",
        server.base_url,
        "--model",
        "qwen3-vl-tiny",
        "--profile",
        "concurrency:2",
        "--workload",
        "product:size=256x256",
        "--num-requests",
        "6",
        "--output-tokens",
        "8",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    (stage,) = read_run(out).stages
    assert (stage["completed"], stage["failed"]) == (6, 0)
    assert stage["total_output_tokens"] == 48  # ignore_eos: exactly 8 each
    assert stage["served_share"] == {"qwen3-vl-tiny": 1.0}
    assert 0 < stage["p50_ttft_ms"] < stage["p50_e2el_ms"]


@pytest.mark.slow
def test_compare_launches_a_variant_with_the_engine_cli_and_compares_it(server, tmp_path):
    """One command: launch a profile with the engine CLI, run, stop it; run the same workload
    against the live session server; one table with ratios. The launched profile serves the
    tiny model on ONNX Runtime: the same CLI, Ray and Serve, ready in a third of vLLM's time."""
    profile = yaml.safe_load((REPO / "configs/cpu-tiny-onnx.yaml").read_text())
    profile["models"][0]["name"] = "launched-tiny"  # tells its answers from the session's
    profile.pop("routing", None)
    profile_path = tmp_path / "launched.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    spec = {
        "baseline": "session",
        "run": {
            "profile": "concurrency:2",
            "workload": "product:size=128x128",
            "num_requests": 4,
            "output_tokens": "4",
            "warmup": 1,
        },
        "variants": [
            {"name": "session", "url": server.base_url, "model": "qwen3-vl-tiny"},
            {"name": "launched", "config": str(profile_path)},
        ],
    }
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(spec))
    _bench("compare", str(path), "--out", str(tmp_path / "cmp"))
    launched = read_run(tmp_path / "cmp" / "launched")
    assert launched.meta["server_ready_s"] > 0 and launched.meta["config"] == str(profile_path)
    assert launched.stages[0]["completed"] == 4
    assert launched.stages[0]["served_share"] == {"launched-tiny": 1.0}
    session = read_run(tmp_path / "cmp" / "session")
    assert session.stages[0]["served_share"] == {"qwen3-vl-tiny": 1.0}
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| launched | concurrency 2 |" in table and "Server start to healthy: launched" in table


def test_the_harness_measures_ttft_tpot_and_itl_as_vllms_client_does(tmp_path):
    """Both clients on the same requests to a server of fixed timing (a role-only chunk first,
    as vLLM's server sends): a definition that differs shows as a ratio off 1."""
    from bench.crosscheck import TIMED_ITL_MS, TIMED_TTFT_MS, crosscheck

    report = crosscheck(
        "timed", tmp_path, num_prompts=48, concurrency=4, output_len=16, rounds=2, warmup=8
    )
    assert report["within_5_percent"], report["ratio_harness_over_vllm"]
    harness = [r for r in report["rows"] if r["client"] == "harness"]
    assert all(abs(r["median_ttft_ms"] - TIMED_TTFT_MS) < 0.25 * TIMED_TTFT_MS for r in harness)
    assert all(abs(r["median_itl_ms"] - TIMED_ITL_MS) < 0.5 * TIMED_ITL_MS for r in harness)


def test_a_paused_server_uses_no_cpu_answers_after_resume_and_stops_even_paused(tmp_path):
    """compare_servers --interleave measures one server while the others are paused."""
    import httpx

    server = _fake(tmp_path)
    try:
        server.pause()
        assert process_state(server.proc.pid) == "T", "stopped"
        with pytest.raises(httpx.TimeoutException):
            httpx.get(server.base_url + "/health", timeout=1)
        server.resume()
        assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
        server.pause()
    finally:
        code = server.stop(timeout_s=10)
    assert code is not None, "a paused server takes SIGTERM once stop() resumes it"
