"""The service over HTTP: the ASGI app in process, a real `nextbest serve`, hot reload."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import (
    Served,
    asgi_client,
    free_port,
    nextbest_serve,
    running,
    train_and_register,
)
from typer.testing import CliRunner

from nextbest.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One ASGI app per test module."""
    with asgi_client(
        served, tmp_path_factory.mktemp("asgi"), NEXTBEST_RELOAD_SECONDS="0.2"
    ) as test_client:
        yield test_client


def test_recommend_and_feedback(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/recommend",
        json={
            "customer_id": "S00003",
            "channel": "web",
            "placement": "pdp",
            "k": 2,
            "context": {"product_id": "F1-D1", "cart": []},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "request_id",
        "customer_id",
        "as_of",
        "model",
        "holdout",
        "offers",
        "degraded",
        "budget_exceeded",
    }
    assert len(body["offers"]) == 2
    offer = body["offers"][0]
    assert {
        "offer_id",
        "title",
        "rank",
        "score",
        "probability",
        "value",
        "because",
        "contributions",
    } <= set(offer)
    feedback = {
        "request_id": body["request_id"],
        "offer_id": offer["offer_id"],
        "outcome": "accepted",
        "value": 12.5,
    }
    first = client.post("/feedback", json=feedback).json()
    again = client.post("/feedback", json=feedback).json()
    assert first["recorded"] is True and again["duplicate"] is True
    unknown = client.post("/feedback", json=feedback | {"offer_id": "x"})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": f"request {body['request_id']!r} did not serve offer 'x'"}
    debug = client.post(
        "/recommend", json={"customer_id": "S00003", "channel": "web", "debug": True}
    ).json()
    assert "excluded" in debug


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"customer_id": "S1", "channel": "fax"}, "'web', 'app', 'email', 'sms' or 'mailer'"),
        ({"customer_id": "S1", "channel": "web", "placement": "roof"}, "'home', 'pdp', 'cart'"),
        ({"customer_id": "S1", "channel": "web", "k": 0}, "greater than or equal to 1"),
        ({"customer_id": "S1", "channel": "web", "k": 26}, "less than or equal to 25"),
        ({"customer_id": "", "channel": "web"}, "at least 1 character"),
        ({"customer_id": "x" * 129, "channel": "web"}, "at most 128 characters"),
        ({"channel": "web"}, "Field required"),
        ({"customer_id": "S1", "channel": "web", "as_of": "someday"}, "should match pattern"),
        (
            {"customer_id": "S1", "channel": "web", "as_of": "2017-02-30"},
            "not a day of the calendar",
        ),
        (
            {"customer_id": "S1", "channel": "web", "context": {"moment": "birthday"}},
            "'post_purchase'",
        ),
    ],
)
def test_bad_input_is_a_4xx_that_says_what_is_allowed(client, body: dict, needle: str) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/recommend", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert needle in response.text


def test_malformed_json_and_unknown_outcome(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/recommend", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    response = client.post(
        "/feedback", json={"request_id": "r", "offer_id": "o", "outcome": "loved"}
    )
    assert response.status_code == 400 and "'viewed', 'accepted'" in response.text


def test_operations_endpoints(client, served: Served) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    metadata = client.get("/metadata").json()
    assert metadata["model"]["version"] == served.version
    assert "offer_popularity_30d" in metadata["features"]
    assert metadata["rules"]["hash"] and metadata["ledger"] == "sqlite"
    docs = client.get("/docs.json").json()
    assert "/recommend" in docs["paths"] and "/feedback" in docs["paths"]


