"""The review page over HTTP, in process: sessions, CSRF, every form, and the release that
moves champion and what /recommend serves. (tests/test_review_browser.py drives the same
page in Chromium against a real `nextbest serve`.)"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serving_helpers import Served, forget_bentoml_metrics, train_and_register

from serving.ledger import SqlLedger
from serving.review import ReviewStore


@dataclass
class Site:
    client: Any
    served: Served
    challenger: str
    store: ReviewStore


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    from starlette.testclient import TestClient

    from serving.service import NextBest

    home = tmp_path_factory.mktemp("review-web")
    served = train_and_register(home)  # version 1, champion
    challenger = train_and_register(home, champion=False, seed=4).version
    db_url = f"sqlite:///{home / 'ledger.db'}"
    store = ReviewStore(SqlLedger(db_url).engine)
    store.add_user("rita", "reviewer-pass", "reviewer")
    store.add_user("alan", "approver-pass", "approver")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEXTBEST_HOME", str(home))
        patch.setenv("NEXTBEST_WORKSPACE", str(served.workspace.path))
        patch.setenv("NEXTBEST_DB_URL", db_url)
        patch.setenv("NEXTBEST_HOLDOUT_SHARE", "0")
        patch.setenv("NEXTBEST_RELOAD_SECONDS", "3600")  # only the page's own sync moves it
        patch.setenv("BENTOML_HOME", str(home / "bentoml"))
        forget_bentoml_metrics()
        with TestClient(NextBest.to_asgi(), follow_redirects=False) as client:
            yield Site(client, served, challenger, store)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def _sign_in(client: Any, username: str, password: str) -> str:
    """Sign in through the form (login CSRF from its cookie); the session's CSRF token."""
    client.cookies.clear()
    form = client.get("/review/login")
    response = client.post(
        "/review/login",
        data={
            "username": username,
            "password": password,
            "csrf": _csrf(form.text),
            "next": "/review/",
        },
    )
    assert response.status_code == 303, response.text
    return _csrf(client.get("/review/").text)


def test_signed_out_visitors_are_sent_to_sign_in_and_their_forms_refused(site: Site) -> None:
    client = site.client
    client.cookies.clear()
    for page in ("/review/", "/review/audit", "/review/audit.csv", "/review/anything"):
        response = client.get(page)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/review/login?next=")
    for form in ("/review/x/release", "/review/x/decide", "/review/open", "/review/logout"):
        response = client.post(form, data={"csrf": "guess", "decision": "approve"})
        assert response.status_code == 401 and "Sign in first" in response.text
    assert client.get("/review/static/review.css").status_code == 200
    login = client.get("/review/login")
    assert login.status_code == 200 and 'type="password"' in login.text
    assert "script" not in login.text.lower()  # no JavaScript
    assert "frame-ancestors 'none'" in login.headers["content-security-policy"]


