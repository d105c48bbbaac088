"""Opening a review, deciding every item, and the release decision that moves champion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from serving_helpers import Served, train_and_register

from runtime.registry import BEATS_BASELINE_TAG, configure_tracking, set_version_tags
from serving.assembly import build_recommender
from serving.engine import Recommender
from serving.ledger import SqlLedger
from serving.review import AccessError, ReleaseError, Reviews, ReviewStore
from serving.settings import ServingSettings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return train_and_register(tmp_path_factory.mktemp("review"), champion=False)


def _setup(
    served: Served, tmp_path: Path, db_url: str | None = None, *, beats: str = "true"
) -> tuple[Reviews, Recommender]:
    """A review gate on a fresh ledger. The version's baseline verdict is set by hand:
    by default it beat its best baseline (the tests of the other conditions)."""
    configure_tracking()
    set_version_tags(served.model_name, served.version, {BEATS_BASELINE_TAG: beats})
    ledger = SqlLedger(db_url or f"sqlite:///{tmp_path / 'ledger.db'}")
    store = ReviewStore(ledger.engine)
    store.add_user("rita", "reviewer-pass", "reviewer")
    store.add_user("alan", "approver-pass", "approver")
    challenger = build_recommender(
        ServingSettings(holdout_share=0.0),
        workspace=served.workspace,
        version=served.version,
        ledger=ledger,
    )
    return Reviews(store), challenger


def test_review_opens_a_stratified_frozen_sample(served: Served, tmp_path: Path) -> None:
    reviews, challenger = _setup(served, tmp_path)
    review_id = reviews.open_review(challenger, None, actor="rita", sample=12, k=2)
    review = reviews.review(review_id)
    assert review["status"] == "open" and review["version"] == served.version
    slates = review["slates"]
    assert len(slates) == 12
    assert sum(s["cold_start"] for s in slates) == 1
    assert len({s["segment"] for s in slates if not s["cold_start"]}) > 2
    assert {s["channel"] for s in slates} == {"web", "app", "email"}
    first = slates[0]["challenger"]
    assert first["offers"] and "excluded" in first  # the eligibility trace is frozen too
    assert all(
        o["because"].startswith("Because") and o["decision"] is None for o in first["offers"]
    )
    assert review["counts"] == {
        "items": sum(len(s["challenger"]["offers"]) for s in slates),
        "decided": 0,
        "rejected": 0,
        "rejection_rate": 0.0,
    }
    with pytest.raises(AccessError):
        reviews.open_review(challenger, None, actor="mallory", sample=3)


def test_release_needs_every_item_a_low_rejection_rate_and_an_approver(
    served: Served, tmp_path: Path
) -> None:
    reviews, challenger = _setup(served, tmp_path)
    review_id = reviews.open_review(challenger, None, actor="rita", sample=6, k=2)
    items = [
        (s["slate_no"], o["offer_id"])
        for s in reviews.review(review_id)["slates"]
        for o in s["challenger"]["offers"]
    ]
    with pytest.raises(ReleaseError, match=f"{len(items)} of {len(items)} items are not"):
        reviews.release(review_id, approve=True, actor="alan")
    with pytest.raises(ValueError, match="a rejection needs a reason"):
        reviews.decide(review_id, *items[0], "reject", actor="rita")
    with pytest.raises(ValueError, match="'other' needs a comment"):
        reviews.decide(review_id, *items[0], "reject", actor="rita", reason="other")
    reviews.decide(review_id, *items[0], "reject", actor="rita", reason="wrong_timing")
    reviews.decide(review_id, *items[0], "approve", actor="rita")  # changed their mind
    for item in items[1:]:
        reviews.decide(review_id, *item, "approve", actor="rita")
    reviews.decide(review_id, *items[1], "reject", actor="rita", reason="irrelevant")
    with pytest.raises(AccessError, match="'rita' is not an approver"):
        reviews.release(review_id, approve=True, actor="rita")
    client = MlflowClient()
    outcome = reviews.release(review_id, approve=True, actor="alan")
    assert outcome["status"] == "approved" and outcome["rejected"] == 1
    assert str(client.get_model_version_by_alias(served.model_name, "champion").version) == (
        served.version
    )
    tags = client.get_model_version(served.model_name, served.version).tags
    assert tags["review.by"] == "alan" and tags["review.status"] == "approved"
    assert tags["review.items"] == str(len(items)) and tags["review.rejected"] == "1"
    with pytest.raises(ReleaseError, match="already approved"):
        reviews.release(review_id, approve=False, actor="alan")
    actions = [e["action"] for e in reviews.store.audit_log()]
    assert actions.count("decide") == len(items) + 2 and actions[-1] == "release"
    client.delete_registered_model_alias(served.model_name, "champion")


def test_a_high_rejection_rate_blocks_release_and_rejection_leaves_champion(
    served: Served, tmp_path: Path
) -> None:
    reviews, challenger = _setup(served, tmp_path)
    review_id = reviews.open_review(challenger, None, actor="rita", sample=3, k=2, threshold=0.2)
    for slate in reviews.review(review_id)["slates"]:
        for offer in slate["challenger"]["offers"]:
            reviews.decide(
                review_id,
                slate["slate_no"],
                offer["offer_id"],
                "reject",
                actor="rita",
                reason="inappropriate",
            )
    with pytest.raises(ReleaseError, match="rejection rate 100% is not under the threshold 20%"):
        reviews.release(review_id, approve=True, actor="alan")
    outcome = reviews.release(review_id, approve=False, actor="alan")
    assert outcome["status"] == "rejected"
    client = MlflowClient()
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias(served.model_name, "champion")
    assert (
        client.get_model_version(served.model_name, served.version).tags["review.status"]
        == "rejected"
    )


def test_approval_is_refused_when_the_champion_changed_since_the_review_opened(
    served: Served, tmp_path: Path
) -> None:
    reviews, challenger = _setup(served, tmp_path)
    review_id = reviews.open_review(challenger, None, actor="rita", sample=3, k=1)
    for slate in reviews.review(review_id)["slates"]:
        reviews.approve_rest(review_id, slate["slate_no"], actor="rita")
    client = MlflowClient()
    client.set_registered_model_alias(served.model_name, "champion", served.version)
    try:  # someone released this version elsewhere after the reviewers compared with none
        with pytest.raises(ReleaseError, match=r"champion changed .* \(then none, now "):
            reviews.release(review_id, approve=True, actor="alan")
        assert reviews.review(review_id)["status"] == "open"  # the claim was undone
    finally:
        client.delete_registered_model_alias(served.model_name, "champion")
    assert reviews.release(review_id, approve=True, actor="alan")["status"] == "approved"
    client.delete_registered_model_alias(served.model_name, "champion")


@pytest.fixture(params=["sqlite", "postgresql"])
def on_db(
    request: pytest.FixtureRequest, served: Served, tmp_path: Path
) -> Iterator[tuple[Reviews, Recommender]]:
    """The review gate on SQLite and on a fresh PostgreSQL database."""
    url = (
        f"sqlite:///{tmp_path / 'ledger.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("fresh_postgres"))
    )
    reviews, challenger = _setup(served, tmp_path, url)
    yield reviews, challenger
    reviews.store.engine.dispose()


def _all_approved(reviews: Reviews, challenger: Recommender) -> str:
    review_id = reviews.open_review(challenger, None, actor="rita", sample=3, k=1)
    for slate in reviews.review(review_id)["slates"]:
        reviews.approve_rest(review_id, slate["slate_no"], actor="rita")
    return review_id


def test_nothing_interleaves_with_a_release_in_progress(
    on_db: tuple[Reviews, Recommender], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the registry is being updated, a decision, a second release decision and a
    new review of the same version are all refused."""
    reviews, challenger = on_db
    review_id = _all_approved(reviews, challenger)
    slate = reviews.review(review_id)["slates"][0]
    offer = slate["challenger"]["offers"][0]["offer_id"]
    meanwhile: list[str] = []
    real_tag = MlflowClient.set_model_version_tag

    def tag_and_interfere(self: MlflowClient, *args: object) -> None:
        if not meanwhile:
            for attempt in (
                lambda: reviews.decide(
                    review_id, slate["slate_no"], offer, "approve", actor="rita"
                ),
                lambda: reviews.release(review_id, approve=False, actor="alan"),
                lambda: reviews.open_review(challenger, None, actor="rita", sample=3, k=1),
            ):
                try:
                    attempt()
                    meanwhile.append("allowed")
                except ValueError as error:
                    meanwhile.append(str(error))
        real_tag(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", tag_and_interfere)
    try:
        assert reviews.release(review_id, approve=True, actor="alan")["status"] == "approved"
        assert "is releasing, not open" in meanwhile[0]
        assert f"review {review_id} is already releasing" in meanwhile[1]
        assert "already has an open review" in meanwhile[2]
        actions = [e["action"] for e in reviews.store.audit_log() if e["target"] == review_id]
        assert actions[-2:] == ["release_started", "release"]
    finally:
        MlflowClient().delete_registered_model_alias(challenger.model_name, "champion")


def test_a_registry_failure_leaves_the_review_open_and_untagged(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews, challenger = _setup(served, tmp_path)
    review_id = _all_approved(reviews, challenger)

    def unreachable(*_: object) -> None:
        raise ConnectionError("registry unreachable")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", unreachable)
    with pytest.raises(ReleaseError, match=r"registry unreachable.*nothing was released"):
        reviews.release(review_id, approve=True, actor="alan")
    assert reviews.review(review_id)["status"] == "open"
    tags = MlflowClient().get_model_version(served.model_name, served.version).tags
    assert tags.get("review.id") != review_id  # this attempt's tags were taken back
    failed = [e for e in reviews.store.audit_log() if e["action"] == "release_failed"]
    assert failed and "registry unreachable" in failed[-1]["after"]
    monkeypatch.undo()
    assert reviews.release(review_id, approve=True, actor="alan")["status"] == "approved"
    MlflowClient().delete_registered_model_alias(served.model_name, "champion")


def test_an_interrupted_release_is_resolved_from_the_registry(
    served: Served, tmp_path: Path
) -> None:
    from datetime import datetime

    from serving.review.reviews import reviews as review_table

    reviews, challenger = _setup(served, tmp_path)
    review_id = _all_approved(reviews, challenger)
    with reviews.store.engine.begin() as connection:  # the process died mid-release
        connection.execute(review_table.update().values(status="releasing"))
        connection.execute(  # and another version's review waits for its release decision
            review_table.insert().values(
                review_id="other",
                model_name=served.model_name,
                version="999",
                status="open",
                threshold=0.2,
                created_by="rita",
                created_at=datetime(2026, 1, 1),
            )
        )
    with pytest.raises(ReleaseError, match=f"review {review_id} is being released"):
        reviews.release("other", approve=False, actor="alan")
    assert reviews.resolve(review_id, actor="alan") == "open"  # champion never moved
    with reviews.store.engine.begin() as connection:
        connection.execute(
            review_table.update()
            .where(review_table.c.review_id == review_id)
            .values(status="releasing")
        )
    MlflowClient().set_registered_model_alias(served.model_name, "champion", served.version)
    try:  # this time the alias had moved before the process died
        assert reviews.resolve(review_id, actor="alan") == "approved"
    finally:
        MlflowClient().delete_registered_model_alias(served.model_name, "champion")


def test_two_release_decisions_at_once_release_once(
    served: Served, on_db: tuple[Reviews, Recommender]
) -> None:
    import threading

    reviews, challenger = on_db
    review_id = _all_approved(reviews, challenger)
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def decide(approve: bool) -> None:
        start.wait()
        try:
            outcomes.append(reviews.release(review_id, approve=approve, actor="alan")["status"])
        except ReleaseError as error:
            outcomes.append(str(error))

    threads = [threading.Thread(target=decide, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [o for o in outcomes if o in ("approved", "rejected")]
    assert len(done) == 1, outcomes
    assert any("already" in o or "being released" in o for o in outcomes), outcomes
    final = reviews.review(review_id)["status"]
    assert final == done[0]
    tag = MlflowClient().get_model_version(served.model_name, served.version).tags
    assert tag["review.status"] == final and tag["review.id"] == review_id
    releases = [e["action"] for e in reviews.store.audit_log() if e["target"] == review_id]
    assert [a for a in releases if a in ("release", "reject_release")] == [
        "release" if final == "approved" else "reject_release"
    ]
    if final == "approved":
        MlflowClient().delete_registered_model_alias(served.model_name, "champion")


def test_review_open_command(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from nextbest.cli import app

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("NEXTBEST_HOME", str(served.home))
    monkeypatch.setenv("NEXTBEST_DB_URL", url)
    store = ReviewStore(SqlLedger(url).engine)
    store.add_user("rita", "reviewer-pass", "reviewer")
    runner = CliRunner()
    args = [
        "review",
        "open",
        "--version",
        served.version,
        "--sample",
        "4",
        "-w",
        str(served.workspace.path),
    ]
    refused = runner.invoke(app, [*args, "--as", "nobody"])
    assert refused.exit_code == 2 and "unknown user 'nobody'" in refused.stderr
    monkeypatch.setenv("NEXTBEST_REVIEWER", "rita")  # the default for --as
    opened = runner.invoke(app, args)
    assert opened.exit_code == 0, opened.output
    review_id = opened.stdout.strip()
    listed = Reviews(store).list_reviews()
    assert [r["review_id"] for r in listed] == [review_id]
    assert len(Reviews(store).review(review_id)["slates"]) == 4


def test_a_version_that_does_not_beat_its_baseline_needs_an_audited_override(
    served: Served, tmp_path: Path
) -> None:
    reviews, challenger = _setup(served, tmp_path, beats="false")
    review_id = reviews.open_review(challenger, None, actor="rita", sample=3, k=2)
    assert reviews.quality(review_id)["beats"] is False
    for slate in reviews.review(review_id)["slates"]:
        for offer in slate["challenger"]["offers"]:
            reviews.decide(review_id, slate["slate_no"], offer["offer_id"], "approve", actor="rita")
    with pytest.raises(ReleaseError, match="does not beat its best baseline"):
        reviews.release(review_id, approve=True, actor="alan")
    client = MlflowClient()
    with pytest.raises(Exception, match="alias"):
        client.get_model_version_by_alias(served.model_name, "champion")
    assert reviews.review(review_id)["status"] == "open"
    outcome = reviews.release(review_id, approve=True, actor="alan", override_baseline=True)
    assert outcome["status"] == "approved"
    tags = client.get_model_version(served.model_name, served.version).tags
    assert tags["review.baseline_override"] == "alan"
    started = [e for e in reviews.store.audit_log() if e["action"] == "release_started"]
    assert "baseline_override" in str(started[-1]["after"])
    client.delete_registered_model_alias(served.model_name, "champion")
    client.delete_model_version_tag(served.model_name, served.version, "review.baseline_override")
