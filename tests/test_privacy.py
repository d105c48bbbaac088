"""Privacy (issue 12, item 7), through the real recommender on a trained version:

* consent per channel and purpose: no marketing consent on a channel, no offer there (in
  serving and in batch); no consent to personalisation, a slate ranked and explained as
  for anyone (by popularity, nothing said of the customer); each at its moment;
* ``nextbest customer erase``: the ledger, its local buffer, the workspace and the
  running service forget the customer, and the erasure is recorded without their data;
* the MLflow artifacts of a trained version carry no customer attribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from serving_helpers import Served, recommender_for, train_and_register

from features import Workspace
from features.workspace import rewrite_workspace
from serving.batch import recommend_batch
from serving.engine import Recommender

pytestmark = pytest.mark.slow

CHANNEL = "web"
# features a slate without personalisation may cite: the offer's own, never the customer's
OFFER_ONLY = {"offer_popularity_30d"}


CONSENT_SERVED: dict[str, Served] = {}  # the consent case's workspace, served
TRAINED: dict[str, Any] = {}  # the training result of the module's version (the scan's oracle)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A trained champion; the training's result kept in ``TRAINED`` (logged as it is)."""
    import training.tracking

    log_run = training.tracking.log_run

    def keep(result: Any, *args: Any, **kwargs: Any) -> Any:
        TRAINED["result"] = result
        return log_run(result, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.tracking, "log_run", keep)
        trained = train_and_register(tmp_path_factory.mktemp("privacy-home"))
    yield trained


def _with_consent(served: Served, folder: Path, rows: list[dict[str, Any]]) -> Served:
    """A copy of the served workspace whose consent table has ``rows`` in place of the
    same (customer, channel, purpose) rows."""
    import shutil

    target = folder / "ws"
    shutil.copytree(served.workspace.path, target)
    workspace = Workspace(target)
    tables = workspace.read_all()
    consent = tables["consent"]
    keys = {(r["customer_id"], r["channel"], r["purpose"]) for r in rows}
    kept = consent[
        [
            (c, ch, p) not in keys
            for c, ch, p in consent[["customer_id", "channel", "purpose"]].itertuples(index=False)
        ]
    ]
    tables["consent"] = pd.concat([kept, pd.DataFrame(rows)], ignore_index=True)
    rewrite_workspace(workspace, tables, source={"test": "consent rows"})
    return Served(served.home, Workspace(target), served.version, served.model_name)


def _consent(customer: str, purpose: str, granted: bool, at: pd.Timestamp) -> dict[str, Any]:
    return dict(
        customer_id=customer, channel=CHANNEL, purpose=purpose, granted=granted, updated_at=at
    )


def _customers_with_slates(recommender: Recommender, n: int) -> list[str]:
    """Known customers who get a personalised web slate at the data's end."""
    found = []
    for customer in sorted(recommender.known_customers()):
        answer = recommender.recommend(customer, channel=CHANNEL, k=3, log_exposure=False)
        if answer["offers"] and answer["model"]["mode"] == "model":
            found.append(customer)
        if len(found) == n:
            return found
    raise AssertionError(f"fewer than {n} customers get a web slate")


@pytest.fixture(scope="module")
def consent_case(
    served: Served, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Recommender, list[str], pd.Timestamp]]:
    """Four customers with web slates; at ``when`` (5 days before the data's end) the
    first withdraws marketing consent on the web, the second and third personalisation
    consent on the web; the fourth changes nothing."""
    folder = tmp_path_factory.mktemp("consent")
    plain = recommender_for(served, folder / "plain.db")
    customers = _customers_with_slates(plain, 4)
    when = plain.reference - pd.Timedelta(days=5)
    plain.ledger.dispose()
    rows = [
        _consent(customers[0], "marketing", False, when),
        _consent(customers[1], "personalisation", False, when),
        _consent(customers[2], "personalisation", False, when),
    ]
    changed = _with_consent(served, folder, rows)
    CONSENT_SERVED["served"] = changed
    recommender = recommender_for(changed, folder / "ledger.db")
    yield recommender, customers, when
    recommender.ledger.dispose()