def test_sign_in_sets_an_httponly_samesite_cookie_and_audits(site: Site) -> None:
    client = site.client
    client.cookies.clear()
    form = client.get("/review/login")
    token = _csrf(form.text)
    data = {"username": "rita", "password": "wrong-password", "csrf": token, "next": "/review/"}
    wrong = client.post("/review/login", data=data)
    assert wrong.status_code == 401 and "Unknown user or wrong password." in wrong.text
    forged = client.post(
        "/review/login", data=data | {"password": "reviewer-pass", "csrf": "forged"}
    )
    assert forged.status_code == 403 and "expired" in forged.text
    form = client.get("/review/login")
    good = client.post(
        "/review/login",
        data=data | {"password": "reviewer-pass", "csrf": _csrf(form.text)},
    )
    assert good.status_code == 303 and good.headers["location"] == "/review/"
    cookie = next(
        c for c in good.headers.get_list("set-cookie") if c.startswith("nextbest_review=")
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/review/" in cookie
    raw = cookie.split(";")[0].split("=", 1)[1]
    with site.store.engine.connect() as connection:
        stored = connection.exec_driver_sql("select token_hash from review_sessions").all()
    assert stored and all(raw != row[0] for row in stored)  # only a hash is kept
    actions = [(e["actor"], e["action"]) for e in site.store.audit_log()]
    assert ("rita", "sign_in_failed") in actions and ("rita", "sign_in") in actions
    # a signed-in visitor skips the form; an open redirect is not followed
    assert client.get("/review/login").headers["location"] == "/review/"
    client.cookies.clear()
    form = client.get("/review/login")
    away = client.post(
        "/review/login",
        data=data
        | {"password": "reviewer-pass", "csrf": _csrf(form.text), "next": "https://evil/"},
    )
    assert away.headers["location"] == "/review/"
    for target in ("//evil.example/", "/\\evil.example", "/review/../\\evil", "javascript:x"):
        client.cookies.clear()
        form = client.get("/review/login")
        away = client.post(
            "/review/login",
            data=data | {"password": "reviewer-pass", "csrf": _csrf(form.text), "next": target},
        )
        assert away.headers["location"] == "/review/", target
    client.cookies.clear()
    client.get("/review/login")
    odd = client.post("/review/login", data=data | {"csrf": "é"})
    assert odd.status_code == 403  # any text a client sends is compared, none crashes


def test_forms_need_the_session_csrf_token_and_sign_out_ends_the_session(site: Site) -> None:
    client = site.client
    csrf = _sign_in(client, "rita", "reviewer-pass")
    before = len(site.store.audit_log())
    for token in ("", "not-the-token"):
        response = client.post(
            "/review/open", data={"csrf": token, "version": site.challenger, "sample": 3}
        )
        assert response.status_code == 403 and "did not come from your page" in response.text
    response = client.post("/review/open", data={"csrf": "é", "version": site.challenger})
    assert response.status_code == 403
    assert len(site.store.audit_log()) == before  # nothing happened
    cookie = client.cookies.get("nextbest_review")
    assert client.post("/review/logout", data={"csrf": csrf}).status_code == 303
    client.cookies.set("nextbest_review", cookie, path="/review/")  # replay the old cookie
    assert client.get("/review/").status_code == 303


def test_review_release_by_page_moves_champion_and_what_recommend_serves(site: Site) -> None:
    from mlflow import MlflowClient

    from runtime.registry import (
        BEATS_BASELINE_TAG,
        CHAMPION,
        QUALITY_SUMMARY_TAG,
        set_version_tags,
    )

    client = site.client
    csrf = _sign_in(client, "rita", "reviewer-pass")
    listing = client.get("/review/")
    assert f"Open review of v{site.challenger}" in listing.text
    opened = client.post(
        "/review/open",
        data={"csrf": csrf, "version": site.challenger, "sample": 6, "k": 2, "threshold": 0.5},
    )
    assert opened.status_code == 303
    path = opened.headers["location"]
    review_id = path.rsplit("/", 1)[1]
    page = client.get(path)
    assert page.status_code == 200
    assert f"Review of version {site.challenger}" in page.text
    assert f"Champion, version {site.served.version}" in page.text
    assert page.text.count('<table class="shap"') >= 6  # a SHAP chart per model offer
    assert 'class="up"' in page.text and "Eligibility trace" in page.text
    review = _review(site, review_id)
    assert review["threshold"] == 0.2  # the service's setting; the form cannot change it
    slates = review["slates"]
    first = slates[0]
    offer = first["challenger"]["offers"][0]["offer_id"]

    def decide(**form: Any) -> Any:
        return client.post(f"/review/{review_id}/decide", data={"csrf": csrf} | form)

    # 'other' needs a comment: refused with a message, nothing recorded
    decide(slate=first["slate_no"], offer=offer, decision="reject", reason="other")
    assert "needs a comment" in client.get(path).text
    assert _review(site, review_id)["counts"]["decided"] == 0
    decide(slate=first["slate_no"], offer=offer, decision="reject", reason="wrong_timing")
    second = first["challenger"]["offers"][1]["offer_id"]
    comment = "<script>alert(1)</script> & too soon"
    decide(
        slate=first["slate_no"], offer=second, decision="reject", reason="other", comment=comment
    )
    shown = client.get(path).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; too soon" in shown
    assert "<script>" not in shown
    invalid = decide(slate="abc", offer=offer, decision="approve")
    assert invalid.status_code == 400 and "Not understood" in invalid.text
    for slate in slates:
        client.post(
            f"/review/{review_id}/approve-slate", data={"csrf": csrf, "slate": slate["slate_no"]}
        )
    counts = _review(site, review_id)["counts"]
    assert counts["decided"] == counts["items"] and counts["rejected"] == 2

    # a reviewer cannot release, even with a valid session and token
    refused = client.post(
        f"/review/{review_id}/release", data={"csrf": csrf, "decision": "approve"}
    )
    assert refused.status_code == 403 and "Only an approver" in refused.text
    champion = MlflowClient().get_model_version_by_alias(site.served.model_name, CHAMPION)
    assert str(champion.version) == site.served.version

    # this version did not beat its best baseline: the page says so, and a release
    # without the approver's explicit override is refused
    set_version_tags(
        site.served.model_name,
        site.challenger,
        {BEATS_BASELINE_TAG: "false", QUALITY_SUMMARY_TAG: "served-slate NDCG@10 margin -0.01"},
    )
    csrf = _sign_in(client, "alan", "approver-pass")
    page = client.get(path).text
    assert "Approve release" in page and "does not beat its best baseline" in page
    assert 'name="override_baseline"' in page
    plain = client.post(f"/review/{review_id}/release", data={"csrf": csrf, "decision": "approve"})
    assert plain.status_code == 303 and "tick the override" in client.get(path).text
    released = client.post(
        f"/review/{review_id}/release",
        data={"csrf": csrf, "decision": "approve", "override_baseline": "yes"},
    )
    assert released.status_code == 303
    assert "is the champion and now serves" in client.get(path).text
    version = MlflowClient().get_model_version(site.served.model_name, site.challenger)
    assert "champion" in version.aliases
    assert version.tags["review.by"] == "alan" and version.tags["review.rejected"] == "2"
    assert version.tags["review.baseline_override"] == "alan"
    again = client.post(f"/review/{review_id}/release", data={"csrf": csrf, "decision": "reject"})
    assert again.status_code == 303 and "is already approved" in client.get(path).text
    assert (
        "champion"
        in MlflowClient().get_model_version(site.served.model_name, site.challenger).aliases
    )
    served = client.post("/recommend", json={"customer_id": first["customer_id"], "channel": "web"})
    assert served.json()["model"]["version"] == site.challenger  # at once, not at a tick

    audit = client.get("/review/audit")
    assert "release" in audit.text and "wrong_timing" in audit.text
    exported = client.get("/review/audit.csv")
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["action"] for r in rows] == [e["action"] for e in site.store.audit_log()]
    assert {"open_review", "decide", "release"} <= {r["action"] for r in rows}


