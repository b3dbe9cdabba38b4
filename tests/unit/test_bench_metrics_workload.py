"""Harness metrics from known records, and the synthetic workload's promises."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from bench.client import RequestRecord
from bench.metrics import parse_slo, summarize
from bench.workload import QUESTIONS, build_requests, output_lengths


def _ok(index: int, ttft: float, gap: float, tokens: int, model: str) -> RequestRecord:
    times = [ttft + i * gap for i in range(tokens)]
    return RequestRecord(
        index,
        "s",
        "product",
        0.0,
        status=200,
        served_model=model,
        ttft_s=ttft,
        latency_s=times[-1],
        token_times_s=times,
        output_tokens=tokens,
    )


def test_summary_matches_hand_computed_values():
    records = [
        _ok(0, 0.100, 0.010, 11, "big"),  # TPOT (0.2 - 0.1) / 10 = 10 ms, E2E 200 ms
        _ok(1, 0.300, 0.020, 11, "big"),  # TPOT 20 ms, E2E 500 ms
        _ok(2, 0.200, 0.030, 1, "small"),  # one token: no TPOT, no ITL
        RequestRecord(3, "s", "product", 0.0, status=429, error="rate_limited"),
        RequestRecord(4, "s", "product", 0.0, status=0, error="ClientConnectionError"),
    ]
    s = summarize(records, duration_s=2.0, slo=parse_slo("ttft_ms=250,tpot_ms=15"))
    assert (s["requests"], s["completed"], s["failed"]) == (5, 3, 2)
    assert s["errors_by_status"] == {"0": 1, "429": 1}
    assert s["request_throughput"] == 1.5
    assert s["total_output_tokens"] == 23 and s["output_throughput"] == 11.5
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["p50_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)  # numpy linear: 200 + 0.98 * 100
    assert s["mean_tpot_ms"] == pytest.approx(15.0)
    assert s["p50_itl_ms"] == pytest.approx(15.0)  # ten 10 ms gaps and ten 20 ms gaps
    assert s["p50_e2el_ms"] == pytest.approx(200.0)
    # good: request 0 (100 ms, 10 ms) and request 2 (200 ms, TPOT 0); request 1 misses both
    assert s["goodput"] == pytest.approx(1.0)
    assert s["served_share"] == {"big": pytest.approx(2 / 3), "small": pytest.approx(1 / 3)}


def test_summary_without_completions_has_no_latencies():
    s = summarize([RequestRecord(0, "s", "text", 0.0, status=503, error="x")], 1.0)
    assert s["completed"] == 0 and s["p99_ttft_ms"] is None and s["goodput"] is None


def test_unknown_slo_is_refused():
    with pytest.raises(ValueError, match="ttft_ms"):
        parse_slo("latency=5")


def _pixels(url: str) -> tuple[str, tuple[int, int], bytes]:
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return image.format, image.size, image.tobytes()


def test_every_synthetic_image_is_unique_in_bytes_and_pixels():
    specs = build_requests("product+screenshot:size=96x160", "m", 8)
    urls = [
        part["image_url"]["url"]
        for s in specs
        for part in s.body["messages"][0]["content"]
        if part["type"] == "image_url"
    ]
    assert len(urls) == 8 and len(set(urls)) == 8
    decoded = [_pixels(url) for url in urls]
    assert len({pixels for _, _, pixels in decoded}) == 8
    assert {fmt for fmt, _, _ in decoded} == {"JPEG", "PNG"}  # product JPEG, screenshot PNG
    assert {size for _, size, _ in decoded} == {(96, 160)}
    assert [s.kind for s in specs[:2]] == ["product", "screenshot"]


def test_phone_photos_have_phone_resolution_and_formats_can_be_chosen():
    (spec,) = build_requests("phone:format=webp,images=2", "m", 1)
    parts = [p for p in spec.body["messages"][0]["content"] if p["type"] == "image_url"]
    assert len(parts) == 2
    fmt, size, _ = _pixels(parts[0]["image_url"]["url"])
    assert (fmt, size) == ("WEBP", (4032, 3024))
    assert spec.image_bytes > 0


def test_questions_cover_chinese_and_english_and_output_lengths_are_configurable():
    assert any("\u4e00" <= ch <= "\u9fff" for q in QUESTIONS for ch in q)
    assert any(q.isascii() for q in QUESTIONS)
    lengths = output_lengths("32-128", 500, seed=1)
    assert min(lengths) >= 32 and max(lengths) <= 128 and len(set(lengths)) > 50
    specs = build_requests("text", "m", 3, output_tokens="7")
    assert [s.body["max_tokens"] for s in specs] == [7, 7, 7]
    assert all(s.body["ignore_eos"] for s in specs)


def test_jsonl_workload_replays_recorded_requests(tmp_path):
    path = tmp_path / "recorded.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "timestamp_s": 1},
        {"messages": [{"role": "user", "content": "yo"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    specs = build_requests(f"jsonl:{path}", "served", 3, ignore_eos=False)
    assert [s.body["messages"][0]["content"] for s in specs] == ["hi", "yo", "hi"]
    assert [s.body["max_tokens"] for s in specs] == [5, 64, 5]
    assert all(s.body["model"] == "served" and "timestamp_s" not in s.body for s in specs)


def test_unknown_workload_kind_is_refused():
    with pytest.raises(ValueError, match="mixed"):
        build_requests("video", "m", 1)


def _row(server: str, round_no: int, rps: float) -> dict:
    keys = ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "mean_ttft_ms")
    return {
        "workload": "tiny-c8",
        "server": server,
        "round": round_no,
        "request_throughput": rps,
        "mean_engine_ttft_ms": 1.0,
        "events_per_stream_median": 64,
        "events_per_stream_min": 64,
        "full_stream_share": 1.0,
    } | dict.fromkeys(keys, 2.0)


def test_compare_servers_takes_ratios_against_the_checkout_before_when_vllm_did_not_run():
    from bench.compare_servers import baseline_of, markdown

    cpu = {"cpu_engine_ms_per_request": 30.0, "cpu_ray_core_share": 0.05}
    before_after = [
        _row("ours", 1, 9.0) | {"mean_server_ttft_ms": 1.5, "cpu_api_ms_per_request": 12.0} | cpu,
        _row("ours-before", 1, 10.0) | {"cpu_api_ms_per_request": 15.0} | cpu,
    ]
    assert baseline_of(before_after) == "ours-before"
    table = markdown(before_after)
    assert "vs ours-before" in table and "| 0.90x |" in table and "nan" not in table
    # client 2.0 ms, our route 1.5 ms: 0 ms outside it (rounded); a server without it: "-"
    assert table.count("| 0 |") == 1 and table.count("| - |") == 1
    assert "ours / ours-before, mean of 1 rounds: req/s 0.90x" in table
    assert "| 12.0 / 30.0; 5.0% |" in table and "HTTP process CPU/request 0.80x" in table
    assert baseline_of([*before_after, _row("vllm", 1, 12.0)]) == "vllm"


def test_the_checkout_before_is_served_with_its_own_copy_of_the_profile(tmp_path):
    from bench.compare_servers import REPO, servers

    before = tmp_path / "before"
    (before / "configs").mkdir(parents=True)
    profile = yaml.safe_load((REPO / "configs/cpu-tiny.yaml").read_text())
    profile["models"][0]["engine_kwargs"]["seed"] = 1234  # what the checkout before had
    (before / "configs/cpu-tiny.yaml").write_text(yaml.safe_dump(profile))
    found = servers(REPO / "configs/cpu-tiny.yaml", 8999, tmp_path, before)
    ours, theirs = (
        yaml.safe_load(Path(found[n][0][-1]).read_text()) for n in ("ours", "ours-before")
    )
    assert (
        theirs["models"][0]["engine_kwargs"]["seed"]
        == 1234
        != ours["models"][0]["engine_kwargs"]["seed"]
    )
    assert theirs["server"]["port"] == ours["server"]["port"] == 8999
    assert found["ours-before"][1]["PYTHONPATH"] == str(before.resolve())


def test_cpu_is_booked_to_the_part_of_the_server_that_used_it():
    import os

    from bench.cpu_account import Process, busiest, cpu_by_part, part_of

    assert part_of(os.getpid(), "python -m bench.compare_servers") == "client"
    assert part_of(1, "VLLM::EngineCore") == part_of(2, "VLLM::Worker") == "engine"
    assert part_of(3, "ray::ServeReplica:qwen3vl:OpenAIServer") == "api"
    assert part_of(4, "python -m vllm.entrypoints.openai.api_server --model m") == "api"
    assert part_of(5, "/x/ray/core/src/ray/raylet/raylet --x") == "ray"
    assert part_of(6, "ray::ProxyActor") == part_of(7, "python -m engine serve --config c") == "ray"
    assert part_of(8, "kworker/0:1") == "other"
    before = {3: Process(10.0, "ray::ServeReplica:a:B"), 9: Process(5.0, "old")}
    after = {
        3: Process(12.5, "ray::ServeReplica:a:B"),
        9: Process(1.0, "VLLM::Worker"),  # the pid was reused: counts from zero
        10: Process(0.5, "ray::IDLE"),  # started in between
    }
    used = cpu_by_part(before, after)
    assert used["api"] == 2.5 and used["engine"] == 1.0 and used["ray"] == 0.5
    assert busiest(before, after, "ray") == [("ray::IDLE", 0.5)]


def test_a_cpu_snapshot_sees_this_process_spend_time():
    import time

    from bench.cpu_account import cpu_by_part, snapshot

    before = snapshot()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    used = cpu_by_part(before, snapshot())
    assert 0.1 <= used["client"] < 5


def test_settling_measures_from_health_and_can_be_turned_off():
    import time

    from bench.compare_servers import settle

    ready_at = time.monotonic() - 100  # healthy 100 s ago: nothing left to wait for
    started = time.monotonic()
    assert 100 <= settle(ready_at, 0) < 101
    # already past: one sample of the cores, quiet at once
    assert settle(ready_at, 0.5, quiet_core_share=1e9, sample_s=0.1) < 101
    assert time.monotonic() - started < 1
