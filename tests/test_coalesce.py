"""Requests that queue are served together (serving.coalesce), and answer as served alone."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from serving_helpers import Served, asgi_client, train_and_register

from serving.coalesce import Coalescer

NO_BUDGET_MS = 600_000  # a latency budget no request here uses up


class _Gate:
    """A serve function that records each call's customers; the first call waits for
    ``release`` (so that the test can queue requests behind it)."""

    def __init__(self, fail_for: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.waited: list[list[float]] = []
        self.release = threading.Event()
        self.fail_for = fail_for

    def serve(
        self, customers: list[str], contexts: list[dict[str, Any]], waited_s: list[float]
    ) -> list[dict[str, Any]]:
        if not self.calls:
            assert self.release.wait(10)
        self.calls.append(list(customers))
        self.waited.append(list(waited_s))
        if self.fail_for in customers:
            raise ValueError(f"bad customer {self.fail_for}")
        return [{"customer_id": c, "context": x} for c, x in zip(customers, contexts, strict=True)]


async def _queued_behind_one(
    coalescer: Coalescer, gate: _Gate, requests: list[tuple[str, str]]
) -> list[Any]:
    """Submit ('A', 'x') and wait until it runs; then submit ``requests`` (key, customer)
    while it blocks; release it; every result (an answer or the exception) in order."""
    first = asyncio.create_task(coalescer.submit("A", "x", {"n": 0}, gate.serve))
    while not coalescer.sizes:  # the first call has started
        await asyncio.sleep(0.001)
    tasks = [
        asyncio.create_task(coalescer.submit(key, customer, {"n": i + 1}, gate.serve))
        for i, (key, customer) in enumerate(requests)
    ]
    await asyncio.sleep(0.01)  # all of them queued
    gate.release.set()
    return await asyncio.gather(first, *tasks, return_exceptions=True)


def _coalescer(max_batch: int) -> Coalescer:
    return Coalescer(lambda call: asyncio.to_thread(call), max_batch=max_batch)


QUEUED = [("A", "y"), ("A", "z"), ("B", "w"), ("A", "y"), ("A", "v")]


def test_waiting_requests_are_batched_by_key_in_order_one_customer_per_batch() -> None:
    gate = _Gate()
    results = asyncio.run(_queued_behind_one(_coalescer(8), gate, QUEUED))
    # by hand: x ran alone; then the oldest waiting (A y) with the later A's of other
    # customers (z, v; the second y waits); then B w; then the second y
    assert gate.calls == [["x"], ["y", "z", "v"], ["w"], ["y"]]
    # every request got its own answer, with its own context
    assert [(r["customer_id"], r["context"]["n"]) for r in results] == [
        ("x", 0),
        ("y", 1),
        ("z", 2),
        ("w", 3),
        ("y", 4),
        ("v", 5),
    ]


def test_a_batch_holds_at_most_max_batch_and_the_rest_keep_their_place() -> None:
    gate = _Gate()
    asyncio.run(_queued_behind_one(_coalescer(2), gate, QUEUED))
    assert gate.calls == [["x"], ["y", "z"], ["w"], ["y", "v"]]


def test_max_batch_one_serves_every_request_alone_in_arrival_order() -> None:
    gate = _Gate()
    asyncio.run(_queued_behind_one(_coalescer(1), gate, QUEUED))
    assert gate.calls == [["x"], ["y"], ["z"], ["w"], ["y"], ["v"]]


def test_a_failing_batch_is_served_alone_and_only_the_bad_request_fails() -> None:
    gate = _Gate(fail_for="z")
    results = asyncio.run(_queued_behind_one(_coalescer(8), gate, QUEUED))
    assert gate.calls == [["x"], ["y", "z", "v"], ["y"], ["z"], ["v"], ["w"], ["y"]]
    assert isinstance(results[2], ValueError) and "bad customer z" in str(results[2])
    assert [r["customer_id"] for i, r in enumerate(results) if i != 2] == ["x", "y", "w", "y", "v"]


def test_a_request_whose_client_went_away_is_not_served() -> None:
    gate = _Gate()

    async def scenario() -> None:
        coalescer = _coalescer(8)
        first = asyncio.create_task(coalescer.submit("A", "x", {}, gate.serve))
        while not coalescer.sizes:
            await asyncio.sleep(0.001)
        gone = asyncio.create_task(coalescer.submit("A", "y", {}, gate.serve))
        kept = asyncio.create_task(coalescer.submit("A", "z", {}, gate.serve))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.release.set()
        await asyncio.gather(first, kept)

    asyncio.run(scenario())
    assert gate.calls == [["x"], ["z"]]


def test_each_request_is_served_with_how_long_it_waited_for_the_thread() -> None:
    """The latency budget counts a request's wait: the requests queued behind a call held
    for 0.3 s are handed at least that wait (each its own, measured here with the test's
    clock around the hold), the first one almost none."""
    gate = _Gate()
    held_s = 0.3

    async def scenario() -> float:
        coalescer = _coalescer(8)
        first = asyncio.create_task(coalescer.submit("A", "x", {}, gate.serve))
        while not coalescer.sizes:
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        later = [asyncio.create_task(coalescer.submit("A", c, {}, gate.serve)) for c in ("y", "z")]
        await asyncio.sleep(0.01)  # both queued by now
        await asyncio.sleep(held_s)
        gate.release.set()
        await asyncio.gather(first, *later)
        return time.perf_counter() - started

    elapsed = asyncio.run(scenario())
    assert gate.calls == [["x"], ["y", "z"]]
    [[first_wait], queued] = gate.waited
    assert 0 <= first_wait < held_s / 3
    assert all(held_s <= w <= elapsed for w in queued), (queued, elapsed)


def test_max_batch_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        _coalescer(0)


# -- the service: concurrent requests, batched, answer as each alone ------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("coalesce"))


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # answers are compared with a recommender's alone: a loaded machine must not use up the
    # latency budget (short becauses) on one side only
    folder = tmp_path_factory.mktemp("asgi")
    with asgi_client(served, folder, NEXTBEST_BUDGET_MS=str(NO_BUDGET_MS)) as test_client:
        yield test_client


def test_concurrent_requests_are_served_together_and_answer_as_served_alone(
    client: Any, served: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """20 customers, each with a cart of their own, posted at once: some are served in one
    call (the log says so), and each answer is the one an independent recommender on a
    fresh ledger gives that customer alone (no customer was served here before)."""
    from features import load_snapshot
    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    snapshot = load_snapshot(served.workspace)
    alone = build_recommender(
        ServingSettings(
            holdout_share=0.0,
            db_url=f"sqlite:///{tmp_path / 'alone.db'}",
            budget_ms=float(NO_BUDGET_MS),
        ),
        workspace=served.workspace,
        snapshot=snapshot,
        blocks=[],
    )
    customers = sorted(alone.known_customers())[:20]
    products = snapshot.products.values
    bodies = [
        {
            "customer_id": c,
            "channel": "web",
            "placement": "cart",
            "k": 3,
            "context": {"cart": [str(products[(7 * i) % len(products)])]},
        }
        for i, c in enumerate(customers)
    ]
    caplog.set_level(logging.DEBUG, logger="serving.coalesce")
    barrier = threading.Barrier(len(bodies))

    def post(body: dict[str, Any]) -> dict[str, Any]:
        barrier.wait(10)
        response = client.post("/recommend", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    together = [r.getMessage() for r in caplog.records if "requests together" in r.message]
    assert together, "no two requests were served in one call"
    for body, answer in zip(bodies, answers, strict=True):
        expected = alone.recommend(
            body["customer_id"],
            channel="web",
            placement="cart",
            context=body["context"],
            k=3,
            log_exposure=False,
        )
        assert answer["customer_id"] == body["customer_id"]
        assert [(o["offer_id"], o["because"]) for o in answer["offers"]] == [
            (o["offer_id"], o["because"]) for o in expected["offers"]
        ]
        assert [o["score"] for o in answer["offers"]] == pytest.approx(
            [o["score"] for o in expected["offers"]]
        )
