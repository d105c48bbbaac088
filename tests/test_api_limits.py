"""Bounded work per request, over real HTTP on a real `bentoml serve` whose ledger is a
real PostgreSQL: body, cart, id and string limits, strict types, as_of, control
characters, content types; each refusal is a 4xx in the one error shape, logged in one
line. And the engine's present builder, which no replay of the past can evict."""

from __future__ import annotations

import json
import re
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from api_helpers import Answer, Server, call, serve, small_api_workspace, wait_for_log

from features import ScenarioConfig, make_world, write_world

pytestmark = pytest.mark.slow

MB = 1 << 20
# the documented limits, written here by hand (the contract in serving.contract states them)
LIMIT = 64 * 1024  # the default NEXTBEST_MAX_BODY_BYTES
MAX_CART_ITEMS = 100
MAX_ID_LENGTH = 128


@pytest.fixture(scope="module")
def ledger_url(postgres_url: str) -> Iterator[str]:
    """A schema of its own on the test PostgreSQL (its search path), for this module."""
    schema = f"limits_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.schema.CreateSchema(schema))
    try:
        yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.schema.DropSchema(schema, cascade=True))
        admin.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ledger_url: str) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("limits")
    workspace = small_api_workspace(folder / "ws")
    with serve(workspace, folder / "home", folder, NEXTBEST_DB_URL=ledger_url) as running:
        yield running


@pytest.fixture(scope="module")
def customer(server: Server) -> str:
    """A customer of the workspace, from a request that works."""
    answer = call(server, "POST", "/recommend", {"customer_id": "S00001", "channel": "web"})
    assert answer.status == 200, answer.body
    assert call(server, "GET", "/metadata").json()["ledger"] == "postgresql"
    return "S00001"


def refused(answer: Answer, status: int, needle: str) -> dict:
    """The answer is ``status`` in the one error shape, and its message says ``needle``."""
    assert answer.status == status, (answer.status, answer.body[:500])
    body = answer.json()
    assert isinstance(body, dict) and isinstance(body["error"], str), body
    assert set(body) <= {"error", "detail"}, body
    assert needle in body["error"], body
    return body


def served_offer(server: Server, customer: str) -> tuple[str, str]:
    answer = call(server, "POST", "/recommend", {"customer_id": customer, "channel": "web"})
    body = answer.json()
    assert answer.status == 200 and body["offers"], answer.body
    return body["request_id"], body["offers"][0]["offer_id"]


# -- the cart and every string --------------------------------------------------------------
def test_a_100000_item_cart_is_refused_at_once_with_its_limit(server: Server) -> None:
    """The issue's 1 MB cart took 26 s (or a 504 at 30 s): now a 413 naming the limit."""
    cart = [f"P{i:06d}" for i in range(100_000)]
    body = json.dumps({"customer_id": "S00001", "channel": "web", "context": {"cart": cart}})
    raw = body.encode()
    pieces = (raw[i : i + LIMIT] for i in range(0, len(raw), LIMIT))
    reply, _ = _post_early(server, pieces, length=len(raw))
    assert _refusal(reply) == (413, f"the body is {len(raw)} bytes; the limit is {LIMIT} bytes")


def test_a_cart_over_its_item_limit_is_a_400_that_states_it(server: Server) -> None:
    cart = [f"P{i}" for i in range(MAX_CART_ITEMS + 1)]
    body = {"customer_id": "S00001", "channel": "web", "context": {"cart": cart}}
    answer = call(server, "POST", "/recommend", body)
    said = refused(answer, 400, "context.cart")
    assert f"at most {MAX_CART_ITEMS} items" in said["error"]
    full = body | {"context": {"cart": cart[:MAX_CART_ITEMS]}}
    assert call(server, "POST", "/recommend", full).status == 200


@pytest.mark.parametrize(
    ("where", "body"),
    [
        ("customer_id", {"customer_id": "x" * (MAX_ID_LENGTH + 1), "channel": "web"}),
        (
            "context.product_id",
            {"customer_id": "S1", "channel": "web", "context": {"product_id": "p" * 129}},
        ),
        (
            "context.cart.0",
            {"customer_id": "S1", "channel": "web", "context": {"cart": ["c" * 129]}},
        ),
    ],
)
def test_every_id_has_a_length_limit(server: Server, where: str, body: dict) -> None:
    said = refused(call(server, "POST", "/recommend", body), 400, where)
    assert f"at most {MAX_ID_LENGTH} characters" in said["error"]


@pytest.mark.parametrize("character", ["\x00", "\x01", "\n", "\x7f", "\x9b"])
def test_a_nul_or_control_character_in_any_id_is_a_400_on_postgresql(
    server: Server, customer: str, character: str
) -> None:
    """A NUL in an id reached PostgreSQL and gave a 500; every control character is
    refused before anything is read or written."""
    request_id, offer_id = served_offer(server, customer)
    bad = f"S{character}1"
    asked = {"customer_id": customer, "channel": "web"}
    cases = [
        ("/recommend", asked | {"customer_id": bad}, "customer_id"),
        ("/recommend", asked | {"context": {"cart": [bad]}}, "context.cart.0"),
        ("/recommend", asked | {"context": {"product_id": bad}}, "context.product_id"),
        ("/feedback", {"request_id": bad, "offer_id": offer_id, "outcome": "viewed"}, "request_id"),
        ("/feedback", {"request_id": request_id, "offer_id": bad, "outcome": "viewed"}, "offer_id"),
    ]
    for path, body, where in cases:
        refused(call(server, "POST", path, body), 400, where)


