"""API keys on the storefront API, over real HTTP on a real `bentoml serve` with
``NEXTBEST_API_KEYS`` set: data endpoints refuse a missing or wrong key with a 401 in the
one error shape, the probes and the documentation stay open, keys are never logged, and
no secret (the holdout salt, a key) is ever published."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from api_helpers import (
    Answer,
    Server,
    call,
    schemathesis,
    serve,
    small_api_workspace,
    wait_for_log,
)

pytestmark = pytest.mark.slow

FIRST = f"first-{uuid.uuid4().hex}"
SECOND = f"second-{uuid.uuid4().hex}"
WRONG = f"wrong-{uuid.uuid4().hex}"
SALT = f"salt-{uuid.uuid4().hex}"
DATA = [
    ("POST", "/recommend", {"customer_id": "S00001", "channel": "web"}),
    ("POST", "/feedback", {"request_id": "r1", "offer_id": "o1", "outcome": "viewed"}),
    ("GET", "/metadata", None),
    ("GET", "/metrics", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("keys")
    workspace = small_api_workspace(folder / "ws")
    keys = f" {FIRST}, {SECOND} ,"  # spaces and an empty entry are ignored
    with serve(
        workspace,
        folder / "home",
        folder,
        NEXTBEST_API_KEYS=keys,
        NEXTBEST_HOLDOUT_SALT=SALT,
        NEXTBEST_HOLDOUT_SHARE="0.1",
    ) as running:
        yield running


def _refused(answer: Answer, needle: str) -> None:
    assert answer.status == 401, answer.body
    body = answer.json()
    assert set(body) == {"error"} and needle in body["error"], body


@pytest.mark.parametrize(("method", "path", "body"), DATA)
def test_a_missing_key_is_a_401_that_says_how_to_send_one(
    server: Server, method: str, path: str, body: object
) -> None:
    _refused(call(server, method, path, body), "Authorization: Bearer KEY")
    _refused(
        call(server, method, path, body, headers={"Authorization": "Basic dXNlcjpwYXNz"}),
        "X-API-Key: KEY",
    )


@pytest.mark.parametrize(("method", "path", "body"), DATA)
def test_a_wrong_key_is_a_401_either_way_it_is_sent(
    server: Server, method: str, path: str, body: object
) -> None:
    for headers in (
        {"Authorization": f"Bearer {WRONG}"},
        {"X-API-Key": WRONG},
        {"X-API-Key": FIRST[:-1]},  # a prefix of a key is not the key
        {"X-API-Key": FIRST + "x"},
        {"Authorization": "Bearer "},
    ):
        _refused(call(server, method, path, body, headers=headers), "not valid")


def test_either_key_either_header_is_served(server: Server) -> None:
    for headers in (
        {"Authorization": f"Bearer {FIRST}"},
        {"Authorization": f"bearer {SECOND}"},
        {"X-API-Key": SECOND},
        {"X-API-Key": FIRST},
    ):
        slate = call(server, *DATA[0][:2], DATA[0][2], headers=headers)
        assert slate.status == 200, slate.body
        offer = {"request_id": slate.json()["request_id"], "offer_id": "nope"}
        feedback = call(server, "POST", "/feedback", offer | {"outcome": "viewed"}, headers=headers)
        assert feedback.status == 404  # through the door: the request did not serve it
        assert call(server, "GET", "/metadata", headers=headers).status == 200
        assert call(server, "GET", "/metrics", headers=headers).status == 200


@pytest.mark.parametrize(
    "path", ["/healthz", "/livez", "/readyz", "/docs", "/docs/init.js", "/docs.json"]
)
def test_the_probes_and_the_documentation_stay_open(server: Server, path: str) -> None:
    assert call(server, "GET", path).status == 200


def test_the_review_page_keeps_its_own_sign_in(server: Server) -> None:
    login = call(server, "GET", "/review/login")
    assert login.status == 200 and b'type="password"' in login.body


def test_the_contract_declares_the_keys(server: Server) -> None:
    spec = call(server, "GET", "/docs.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, method in (("/recommend", "post"), ("/feedback", "post"), ("/metadata", "get")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
        assert "401" in operation["responses"]
    assert "security" not in spec["paths"]["/readyz"]["get"]


def test_schemathesis_authorised_finds_nothing(server: Server) -> None:
    """An authorised client sends both headers the contract offers: left to itself,
    schemathesis fills the optional X-API-Key with random text beside the right Bearer,
    and a wrong X-API-Key is refused whatever else comes with it, so most of the run was
    401s and POST /feedback could end with nothing but 401 and 404 (a warning: the run
    failed). The contract's link from a served slate to its feedback gives /feedback
    cases on slates really served. 15 examples an operation, not the contract file's 40:
    that run fuzzes the bodies; this one proves the keyed contract (its security schemes,
    its 401s), which the coverage phase tries in full whatever the bound (every operation
    without a key and with a wrong one), and every operation is still served."""
    fuzzed = schemathesis(
        server,
        "--header",
        f"Authorization: Bearer {FIRST}",
        "--header",
        f"X-API-Key: {SECOND}",
        max_examples=15,
    )
    assert (
        fuzzed.declared_links == 1
        and fuzzed.covered_links == fuzzed.declared_links + fuzzed.inferred_links
    )
    for operation in ("POST /recommend", "POST /feedback", "GET /metadata", "GET /metrics"):
        assert fuzzed.succeeded(operation) > 0, (operation, fuzzed.statuses)


def test_no_secret_is_published_or_logged(server: Server) -> None:
    """/metadata published the holdout salt (anyone could tell who is held out); keys
    must never reach the log, even the wrong ones."""
    headers = {"X-API-Key": FIRST}
    metadata = call(server, "GET", "/metadata", headers=headers)
    assert metadata.status == 200
    assert metadata.json()["holdout"] == {"share": 0.1, "control": "nothing", "offer_share": 0.0}
    published = [
        metadata.body,
        call(server, "GET", "/docs.json").body,
        call(server, "GET", "/schema.json").body,
        call(server, "GET", "/metrics", headers=headers).body,
    ]
    for secret in (SALT, FIRST, SECOND):
        assert all(secret.encode() not in body for body in published), secret
    call(server, "GET", "/metadata", headers={"Authorization": f"Bearer {WRONG}"})
    log = wait_for_log(server, "status=401")
    for secret in (SALT, FIRST, SECOND, WRONG):
        assert secret not in log, secret