def test_a_block_from_the_page_takes_effect_for_serving(site: Site) -> None:
    client = site.client
    csrf = _sign_in(client, "rita", "reviewer-pass")
    segment_customer = next(
        (c, s)
        for c, s in _customer_segments(site).items()
        if client.post("/recommend", json={"customer_id": c, "channel": "web"}).json()["offers"]
    )
    customer, segment = segment_customer
    shown = client.post("/recommend", json={"customer_id": customer, "channel": "web"}).json()
    offer = shown["offers"][0]["offer_id"]
    review_id = _any_review(site, csrf)
    unknown = client.post(
        f"/review/{review_id}/block",
        data={"csrf": csrf, "offer": "no-such-offer", "segment": segment, "reason": "x"},
    )
    assert unknown.status_code == 303 and "There is no offer" in client.get("/review/").text
    missing_reason = client.post(
        f"/review/{review_id}/block",
        data={"csrf": csrf, "offer": offer, "segment": segment, "reason": " "},
    )
    assert missing_reason.status_code == 303 and "Say why" in client.get("/review/").text
    client.post(
        f"/review/{review_id}/block",
        data={"csrf": csrf, "offer": offer, "segment": segment, "reason": "not for them"},
    )
    after = client.post(
        "/recommend", json={"customer_id": customer, "channel": "web", "debug": True}
    ).json()
    assert offer not in [o["offer_id"] for o in after["offers"]]
    assert "blocked_for_segment" in _reasons(after, offer)
    client.post(
        "/review/unblock",
        data={"csrf": csrf, "offer": offer, "segment": segment, "back": "/review/"},
    )
    again = client.post(
        "/recommend", json={"customer_id": customer, "channel": "web", "debug": True}
    ).json()
    assert "blocked_for_segment" not in _reasons(again, offer)
    assert [e["action"] for e in site.store.audit_log()][-2:] == ["block", "unblock"]


def _reasons(response: dict[str, Any], offer: str) -> list[str]:
    return [r for e in response["excluded"] if e["offer_id"] == offer for r in e["reasons"]]


def _review(site: Site, review_id: str) -> dict[str, Any]:
    from serving.review import Reviews

    return Reviews(site.store).review(review_id)


def _any_review(site: Site, csrf: str) -> str:
    from serving.review import Reviews

    if not Reviews(site.store).list_reviews():
        data = {"csrf": csrf, "version": site.challenger, "sample": 3, "k": 1}
        assert site.client.post("/review/open", data=data).status_code == 303
    return str(Reviews(site.store).list_reviews()[0]["review_id"])


def _customer_segments(site: Site) -> dict[str, str]:
    import pandas as pd

    customers = pd.read_parquet(Path(site.served.workspace.path) / "customers.parquet")
    known = customers.dropna(subset=["segment"])
    return dict(zip(known["customer_id"].astype(str), known["segment"].astype(str), strict=True))


def test_the_page_says_its_database_is_unavailable_instead_of_a_500(site: Site) -> None:
    """The ledger's SQLite file moved away (as deleted): the review page answers a 503 page
    that says so, and nothing is written into a new empty file; moved back, it works."""
    client = site.client
    _sign_in(client, "rita", "reviewer-pass")
    ledger = site.served.workspace.path.parent / "ledger.db"  # the fixture's home
    away = ledger.with_name("ledger.db.away")
    ledger.rename(away)
    try:
        page = client.get("/review/")
        assert page.status_code == 503, page.text[:500]
        assert "The review database is unavailable" in page.text
        assert "Traceback" not in page.text
        assert not ledger.exists()
    finally:
        away.rename(ledger)
    # restored: the ledger's recovery (a probe a second) finds the same file again
    deadline = time.monotonic() + 20
    while (status := client.get("/review/").status_code) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200
