"""Nothing private in the logs: a real `nextbest serve` is taken through a review sign-in
(a wrong password, then the right one), slates and feedback for one known customer, and the
errors around them; then every line it logged is scanned for the passwords, the API key and
each of that customer's attributes (features/contract.py's customers table)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from serving_helpers import free_port, nextbest_serve, running, train_and_register

from features.contract import TABLES
from serving.ledger import SqlLedger
from serving.review import ReviewStore

pytestmark = pytest.mark.slow

PASSWORD = "Plover-7391-quietly"
WRONG_PASSWORD = "Heron-5528-loudly"
API_KEY = "nbk-privacy-test-8c1f0e2a"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "X-API-Key": API_KEY}


def _customer_attributes(served_workspace: object, customer_id: str) -> dict[str, str]:
    """The customer's row: every attribute the contract declares that the data has."""
    customers = served_workspace.read("customers")  # type: ignore[attr-defined]
    row = customers.set_index("customer_id").loc[customer_id]
    declared = {column.name for column in TABLES["customers"].columns}
    values = {name: str(row[name]) for name in declared & set(row.index) if row.notna()[name]}
    values["customer_id"] = customer_id  # personal data too (pii in the contract)
    if "signup_at" in values:  # as a log would print a date
        values["signup_at"] = values["signup_at"][:10]
    return values


def _sign_in(client: object, base: str, password: str) -> int:
    form = client.get(f"{base}/review/login")  # type: ignore[attr-defined]
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token, form.text[:2000]
    response = client.post(  # type: ignore[attr-defined]
        f"{base}/review/login",
        data={"username": "rita", "password": password, "csrf": token.group(1), "next": ""},
    )
    return int(response.status_code)


def test_no_password_key_or_customer_attribute_is_logged(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import httpx

    served = train_and_register(tmp_path_factory.mktemp("privacy"))
    folder = tmp_path_factory.mktemp("privacy-serve")
    db_url = f"sqlite:///{folder / 'ledger.db'}"
    store = ReviewStore(SqlLedger(db_url).engine)
    store.add_user("rita", PASSWORD, "reviewer")
    customer = "S00001"
    attributes = _customer_attributes(served.workspace, customer)
    assert {"segment", "age_band"} <= set(attributes)  # the scan looks for something real
    port = free_port()
    env = {
        **os.environ,
        "NEXTBEST_HOME": str(served.home),
        "NEXTBEST_DB_URL": db_url,
        "NEXTBEST_HOLDOUT_SHARE": "0",
        "NEXTBEST_API_KEYS": f"other-key,{API_KEY}",
        "BENTOML_HOME": str(folder / "bentoml"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = folder / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with (
        running(nextbest_serve(served.workspace, port), env, f"{base}/readyz", log),
        httpx.Client(headers=HEADERS, timeout=30) as client,
    ):
        assert _sign_in(client, base, WRONG_PASSWORD) == 401
        client.cookies.clear()
        assert _sign_in(client, base, PASSWORD) == 303
        slate = client.post(
            f"{base}/recommend",
            json={"customer_id": customer, "channel": "web", "k": 3, "debug": True},
        )
        assert slate.status_code == 200, slate.text
        answer = slate.json()
        assert answer["offers"], answer
        offer = answer["offers"][0]["offer_id"]
        for outcome in ("viewed", "accepted"):
            feedback = {"request_id": answer["request_id"], "offer_id": offer, "outcome": outcome}
            assert client.post(f"{base}/feedback", json=feedback).status_code == 200
        # the error paths, which are where bodies and values tend to be logged
        unknown = {"request_id": answer["request_id"], "offer_id": "nope", "outcome": "viewed"}
        assert client.post(f"{base}/feedback", json=unknown).status_code == 404
        bad = {"customer_id": customer, "channel": "fax", "segment": attributes["segment"]}
        assert client.post(f"{base}/recommend", json=bad).status_code == 400
        as_of = {"customer_id": customer, "channel": "web", "as_of": "someday"}
        assert client.post(f"{base}/recommend", json=as_of).status_code == 400
    lines = log.read_text().splitlines()
    assert any("/recommend" in line for line in lines)  # the requests were logged, as lines

    secrets = {"password": PASSWORD, "wrong password": WRONG_PASSWORD, "API key": API_KEY}
    secrets |= {f"customer's {name}": value for name, value in attributes.items()}
    found = [
        (what, number, line)
        for what, value in secrets.items()
        for number, line in enumerate(lines, 1)
        if re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", line)
    ]
    assert found == [], "\n".join(f"{what} on line {n}: {line}" for what, n, line in found)


def test_the_scan_finds_a_value_that_is_logged(tmp_path: Path) -> None:
    """The scan's own pattern: a value as a whole token is found, inside a word it is not."""
    text = 'INFO body={"segment": "student", "pw": "Plover-7391-quietly"} studentship'
    for value in ("student", PASSWORD):
        assert re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", text)
    assert not re.search(r"(?<![\w-])gold(?![\w-])", "golden goldfish")
