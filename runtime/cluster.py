"""A Dask client for the scale-out paths (training rows and fit, batch scoring)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["dask_client"]


@contextmanager
def dask_client(scheduler: str | None, n_workers: int = 2) -> Iterator[Any]:
    """A client of ``scheduler``, or of a local cluster of ``n_workers`` single-threaded
    processes on loopback (no fixed HTTP port); both are closed on the way out."""
    from distributed import Client, LocalCluster

    cluster = (
        None
        if scheduler
        else LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            # the scheduler's HTTP server (metrics) starts even without a dashboard: on a
            # free port, so that two clusters on one machine never race for 8787
            dashboard_address=":0",
            host="127.0.0.1",
        )
    )
    client = Client(scheduler or cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
