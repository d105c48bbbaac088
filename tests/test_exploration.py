"""Exploration after arbitration: honest propensities (hand-computed and counted), seeded
replays, per-channel rates, no exploration in holdouts or unlogged previews, deterministic
slates logged as such, offer-level holdout ghosts, and the ledger's migration."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from features import TABLES, ScenarioConfig, Snapshot, Workspace, coerce_table, make_world
from features.candidates import CandidateGenerator
from policy import load_rules, parse_rules
from policy.exploration import Exploration, draw_slate, request_rng, step_probabilities
from policy.slate import assemble_slate
from serving.assembly import build_recommender
from serving.engine import Recommender, in_holdout
from serving.ledger import ServedOffer, SqlLedger
from serving.settings import ServingSettings
from training.offpolicy import off_policy_value

NO_RULES = load_rules().model_copy(update={"rules": []})


@pytest.fixture(scope="module")
def snapshot(small_workspace: Workspace) -> Snapshot:
    from features import load_snapshot

    return load_snapshot(small_workspace)


@pytest.fixture(scope="module")
def three(snapshot: Snapshot) -> np.ndarray:
    """Three offer codes outside any bundle ladder (no collision between them)."""
    free = np.flatnonzero(snapshot.offer_bundle_ladder < 0)
    return free[:3]


def _draws(snapshot: Snapshot, rules, ranked, scores, k, exploration, n):  # type: ignore[no-untyped-def]
    """n seeded draws: how often each ordered slate came, and what each logged."""
    seen: Counter[tuple[int, ...]] = Counter()
    logged: dict[tuple[int, ...], list[float]] = {}
    demoted = np.zeros(len(ranked), dtype=bool)
    for seed in range(n):
        slate = draw_slate(
            snapshot,
            rules,
            ranked,
            scores,
            demoted,
            k,
            exploration,
            np.random.default_rng(seed),
            inclusions=False,  # counted here; their own test counts them (test_replay)
        )
        key = tuple(slate.chosen)
        seen[key] += 1
        assert slate.propensities is not None
        logged.setdefault(key, slate.propensities)
        assert logged[key] == slate.propensities  # a slate always logs the same figures
    return seen, logged


def _within(count: int, n: int, p: float) -> bool:
    """The observed frequency within 4.5 binomial standard deviations of p."""
    return abs(count / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_softmax_slate_probability_by_hand_and_by_counting(
    snapshot: Snapshot, three: np.ndarray
) -> None:
    a, b, c = (int(x) for x in three)
    # weights 3, 2, 1: rank 1 draws b with 2/6; then a among {a, c} with 3/4
    scores = np.log([3.0, 2.0, 1.0])
    plackett_luce = Exploration("softmax", rate=1.0, temperature=1.0)
    assert step_probabilities(scores, plackett_luce) == pytest.approx([1 / 2, 1 / 3, 1 / 6])
    n = 20_000
    seen, logged = _draws(snapshot, NO_RULES, three, scores, 2, plackett_luce, n)
    assert logged[(b, a)] == pytest.approx([1 / 3, 3 / 4])
    by_hand = {
        (a, b): 1 / 2 * 2 / 3,
        (a, c): 1 / 2 * 1 / 3,
        (b, a): 1 / 3 * 3 / 4,
        (b, c): 1 / 3 * 1 / 4,
        (c, a): 1 / 6 * 3 / 5,
        (c, b): 1 / 6 * 2 / 5,
    }
    assert set(seen) == set(by_hand)
    for slate, p in by_hand.items():
        assert math.prod(logged[slate]) == pytest.approx(p)  # the slate's probability
        assert _within(seen[slate], n, p), (slate, seen[slate] / n, p)


def test_epsilon_greedy_with_a_collision_by_hand_and_by_counting(
    snapshot: Snapshot, three: np.ndarray
) -> None:
    a, b, c = (int(x) for x in three)
    ids = snapshot.offers.decode(np.array([a, b]))
    rules = parse_rules(
        {
            "name": "t",
            "version": 1,
            "rules": [{"type": "mutual_exclusion", "groups": {"g": [str(i) for i in ids]}}],
        },
        source="test",
    )
    # epsilon 0.5, greedy order a, b, c: rank 1 takes a with 1/2 + 1/6; a and b collide,
    # so after a only c is left (probability 1); after b, only c too; after c, a or b
    eps = Exploration("epsilon", rate=0.5)
    n = 20_000
    seen, logged = _draws(snapshot, rules, three, np.array([3.0, 2.0, 1.0]), 2, eps, n)
    by_hand = {
        (a, c): (2 / 3) * 1.0,
        (b, c): (1 / 6) * 1.0,
        (c, a): (1 / 6) * (1 / 2 + 1 / 4),  # a is the greedy pick of {a, b}
        (c, b): (1 / 6) * (1 / 4),
    }
    assert set(seen) == set(by_hand)
    for slate, p in by_hand.items():
        assert math.prod(logged[slate]) == pytest.approx(p)
        assert _within(seen[slate], n, p), (slate, seen[slate] / n, p)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.0, np.nan, 0.0], [0.5, 0.0, 0.5]),  # an unknown score is never drawn by softmax
        ([np.nan, np.nan], [0.5, 0.5]),  # nothing known: uniform
    ],
)
def test_softmax_with_unknown_scores(scores: list[float], expected: list[float]) -> None:
    p = step_probabilities(np.array(scores), Exploration("softmax", rate=1.0))
    assert p == pytest.approx(expected)


def test_exploration_off_is_the_greedy_slate_without_propensities(
    snapshot: Snapshot, three: np.ndarray
) -> None:
    scores = np.array([3.0, 2.0, 1.0])
    demoted = np.zeros(3, dtype=bool)
    for off in (Exploration(), Exploration("softmax", rate=0.0)):
        slate = draw_slate(snapshot, NO_RULES, three, scores, demoted, 2, off, request_rng("r"))
        assert slate == assemble_slate(snapshot, NO_RULES, three, 2)
        assert slate.propensities is None


def test_the_draw_is_seeded_from_the_request_id() -> None:
    first = [request_rng("req-1").random() for _ in range(3)]
    assert first == [request_rng("req-1").random() for _ in range(3)]
    assert first != [request_rng("req-2").random() for _ in range(3)]


@pytest.mark.parametrize(
    ("environ", "web", "email"),
    [
        ({}, Exploration(), Exploration()),
        ({"NEXTBEST_EXPLORATION_RATES": "0.2"}, Exploration(), Exploration()),  # method off
        (
            {"NEXTBEST_EXPLORATION": "epsilon", "NEXTBEST_EXPLORATION_RATES": "web=0.2"},
            Exploration("epsilon", 0.2),
            Exploration(),
        ),
        (
            {
                "NEXTBEST_EXPLORATION": "softmax",
                "NEXTBEST_EXPLORATION_RATES": "web=0.2,*=0.05",
                "NEXTBEST_EXPLORATION_TEMPERATURE": "0.5",
            },
            Exploration("softmax", 0.2, 0.5),
            Exploration("softmax", 0.05, 0.5),
        ),
    ],
)
def test_settings_per_channel(
    environ: dict[str, str], web: Exploration, email: Exploration
) -> None:
    settings = ServingSettings.from_env(environ)
    assert settings.exploration_for("web") == web
    assert settings.exploration_for("email") == email


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NEXTBEST_EXPLORATION", "greedy", "must be one of off, epsilon, softmax"),
        ("NEXTBEST_EXPLORATION_RATES", "web=1.5", r"RATES must be in \[0, 1\]"),
        ("NEXTBEST_EXPLORATION_TEMPERATURE", "0", "must be above 0"),
    ],
)
def test_settings_refuse_bad_values(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServingSettings.from_env({name: value})


# -- the recommender ----------------------------------------------------------------------


def _recommender(workspace: Workspace, ledger: Path, **settings: object) -> Recommender:
    base = {"holdout_share": 0.0, "db_url": f"sqlite:///{ledger}"}
    return build_recommender(
        ServingSettings(**(base | settings)),  # type: ignore[arg-type]
        workspace=workspace,
        bundle=None,
    )


EXPLORING = {
    "exploration": "epsilon",
    "exploration_rates": (("web", 1.0),),
}


@pytest.fixture(scope="module")
def customers(small_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Customers whose web slate holds 3 of at least 5 eligible offers."""
    recommender = _recommender(small_workspace, tmp_path_factory.mktemp("c") / "l.db")
    known = sorted(recommender.known_customers())[:40]
    answers = recommender.recommend_many(known, channel="web", k=3, debug=True)
    return [a["customer_id"] for a in answers if len(a["offers"]) == 3 and a["eligible"] >= 5]


