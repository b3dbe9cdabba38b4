"""Every load profile produces the arrival pattern it claims."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.profiles import Concurrency, Poisson, Ramp, Sweep, Trace, gamma_arrivals, parse_profile


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times, strict=False)]


def test_poisson_inter_arrivals_have_mean_and_variance_of_an_exponential():
    stage = next(Poisson(rate=10.0, seed=3).stages(20_000))
    gaps = _gaps(list(stage.arrivals_s))
    assert len(gaps) == 20_000 and stage.offered_rate == 10.0
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.03)
    assert statistics.variance(gaps) == pytest.approx(0.01, rel=0.06)  # exponential: 1/rate²


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_scales_the_variance_and_keeps_the_mean(burstiness):
    gaps = _gaps(gamma_arrivals(10.0, 20_000, burstiness, random.Random(1)))
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.04)
    assert statistics.variance(gaps) == pytest.approx(0.01 / burstiness, rel=0.1)


def test_poisson_parses_rate_and_burstiness():
    profile = parse_profile("poisson:2.5,burstiness=0.5")
    assert isinstance(profile, Poisson) and (profile.rate, profile.burstiness) == (2.5, 0.5)


def test_ramp_rate_rises_linearly():
    ramp = parse_profile("ramp:2-20/200", seed=5)
    assert isinstance(ramp, Ramp)
    times = ramp.arrivals()
    # expected count = area under the rate line: (2 + 20) / 2 * 200 = 2200
    assert len(times) == pytest.approx(2200, rel=0.06)
    assert all(0 <= t <= 200 for t in times) and times == sorted(times)
    # per 50 s quarter, the count follows the integral of the rate over that quarter
    for quarter in range(4):
        low, high = quarter * 50, (quarter + 1) * 50
        expected = (ramp.rate_at(low) + ramp.rate_at(high)) / 2 * 50
        observed = sum(low <= t < high for t in times)
        assert observed == pytest.approx(expected, rel=0.15), quarter


def test_concurrency_is_one_closed_loop_stage():
    stages = list(Concurrency(8).stages(100))
    assert len(stages) == 1 and stages[0].concurrency == 8 and stages[0].arrivals_s is None
    assert stages[0].num_requests == 100


def test_sweep_doubles_the_rate_until_the_server_saturates():
    sweep = Sweep(steps=6, factor=2.0)
    stages = sweep.stages(40)
    first = next(stages)
    assert first.concurrency == 1
    offered = []
    stage = stages.send({"request_throughput": 3.0, "failed": 0, "completed": 10})
    # the server keeps up to 10 req/s, then achieves only 10
    while True:
        offered.append(stage.offered_rate)
        achieved = min(stage.offered_rate, 10.0)
        try:
            stage = stages.send({"request_throughput": achieved, "failed": 0, "completed": 40})
        except StopIteration:
            break
    assert offered == [3.0, 6.0, 12.0]  # 12 offered, 10 achieved: saturated, stop


def test_sweep_stops_on_errors_too():
    stages = Sweep(steps=6).stages(40)
    next(stages)
    stage = stages.send({"request_throughput": 3.0, "failed": 0, "completed": 10})
    with pytest.raises(StopIteration):
        stages.send({"request_throughput": stage.offered_rate, "failed": 5, "completed": 35})


def test_trace_replays_timestamps_from_numbers_or_jsonl(tmp_path):
    plain = tmp_path / "trace.txt"
    plain.write_text("100.5\n100.0\n\n101.25\n")
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text('{"timestamp_s": 7.0}\n{"timestamp_s": 9.5}\n')
    assert parse_profile(f"trace:{plain}").times_s == [0.0, 0.5, 1.25]
    stage = next(parse_profile(f"trace:{jsonl}").stages(999))
    assert stage.arrivals_s == (0.0, 2.5) and stage.num_requests == 2
    assert isinstance(parse_profile(f"trace:{plain}"), Trace)


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="concurrency"):
        parse_profile("burst:5")
