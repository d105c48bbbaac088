"""Requests that queue are served together: the present's ``/recommend`` under load.

The present is computed on one thread (the service's ``_present``). While it computes,
the requests that arrive wait; when it is free, :class:`Coalescer` serves the waiting
requests that share their parameters (channel, placement, k, …) in one
``Recommender.recommend_many`` call, at most ``max_batch`` of them. A batch of eight
costs about 40 % of eight single calls on the demo (features, eligibility, scores and
explanations are computed for the whole batch at once), so a backlog drains faster than it
grew, instead of growing for as long as the service is a little slower than its traffic
(a busy neighbour on the machine, a burst): a queue shortens itself. With no backlog every
request is served alone, exactly as before, at the same latency.

The answers are those of the requests served one by one (but for the latency budget,
which each request spends on its wait and then on its whole batch's work; one past it
has the short because, and is answered with its batch): ``recommend_many`` has the
per-request semantics of the service, and a batch holds each customer at most once (a
customer's second request waits for the next batch, so it sees the first one's slate in
the ledger, for caps and sequencing, as it would have). Requests are served in the order
they arrived, batch by batch. If a batch fails, each of its requests is served alone, so
that one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Coalescer", "Serve"]

log = logging.getLogger(__name__)

# one call for many customers: (customer ids, their contexts, the seconds each waited
# here before the call: the latency budget counts them) -> their answers, in order
Serve = Callable[[list[str], list[dict[str, Any]], list[float]], list[dict[str, Any]]]


@dataclass
class _Waiting:
    key: Hashable
    customer_id: str
    context: dict[str, Any]
    serve: Serve
    future: asyncio.Future[dict[str, Any]] = field(repr=False)
    arrived: float = field(default_factory=time.perf_counter)


class Coalescer:
    """One computation at a time, on a worker thread; what waits meanwhile is batched.

    ``submit`` is called on the event loop. ``run_sync`` runs a blocking call on a worker
    thread and is awaited (the service passes ``anyio.to_thread.run_sync`` with its
    present's limiter). ``sizes`` counts the batches served by their size.
    """

    def __init__(
        self,
        run_sync: Callable[[Callable[[], list[dict[str, Any]]]], Any],
        max_batch: int = 8,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.max_batch = max_batch
        self.sizes: Counter[int] = Counter()
        self._run_sync = run_sync
        self._queue: deque[_Waiting] = deque()
        self._drainer: asyncio.Task[None] | None = None

    async def submit(
        self, key: Hashable, customer_id: str, context: dict[str, Any], serve: Serve
    ) -> dict[str, Any]:
        """The answer for one request; requests with equal ``key`` may be served together
        (``serve`` must then be interchangeable between them: it is the first one's)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(key, customer_id, context, serve, future))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[_Waiting]:
        """The next batch: the oldest waiting request and, in their order, the later ones
        with its key and another customer, up to ``max_batch``; the rest keep their place."""
        while self._queue and self._queue[0].future.done():  # cancelled while waiting
            self._queue.popleft()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, customers, rest = [first], {first.customer_id}, deque[_Waiting]()
        while self._queue:
            waiting = self._queue.popleft()
            if waiting.future.done():
                continue
            if (
                len(batch) < self.max_batch
                and waiting.key == first.key
                and waiting.customer_id not in customers
            ):
                batch.append(waiting)
                customers.add(waiting.customer_id)
            else:
                rest.append(waiting)
        self._queue = rest
        return batch

    async def _drain(self) -> None:
        batch: list[_Waiting] = []
        try:
            while batch := self._take():
                await self._serve(batch)
        except BaseException:
            for waiting in [*batch, *self._queue]:  # the loop is going away: nobody waits
                if not waiting.future.done():
                    waiting.future.cancel()
            self._queue.clear()
            raise
        finally:
            self._drainer = None

    async def _serve(self, batch: list[_Waiting]) -> None:
        serve = batch[0].serve
        customers = [w.customer_id for w in batch]
        contexts = [w.context for w in batch]
        self.sizes[len(batch)] += 1

        def call() -> list[dict[str, Any]]:
            # on the worker thread, when the call starts: the wait for the thread counts
            started = time.perf_counter()
            return serve(customers, contexts, [started - w.arrived for w in batch])

        try:
            answers = await self._run_sync(call)
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0], error=error)
                return
            log.warning(
                "a batch of %d /recommend requests failed (%s): each is served alone",
                len(batch),
                type(error).__name__,
            )
            for waiting in batch:
                await self._serve([waiting])
            return
        if len(batch) > 1:
            log.debug("served %d /recommend requests together", len(batch))
        for waiting, answer in zip(batch, answers, strict=True):
            _settle(waiting, answer=answer)


def _settle(
    waiting: _Waiting, *, answer: dict[str, Any] | None = None, error: Exception | None = None
) -> None:
    if waiting.future.done():  # its client went away meanwhile
        return
    if error is not None:
        waiting.future.set_exception(error)
    else:
        assert answer is not None  # nosec B101 - one of the two is always given
        waiting.future.set_result(answer)