def test_a_deterministic_slate_logs_no_propensity(
    small_workspace: Workspace, tmp_path: Path, customers: list[str]
) -> None:
    recommender = _recommender(small_workspace, tmp_path / "l.db")
    answer = recommender.recommend(customers[0], channel="web", k=3)
    logged = recommender.ledger.slate(answer["request_id"])
    assert logged is not None and len(logged["offers"]) == 3
    assert [o["propensity"] for o in logged["offers"]] == [None, None, None]


def test_explored_slates_log_their_draw_and_replay_it(
    small_workspace: Workspace,
    tmp_path: Path,
    customers: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    greedy = _recommender(small_workspace, tmp_path / "greedy.db")
    exploring = _recommender(small_workspace, tmp_path / "explore.db", **EXPLORING)
    chosen = customers[:12]
    best = greedy.recommend_many(chosen, channel="web", k=3, log_exposure=False)
    drawn = exploring.recommend_many(chosen, channel="web", k=3)
    assert any(
        [o["offer_id"] for o in x["offers"]] != [o["offer_id"] for o in y["offers"]]
        for x, y in zip(best, drawn, strict=True)
    )
    for answer in drawn:
        logged = exploring.ledger.slate(answer["request_id"])
        assert logged is not None
        assert [o["offer_id"] for o in logged["offers"]] == [
            o["offer_id"] for o in answer["offers"]
        ]
        # epsilon 1: uniform among what is left at each rank, so each propensity is
        # 1/(offers left), and at least 1/eligible
        propensities = [o["propensity"] for o in logged["offers"]]
        assert all(p is not None and 0 < p <= 1 for p in propensities)
        assert propensities[0] < 1 and propensities == sorted(propensities)
    # a replay with the same request id draws the same slate, with the same figures
    first = drawn[0]
    import serving.engine

    monkeypatch.setattr(
        serving.engine.uuid, "uuid4", lambda: type("U", (), {"hex": first["request_id"]})()
    )
    replay = _recommender(small_workspace, tmp_path / "replay.db", **EXPLORING)
    again = replay.recommend(first["customer_id"], channel="web", k=3)
    assert again["offers"] == first["offers"]
    replayed, original = (r.ledger.slate(first["request_id"]) for r in (replay, exploring))
    assert replayed is not None and original is not None
    assert replayed["offers"] == original["offers"]


def test_a_request_seed_makes_a_simulated_run_replay_exactly(
    small_workspace: Workspace, tmp_path: Path, customers: list[str]
) -> None:
    """With ``request_seed`` the ids are derived (customer, moment, channel, placement, and
    the how-many-th such request), so two services given the same requests serve the same
    explored slates; a repeated request gets a new id; without a seed ids are random."""
    seeded = {**EXPLORING, "request_seed": "sim-1"}
    runs = []
    for n in range(2):
        recommender = _recommender(small_workspace, tmp_path / f"seeded-{n}.db", **seeded)
        first = recommender.recommend_many(customers[:8], channel="web", k=3)
        again = recommender.recommend_many(customers[:8], channel="web", k=3)
        runs.append((first, again))
    (a_first, a_again), (b_first, b_again) = runs
    assert [x["request_id"] for x in a_first] == [x["request_id"] for x in b_first]
    assert [x["offers"] for x in a_first + a_again] == [x["offers"] for x in b_first + b_again]
    assert not {x["request_id"] for x in a_first} & {x["request_id"] for x in a_again}
    assert len({x["request_id"] for x in a_first}) == 8
    other = _recommender(
        small_workspace, tmp_path / "other.db", **{**EXPLORING, "request_seed": "sim-2"}
    )
    ids = [x["request_id"] for x in other.recommend_many(customers[:8], channel="web", k=3)]
    assert not set(ids) & {x["request_id"] for x in a_first}
    unseeded = [_recommender(small_workspace, tmp_path / f"u{n}.db", **EXPLORING) for n in range(2)]
    random_ids = [u.recommend(customers[0], channel="web", k=3)["request_id"] for u in unseeded]
    assert random_ids[0] != random_ids[1]


def test_no_exploration_off_its_channels_in_holdouts_or_unlogged_previews(
    small_workspace: Workspace, tmp_path: Path, customers: list[str]
) -> None:
    chosen = customers[:12]
    greedy = _recommender(small_workspace, tmp_path / "greedy.db")
    best = {
        channel: greedy.recommend_many(chosen, channel=channel, k=3, log_exposure=False)
        for channel in ("web", "email")
    }

    def same(answers, channel):  # type: ignore[no-untyped-def]
        return [[o["offer_id"] for o in a["offers"]] for a in answers] == [
            [o["offer_id"] for o in a["offers"]] for a in best[channel]
        ]

    exploring = _recommender(small_workspace, tmp_path / "e.db", **EXPLORING)
    # an unlogged call (the review gate's previews are such calls) is never explored
    assert same(exploring.recommend_many(chosen, channel="web", k=3, log_exposure=False), "web")
    # email has no rate: deterministic, and logged as such
    email = exploring.recommend_many(chosen, channel="email", k=3)
    assert same(email, "email")
    for answer in email:
        slate = exploring.ledger.slate(answer["request_id"])
        assert slate is not None and all(o["propensity"] is None for o in slate["offers"])
    # everyone in a rules-only holdout (shown): the holdout's control is never explored
    held = _recommender(
        small_workspace,
        tmp_path / "h.db",
        holdout_share=1.0,
        holdout_control="rules_only",
        **EXPLORING,
    )
    answers = held.recommend_many(chosen, channel="web", k=3)
    assert all(a["holdout"] for a in answers) and same(answers, "web")
    for answer in answers:
        slate = held.ledger.slate(answer["request_id"])
        assert slate is not None and all(o["propensity"] is None for o in slate["offers"])


def test_offer_holdout_drops_are_logged_as_ghosts_never_shown_nor_counted(
    small_workspace: Workspace, tmp_path: Path, customers: list[str]
) -> None:
    share = 0.5
    settings = ServingSettings()
    full = _recommender(small_workspace, tmp_path / "full.db", offer_holdout_share=0.0)
    held = _recommender(small_workspace, tmp_path / "held.db", offer_holdout_share=share)
    ghosts_seen = 0
    for customer in customers[:15]:
        unheld = [o["offer_id"] for o in full.recommend(customer, channel="web", k=3)["offers"]]

        def withheld(offer: str, customer: str = customer) -> bool:
            return in_holdout(f"{customer}:{offer}", settings.holdout_salt, share)

        answer = held.recommend(customer, channel="web", k=3)
        shown = [o["offer_id"] for o in answer["offers"]]
        # oracle: the withheld offers of the slate without the holdout, at their rank there
        expected = [(o, rank) for rank, o in enumerate(unheld, start=1) if withheld(o)]
        logged = held.ledger.slate(answer["request_id"])
        assert logged is not None
        assert [(g["offer_id"], g["rank"]) for g in logged["ghosts"]] == expected
        assert all(g["reason"] == "offer_holdout" for g in logged["ghosts"])
        assert not {o for o, _ in expected} & set(shown)  # never shown
        assert [o["offer_id"] for o in logged["offers"]] == shown
        ghosts_seen += len(expected)
        # never counted: not served, not shown before, and no feedback can name one
        everything = held.ledger.offer_counts("served", [customer], 0, 2**62)
        assert set(everything) == {(customer, o) for o in shown}
        assert held.ledger.counts("served", [customer], 0, 2**62, ["web"]) == {customer: len(shown)}
        assert held.ledger.shown_offers([customer], 2**62) == {(customer, o) for o in shown}
        for offer, _ in expected:
            with pytest.raises(LookupError, match="did not serve"):
                held.ledger.record_feedback(
                    request_id=answer["request_id"],
                    offer_id=offer,
                    outcome="viewed",
                    value=None,
                    at_s=logged["at_s"],
                )
    assert ghosts_seen >= 5  # the test saw ghosts at all


def _log(
    ledger: SqlLedger,
    request_id: str,
    at_s: int,
    offers: list[ServedOffer],
    ghosts: list[ServedOffer],
) -> None:
    """A web slate of customer c."""
    ledger.log_slate(
        request_id=request_id,
        customer_id="c",
        channel="web",
        placement="home",
        model_version=None,
        mode="model",
        holdout=False,
        at_s=at_s,
        offers=offers,
        ghosts=ghosts,
    )


def test_ghosts_survive_the_buffer(tmp_path: Path) -> None:
    """Ghosts logged while the database is down are written when it is back."""
    ledger = SqlLedger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.down = "test: down"
    _log(ledger, "r1", 10, [ServedOffer("a", 1, 1.0, None, 0.5)], [ServedOffer("b", 1, 2.0, None)])
    ledger.down = None
    assert ledger.flush() == 1
    logged = ledger.slate("r1")
    assert logged is not None
    assert [(o["offer_id"], o["propensity"]) for o in logged["offers"]] == [("a", 0.5)]
    assert [(g["offer_id"], g["rank"]) for g in logged["ghosts"]] == [("b", 1)]
    ledger.dispose()


def test_a_slate_cut_by_a_cap_is_no_longer_a_draw(tmp_path: Path) -> None:
    from policy.eligibility import Limit

    ledger = SqlLedger(f"sqlite:///{tmp_path / 'l.db'}")
    drawn = [ServedOffer(o, r, 1.0, None, 0.5) for r, o in enumerate("abc", start=1)]
    logged = ledger.log_slates(
        [
            {
                "request_id": "r",
                "customer_id": "c",
                "channel": "web",
                "placement": "home",
                "model_version": None,
                "mode": "model",
                "holdout": False,
                "at_s": 10,
                "offers": drawn,
            }
        ],
        {"r": [Limit("served", ("web",), 0, 2)]},
    )
    assert logged["r"] == ["a", "b"]
    slate = ledger.slate("r")
    assert slate is not None
    assert [(o["offer_id"], o["propensity"]) for o in slate["offers"]] == [("a", None), ("b", None)]
    ledger.dispose()


# -- an existing ledger -------------------------------------------------------------------

_OLD_TABLES = [
    """CREATE TABLE slates (request_id VARCHAR(64) NOT NULL PRIMARY KEY,
    customer_id VARCHAR(128) NOT NULL, channel VARCHAR(16) NOT NULL,
    placement VARCHAR(32) NOT NULL, model_version VARCHAR(32), mode VARCHAR(32) NOT NULL,
    holdout BOOLEAN NOT NULL, at_s BIGINT NOT NULL)""",
    """CREATE TABLE slate_offers (request_id VARCHAR(64) NOT NULL
    REFERENCES slates (request_id), offer_id VARCHAR(128) NOT NULL, rank INTEGER NOT NULL,
    score FLOAT, probability FLOAT, propensity FLOAT NOT NULL,
    PRIMARY KEY (request_id, offer_id))""",
    "INSERT INTO slates VALUES ('old', 'c', 'web', 'home', NULL, 'model', false, 5)",
    "INSERT INTO slate_offers VALUES ('old', 'a', 1, 1.0, NULL, 1.0)",
]


def _migrated(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for statement in _OLD_TABLES:
            connection.execute(sa.text(statement))
    ledger = SqlLedger(url)
    columns = {c["name"]: c for c in sa.inspect(ledger.engine).get_columns("slate_offers")}
    assert columns["propensity"]["nullable"]
    old = ledger.slate("old")
    assert old is not None  # the old row kept, its 1.0 said for what it was: no draw
    assert [(o["offer_id"], o["rank"], o["propensity"]) for o in old["offers"]] == [("a", 1, None)]
    assert ledger.counts("served", ["c"], 0, 10, ["web"]) == {"c": 1}
    served = [ServedOffer("a", 1, 1.0, None), ServedOffer("b", 2, 0.5, None, 0.25)]
    _log(ledger, "new", 6, served, [ServedOffer("x", 1, 2.0, None)])
    new = ledger.slate("new")
    assert new is not None
    assert [o["propensity"] for o in new["offers"]] == [None, 0.25]
    assert [g["offer_id"] for g in new["ghosts"]] == ["x"]
    ledger.dispose()
    again = SqlLedger(url)  # a second start leaves the new rows as they are
    assert [o["propensity"] for o in again.slate("new")["offers"]] == [None, 0.25]  # type: ignore[index]
    again.dispose()
    engine.dispose()


def test_an_old_sqlite_ledger_is_migrated(tmp_path: Path) -> None:
    _migrated(f"sqlite:///{tmp_path / 'old.db'}")


def test_an_old_postgres_ledger_is_migrated(fresh_postgres: str) -> None:
    _migrated(fresh_postgres)


# -- the off-policy estimators ------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_world():  # type: ignore[no-untyped-def]
    world = make_world(ScenarioConfig(n_customers=20, n_days=40, seed=1))
    return {n: coerce_table(n, world.tables[n]) for n in TABLES}


def _estimate(tables, exposures):  # type: ignore[no-untyped-def]
    return off_policy_value(
        Snapshot.from_tables(tables),
        exposures,
        tables["outcomes"],
        NO_RULES,
        lambda s, requests, rows, offers: np.zeros(len(rows)),
        generator=CandidateGenerator(),
        start=pd.Timestamp("2000-01-01"),
        end=pd.Timestamp("2100-01-01"),
        bootstrap_samples=20,
    )


def test_estimators_refuse_deterministic_rows_with_a_reason(logged_world) -> None:  # type: ignore[no-untyped-def]
    exposures = logged_world["exposures"]
    period = int((~exposures["holdout"].astype(bool)).sum())
    assert period > 0
    # NULL propensities (the ledger's deterministic slates), or a deterministic flag
    for deterministic in (
        exposures.assign(propensity=np.nan),
        exposures.assign(propensity=1.0, deterministic=True),
    ):
        result = _estimate(logged_world, deterministic)
        assert result["available"] is False
        assert result["refused"] == {"deterministic": period}
        assert "logged by a deterministic policy" in result["reason"]
    # some rows drawn, some not: the drawn ones are used, the others counted as refused
    flagged = np.arange(len(exposures)) % 2 == 0
    mixed = exposures.assign(deterministic=flagged)
    result = _estimate(logged_world, mixed)
    refused = int((flagged & ~exposures["holdout"].astype(bool).to_numpy()).sum())
    assert result["available"] is True
    assert result["refused"] == {"deterministic": refused}
    assert result["logged_exposures"] == period - refused


# -- the review gate ----------------------------------------------------------------------


def test_review_previews_are_never_explored(small_workspace: Workspace, tmp_path: Path) -> None:
    """The review gate's frozen slates are the greedy ones, whatever the exploration."""
    from model_helpers import bundle_of
    from serving_helpers import CONFIG

    from features import load_snapshot
    from serving.review import Reviews, ReviewStore
    from training.config import load_config
    from training.pipeline import train

    rules = load_rules()
    config = load_config(None, **(CONFIG | {"n_estimators": 10, "bootstrap_samples": 10}))
    bundle = bundle_of(train(load_snapshot(small_workspace), rules, config), small_workspace, rules)
    frozen = []
    for name, extra in (("greedy", {}), ("exploring", {"exploration_rates": (("*", 1.0),)})):
        ledger = SqlLedger(f"sqlite:///{tmp_path / name}.db")
        store = ReviewStore(ledger.engine)
        store.add_user("rita", "reviewer-pass", "reviewer")
        settings = ServingSettings(holdout_share=0.0, exploration="epsilon", **extra)  # type: ignore[arg-type]
        challenger = build_recommender(
            settings, workspace=small_workspace, bundle=bundle, ledger=ledger
        )
        reviews = Reviews(store)
        review = reviews.review(reviews.open_review(challenger, None, actor="rita", sample=8))
        frozen.append(
            [
                (s["customer_id"], [o["offer_id"] for o in s["challenger"]["offers"]])
                for s in review["slates"]
            ]
        )
        ledger.dispose()
    assert frozen[0] == frozen[1] and sum(len(offers) for _, offers in frozen[0]) > 8
