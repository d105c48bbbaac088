"""BentoML's traffic-timeout middleware, as the service runs it
(serving.http.cancel_bentoml_request_timers): an answered request leaves no timer behind
(BentoML 1.4 left one alive for the whole timeout, with the request's future and context:
thousands of objects under load that every full garbage collection walked), and a request
past the timeout is still a 504."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import uvloop

from serving.http import cancel_bentoml_request_timers


async def _answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await asyncio.sleep(5)
    await _answer(scope, receive, send)


def _timers() -> int:
    return sum(type(o).__name__ == "TimerHandle" for o in gc.get_objects())


async def _requests(middleware: Any, n: int) -> list[list[dict[str, Any]]]:
    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": []}
    sent: list[list[dict[str, Any]]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    for _ in range(n):
        messages: list[dict[str, Any]] = []

        async def send(message: dict[str, Any], messages: list[dict[str, Any]] = messages) -> None:
            messages.append(message)

        await middleware(scope, receive, send)
        sent.append(messages)
    return sent


@pytest.fixture
def timeout_middleware() -> Any:
    """BentoML's own class, as the service's import leaves it (the fix applied)."""
    from bentoml._internal.server.http import traffic

    cancel_bentoml_request_timers()
    return traffic.TimeoutMiddleware


def test_answered_requests_leave_no_timer_behind(timeout_middleware: Any) -> None:
    async def run() -> tuple[int, int, list[list[dict[str, Any]]]]:
        before = _timers()
        sent = await _requests(timeout_middleware(_answer, timeout=30), 200)
        return before, _timers(), sent

    before, after, sent = uvloop.run(run())
    assert all(m[0]["status"] == 200 for m in sent)
    assert after - before < 5, f"{after - before} timers left by 200 answered requests"


def test_bentomls_own_middleware_left_one_timer_per_request(timeout_middleware: Any) -> None:
    """The oracle for the test above: BentoML's own code (kept beside the fix)."""

    class Unfixed(timeout_middleware):
        __call__ = timeout_middleware._bentoml_call

    async def run() -> tuple[int, int]:
        before = _timers()
        await _requests(Unfixed(_answer, timeout=30), 200)
        return before, _timers()

    before, after = uvloop.run(run())
    assert after - before >= 200


def test_a_request_past_the_timeout_is_still_a_504(timeout_middleware: Any) -> None:
    (messages,) = uvloop.run(_requests(timeout_middleware(_slow, timeout=0.05), 1))
    assert messages[0]["status"] == 504


async def _fails(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise ValueError("the handler failed before it answered")


def test_a_handler_that_fails_before_answering_is_said_at_once(timeout_middleware: Any) -> None:
    """BentoML's own code (the oracle below) waited for the whole timeout, then returned
    without an answer and without the error."""

    async def run() -> None:
        await asyncio.wait_for(_requests(timeout_middleware(_fails, timeout=30), 1), 5)

    with pytest.raises(ValueError, match="failed before it answered"):
        uvloop.run(run())


def test_bentomls_own_middleware_dropped_the_error(timeout_middleware: Any) -> None:
    class Unfixed(timeout_middleware):
        __call__ = timeout_middleware._bentoml_call

    assert uvloop.run(_requests(Unfixed(_fails, timeout=0.2), 1)) == [[]]
