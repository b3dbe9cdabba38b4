"""The autoscaling simulator: HPA arithmetic against hand-computed cases, and monotonicity."""

from __future__ import annotations

import pytest

from bench.autoscale import (
    REPO,
    Autoscaler,
    HpaSpec,
    Policy,
    Tier,
    desired_replicas,
    hpa_specs,
    load_trace,
    rate_at,
    simulate,
)


@pytest.mark.parametrize(
    ("current", "ready", "total", "expected"),
    [
        (4, 4, 600, 7),  # ratio 600 / (96 * 4) = 1.5625 -> ceil(6.25)
        (4, 4, 400, 4),  # ratio 1.042: inside the 10% tolerance
        (4, 4, 100, 2),  # ratio 0.26 -> ceil(1.04)
        (6, 4, 600, 6),  # scale-up with 2 unready pods counted as 0: 600 / 576 = 1.04, tolerance
        (6, 4, 900, 10),  # 900 / (96 * 6) = 1.5625 -> ceil(9.375)
        (3, 0, 500, 3),  # no ready pod, no metric: no change
    ],
)
def test_desired_replicas_follow_the_hpa_formula(current, ready, total, expected):
    assert desired_replicas(current, ready, total, target=96) == expected


def _spec(**overrides) -> HpaSpec:
    base = dict(
        min_replicas=2,
        max_replicas=16,
        target=100,
        up_window_s=0,
        down_window_s=300,
        up_policies=(Policy("Percent", 100, 60), Policy("Pods", 4, 60)),
        down_policies=(Policy("Pods", 1, 180),),
        up_select="Max",
        down_select="Min",
    )
    return HpaSpec(**(base | overrides))


def test_scale_up_is_limited_by_the_most_permissive_policy_per_period():
    hpa = Autoscaler(_spec())
    # demand worth 20 pods; Max(100% of 2 -> 4, 2 + 4 -> 6) = 6
    assert hpa.step(0, current=2, ready=2, metric_total=2000) == 6
    # 15 s later the +4 is still inside the 60 s period: the period started at 2, limit 6 again
    assert hpa.step(15, current=6, ready=2, metric_total=2000) == 6
    # after the period: start 6 -> Max(12, 10) = 12
    assert hpa.step(75, current=6, ready=6, metric_total=2000) == 12
    assert hpa.step(150, current=12, ready=12, metric_total=5000) == 16  # clamped to max


def test_scale_down_waits_for_the_stabilization_window_then_steps_by_policy():
    hpa = Autoscaler(_spec())
    assert hpa.step(0, current=10, ready=10, metric_total=1000) == 10  # exactly on target
    for t in range(15, 300, 15):  # demand drops to 2 pods' worth: the window remembers 10
        assert hpa.step(t, current=10, ready=10, metric_total=200) == 10
    assert hpa.step(315, current=10, ready=10, metric_total=200) == 9  # one pod per 180 s
    assert hpa.step(330, current=9, ready=9, metric_total=200) == 9
    assert hpa.step(500, current=9, ready=9, metric_total=200) == 8


def test_hpa_settings_come_from_the_shipped_manifest():
    specs = hpa_specs(REPO / "k8s/base/hpa.yaml")
    primary = specs["primary"]
    assert (primary.min_replicas, primary.max_replicas, primary.target) == (2, 16, 96.0)
    assert primary.down_window_s == 900 and primary.up_window_s == 0
    assert Policy("Pods", 4, 60) in primary.up_policies and primary.down_select == "Min"
    assert specs["fallback"].target == 192.0


def test_trace_is_linear_between_points():
    trace = load_trace(REPO / "bench/traces/sale-peak.csv")
    assert rate_at(trace, 0) == 20 and rate_at(trace, 750) == pytest.approx(110)
    assert rate_at(trace, 1800) == 200  # 10x, held


def _run(rate_scale: float, startup_s: float = 300) -> dict:
    specs = hpa_specs(REPO / "k8s/base/hpa.yaml")
    primary = Tier("primary", Autoscaler(specs["primary"]), 40.0, 3.0, 6.0, 256)
    fallback = Tier("fallback", Autoscaler(specs["fallback"]), 100.0, 1.2, 2.4, 256)
    trace = load_trace(REPO / "bench/traces/sale-peak.csv")
    return simulate(trace, primary, fallback, startup_s, rate_scale=rate_scale)


def test_a_stronger_surge_never_yields_fewer_replicas():
    runs = [_run(scale) for scale in (0.5, 1.0, 1.5)]
    for weak, strong in zip(runs, runs[1:], strict=False):
        for a, b in zip(weak["series"], strong["series"], strict=True):
            assert b["primary_pods"] >= a["primary_pods"], a["t_s"]
        assert strong["summary"]["gpu_hours_primary"] > weak["summary"]["gpu_hours_primary"]


def test_the_fallback_tier_absorbs_the_surge_while_primary_pods_start():
    result = _run(1.0)
    s = result["summary"]
    assert s["offered"] == pytest.approx(s["primary"] + s["fallback"] + s["rejected"])
    assert 0 < s["fallback_share"] < 0.5
    during_startup = [p for p in result["series"] if 700 <= p["t_s"] <= 1100]
    assert max(p["fallback_rps"] for p in during_startup) > 50
    assert result["series"][-1]["primary_pods"] == 2  # back to min after the peak
    slower = _run(1.0, startup_s=900)["summary"]  # slower pod start: more overflow, more 429s
    assert slower["fallback_share"] > s["fallback_share"] and slower["rejected"] >= s["rejected"]