# -- strict types and finite numbers --------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"k": True}, "k: Input should be a valid integer"),
        ({"k": 2.0}, "k: Input should be a valid integer"),
        ({"k": "2"}, "k: Input should be a valid integer"),
        ({"debug": "yes"}, "debug: Input should be a valid boolean"),
        ({"debug": 1}, "debug: Input should be a valid boolean"),
    ],
)
def test_types_are_strict(server: Server, body: dict, needle: str) -> None:
    """`k: true` was read as 1."""
    request = {"customer_id": "S00001", "channel": "web"} | body
    refused(call(server, "POST", "/recommend", request), 400, needle)


def test_a_misspelt_field_is_a_400_not_a_default(server: Server) -> None:
    body = {"customer_id": "S00001", "channel": "web", "kk": 5}
    said = refused(call(server, "POST", "/recommend", body), 400, "kk: Extra inputs")
    assert said["detail"] == [
        {"type": "extra_forbidden", "loc": ["kk"], "msg": "Extra inputs are not permitted"}
    ]
    feedback = {"request_id": "r", "offer_id": "o", "outcome": "viewed", "valeu": 3}
    refused(call(server, "POST", "/feedback", feedback), 400, "valeu: Extra inputs")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_feedback_values_must_be_finite_and_nothing_is_stored(
    server: Server, customer: str, ledger_url: str, number: str
) -> None:
    """NaN and Infinity were stored as feedback values."""
    request_id, offer_id = served_offer(server, customer)
    raw = (
        f'{{"request_id": "{request_id}", "offer_id": "{offer_id}", '
        f'"outcome": "accepted", "value": {number}}}'
    ).encode()
    answer = call(server, "POST", "/feedback", raw=raw)
    assert answer.status == 400, answer.body
    assert "error" in answer.json()
    from serving.ledger import feedback

    engine = sa.create_engine(ledger_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(sa.func.count()).where(feedback.c.request_id == request_id)
            ).scalar()
    finally:
        engine.dispose()
    assert rows == 0
    fine = call(
        server,
        "POST",
        "/feedback",
        {"request_id": request_id, "offer_id": offer_id, "outcome": "accepted", "value": 4.5},
    )
    assert fine.status == 200 and fine.json()["recorded"] is True


# -- as_of ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("as_of", "needle"),
    [
        ("5 March", "as_of: String should match pattern"),
        ("NaT", "as_of: String should match pattern"),
        ("now", "as_of: String should match pattern"),
        ("2017-06-01T10:00:00+02:00", "as_of: String should match pattern"),
        ("2025-02-30", "is not a day of the calendar"),
        ("1990-01-01", "outside the data's range: from "),
        ("2999-01-01T00:00:00", "days after its end"),
    ],
)
def test_as_of_is_iso_8601_within_the_data(server: Server, as_of: str, needle: str) -> None:
    """ "5 March" was read as year 1, and "NaT" gave a 500."""
    body = {"customer_id": "S00001", "channel": "web", "as_of": as_of}
    refused(call(server, "POST", "/recommend", body), 400, needle)


def test_as_of_inside_the_range_is_served(server: Server) -> None:
    metadata = call(server, "GET", "/metadata").json()
    end = metadata["data_end"][:10]
    for as_of in (end, f"{end}T09:30", f"{end}T09:30:15.5"):
        body = {"customer_id": "S00001", "channel": "web", "as_of": as_of}
        answer = call(server, "POST", "/recommend", body)
        assert answer.status == 200, answer.body
        assert answer.json()["as_of"].startswith(end)