def test_no_marketing_consent_on_a_channel_no_offer_there_from_its_moment_on(
    consent_case: tuple[Recommender, list[str], pd.Timestamp],
) -> None:
    recommender, customers, when = consent_case
    withdrawn = customers[0]
    after = recommender.recommend(withdrawn, channel=CHANNEL, k=3, debug=True)
    assert after["offers"] == []
    assert after["excluded"] and all("no_consent" in e["reasons"] for e in after["excluded"])
    # before the withdrawal it did not apply: served as before
    before = recommender.recommend(
        withdrawn, channel=CHANNEL, k=3, as_of=when - pd.Timedelta(1, "D")
    )
    assert before["offers"]
    # another channel's consent is its own
    assert all(
        "no_consent" not in e["reasons"]
        for e in recommender.recommend(withdrawn, channel="app", k=3, debug=True)["excluded"]
    )
    # batch: the same eligibility (one function)
    batch = recommend_batch(
        recommender,
        pd.DataFrame({"customer_id": [withdrawn, customers[3]]}),
        channel=CHANNEL,
        placement="home",
        k=3,
    )
    assert set(batch["customer_id"]) == {customers[3]}


def test_no_consent_to_personalisation_ranks_by_popularity_and_cites_nothing_personal(
    consent_case: tuple[Recommender, list[str], pd.Timestamp],
) -> None:
    recommender, customers, when = consent_case
    impersonal = [customers[1], customers[2]]
    answers = recommender.recommend_many(impersonal, channel=CHANNEL, k=3, log_exposure=False)
    scores: dict[str, set[float]] = {}
    for answer in answers:
        assert answer["model"]["mode"] == "non_personal", answer["model"]
        assert answer["offers"], answer
        for offer in answer["offers"]:
            assert offer["contributions"] == [] and "shap" not in offer
            assert {r["feature"] for r in offer["reasons"]} <= OFFER_ONLY, offer["reasons"]
            assert "you" not in offer["because"].lower().replace("your history", "")
            scores.setdefault(offer["offer_id"], set()).add(offer["score"])
        ranked = [o["score"] for o in answer["offers"]]
        assert ranked == sorted(ranked, reverse=True)
    # the score of an offer is the same whoever asks: nothing of the customer's goes in
    assert all(len(values) == 1 for values in scores.values()), scores
    # the same two customers before their withdrawal: personalised, by the model
    before = recommender.recommend_many(
        impersonal,
        channel=CHANNEL,
        k=3,
        log_exposure=False,
        as_of=when - pd.Timedelta(1, "D"),
    )
    assert [a["model"]["mode"] for a in before] == ["model", "model"]
    # the consent is per channel: on the app they are personalised
    app = recommender.recommend_many(impersonal, channel="app", k=3, log_exposure=False)
    assert [a["model"]["mode"] for a in app] == ["model", "model"]


def test_a_rules_only_holdout_without_personalisation_states_no_fact_of_the_customer(
    consent_case: tuple[Recommender, list[str], pd.Timestamp], tmp_path: Path
) -> None:
    """The holdout's rules-only control states facts of the customer (no contributions);
    without consent to personalisation it states none."""
    from serving.explain import NON_PERSONAL_BECAUSE

    _, customers, _ = consent_case
    held = recommender_for(
        CONSENT_SERVED["served"],
        tmp_path / "held.db",
        holdout_share=1.0,
        holdout_control="rules_only",
    )
    try:
        personal, impersonal = held.recommend_many(
            [customers[3], customers[1]], channel=CHANNEL, k=3, log_exposure=False
        )
    finally:
        held.ledger.dispose()
    assert personal["holdout"] and impersonal["holdout"]
    assert any(o["reasons"] for o in personal["offers"])  # facts, where personal
    assert impersonal["offers"]
    for offer in impersonal["offers"]:
        assert offer["reasons"] == [] and offer["because"] == NON_PERSONAL_BECAUSE, offer


def test_the_ledger_records_a_slate_without_personalisation_as_such(
    consent_case: tuple[Recommender, list[str], pd.Timestamp],
) -> None:
    recommender, customers, _ = consent_case
    answer = recommender.recommend(customers[1], channel=CHANNEL, k=3)
    logged = recommender.ledger.slate(answer["request_id"])
    assert logged is not None and logged["mode"] == "non_personal"


