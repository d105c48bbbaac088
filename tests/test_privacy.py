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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("privacy-home"))


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


def test_the_ledger_records_a_slate_without_personalisation_as_such(
    consent_case: tuple[Recommender, list[str], pd.Timestamp],
) -> None:
    recommender, customers, _ = consent_case
    answer = recommender.recommend(customers[1], channel=CHANNEL, k=3)
    logged = recommender.ledger.slate(answer["request_id"])
    assert logged is not None and logged["mode"] == "non_personal"
