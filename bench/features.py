"""Feature assembly on the demo, beside the time it takes simply to read the same tables.

* batch: every demo household × every offer at one as_of (snapshot, fit, build);
* online: one customer × 1,000 offers, as the service assembles it per request,
  beside a memory floor (gathering a precomputed 1,000-row block of the same width).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

AS_OF = pd.Timestamp("2017-09-01")
ONLINE_REPEATS = 200


def _demo_workspace(folder: Path) -> Any:
    from features import Workspace, write_demo_workspace
    from runtime.settings import Settings

    demo = Workspace(Settings.load().demo_workspace)
    return demo if demo.exists() else write_demo_workspace(folder / "demo")


def _percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1e3
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
    }


def run() -> dict[str, Any]:
    from features import FeatureBuilder, Requests, Snapshot

    with tempfile.TemporaryDirectory() as folder:
        workspace = _demo_workspace(Path(folder))
        started = time.perf_counter()
        tables = workspace.read_all()
        read_s = time.perf_counter() - started

        started = time.perf_counter()
        snapshot = Snapshot.from_tables(tables)
        snapshot_s = time.perf_counter() - started
        started = time.perf_counter()
        builder = FeatureBuilder().fit(snapshot, AS_OF)
        fit_s = time.perf_counter() - started

        customers = [c for c in snapshot.customers.values if c != "UNKNOWN"]
        offers = np.flatnonzero(snapshot.offer_known)
        requests = Requests.build(snapshot, customers, [AS_OF] * len(customers))
        rows = np.repeat(np.arange(len(customers)), len(offers))
        started = time.perf_counter()
        matrix = builder.build(snapshot, requests, rows, np.tile(offers, len(customers)))
        build_s = time.perf_counter() - started

        # online: one customer, 1,000 offers, with a channel and a cart
        chosen = offers[:1000]
        one_rows = np.zeros(len(chosen), dtype=np.int64)
        rng = np.random.default_rng(0)
        online, floor = [], []
        block = matrix.values[: len(chosen)].copy()
        for _ in range(ONLINE_REPEATS):
            customer = str(rng.choice(customers))
            request = Requests.build(
                snapshot,
                [customer],
                [AS_OF],
                channel=["web"],
                placement=["cart"],
                cart=[["1082185", "981760"]],
            )
            started = time.perf_counter()
            builder.build(snapshot, request, one_rows, chosen)
            online.append(time.perf_counter() - started)
            index = rng.permutation(len(chosen))
            started = time.perf_counter()
            np.ascontiguousarray(block[index])
            floor.append(time.perf_counter() - started)
    return {
        "as_of": AS_OF.isoformat(),
        "batch": {
            "rows": int(matrix.values.shape[0]),
            "features": int(matrix.values.shape[1]),
            "reference_read_tables_s": round(read_s, 2),
            "snapshot_s": round(snapshot_s, 2),
            "fit_s": round(fit_s, 2),
            "build_s": round(build_s, 2),
            "rows_per_s": round(matrix.values.shape[0] / build_s),
            "total_over_read_ratio": round((snapshot_s + fit_s + build_s) / read_s, 2),
            "build_over_read_ratio": round(build_s / read_s, 2),
        },
        "online_1x1000": {
            "repeats": ONLINE_REPEATS,
            **_percentiles(online),
            "reference_gather_1000_rows": _percentiles(floor),
            "reference_read_tables_s": round(read_s, 2),
            "p50_over_gather_ratio": round(float(np.median(online) / np.median(floor)), 1),
        },
    }