# -- erasure: the ledger and its buffer ----------------------------------------------------------

ERASED = "S-ERASE-ME-0001"
KEPT = "S-KEEP-ME-0002"


def _slate(request_id: str, customer: str, offers: list[str], at_s: int) -> dict[str, Any]:
    from serving.ledger import ServedOffer

    return dict(
        request_id=request_id,
        customer_id=customer,
        channel=CHANNEL,
        placement="home",
        model_version="1",
        mode="model",
        holdout=False,
        at_s=at_s,
        offers=[ServedOffer(o, rank, 0.5, 0.1, None) for rank, o in enumerate(offers, 1)],
        ghosts=[ServedOffer("ghost-offer", len(offers) + 1, 0.4, 0.1)],
    )


def _fill(ledger: Any) -> None:
    """By hand: the erased customer has 2 slates in the database (2 and 1 offers, a ghost
    each), 3 feedback rows, and in the buffer 1 slate with 1 feedback; the kept customer
    1 slate (1 offer, 1 ghost), 1 feedback, and 1 buffered slate."""
    from dataclasses import asdict

    ledger.log_slates(
        [
            _slate("r-erased-1", ERASED, ["o1", "o2"], 1000),
            _slate("r-erased-2", ERASED, ["o3"], 2000),
            _slate("r-kept-1", KEPT, ["o1"], 1500),
        ]
    )
    for request, offer, outcome in [
        ("r-erased-1", "o1", "viewed"),
        ("r-erased-1", "o1", "accepted"),
        ("r-erased-2", "o3", "viewed"),
        ("r-kept-1", "o1", "viewed"),
    ]:
        ledger.record_feedback(
            request_id=request, offer_id=offer, outcome=outcome, value=None, at_s=3000
        )
    for request, customer in (("r-erased-buffered", ERASED), ("r-kept-buffered", KEPT)):
        slate = _slate(request, customer, ["o4"], 4000)
        ledger.buffer.add_slate(
            slate
            | {
                "offers": [asdict(o) for o in slate["offers"]],
                "ghosts": [asdict(o) for o in slate["ghosts"]],
            }
        )
    ledger.buffer.add_feedback(
        dict(request_id="r-erased-buffered", offer_id="o4", outcome="viewed", value=None, at_s=4100)
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_ledger_erases_a_customer_and_their_buffered_rows(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import sqlalchemy as sa

    from serving.ledger import SqlLedger, feedback, ghost_offers, slate_offers, slates

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        import uuid

        base = request.getfixturevalue("postgres_url")
        schema = f"erase_{uuid.uuid4().hex[:8]}"
        engine = sa.create_engine(base)
        with engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        engine.dispose()
        url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buffer.db")
    try:
        _fill(ledger)
        removed = ledger.erase_customer(ERASED)
        assert removed == {
            "slate_offers": 3,
            "ghost_offers": 2,
            "feedback": 3,
            "slates": 2,
            "buffer_slates": 1,
            "buffer_feedback": 1,
        }
        with ledger.engine.connect() as connection:
            for table in (slates, feedback):
                ids = connection.execute(sa.select(table.c.customer_id)).scalars().all()
                assert set(ids) == {KEPT}, table.name
            for table in (slate_offers, ghost_offers):
                requests = connection.execute(sa.select(table.c.request_id)).scalars().all()
                assert set(requests) == {"r-kept-1"}, table.name
        assert [body["request_id"] for _, _, body in ledger.buffer.oldest(10)] == [
            "r-kept-buffered"
        ]
        # nothing of theirs lingers in the files' free pages either
        files = [tmp_path / "buffer.db"] + ([tmp_path / "ledger.db"] if backend == "sqlite" else [])
        for path in files:
            held = b"".join(
                p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists()
            )
            assert ERASED.encode() not in held, path
            assert KEPT.encode() in held, path  # the check can find an id
        # twice: nothing left
        assert set(ledger.erase_customer(ERASED).values()) == {0}
    finally:
        ledger.dispose()


def test_the_workspace_loses_every_row_of_the_customer_and_stays_valid(
    served: Served, tmp_path: Path
) -> None:
    import shutil

    from features.contract import validate_tables
    from features.workspace import erase_customer_rows

    shutil.copytree(served.workspace.path, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    before = workspace.read_all()
    customer = str(before["orders"]["customer_id"].iloc[0])
    # recomputed by hand: the rows of the customer in each table with a customer id
    expected = {
        name: int((frame["customer_id"].astype(str) == customer).sum())
        for name, frame in before.items()
        if "customer_id" in frame.columns
    }
    assert set(expected) == {
        "customers",
        "orders",
        "exposures",
        "outcomes",
        "events",
        "consent",
        "audiences",
    }
    assert expected["customers"] == 1 and expected["orders"] > 0
    erased, removed = erase_customer_rows(workspace, customer, source={"erasure": "e1"})
    assert removed == expected
    after = erased.read_all()
    for name, frame in after.items():
        if "customer_id" in frame.columns:
            assert customer not in set(frame["customer_id"].astype(str)), name
            assert len(frame) == len(before[name]) - expected[name], name
        else:
            assert len(frame) == len(before[name]), name
    validate_tables(after, allow_orphans=erased.manifest.get("tolerated_unknown_ids", []))
    assert customer not in (tmp_path / "ws" / "workspace.json").read_text()
    fingerprint = erased.fingerprint
    again, nothing = erase_customer_rows(erased, customer, source={"erasure": "e2"})
    assert set(nothing.values()) == {0} and again.fingerprint == fingerprint


# -- erasure, end to end: the CLI, a real `nextbest serve` with API keys ------------------------

API_KEY = "nbk-erase-test-41d7"
SECRET = "erasure-secret-for-the-test"


def _nextbest(*args: str, env: dict[str, str]) -> Any:
    import subprocess
    import sys

    executable = str(Path(sys.executable).with_name("nextbest"))
    return subprocess.run(
        [executable, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_customer_erase_forgets_them_in_the_workspace_the_ledger_and_the_service(
    served: Served, tmp_path: Path
) -> None:
    import hashlib
    import hmac
    import json
    import os
    import shutil

    import httpx
    import sqlalchemy as sa
    from serving_helpers import free_port, nextbest_serve, running

    from features.contract import validate_tables
    from measurement.erasure import reimported
    from serving.ledger import SqlLedger

    shutil.copytree(served.workspace.path, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.getcwd(),
        "NEXTBEST_HOME": str(served.home),
        "NEXTBEST_DB_URL": db_url,
        "NEXTBEST_HOLDOUT_SHARE": "0",
        "NEXTBEST_API_KEYS": API_KEY,
        "NEXTBEST_RELOAD_SECONDS": "3600",  # the erasure, not the watcher, refreshes
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    tables = workspace.read_all()
    customer = str(tables["orders"]["customer_id"].iloc[0])
    orders = int((tables["orders"]["customer_id"].astype(str) == customer).sum())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    erase_env = env | {"NEXTBEST_API_KEY": API_KEY, "NEXTBEST_ERASURE_SECRET": SECRET}
    command = ["customer", "erase", customer, "--workspace", str(workspace.path)]
    command += ["--db-url", db_url, "--service", base, "--json"]
    with (
        running(nextbest_serve(workspace, port), env, f"{base}/readyz", tmp_path / "serve.log"),
        httpx.Client(headers=headers, timeout=60) as client,
    ):
        known = client.get(f"{base}/metadata").json()["snapshot_customers"]
        offers_served = 0
        for channel, placement in ((CHANNEL, "home"), (CHANNEL, "pdp"), ("app", "home")):
            answer = client.post(
                f"{base}/recommend",
                json={"customer_id": customer, "channel": channel, "placement": placement},
            ).json()
            assert answer["model"]["mode"] == "model" and answer["offers"], answer
            offers_served += len(answer["offers"])
        feedback = {
            "request_id": answer["request_id"],
            "offer_id": answer["offers"][0]["offer_id"],
            "outcome": "viewed",
        }
        assert client.post(f"{base}/feedback", json=feedback).status_code == 200
        # the service alone cannot erase: the workspace still holds them
        refused = client.post(f"{base}/admin/erase", json={"customer_id": customer})
        assert refused.status_code == 409 and "nextbest customer erase" in refused.json()["error"]
        # without the key, the endpoint is closed
        assert httpx.post(f"{base}/admin/erase", json={"customer_id": customer}).status_code == 401

        done = _nextbest(*command, env=erase_env)
        assert done.returncode == 0, done.stderr
        erasure = json.loads(done.stdout)
        removed = erasure["removed"]
        assert removed["workspace.customers"] == 1 and removed["workspace.orders"] == orders
        assert removed["ledger.slates"] == 3 and removed["ledger.slate_offers"] == offers_served
        assert removed["ledger.feedback"] == 1
        assert erasure["service"] == {
            "customer_id": customer,
            "in_snapshot": False,
            "refreshed": True,
        }
        assert erasure["nothing_left"] is False

        # twice: fine, and nothing left
        again = _nextbest(*command, env=erase_env)
        assert again.returncode == 0, again.stderr
        second = json.loads(again.stdout)
        assert second["nothing_left"] is True and set(second["removed"].values()) == {0}
        assert second["service"]["refreshed"] is False
        assert "nothing of this customer was left" in _nextbest(*command[:-1], env=erase_env).stdout

        # the service: the customer is unknown now, ranked as a cold start
        after = client.post(f"{base}/recommend", json={"customer_id": customer, "channel": "web"})
        assert after.json()["model"]["mode"] == "cold_start"
        assert client.get(f"{base}/metadata").json()["snapshot_customers"] == known - 1
    # the service's log: ids only, never the customer's attributes beside them
    row = tables["customers"].astype("string").set_index("customer_id").loc[customer]
    attributes = {str(v) for v in row.dropna().to_numpy()} - {""}
    logged = [
        line
        for line in (tmp_path / "serve.log").read_text().splitlines()
        if any(_whole(value, line) for value in attributes)
    ]
    assert logged == [], logged
    # the workspace: nothing of theirs, and valid under the contract
    erased = Workspace(tmp_path / "ws")
    after_tables = erased.read_all()
    for name, frame in after_tables.items():
        if "customer_id" in frame.columns:
            assert customer not in set(frame["customer_id"].astype(str)), name
    validate_tables(after_tables, allow_orphans=erased.manifest.get("tolerated_unknown_ids", []))
    # the ledger: nothing of theirs; the erasures hold no id, only the keyed hash
    ledger = SqlLedger(db_url)
    try:
        with ledger.engine.connect() as connection:
            # only the slate served after the erasure, to an unknown id
            for table, expected_rows in (("slates", 1), ("feedback", 0)):
                rows = connection.execute(
                    sa.text(f"SELECT count(*) FROM {table} WHERE customer_id = :c"), {"c": customer}
                ).scalar()
                assert rows == expected_rows, table
            records = connection.execute(sa.text("SELECT * FROM erasures")).mappings().all()
        assert len(records) == 3
        assert all(customer not in json.dumps(dict(r), default=str) for r in records)
        expected = hmac.new(SECRET.encode(), customer.encode(), hashlib.sha256).hexdigest()
        assert {r["keyed_hash"] for r in records} == {expected}
        assert json.loads(records[0]["removed"]) == erasure["removed"]
        # a re-import is told by the keyed hash
        tables = erased.read_all()
        tables["customers"] = pd.concat(
            [tables["customers"], tables["customers"].iloc[:1].assign(customer_id=customer)]
        )
        from features.workspace import rewrite_workspace

        reimport = rewrite_workspace(erased, tables, source={"test": "re-import"})
        assert reimported(reimport, ledger, SECRET) == [customer]
        assert reimported(reimport, ledger, "another secret") == []
    finally:
        ledger.dispose()


# -- MLflow artifacts: ids only, never a customer's attributes -------------------------------


def _whole(value: str, text: str) -> bool:
    """``value`` as a whole token in ``text`` (as tests/test_log_privacy.py scans)."""
    import re

    return re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", text) is not None


def _number_rows(document: Any, width: int) -> Iterator[list[Any]]:
    """Every list of ``width`` numbers (or nulls) anywhere in a parsed JSON document."""
    if isinstance(document, list):
        if len(document) == width and all(
            v is None or isinstance(v, (int, float)) for v in document
        ):
            yield document
        for item in document:
            yield from _number_rows(item, width)
    elif isinstance(document, dict):
        for item in document.values():
            yield from _number_rows(item, width)


def _customer_rows_in(document: Any, matrices: list[Any]) -> int:
    """How many of the document's feature-wide rows are some real row of ``matrices``
    (one customer's features for one offer), NaN = null."""
    import numpy as np

    width = matrices[0].shape[1]
    real = np.vstack(matrices).astype(np.float32)
    found = 0
    for row in _number_rows(document, width):
        values = np.array([np.nan if v is None else v for v in row], dtype=np.float32)
        same = (real == values) | (np.isnan(real) & np.isnan(values))
        found += bool(same.all(axis=1).any())
    return found


def _artifact_texts(served: Served) -> dict[str, str]:
    """Every file MLflow keeps for the served version (its run's artifacts and its logged
    model's), and the run's params and tags, as text (images by their bytes)."""
    from mlflow.tracking import MlflowClient

    from runtime.registry import configure_tracking

    configure_tracking()
    client = MlflowClient()
    version = client.get_model_version(served.model_name, served.version)
    run = client.get_run(version.run_id)
    texts = {
        "params": "\n".join(f"{k}={v}" for k, v in run.data.params.items()),
        "tags": "\n".join(f"{k}={v}" for k, v in run.data.tags.items()),
        "version tags": "\n".join(f"{k}={v}" for k, v in version.tags.items()),
    }
    root = served.home / "models" / "artifacts"
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "input_example.json" for p in files) and len(files) >= 10, files
    for path in files:
        texts[str(path.relative_to(root))] = path.read_bytes().decode("utf-8", "replace")
    return texts


def test_no_mlflow_artifact_of_a_trained_version_carries_a_customer_attribute(
    served: Served,
) -> None:
    import json

    from features.contract import TABLES

    texts = _artifact_texts(served)
    # 1. no customer's own feature row (tenure, loyalty tier, spend ...) in any JSON file
    result = TRAINED["result"]
    matrices = [result.test.values, result.validation.values]
    found_rows = {}
    for name, text in texts.items():
        if name.endswith(".json"):
            rows = _customer_rows_in(json.loads(text), matrices)
            if rows:
                found_rows[name] = rows
    assert found_rows == {}, f"customers' feature rows in {found_rows}"
    # 2. no customer id beside one of that customer's attributes, on any line
    customers = served.workspace.read("customers").astype("string")
    declared = [c.name for c in TABLES["customers"].columns if c.name != "customer_id"]
    import re

    ids = set(customers["customer_id"].astype(str))
    with_an_id = [  # the lines that name a customer: tokens, then their attributes
        (name, line, token)
        for name, text in texts.items()
        for line in text.splitlines()
        for token in ids & set(re.findall(r"[\w-]+", line))
    ]
    rows = customers.set_index("customer_id")
    paired = [
        (name, token, column)
        for name, line, token in with_an_id
        for column in declared
        if column in rows.columns
        and not pd.isna(rows.at[token, column])
        and _whole(str(rows.at[token, column]), line)
    ]
    assert paired == [], paired
    # 3. no attribute value that only one customer has (it names them), anywhere
    unique = [
        str(value)
        for column in declared
        if column in customers.columns and column != "signup_at"  # dates: the splits' too
        for value, n in customers[column].value_counts().items()
        if n == 1
    ]
    named = [
        (value, name) for value in unique for name, text in texts.items() if _whole(value, text)
    ]
    assert named == [], named


def test_the_row_scan_finds_a_customers_row() -> None:
    """The scan's own check: a real row is found in a document, a mean row is not."""
    import numpy as np

    real = np.array([[1.0, np.nan, 3.5], [2.0, 0.0, 7.25]], dtype=np.float32)
    assert _customer_rows_in({"inputs": [[2.0, 0.0, 7.25]]}, [real]) == 1
    assert _customer_rows_in([[1.0, None, 3.5], [9.0, 9.0, 9.0]], [real]) == 1
    assert _customer_rows_in([[1.5, 0.0, 5.375]], [real]) == 0
