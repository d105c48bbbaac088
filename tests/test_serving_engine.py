"""The recommender in process: explained, faithful, guarded, held out and logged."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import Served, recommender_for, train_and_register

from features import FEATURES, Requests
from serving.assembly import build_recommender
from serving.engine import Recommender, in_holdout
from serving.explain import NO_REASON


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("serve"))


def _recommender(served: Served, tmp_path: Path, **settings: object) -> Recommender:
    return recommender_for(served, tmp_path / "ledger.db", **settings)


def _customers(recommender: Recommender) -> list[str]:
    return sorted(recommender.known_customers())


def test_offers_are_ranked_explained_and_logged(served: Served, tmp_path: Path) -> None:
    recommender = _recommender(served, tmp_path)
    customer = _customers(recommender)[3]
    response = recommender.recommend(customer, channel="web", placement="home", k=3, debug=True)
    assert response["model"] == {
        "name": served.model_name,
        "version": served.version,
        "alias": "champion",
        "mode": "model",
    }
    offers = response["offers"]
    assert [o["rank"] for o in offers] == [1, 2, 3]
    # a reason with a positive contribution, or the honest fallback that says there is none
    assert all(o["because"].startswith(("Because ", NO_REASON)) for o in offers)
    assert any(o["because"].startswith("Because ") for o in offers)
    excluded = {e["offer_id"] for e in response["excluded"]}
    assert not excluded & {o["offer_id"] for o in offers}
    logged = recommender.ledger.slate(response["request_id"])
    assert logged is not None and [o["offer_id"] for o in logged["offers"]] == [
        o["offer_id"] for o in offers
    ]
    assert logged["model_version"] == served.version


def test_because_is_faithful_to_shap(served: Served, tmp_path: Path) -> None:
    recommender = _recommender(served, tmp_path)
    booster = recommender.model.bundle.booster  # type: ignore[union-attr]
    s = recommender.snapshot
    said = 0
    for customer in _customers(recommender)[:8]:
        response = recommender.recommend(customer, channel="web", k=3)
        builder = recommender.builder_for(recommender.now_s())
        requests = Requests.build(
            s,
            [customer],
            [response["as_of"]],
            channel=["web"],
            placement=["home"],
            moment=[None],
            page_product=[None],
            cart=[[]],
        )
        offers = s.offers.encode([o["offer_id"] for o in response["offers"]])
        matrix = builder.build(s, requests, np.zeros(len(offers), dtype=np.int64), offers)
        contributions = booster.predict(matrix.values, pred_contrib=True)
        raw = booster.predict(matrix.values, raw_score=True)
        for i, offer in enumerate(response["offers"]):
            shap = contributions[i, :-1]
            # all contributions plus the expected value sum to the raw score
            assert contributions[i].sum() == pytest.approx(raw[i], abs=1e-9)
            assert offer["raw_score"] == pytest.approx(raw[i], abs=1e-9)
            assert offer["expected_value"] == pytest.approx(contributions[i, -1], abs=1e-9)
            # the listed contributions are the largest positive ones, in order
            positive = [j for j in np.argsort(-shap, kind="stable") if shap[j] > 0]
            listed = [c["feature"] for c in offer["contributions"]]
            assert listed == [matrix.names[j] for j in positive[: len(listed)]]
            assert all(c["shap"] > 0 for c in offer["contributions"])
            # every reason is a feature with a positive contribution, in the order of the
            # contributions, at its value in the matrix; the sentence is exactly the reasons
            reasons = [r for r in offer["reasons"] if r["role"] == "reason"]
            columns = [matrix.names.index(r["feature"]) for r in reasons]
            assert all(shap[j] > 0 for j in columns)
            assert columns == sorted(columns, key=lambda j: -shap[j])
            for r, j in zip(reasons, columns, strict=True):
                assert r["value"] == float(matrix.values[i, j])
                assert r["shap"] == pytest.approx(shap[j], abs=1e-9)
            if reasons:
                said += len(reasons)
                texts = " and ".join(r["text"] for r in reasons)
                assert offer["because"] == f"Because {texts}."
            else:  # nothing passed off as the reason: at most one fact, said as a fact
                assert not offer["because"].startswith("Because")
                assert [r["role"] for r in offer["reasons"]] in ([], ["fact"])
    assert said  # the test would pass vacuously if nothing were ever said


def test_holdout_is_sticky_and_about_the_configured_share(served: Served, tmp_path: Path) -> None:
    keys = [f"customer-{i}" for i in range(20_000)]
    share = np.mean([in_holdout(k, "salt-a", 0.05) for k in keys])
    assert 0.045 < share < 0.055
    assert [in_holdout(k, "salt-a", 0.05) for k in keys[:500]] == [
        in_holdout(k, "salt-a", 0.05) for k in keys[:500]
    ]
    assert [in_holdout(k, "salt-a", 0.05) for k in keys[:2000]] != [
        in_holdout(k, "salt-b", 0.05) for k in keys[:2000]
    ]

    everyone = _recommender(served, tmp_path, holdout_share=1.0, holdout_control="nothing")
    customer = _customers(everyone)[0]
    response = everyone.recommend(customer, channel="web", k=3)
    assert response["holdout"] is True and response["offers"] == []
    ghost = everyone.ledger.slate(response["request_id"])
    assert ghost is not None and ghost["holdout"] and len(ghost["offers"]) == 3
    control = _recommender(served, tmp_path, holdout_share=1.0, holdout_control="rules_only")
    answer = control.recommend(customer, channel="web", k=3)
    assert answer["holdout"] is True and len(answer["offers"]) == 3


def test_page_views_never_starve_a_slate_and_offer_caps_rotate(
    served: Served, tmp_path: Path
) -> None:
    """50 requests for one customer on web/home in one moment (the fixed data clock): every
    slate is full, and the per-offer cap (3 a day) rotates what is shown."""
    recommender = _recommender(served, tmp_path)
    customer = _customers(recommender)[5]
    eligible = recommender.recommend(customer, channel="web", k=3, debug=True, log_exposure=False)
    assert eligible["eligible"] >= 20  # enough to rotate through
    slates = [recommender.recommend(customer, channel="web", k=3) for _ in range(50)]
    assert all(len(slate["offers"]) == 3 for slate in slates)
    shown = [o["offer_id"] for slate in slates for o in slate["offers"]]
    early = shown[:30]  # the first 10 slates: no offer more than its cap of 3
    assert max(early.count(o) for o in set(early)) <= 3
    assert len(set(shown)) >= 20  # without rotation it would be the same 3 offers 50 times
    again = recommender.recommend(customer, channel="web", k=3, debug=True)
    assert len(again["offers"]) == 3 and len(again["rotated"]) >= 20


def test_sends_are_capped_per_channel_and_in_total_by_real_id(
    served: Served, tmp_path: Path
) -> None:
    recommender = _recommender(served, tmp_path)
    customer = _customers(recommender)[5]
    # empty slates (every offer held out here) reached nobody: they are never sends
    nothing = _recommender(served, tmp_path, offer_holdout_share=1.0)
    assert all(not nothing.recommend(customer, channel="email")["offers"] for _ in range(4))
    for _ in range(3):
        assert recommender.recommend(customer, channel="email", k=2)["offers"]
    capped = recommender.recommend(customer, channel="email", k=2, debug=True)
    assert capped["offers"] == []
    assert all("frequency_cap_channel" in e["reasons"] for e in capped["excluded"])
    # a second recommender on the same database (another worker) sees the same caps
    other = _recommender(served, tmp_path)
    assert other.recommend(customer, channel="email", k=2)["offers"] == []
    # the web is no send: still served
    assert len(other.recommend(customer, channel="web", k=2)["offers"]) == 2
    # customers the snapshot does not know are capped as themselves, not as one 'UNKNOWN'
    for _ in range(3):
        assert recommender.recommend("newcomer-1", channel="email", k=2)["offers"]
    assert recommender.recommend("newcomer-1", channel="email", k=2)["offers"] == []
    assert recommender.recommend("newcomer-2", channel="email", k=2)["offers"]


def test_a_rules_only_holdout_is_shown_so_its_sends_are_capped(
    served: Served, tmp_path: Path
) -> None:
    """A holdout whose control is the rules-only ranking really receives its slates: they
    count, as anyone's (only the 'nothing' control's ghost slates are shown to nobody)."""
    control = _recommender(served, tmp_path, holdout_share=1.0, holdout_control="rules_only")
    customer = _customers(control)[5]
    for _ in range(3):
        answer = control.recommend(customer, channel="email", k=2)
        assert answer["holdout"] and answer["offers"]
    assert control.recommend(customer, channel="email", k=2)["offers"] == []
    ghosts = _recommender(served, tmp_path, holdout_share=1.0, holdout_control="nothing")
    other = _customers(ghosts)[6]
    for _ in range(5):  # logged with the would-be slate, shown to nobody: never a send
        assert ghosts.recommend(other, channel="email", k=2)["offers"] == []
    sends = ghosts.ledger.counts("sends", [customer, other], 0, 2**40, ["email"])
    assert sends == {customer: 3}


def test_features_of_every_candidate_when_a_rule_reads_them(served: Served, tmp_path: Path) -> None:
    """With compatibility_required on, features are built for every candidate first (the
    rule reads them) and the ranked rows are taken from that matrix: the slate is the
    compatible offers' best, each with its true because."""
    import yaml

    from policy import load_rules

    rules = load_rules().model_dump(mode="json")
    for rule in rules["rules"]:
        if rule["type"] == "compatibility_required":
            rule["kinds"] = ["item", "bundle"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    strict = _recommender(served, tmp_path, rules_path=path)
    assert strict.model.rules.needs_features
    plain = _recommender(served, tmp_path)
    for customer in _customers(strict)[:20]:
        answer = strict.recommend(customer, channel="web", k=5, debug=True, log_exposure=False)
        excluded = {e["offer_id"]: e["reasons"] for e in answer["excluded"]}
        assert not {o["offer_id"] for o in answer["offers"]} & set(excluded)
        # each offer is scored and explained as its own row, whichever others remain: the
        # same score and because as under the plain rules, in the same order
        loose = plain.recommend(customer, channel="web", k=25, debug=True, log_exposure=False)
        theirs = {o["offer_id"]: o for o in loose["offers"]}
        both = [o for o in answer["offers"] if o["offer_id"] in theirs]
        assert both, customer
        for offer in both:
            assert offer["score"] == theirs[offer["offer_id"]]["score"]
            assert offer["because"] == theirs[offer["offer_id"]]["because"]
        order = [o["offer_id"] for o in loose["offers"]]
        assert [order.index(o["offer_id"]) for o in both] == sorted(
            order.index(o["offer_id"]) for o in both
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_at_once_cannot_both_pass_a_cap(
    served: Served, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two workers (two recommenders, two connection pools, one ledger) serve one customer
    at the same moment with one send left under the cap: exactly one slate goes out."""
    import threading

    from serving.ledger import SqlLedger

    url = (
        f"sqlite:///{tmp_path / 'shared.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("fresh_postgres")
    )
    workers = [_recommender(served, tmp_path, db_url=url) for _ in range(2)]
    customer = _customers(workers[0])[9]
    for _ in range(2):
        assert workers[0].recommend(customer, channel="email", k=2)["offers"]
    both_checked = threading.Barrier(2, timeout=30)
    for worker in workers:  # both have passed eligibility before either logs
        real = worker.ledger.log_slates

        def log_after_both(slates, limits=None, real=real):  # type: ignore[no-untyped-def]
            both_checked.wait()
            return real(slates, limits)

        worker.ledger.log_slates = log_after_both  # type: ignore[method-assign]
    answers: list[dict] = []
    threads = [
        threading.Thread(
            target=lambda w=w: answers.append(w.recommend(customer, channel="email", k=2))
        )
        for w in workers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reader = SqlLedger(url)
    sends = reader.counts("sends", [customer], 0, 2**40, ["email"])
    for ledger in (reader, *(w.ledger for w in workers)):  # before the database is dropped
        ledger.dispose()
    assert sorted(len(a["offers"]) for a in answers) == [0, 2]
    assert sends == {customer: 3}


def test_a_decline_starts_the_cooldown(served: Served, tmp_path: Path) -> None:
    recommender = _recommender(served, tmp_path)
    customer = _customers(recommender)[7]
    first = recommender.recommend(customer, channel="web", k=1)
    offer = first["offers"][0]["offer_id"]
    assert recommender.ledger.record_feedback(
        request_id=first["request_id"],
        offer_id=offer,
        outcome="declined",
        value=None,
        at_s=recommender.now_s(),
    )
    assert not recommender.ledger.record_feedback(
        request_id=first["request_id"],
        offer_id=offer,
        outcome="declined",
        value=None,
        at_s=recommender.now_s(),
    )
    again = recommender.recommend(customer, channel="app", k=3, debug=True)
    assert offer not in {o["offer_id"] for o in again["offers"]}
    reasons = {e["offer_id"]: e["reasons"] for e in again["excluded"]}
    assert "declined_cooldown" in reasons[offer]
    with pytest.raises(LookupError, match="did not serve offer"):
        recommender.ledger.record_feedback(
            request_id=first["request_id"], offer_id="nope", outcome="accepted", value=None, at_s=0
        )
    # a customer the snapshot does not know cools down as themself, not as 'UNKNOWN'
    stranger = recommender.recommend("stranger-1", channel="web", k=1)
    declined = stranger["offers"][0]["offer_id"]
    recommender.ledger.record_feedback(
        request_id=stranger["request_id"],
        offer_id=declined,
        outcome="declined",
        value=None,
        at_s=recommender.now_s(),
    )
    later = recommender.recommend("stranger-1", channel="web", k=3, debug=True)
    assert "declined_cooldown" in {e["offer_id"]: e["reasons"] for e in later["excluded"]}[declined]
    other = recommender.recommend("stranger-2", channel="web", k=1)
    assert other["offers"][0]["offer_id"] == declined


def test_cold_start_and_rules_only(served: Served, tmp_path: Path) -> None:
    recommender = _recommender(served, tmp_path)
    cold = recommender.recommend("never-seen-before", channel="web", k=3)
    assert cold["model"]["mode"] == "cold_start"
    # ranked by 30-day popularity alone, and says so with the count (no segment: the
    # customer is unknown)
    for offer in cold["offers"]:
        assert re.fullmatch(
            r"Because we have no orders from you yet, we show what sells most: customers "
            r"bought .+ (once|twice|[\d,]+ times) in the last 30 days\.",
            offer["because"],
        ), offer["because"]
        assert [r["feature"] for r in offer["reasons"]] == ["offer_popularity_30d"]
    no_model = build_recommender(
        replace(recommender.settings, db_url=f"sqlite:///{tmp_path / 'other.db'}"),
        workspace=served.workspace,
        bundle=None,
        snapshot=recommender.snapshot,
    )
    answer = no_model.recommend(_customers(recommender)[2], channel="web", k=3)
    assert answer["model"] == {
        "name": served.model_name,
        "version": None,
        "alias": None,
        "mode": "rules_only",
    }
    assert len(answer["offers"]) == 3


def test_registry_phrases_cover_the_because_features() -> None:
    phrased = [spec for spec in FEATURES if spec.claims]
    assert len(phrased) >= 20
    for spec in phrased:
        for claim in spec.claims:
            # every claim is conditioned on the feature's own value, declared as data
            assert any(c.quantity == "value" for c in claim.when), spec.name
            assert spec.because is not None and claim.template in spec.because


def test_a_used_up_budget_serves_the_ranked_slate_with_short_true_becauses(
    served: Served, tmp_path: Path
) -> None:
    """The latency budget: past it, the same ranked slate comes at once with a stated fact
    for its because (no SHAP), and the answer says so; within it, the SHAP because."""
    within = recommender_for(served, tmp_path / "within.db")
    used_up = recommender_for(served, tmp_path / "used_up.db", budget_ms=0.0)
    for customer in _customers(within)[:4]:
        full = within.recommend(customer, channel="web", placement="home", k=3)
        short = used_up.recommend(customer, channel="web", placement="home", k=3)
        assert full["budget_exceeded"] is False and short["budget_exceeded"] is True
        assert [o["offer_id"] for o in short["offers"]] == [o["offer_id"] for o in full["offers"]]
        assert [o["score"] for o in short["offers"]] == [o["score"] for o in full["offers"]]
        for offer in short["offers"]:
            assert offer["contributions"] == [] and "raw_score" not in offer
            assert offer["because"].startswith("One of our current offers"), offer["because"]
            assert all(r["role"] == "fact" and r["shap"] is None for r in offer["reasons"])
        assert any(o["contributions"] for o in full["offers"])


def test_the_budget_counts_each_request_s_wait_in_the_service(
    served: Served, tmp_path: Path
) -> None:
    """Requests served together (the service's coalescing) each bring the time they
    waited for the thread: one that waited past the budget goes short, the ones that did
    not keep their SHAP because, in the same call. Without waits, the call's customers
    share its work's budgets as before."""
    budget_ms = 10_000.0  # no call here works that long; the waits decide
    within = recommender_for(served, tmp_path / "within.db", budget_ms=budget_ms)
    together = recommender_for(served, tmp_path / "together.db", budget_ms=budget_ms)
    customers = _customers(within)[:4]
    waited_s = [0.0, 20.0, 0.5, 10.001]  # by hand: the second and the fourth are past it
    answers = together.recommend_many(
        customers, channel="web", placement="home", k=3, waited_s=waited_s
    )
    assert [a["budget_exceeded"] for a in answers] == [False, True, False, True]
    for customer, answer in zip(customers, answers, strict=True):
        full = within.recommend(customer, channel="web", placement="home", k=3)
        offers = [o["offer_id"] for o in answer["offers"]]
        assert offers == [o["offer_id"] for o in full["offers"]]
        becauses = [o["because"] for o in answer["offers"]]
        if answer["budget_exceeded"]:
            assert all(b.startswith("One of our current offers") for b in becauses), becauses
        else:
            assert becauses == [o["because"] for o in full["offers"]]
    plain = together.recommend_many(customers, channel="web", placement="home", k=3)
    assert [a["budget_exceeded"] for a in plain] == [False] * 4
    with pytest.raises(ValueError, match="waited_s has 2 values for 4 customers"):
        together.recommend_many(customers, channel="web", k=3, waited_s=[0.0, 0.0])
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="finite and not negative"):
            together.recommend_many(customers, channel="web", k=3, waited_s=[0.0, bad, 0, 0])


def test_the_budget_warning_is_one_line_then_one_per_interval_with_the_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under overload every request may go short: the first time says so at once, the
    next ones within 10 s are counted, not logged, and the next line gives their count."""
    from serving import engine

    clock = [100.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: clock[0])
    budget_log = engine._BudgetLog(150.0, every_s=10.0)
    caplog.set_level(logging.WARNING, logger="nextbest.serving")
    budget_log.used_up(1, 200.0, 1)
    for at in (101.0, 105.0, 109.9):
        clock[0] = at
        budget_log.used_up(2, 300.0, 4)
    clock[0] = 112.0
    budget_log.used_up(3, 400.0, 8)
    lines = [r.getMessage() for r in caplog.records if "latency budget" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "1 customer(s) served with short becauses (the last call" in lines[0]
    # by hand: 2 + 2 + 2 counted in between, and the 3 of the call that logs
    assert "9 customer(s) served with short becauses in the last 12 s" in lines[1], lines[1]
