"""Refusals are throttled per client address (serving.http.RefusalThrottle, in ApiGuard):
a client looping on bad requests is slowed to ``NEXTBEST_REFUSALS_PER_S`` and its
refusals are counted instead of logged one by one; the answers themselves never change
and valid requests are never delayed. Expected waits are worked out by hand below."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.testclient import TestClient

from serving.http import ApiGuard, RefusalThrottle
from serving.settings import ServingSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_holds_one_seconds_worth_and_waits_are_bounded() -> None:
    clock = Clock()
    throttle = RefusalThrottle(4, clock=clock)
    # 4 a second, a bucket of 4: four at once, then 1/4 s, 2/4 s, 3/4 s, then the cap of 1 s
    assert [throttle.take("a") for _ in range(8)] == [0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0]
    # the debt is bounded at one second's worth: a second later the bucket is back to 0 …
    clock.now += 1.0
    assert throttle.take("a") == 0.25
    # … and two more seconds fill it again (never above 4)
    clock.now += 2.0
    assert [throttle.take("a") for _ in range(5)] == [0, 0, 0, 0, 0.25]
    # another address has its own bucket; rate 0 never waits
    assert throttle.take("b") == 0
    assert all(RefusalThrottle(0, clock=clock).take("a") == 0 for _ in range(100))


def test_forgotten_addresses_are_only_those_whose_bucket_is_full_again() -> None:
    clock = Clock()
    throttle = RefusalThrottle(2, clock=clock)
    throttle.MAX_ADDRESSES = 3
    throttle.take("old")
    clock.now += 5.0  # "old" is full again
    throttle.take("busy")
    throttle.take("busy")
    throttle.take("busy")  # in debt
    throttle.take("new")  # 3 addresses known: "old" is forgotten, "busy" is not
    throttle.take("newer")
    assert "old" not in throttle._buckets
    assert throttle.take("busy") > 0  # still in debt: its wait was not forgotten


class Body(BaseModel):
    customer_id: str


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def guarded() -> tuple[TestClient, ApiGuard, list[float], Clock]:
    settings = ServingSettings(refusals_per_s=3)
    guard = ApiGuard(_ok, inputs={"/recommend": Body}, settings=lambda: settings)
    clock, waits = Clock(), []
    guard.throttle.clock = clock

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    guard.sleep = sleep
    return TestClient(guard), guard, waits, clock


def test_a_client_looping_on_refusals_waits_and_is_counted_not_logged(
    guarded: tuple[TestClient, ApiGuard, list[float], Clock], caplog: pytest.LogCaptureFixture
) -> None:
    client, _, waits, clock = guarded
    caplog.set_level(logging.WARNING, logger="nextbest.serving.http")
    answers = [
        client.post("/recommend", content=b"x", headers={"Content-Type": "text/plain"})
        for _ in range(6)
    ]
    # every answer is the same true refusal, whatever the throttle did
    assert [a.status_code for a in answers] == [415] * 6
    assert all("application/json" in a.json()["error"] for a in answers)
    # 3 a second: the fourth waits 1/3 s, the fifth 2/3 s, the sixth the cap of 1 s
    assert waits == pytest.approx([1 / 3, 2 / 3, 1.0])
    lines = [r.getMessage() for r in caplog.records]
    assert sum("refused with 415" in line for line in lines) == 3
    assert sum("are over 3 a second" in line for line in lines) == 1
    # a valid request from the same address is not delayed
    assert client.post("/recommend", json={"customer_id": "c1"}).status_code == 200
    assert len(waits) == 3
    # once the bucket refills, the next refusal is logged, with how many were not
    clock.now += 10
    caplog.clear()
    refused = client.post("/recommend", json={"customer": "c1"})
    assert refused.status_code == 400
    assert len(waits) == 3
    (line,) = [r.getMessage() for r in caplog.records]
    assert "refused with 400" in line and "(3 throttled refusals before it were not logged)" in line


def test_the_setting_is_read_and_zero_turns_it_off() -> None:
    assert ServingSettings.from_env({}).refusals_per_s == 50
    assert ServingSettings.from_env({"NEXTBEST_REFUSALS_PER_S": "0"}).refusals_per_s == 0
    with pytest.raises(ValueError, match="NEXTBEST_REFUSALS_PER_S"):
        ServingSettings.from_env({"NEXTBEST_REFUSALS_PER_S": "-1"})
