"""Routing decisions: thresholds, hysteresis, strict mode and bounded waiting."""

from __future__ import annotations

import pytest

from engine.config import AppConfig
from engine.errors import RequestError
from engine.routing import Router
from tests.utils import two_tier_config


def _router(kv: dict | None = None) -> Router:
    config = AppConfig.model_validate(
        {
            "models": [
                {
                    "name": "big",
                    "model": "x",
                    "engine_kwargs": {"max_num_seqs": 4},
                    "saturation": {"max_queued_requests": 2, "resume_fraction": 0.5},
                },
                {
                    "name": "small",
                    "model": "y",
                    "engine_kwargs": {"max_num_seqs": 2},
                    "saturation": {"max_queued_requests": 1},
                },
            ],
            "routing": {"primary": "big", "fallbacks": ["small"]},
            "admission": {"retry_after_s": 3},
        }
    )
    return Router(config, kv_cache_usage=kv)


def _fill(router: Router, n: int, allow_fallback: bool = True) -> list[str]:
    served = []
    for _ in range(n):
        route = router.choose("big", allow_fallback)
        router.admit(route.served_model)
        served.append(route.served_model)
    return served


def test_primary_until_saturated_then_fallback_then_bounded_queues_then_429():
    router = _router()
    # 4 running on big; then small (2 slots); then queues: big 2, small 1.
    assert _fill(router, 9) == ["big"] * 4 + ["small"] * 2 + ["big"] * 2 + ["small"]
    with pytest.raises(RequestError) as info:
        router.choose("big", allow_fallback=True)
    assert info.value.status_code == 429 and info.value.code == "queue_full"
    assert info.value.headers == {"Retry-After": "3"}


def test_strict_request_to_saturated_model_gets_429_not_a_substitute():
    router = _router()
    _fill(router, 4)
    with pytest.raises(RequestError) as info:
        router.choose("big", allow_fallback=False)
    assert info.value.status_code == 429 and info.value.code == "saturated_strict"


def test_hysteresis_returns_to_primary_only_below_the_resume_fraction():
    router = _router()
    assert _fill(router, 5)[-1] == "small"  # big saturated at 4 in flight
    router.release("big")  # 3 in flight > 0.5 * 4
    assert router.choose("big", True).served_model == "small"
    router.release("big")  # 2 in flight <= 0.5 * 4: resumes
    assert router.choose("big", True).served_model == "big"


def test_kv_cache_usage_saturates_the_primary():
    usage = {"value": 0.0}
    router = _router(kv={"big": lambda: usage["value"]})
    assert router.choose("big", True).served_model == "big"
    usage["value"] = 0.97
    assert router.choose("big", True).served_model == "small"
    usage["value"] = 0.6  # above 0.5 * 0.95: still saturated
    assert router.choose("big", True).served_model == "small"
    usage["value"] = 0.2
    assert router.choose("big", True).served_model == "big"


def test_requesting_the_fallback_by_name_has_no_further_fallback():
    router = _router()
    assert _fill(router, 2) == ["big", "big"]
    route = router.choose("small", True)
    assert route.served_model == "small" and not route.fell_back


def test_when_all_are_saturated_requests_queue_where_the_wait_is_shortest():
    config = two_tier_config((2, 8), (8, 8))
    router = Router(config)
    served = _fill(router, 2 + 8 + 5)
    assert served[:10] == ["big"] * 2 + ["small"] * 8
    # Expected wait = (queued + 1) / slots: big 1/2 vs small 1/8, 2/8, 3/8, then 4/8 ties
    # with big's 1/2 (the earlier tier wins), then big's 2/2 loses to small's 4/8.
    assert served[10:] == ["small", "small", "small", "big", "small"]
