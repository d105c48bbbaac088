"""The exposure ledger on SQLite (embedded default) and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from serving.ledger import ServedOffer, SqlLedger


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    sql = SqlLedger(url)
    yield sql
    if request.param == "postgresql":  # each test starts from empty tables
        from serving.ledger import _metadata

        _metadata.drop_all(sql.engine)
    sql.dispose()


def _slate_kwargs(
    request_id: str, customer: str, channel: str, at_s: int, offers: tuple[str, ...] = ("a", "b")
) -> dict[str, object]:
    return {
        "request_id": request_id,
        "customer_id": customer,
        "channel": channel,
        "placement": "inbox",
        "model_version": "3",
        "mode": "model",
        "holdout": False,
        "at_s": at_s,
        "offers": [ServedOffer(o, i + 1, 1.0 - i / 10, 0.1) for i, o in enumerate(offers)],
    }


def _slate(
    ledger: SqlLedger,
    request_id: str,
    customer: str,
    channel: str,
    at_s: int,
    offers: tuple[str, ...] = ("a", "b"),
    holdout: bool = False,
    mode: str | None = None,
) -> None:
    ledger.log_slate(
        request_id=request_id,
        customer_id=customer,
        channel=channel,
        placement="home",
        model_version="3",
        mode=mode or ("holdout_nothing" if holdout else "model"),
        holdout=holdout,
        at_s=at_s,
        offers=[ServedOffer(o, i + 1, 1.0 - i / 10, 0.1) for i, o in enumerate(offers)],
    )


def test_backend_and_wal(ledger: SqlLedger) -> None:
    assert ledger.ping()
    if ledger.backend == "sqlite":
        with ledger.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    else:
        assert ledger.backend == "postgresql"


def test_slates_and_idempotent_feedback(ledger: SqlLedger) -> None:
    _slate(ledger, "r1", "c1", "web", 1000)
    stored = ledger.slate("r1")
    assert stored is not None and [o["offer_id"] for o in stored["offers"]] == ["a", "b"]
    assert stored["model_version"] == "3" and stored["holdout"] is False
    assert ledger.record_feedback(
        request_id="r1", offer_id="a", outcome="viewed", value=None, at_s=1001
    )
    assert ledger.record_feedback(
        request_id="r1", offer_id="a", outcome="accepted", value=12.5, at_s=1002
    )
    assert not ledger.record_feedback(
        request_id="r1", offer_id="a", outcome="accepted", value=12.5, at_s=1003
    )
    assert len(ledger.slate("r1")["feedback"]) == 2  # type: ignore[index]
    with pytest.raises(LookupError, match="did not serve offer 'z'"):
        ledger.record_feedback(
            request_id="r1", offer_id="z", outcome="viewed", value=None, at_s=1004
        )
    with pytest.raises(ValueError, match="unknown outcome 'loved'"):
        ledger.record_feedback(
            request_id="r1", offer_id="a", outcome="loved", value=None, at_s=1004
        )


def test_reads_for_caps_cooldowns_and_sequencing(ledger: SqlLedger) -> None:
    _slate(ledger, "r1", "c1", "web", 1000)
    _slate(ledger, "r2", "c1", "email", 2000, offers=("c",))
    _slate(ledger, "r3", "c1", "web", 3000, holdout=True)
    _slate(ledger, "r4", "c2", "web", 3000)
    _slate(ledger, "r5", "c1", "email", 3500, offers=())  # an empty slate reached nobody
    # a rules-only holdout's slate is shown: it counts, unlike the ghost r3
    _slate(ledger, "r6", "c3", "web", 3000, holdout=True, mode="holdout_rules_only")
    assert ledger.counts("sends", ["c3"], 0, 5000, ["web"]) == {"c3": 1}
    every = ["web", "app", "email", "sms", "mailer"]
    # the holdout's ghost slate and the empty one are no sends
    assert ledger.counts("sends", ["c1"], 0, 5000, ["web"]) == {"c1": 1}
    assert ledger.counts("sends", ["c1", "c2"], 0, 5000, every) == {"c1": 2, "c2": 1}
    assert ledger.counts("sends", ["c1"], 1500, 5000, every) == {"c1": 1}
    assert ledger.counts("sends", ["c1"], 0, 1000, every) == {"c1": 1}  # this second counts
    assert ledger.counts("sends", ["c1"], 0, 5000, ["email"]) == {"c1": 1}
    assert ledger.counts("served", ["c1"], 0, 5000, every) == {"c1": 3}
    assert ledger.counts("viewed", ["c1"], 0, 5000, every) == {}
    ledger.record_feedback(request_id="r1", offer_id="a", outcome="viewed", value=None, at_s=1001)
    assert ledger.counts("viewed", ["c1"], 0, 5000, ["web"]) == {"c1": 1}
    assert ledger.counts("viewed", ["c1"], 0, 5000, ["email"]) == {}
    assert ledger.offer_counts("served", ["c1", "c2"], 0, 5000) == {
        ("c1", "a"): 1,
        ("c1", "b"): 1,
        ("c1", "c"): 1,
        ("c2", "a"): 1,
        ("c2", "b"): 1,
    }
    assert ledger.offer_counts("viewed", ["c1"], 0, 5000) == {("c1", "a"): 1}
    ledger.record_feedback(request_id="r1", offer_id="b", outcome="declined", value=None, at_s=1500)
    assert ledger.last_outcomes(["c1", "c2"], ["declined"], 2000) == {("c1", "b"): 1500}
    assert ledger.last_outcomes(["c1"], ["declined"], 1400) == {}
    assert ledger.shown_offers(["c1"], 5000) == {("c1", "a"), ("c1", "b"), ("c1", "c")}
    assert ledger.shown_offers(["c2"], 5000) == {("c2", "a"), ("c2", "b")}


def test_a_capped_slate_is_admitted_only_while_it_fits(ledger: SqlLedger) -> None:
    from policy.eligibility import Limit

    sends = [Limit("sends", ("email",), 0, 2)]
    offer = [Limit("served", ("email",), 0, 1, offer_id="a")]
    for i in range(3):
        slate = dict(_slate_kwargs(f"s{i}", "c1", "email", 100 + i))
        assert ledger.log_slates([slate], {f"s{i}": sends}) == {
            f"s{i}": ["a", "b"] if i < 2 else []
        }
    assert ledger.counts("sends", ["c1"], 0, 1000, ["email"]) == {"c1": 2}
    assert ledger.slate("s2")["offers"] == []  # type: ignore[index]
    kept = ledger.log_slates([dict(_slate_kwargs("o1", "c2", "email", 100))], {"o1": offer})
    again = ledger.log_slates([dict(_slate_kwargs("o2", "c2", "email", 101))], {"o2": offer})
    assert kept == {"o1": ["a", "b"]} and again == {"o2": ["b"]}


def test_many_writers_at_once(ledger: SqlLedger) -> None:
    """Workers share the database: concurrent slates and feedback all land, once."""
    other = SqlLedger(ledger.url)
    errors: list[BaseException] = []

    def write(worker: int, sql: SqlLedger) -> None:
        try:
            for i in range(25):
                request = f"w{worker}-{i}"
                _slate(sql, request, f"c{i % 3}", "app", 10_000 + i)
                sql.record_feedback(
                    request_id=request, offer_id="a", outcome="viewed", value=None, at_s=10_001 + i
                )
        except BaseException as error:  # collected and re-raised by the test
            errors.append(error)

    threads = [
        threading.Thread(target=write, args=(w, ledger if w % 2 else other)) for w in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    customers = [f"c{c}" for c in range(3)]
    assert sum(ledger.counts("sends", customers, 0, 20_000, ["app"]).values()) == 100
    other.dispose()


def test_live_offer_counts_land_on_their_rows(small_workspace) -> None:  # type: ignore[no-untyped-def]
    """CombinedLedger reads the live (customer, offer) counts onto a call's candidate rows:
    against a plain dict lookup per row, on random rows, with offers and customers the
    snapshot or the rows do not have."""
    import random

    import numpy as np

    from features import load_snapshot
    from serving.ledger import CombinedLedger

    snapshot = load_snapshot(small_workspace)
    combined = CombinedLedger(snapshot, None)  # type: ignore[arg-type]  # the SQL side unread
    names = [str(o) for o in snapshot.offers.values]
    rng = random.Random(3)
    for _ in range(100):
        customers = [f"S{rng.randint(0, 20):05d}" for _ in range(rng.randint(1, 4))]
        n = rng.randint(1, 250)
        ids = np.array([rng.choice(customers) for _ in range(n)], dtype=object)
        offers = np.array([rng.randrange(len(names)) for _ in range(n)])
        live = {
            (rng.choice([*customers, "stranger"]), rng.choice([*names, "gone"])): rng.randint(1, 5)
            for _ in range(rng.randint(1, 20))
        }
        for i in rng.sample(range(n), min(n, 5)):
            live[(ids[i], names[offers[i]])] = rng.randint(1, 5)
        expected = [live.get((c, names[o]), 0) for c, o in zip(ids, offers, strict=True)]
        assert combined._per_row(live, ids, offers).tolist() == expected


@pytest.mark.parametrize("scheme", ["postgresql://", "postgres://"])
def test_a_postgresql_url_without_a_driver_opens_with_psycopg_3(
    scheme: str, postgres_url: str
) -> None:
    """The URL a database host hands out names no driver, often as ``postgres://``, which
    SQLAlchemy does not know (NoSuchModuleError before). Both open with psycopg 3, with the
    client-side deadline, and the export reads what was written."""
    from serving.export import read_ledger
    from serving.ledger import _metadata

    plain = scheme + postgres_url.split("://", 1)[1]
    ledger = SqlLedger(plain)
    try:
        assert ledger.engine.dialect.driver == "psycopg" and ledger._deadlines is not None
        # the outage buffer keeps the name of the URL as given (as before the driver was
        # pinned): rows an earlier process left there are found and flushed
        digest = hashlib.sha256(plain.encode()).hexdigest()[:12]
        assert ledger.buffer.path.name == f"ledger-buffer-{digest}.db"
        _slate(ledger, "r-plain", "c1", "email", 1_000)
        served = read_ledger(plain).served
        assert served["request_id"].tolist() == ["r-plain", "r-plain"]
        assert served["offer_id"].tolist() == ["a", "b"]
    finally:
        _metadata.drop_all(ledger.engine)
        ledger.dispose()
