"""/recommend on the demo, beside its floor and its peer, measured in one run.

* **The work**: POST /recommend for a random demo household on the web, k = 5 explained,
  with the trained version and its own rules (the defaults), as ``make run`` serves: all
  1,223 offers are candidates, eligibility with the live ledger leaves the category offers
  new to the customer (the coupons' campaigns are over at the data's end), and features
  are built for those, which are ranked.
* **The floor**: ``GET /livez`` of the same BentoML server (a constant answer through the
  same middleware: the storefront API has no benchmark-only endpoint), plus raw
  ``booster.predict`` on one request's ranked (eligible) rows and ``pred_contrib`` on 5.
* **The peer**: ``mlflow models serve`` of the same registered model, scoring the
  request's candidate matrix sent as JSON (a model server without an eligibility engine
  must score every candidate).
* **Batch**: ``recommend-batch``'s candidate rows per second, end to end (features,
  eligibility, ranking, because, ledger), against raw single-threaded ``booster.predict``
  rows per second on exactly those candidate rows.

Latency at concurrency 1 and 8 (threads with keep-alive connections, loopback only),
and throughput at concurrency 8.

* **Isolation**: one client's /recommend latency alone, then while a second client walks
  through 50 distinct past ``as_of`` values (each may fit a feature builder: they run on
  a thread of their own and a cache of their own), then while it sends 10,000-item carts
  (refused at the door). The target: the first client's p99 stays under 50 ms.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REQUESTS_C1 = 300
REQUESTS_C8 = 600
BATCH_CUSTOMERS = 100


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int, path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"nothing answered on 127.0.0.1:{port}{path}")


def _load(port: int, path: str, bodies: list[bytes | None], concurrency: int) -> dict[str, float]:
    """Send every body (round-robin over threads; ``None``: a GET); latency percentiles
    and throughput."""
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    chunks = [bodies[i::concurrency] for i in range(concurrency)]

    def worker(chunk: list[bytes | None]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for body in chunk:
            started = time.perf_counter()
            if body is None:
                connection.request("GET", path)
            else:
                connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - started)
            if response.status != 200:
                errors.append(response.status)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    values = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
    }


def _isolation(port: int, body: bytes, first_s: int, end_s: int) -> dict[str, Any]:
    """The first client's latency alone and beside each kind of heavy request; the walk
    goes through 50 moments spread from ``first_s`` to ``end_s`` (the data's range)."""
    request = json.loads(body)
    moments = np.linspace(first_s, end_s, 50, endpoint=False).astype("datetime64[s]")
    walk = [json.dumps(request | {"as_of": str(moment)}).encode() for moment in moments]
    cart = [str(1_000_000 + i) for i in range(10_000)]
    carts = [json.dumps(request | {"context": {"cart": cart}}).encode()] * 500

    def beside(heavy: list[bytes]) -> dict[str, Any]:
        stop = threading.Event()
        latencies: list[float] = []

        def first_client() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            while not stop.is_set():
                started = time.perf_counter()
                connection.request("POST", "/recommend", body, {"Content-Type": "application/json"})
                connection.getresponse().read()
                latencies.append(time.perf_counter() - started)

        thread = threading.Thread(target=first_client)
        thread.start()
        if heavy:
            second = _load(port, "/recommend", list(heavy), 1)
        else:
            time.sleep(5)
            second = {}
        stop.set()
        thread.join()
        values = np.asarray(latencies) * 1e3
        return {
            "requests": len(values),
            "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2),
            "heavy": second,
        }

    return {
        "alone": beside([]),
        "during_50_as_of": beside(walk),
        "during_10k_item_carts": beside(carts),
    }


def _time(function: Any, repeats: int) -> dict[str, float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    values = np.asarray(samples) * 1e3
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
    }


def run() -> dict[str, Any]:
    from features import Workspace
    from runtime.registry import configure_tracking, model_name, resolve_version
    from runtime.settings import Settings, resolve_workspace
    from serving.assembly import build_recommender
    from serving.batch import recommend_batch
    from serving.settings import ServingSettings

    configure_tracking()
    workspace = Workspace(resolve_workspace(None))
    name = model_name(workspace.workspace_id)
    try:
        version, _ = resolve_version(name, alias="challenger")
    except LookupError:
        subprocess.run(
            [str(Path(sys.executable).with_name("nextbest")), "train", "--quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        version, _ = resolve_version(name, alias="challenger")
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as folder:
        # the trained version with its own (the default) rules, as `make run` serves it
        settings = ServingSettings(
            holdout_share=0.0, db_url=f"sqlite:///{Path(folder) / 'bench.db'}"
        )
        recommender = build_recommender(settings, workspace=workspace, version=version)
        snapshot, ledger, bundle = (
            recommender.snapshot,
            recommender.ledger,
            recommender.model.bundle,
        )
        assert bundle is not None
        customers = sorted(recommender.known_customers())
        probe = recommender.recommend(
            customers[0], channel="web", k=5, debug=True, log_exposure=False
        )
        # the rows one request ranks (its eligible candidates), for the floor and the peer
        from features import Requests
        from policy import evaluate

        builder = recommender.builder_for(recommender.now_s())
        requests = Requests.build(
            snapshot, [customers[0]], [probe["as_of"]], channel=["web"], placement=["home"]
        )
        candidates = recommender.generator.generate(snapshot, requests)
        full = builder.build(snapshot, requests, candidates.request, candidates.offer)
        eligible = evaluate(
            snapshot,
            recommender.model.rules,
            requests,
            candidates.request,
            candidates.offer,
            ledger=recommender.reads(),
            features=full.columns(),
        ).eligible
        assert int(eligible.sum()) == probe["eligible"]
        matrix = builder.build(
            snapshot, requests, candidates.request[eligible], candidates.offer[eligible]
        )
        booster = bundle.booster
        predict = _time(lambda: booster.predict(matrix.values, num_threads=1), 200)
        contrib = _time(
            lambda: booster.predict(matrix.values[:5], pred_contrib=True, num_threads=1), 200
        )

        # the service's coalescing (serving.coalesce): per customer, max_batch waiting requests
        # served in one call against each alone, logged as the service logs them
        def per_customer(n: int) -> float:
            chosen = [str(c) for c in rng.choice(customers, n, replace=False)]
            started = time.perf_counter()
            recommender.recommend_many(chosen, channel="web", placement="home", k=3)
            return (time.perf_counter() - started) * 1e3 / n

        alone_ms = float(np.median([per_customer(1) for _ in range(64)]))
        together_ms = float(np.median([per_customer(settings.max_batch) for _ in range(16)]))

        # batch: candidate rows per second, end to end, against raw predict
        import pandas as pd

        batch_customers = pd.DataFrame(
            {"customer_id": rng.choice(customers, BATCH_CUSTOMERS, replace=False)}
        )
        started = time.perf_counter()
        rows = recommend_batch(
            recommender, batch_customers, channel="email", placement="inbox", k=5
        )
        batch_s = time.perf_counter() - started
        # the reference: raw predict on exactly the candidate rows of those customers
        ids = batch_customers["customer_id"].tolist()
        batch_requests = Requests.build(
            snapshot, ids, [probe["as_of"]] * len(ids), channel=["email"] * len(ids)
        )
        batch_candidates = recommender.generator.generate(snapshot, batch_requests)
        batch_matrix = builder.build(
            snapshot, batch_requests, batch_candidates.request, batch_candidates.offer
        ).values
        batch_rows = len(batch_matrix)
        started = time.perf_counter()
        booster.predict(batch_matrix, num_threads=1)
        predict_rows_s = batch_rows / (time.perf_counter() - started)

        bodies: list[bytes | None] = [
            json.dumps(
                {"customer_id": str(c), "channel": "web", "placement": "home", "k": 5}
            ).encode()
            for c in rng.choice(customers, REQUESTS_C8)
        ]
        port, peer_port = _free_port(), _free_port()
        env = os.environ | {
            "NEXTBEST_HOME": str(Settings.load().home),
            "NEXTBEST_WORKSPACE": str(workspace.path),
            "NEXTBEST_DB_URL": f"sqlite:///{Path(folder) / 'served.db'}",
            "NEXTBEST_MODEL_ALIAS": "challenger",
            "NEXTBEST_HOLDOUT_SHARE": "0",
            "BENTOML_HOME": str(Path(folder) / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("bentoml")),
                "serve",
                "serving.service:NextBest",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peer_env = env | {
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Settings.load().models_dir / 'mlflow.db'}",
        }
        peer = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "models",
                "serve",
                "-m",
                f"models:/{name}/{version}",
                "--env-manager",
                "local",
                "-h",
                "127.0.0.1",
                "-p",
                str(peer_port),
            ],
            env=peer_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(port, "/readyz")
            _wait(peer_port, "/ping")
            _load(port, "/recommend", bodies[:30], 1)  # warm up
            floor_c1 = _load(port, "/livez", [None] * REQUESTS_C1, 1)
            ours_c1 = _load(port, "/recommend", bodies[:REQUESTS_C1], 1)
            ours_c8 = _load(port, "/recommend", bodies, 8)
            first_s, _ = recommender.as_of_bounds()
            isolation = _isolation(port, bodies[0] or b"", first_s, recommender.data_end_s)
            floor_c8 = _load(port, "/livez", [None] * REQUESTS_C8, 8)
            # the peer has no eligibility engine: it must score every candidate of the request
            matrix_json = json.dumps({"inputs": np.nan_to_num(full.values, nan=-1e9).tolist()})
            peer_body: list[bytes | None] = [matrix_json.encode()] * REQUESTS_C1
            _load(peer_port, "/invocations", peer_body[:10], 1)
            peer_c1 = _load(peer_port, "/invocations", peer_body, 1)
            peer_many: list[bytes | None] = [matrix_json.encode()] * REQUESTS_C8
            peer_c8 = _load(peer_port, "/invocations", peer_many, 8)
        finally:
            for process in (server, peer):
                process.terminate()
                process.wait(timeout=60)
        ledger.dispose()

    floor_p50 = floor_c1["p50_ms"] + predict["p50_ms"] + contrib["p50_ms"]
    return {
        "work": {
            "candidates": probe["candidates"],
            "reach_ranker": probe["eligible"],
            "k": 5,
            "rules": "the trained version's own (the default rules)",
            "model_version": version,
        },
        "recommend": {"concurrency_1": ours_c1, "concurrency_8": ours_c8},
        "isolation": isolation,
        "floor": {
            "livez_c1": floor_c1,
            "livez_c8": floor_c8,
            "booster_predict": predict,
            "pred_contrib_5_rows": contrib,
            "p50_ms": round(floor_p50, 2),
        },
        "peer_mlflow_models_serve": {"concurrency_1": peer_c1, "concurrency_8": peer_c8},
        "coalesced": {
            "ms_per_customer_alone": round(alone_ms, 2),
            f"ms_per_customer_{settings.max_batch}_together": round(together_ms, 2),
            "ratio": round(together_ms / alone_ms, 3),
        },
        "batch": {
            "customers": BATCH_CUSTOMERS,
            "recommendations": len(rows),
            "candidate_rows_per_s": round(batch_rows / batch_s),
            "booster_predict_rows_per_s": round(predict_rows_s),
            "ratio": round(batch_rows / batch_s / predict_rows_s, 3),
        },
        "targets": {
            "p99_le_50ms_beside_as_of_walk": isolation["during_50_as_of"]["p99_ms"] <= 50,
            "p99_le_50ms_beside_10k_carts": isolation["during_10k_item_carts"]["p99_ms"] <= 50,
            "p99_c1_le_25ms": ours_c1["p99_ms"] <= 25,
            "p50_le_3x_floor": ours_c1["p50_ms"] <= 3 * floor_p50,
            "throughput_ge_2x_peer": ours_c8["throughput_rps"] >= 2 * peer_c8["throughput_rps"],
            "coalesced_le_half_alone": together_ms <= 0.5 * alone_ms,
            "batch_ge_30pct_of_predict": batch_rows / batch_s >= 0.3 * predict_rows_s,
        },
    }