def test_hot_reload_moves_to_the_new_champion_without_errors(  # type: ignore[no-untyped-def]
    client, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: the watcher (every 0.2 s here) leaves a settled, unchanged store alone, yet
    asks at least every STAMP_TRUST_S, and a write after that is still followed."""
    from mlflow import MlflowClient

    from runtime import registry

    newer = train_and_register(served.home, champion=False)
    resolved: list[str] = []
    stamped: list[float] = []
    real_resolve, real_stamp = registry.resolve_version, registry.store_stamp

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        resolved.append(kwargs.get("alias") or "")
        return real_resolve(*args, **kwargs)

    def stamp(*args, **kwargs):  # type: ignore[no-untyped-def]
        stamped.append(time.monotonic())
        return real_stamp(*args, **kwargs)

    monkeypatch.setattr(registry, "SETTLED_S", 0.5)
    monkeypatch.setattr(registry, "resolve_version", counted)
    monkeypatch.setattr(registry, "store_stamp", stamp)
    time.sleep(0.6)  # the store settles: the next tick resolves once, then none do
    resolved.clear()
    stamped.clear()
    time.sleep(2.0)  # about 10 ticks
    assert len(stamped) >= 5, stamped  # the watcher did look, every tick
    assert len(resolved) <= 1, resolved
    monkeypatch.setattr(registry, "STAMP_TRUST_S", 0.5)  # an unchanged stamp, trusted 0.5 s
    resolved.clear()
    time.sleep(2.0)
    assert len(resolved) >= 2, resolved
    errors: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            response = client.post(
                "/recommend", json={"customer_id": "S00010", "channel": "app", "k": 1}
            )
            if response.status_code != 200:
                errors.append(response.text)
            else:
                versions.append(response.json()["model"]["version"])

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    MlflowClient().set_registered_model_alias(served.model_name, "champion", newer.version)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not versions or versions[-1] != newer.version):
        time.sleep(0.1)
    time.sleep(0.3)
    stop.set()
    for worker in workers:
        worker.join()
    assert errors == []
    assert served.version in versions and versions[-1] == newer.version
    MlflowClient().set_registered_model_alias(served.model_name, "champion", served.version)


def test_a_check_that_fails_unforeseen_does_not_end_the_watching(  # type: ignore[no-untyped-def]
    client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher (every 0.2 s here) meets an error nothing foresaw in its checks: it says
    so once, /metadata says it is not following, and it checks again, where the error
    ended its thread and the alias was never followed again."""
    from runtime import registry

    calls: list[float] = []
    real_stamp = registry.store_stamp
    failures = 8  # about 1.6 s of failing checks

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise RuntimeError("unforeseen: sqlite:///secret/path")
        return real_stamp(*args, **kwargs)

    def watcher() -> dict[str, object]:
        return client.get("/metadata").json()["watcher"]  # type: ignore[no-any-return]

    assert watcher()["following"] is True
    monkeypatch.setattr(registry, "store_stamp", failing)
    seen: list[dict[str, object]] = []
    with caplog.at_level("INFO", logger="nextbest.serving"):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            seen.append(watcher())
            if len(calls) > failures + 3 and seen[-1]["following"]:
                break
            time.sleep(0.1)
    assert len(calls) > failures + 3, calls  # checked again after the failures
    failing_seen = [w for w in seen if not w["following"]]
    assert failing_seen, seen
    # the kind of error, never its message; one start of the failing, kept while it lasts
    assert {w["failure"] for w in failing_seen} == {"RuntimeError"}
    assert len({w["failing_since"] for w in failing_seen}) == 1
    assert all(w["registry_reachable"] for w in seen)
    assert seen[-1]["following"] and seen[-1]["failure"] is seen[-1]["failing_since"] is None
    assert "secret" not in json.dumps(seen)
    said = [r.getMessage() for r in caplog.records if "alias watcher" in r.getMessage()]
    assert said[:2] == [
        "the alias watcher's check failed; tried again every 0.2 s",
        "the alias watcher's check succeeds again",
    ]
    assert (
        client.post(
            "/recommend", json={"customer_id": "S00010", "channel": "app", "k": 1}
        ).status_code
        == 200
    )


def test_nextbest_serve_end_to_end(served: Served, tmp_path: Path) -> None:
    port = free_port()
    env = os.environ | {
        "NEXTBEST_HOME": str(served.home),
        "BENTOML_HOME": str(tmp_path / "b"),
        "NEXTBEST_DB_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = nextbest_serve(served.workspace, port)
    log = tmp_path / "serve.log"
    with running(command, env, f"http://127.0.0.1:{port}/readyz", log, timeout=120):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/recommend",
            data=json.dumps({"customer_id": "S00002", "channel": "web"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert answer is not None and len(answer["offers"]) == 3
        assert answer["model"]["version"] == served.version
        # the storefront's thin client, over real HTTP
        from nextbest.client import NextBestClient, NextBestError

        client = NextBestClient(f"http://127.0.0.1:{port}", timeout=10)
        slate = client.recommend("S00004", channel="app", placement="cart", cart=["F1-D1"], k=2)
        assert len(slate["offers"]) == 2
        recorded = client.feedback(slate["request_id"], slate["offers"][0]["offer_id"], "viewed")
        assert recorded["recorded"] is True
        assert client.metadata()["model"]["version"] == served.version
        with pytest.raises(NextBestError, match="HTTP 400") as refused:
            client.recommend("S00004", channel="fax")
        assert refused.value.status == 400
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Review page" not in log.read_text():
            time.sleep(0.2)
        printed = log.read_text()
        assert "curl -s -X POST" in printed  # what `make run` ends with
        assert "Clock: data. Every answer is as of" in printed
        assert "never expire while it runs" in printed
        assert f"Review page: http://127.0.0.1:{port}/review/" in printed
        assert "nextbest review add-user alice --role approver" in printed


def test_recommend_batch_writes_one_row_per_recommendation(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEXTBEST_HOME", str(served.home))
    monkeypatch.setenv("NEXTBEST_DB_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("NEXTBEST_HOLDOUT_SHARE", "0")
    (tmp_path / "who.csv").write_text("customer_id\nS00001\nS00002\nS00003\n")
    out = tmp_path / "campaign.csv"
    result = CliRunner().invoke(
        app,
        [
            "recommend-batch",
            "--customers",
            str(tmp_path / "who.csv"),
            "--out",
            str(out),
            "--k",
            "2",
            "-w",
            str(served.workspace.path),
        ],
    )
    assert result.exit_code == 0, result.output
    import pandas as pd

    rows = pd.read_csv(out)
    assert list(rows.columns) == [
        "customer_id",
        "rank",
        "offer_id",
        "score",
        "probability",
        "because",
    ]
    # customers at a frequency cap get nothing, exactly as from the service
    sizes = rows.groupby("customer_id").size()
    assert set(sizes.index) <= {"S00001", "S00002", "S00003"} and (sizes == 2).all()
    # a reason, or honestly none ("There is no single reason we can state …")
    assert rows["because"].str.match(r"^(Because |There is no single reason)").all()
    single = CliRunner().invoke(
        app, ["recommend", "S00001", "--json", "-w", str(served.workspace.path)]
    )
    assert single.exit_code == 0, single.output
    assert json.loads(single.stdout)["model"]["version"] == served.version


def test_the_snapshot_refreshes_when_the_workspace_changes(client, served: Served) -> None:  # type: ignore[no-untyped-def]
    """Runs last in this module: it rewrites the served workspace with one more customer."""
    import pandas as pd

    from features import write_workspace

    before = client.get("/metadata").json()["snapshot_customers"]
    tables = served.workspace.read_all()
    newcomer = tables["orders"].iloc[:1].assign(customer_id="NEW-1", order_id="NEW-ORDER")
    tables["orders"] = pd.concat([tables["orders"], newcomer], ignore_index=True)
    tables["customers"] = pd.concat(
        [tables["customers"], tables["customers"].iloc[:1].assign(customer_id="NEW-1")],
        ignore_index=True,
    )
    write_workspace(
        served.workspace.path, tables, source=served.workspace.manifest["source"], synthetic=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if client.get("/metadata").json()["snapshot_customers"] == before + 1:
            break
        time.sleep(0.2)
    assert client.get("/metadata").json()["snapshot_customers"] == before + 1
    answer = client.post("/recommend", json={"customer_id": "NEW-1", "channel": "web"}).json()
    assert answer["model"]["mode"] == "model"  # known now, no longer a cold start


def test_a_workspace_whose_offers_changed_is_refused_and_not_reloaded(  # type: ignore[no-untyped-def]
    client, served: Served
) -> None:
    """Runs after the refresh above: a new offer in the workspace does not fit the serving
    version (trained on the old catalogue), so the service keeps what it serves, says so
    once, and does not load the snapshot again every few seconds."""
    import pandas as pd

    from features import write_workspace

    before = client.get("/metadata").json()
    tables = served.workspace.read_all()
    extra = tables["offers"].iloc[:1].assign(offer_id="item:NEW-OFFER")
    tables["offers"] = pd.concat([tables["offers"], extra], ignore_index=True)
    write_workspace(
        served.workspace.path, tables, source=served.workspace.manifest["source"], synthetic=True
    )
    time.sleep(2)  # ten watcher ticks
    after = client.get("/metadata").json()
    assert after["catalogue"] == before["catalogue"]
    assert after["snapshot_customers"] == before["snapshot_customers"]
    answer = client.post("/recommend", json={"customer_id": "S00005", "channel": "web"})
    assert answer.status_code == 200 and answer.json()["model"]["mode"] == "model"


def test_a_service_shut_down_stops_its_alias_watcher(  # type: ignore[no-untyped-def]
    served: Served, tmp_path: Path
) -> None:
    """An app shut down (its lifespan ended) leaves no watcher behind: the earlier apps'
    watchers, still following their stores through the same registry functions, made the
    watcher tests of a later module count their calls and log lines."""

    def watchers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "nextbest-alias-watcher"}

    before = watchers()
    with asgi_client(served, tmp_path, NEXTBEST_RELOAD_SECONDS="0.2") as test_client:
        assert test_client.get("/livez").status_code == 200
        mine = watchers() - before
        assert len(mine) == 1
    assert not any(t.is_alive() for t in mine)