# -- bodies -------------------------------------------------------------------------------
def _worker(server: Server) -> psutil.Process:
    workers = [
        p
        for p in psutil.Process(server.pid).children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1, workers
    return workers[0]


def _peak_rss(process: psutil.Process) -> int:
    """The process's high-water mark of resident memory, in bytes."""
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{process.pid}/status").read_text())
    assert found is not None
    return int(found.group(1)) * 1024


def _post_early(
    server: Server, chunks: Iterator[bytes], *, length: int | None
) -> tuple[bytes, int]:
    """POST a body to /recommend on a raw socket, chunk by chunk (``length`` declared, or
    streamed with chunked encoding when None), stopping as soon as the server answers, as
    a client must when it is refused mid-body; the response, and the bytes that went out."""
    host, port = server.url.removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    head = (
        f"POST /recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    )
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            framed = (
                chunk if length is not None else f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            )
            try:
                sock.sendall(framed)
            except OSError:  # the server answered and closed while we were still sending
                break
            sent += len(chunk)
        reply = b""
        deadline = time.monotonic() + 30
        while b"}" not in reply and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    return reply, sent


def _refusal(reply: bytes) -> tuple[int, str]:
    """The status and the error message of a raw HTTP response."""
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "streamed"])
def test_a_200_mb_body_is_refused_without_being_read(server: Server, chunked: bool) -> None:
    """A 200 MB body was accepted and kept by the worker: a declared length over the limit
    is refused before a byte is read, a streamed body as soon as it passes the limit, and
    the worker's memory does not grow by the body."""
    worker = _worker(server)
    before = _peak_rss(worker)
    chunk = b'{"customer_id": "' + b"x" * (MB - 17)
    reply, sent = _post_early(server, iter([chunk] * 200), length=None if chunked else 200 * MB)
    status, message = _refusal(reply)
    assert status == 413, reply[:300]
    assert f"limit is {LIMIT} bytes" in message or f"limit of {LIMIT} bytes" in message
    assert sent < 100 * MB  # the client was stopped well before it sent it all
    assert _peak_rss(worker) - before < 32 * MB
    assert call(server, "GET", "/readyz").status == 200


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        ("multipart/form-data; boundary=zzz", b"--nope\r\ngarbage"),
        ("multipart/form-data", b"no boundary at all"),
        ("text/plain", b'{"customer_id": "S00001", "channel": "web"}'),
        ("application/x-www-form-urlencoded", b"customer_id=S00001&channel=web"),
        ("application/vnd.bentoml+pickle", b"\x80\x04N."),
    ],
)
def test_only_json_bodies_are_read(server: Server, content_type: str, raw: bytes) -> None:
    """A multipart body with a bad boundary gave a 500, and a cross-site text/plain POST
    was parsed as JSON: anything but application/json is a 415."""
    for path in ("/recommend", "/feedback"):
        answer = call(server, "POST", path, raw=raw, headers={"Content-Type": content_type})
        refused(answer, 415, "Content-Type must be application/json")


@pytest.mark.parametrize(
    "raw", [b"{oops", b"[1, 2]", b'"just a string"', b"[" * 5000 + b"]" * 5000, b"\xff\xfe"]
)
def test_a_body_that_is_not_a_json_object_is_a_400(server: Server, raw: bytes) -> None:
    answer = call(server, "POST", "/recommend", raw=raw)
    assert answer.status == 400, answer.body
    assert isinstance(answer.json()["error"], str)


def test_a_400_logs_one_line_and_no_traceback(server: Server) -> None:
    """Every 400 wrote a 25-line traceback to the log."""
    marker = uuid.uuid4().hex
    start = len(server.log_text())
    body = {"customer_id": "S00001", "channel": "web", "as_of": f"2025-02-30T{marker}"}
    assert call(server, "POST", "/recommend", body).status == 400
    bad_day = {"customer_id": "S00001", "channel": "web", "as_of": "2025-02-30"}
    assert call(server, "POST", "/recommend", bad_day).status == 400
    text = wait_for_log(server, "status=400", timeout=10)[start:]
    deadline = time.monotonic() + 5
    while text.count("status=400") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
        text = server.log_text()[start:]
    assert "Traceback" not in text, text
    refusals = [line for line in text.splitlines() if "refused with 400" in line]
    assert len(refusals) == 2, text
    assert marker not in text  # what was sent is not logged, only what was wrong


# -- the present's builder, whatever the past asks for -------------------------------------
def test_replaying_the_past_never_evicts_the_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new as_of fitted a builder and pushed the present's out of the cache, so the
    next ordinary request fitted it again. Walking 50 moments over 480 days (17 steps of
    28 days, more than the old cache held) leaves the present's builder in place and the
    past's cache bounded."""
    from serving.assembly import build_recommender
    from serving.engine import DAY
    from serving.settings import ServingSettings

    (tmp_path / "home").mkdir()
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path / "home"))
    workspace = write_world(
        make_world(ScenarioConfig(n_customers=30, n_days=480, seed=5)), tmp_path / "ws"
    )
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0, db_url=f"sqlite:///{tmp_path / 'ledger.db'}"),
        workspace=workspace,
    )
    present = recommender.builder_for(recommender.now_s())
    first = recommender.data_end_s - 470 * DAY
    moments = [first + int(i * (recommender.data_end_s - first) / 50) for i in range(50)]
    step = 28 * DAY  # the rules-only ranking refits its features every 28 days
    assert len({(recommender.data_end_s - m) // step for m in moments}) > 16
    for moment in moments:
        recommender.builder_for(moment)
    assert recommender.builder_for(recommender.now_s()) is present
    assert recommender.builder_for(recommender.data_end_s + DAY) is present
    assert len(recommender.model.builders) <= 4
    assert recommender.builder_for(moments[3]) is not present


def test_the_review_page_bounds_its_bodies_too(server: Server) -> None:
    """The review page went around the guard whole: a sign-in body of any size was read
    into memory. A declared length over the limit is a 413; the page itself still works."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    big = call(server, "POST", "/review/login", raw=b"username=" + b"x" * LIMIT, headers=form)
    assert big.status == 413, big.body[:300]
    assert f"limit is {LIMIT} bytes" in big.json()["error"]
    assert call(server, "GET", "/review/login").status == 200
