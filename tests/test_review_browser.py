"""The review gate in a real browser: Debian's Chromium, driven by Playwright, against a
real `nextbest serve` (the storefront API and the review page on one service).

A reviewer signs in, opens a review of the challenger, approves items, rejects one with a
reason and blocks an offer for a segment; a reviewer's release is refused; an approver
releases. Then champion has moved, /recommend serves the new version, and the blocked
offer is gone for every customer of that segment. Signed-out visitors are refused too.

The screenshot of the review page goes to the test's folder, and also to
``$NEXTBEST_SCREENSHOTS`` when set (that is how docs/review-page.png is made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serving_helpers import Served, free_port, nextbest_serve, running, train_and_register
from typer.testing import CliRunner

from nextbest.cli import app

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("NEXTBEST_CHROMIUM", "/usr/bin/chromium"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Server:
    base: str
    served: Served
    challenger: str
    env: dict[str, str]


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("browser")
    served = train_and_register(home)  # version 1: the champion
    # version 2, to review: a different model on the same world (so that slates change)
    challenger = train_and_register(
        home, champion=False, random_state=7, negatives_per_group=10, num_leaves=7
    ).version
    env = os.environ | {
        "NEXTBEST_HOME": str(home),
        "BENTOML_HOME": str(home / "bentoml"),
        "NEXTBEST_DB_URL": f"sqlite:///{home / 'ledger.db'}",
        "NEXTBEST_HOLDOUT_SHARE": "0",
        "NEXTBEST_RELOAD_SECONDS": "30",  # the page applies its own changes at once
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    runner = CliRunner()
    for user, role, password in (
        ("rita", "reviewer", "reviewer-pass"),
        ("alan", "approver", "approver-pass"),
    ):
        result = runner.invoke(
            app,
            ["review", "add-user", user, "--role", role, "--password-stdin"],
            input=password + "\n",
            env=env,
        )
        assert result.exit_code == 0, result.output
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = nextbest_serve(served.workspace, port, "--no-example")
    with running(command, env, f"{base}/readyz", home / "serve.log"):
        yield Server(base=base, served=served, challenger=challenger, env=env)


@pytest.fixture
def browser_context(tmp_path: Path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir for every run
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def _sign_in(page: Any, base: str, username: str, password: str) -> None:
    page.goto(f"{base}/review/")
    assert "/review/login" in page.url
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/review/")


def test_review_in_the_browser_releases_the_model_and_blocks_serve(
    server: Server, browser_context: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    from runtime.registry import CHAMPION, configure_tracking

    base, version = server.base, server.challenger
    page = browser_context.new_page()

    # Signed out: the page sends you to sign in, and an action is refused.
    page.goto(f"{base}/review/")
    expect(page.get_by_role("heading", name="Sign in to review")).to_be_visible()
    refused = browser_context.request.post(
        f"{base}/review/any/release", form={"csrf": "x", "decision": "approve"}
    )
    assert refused.status == 401

    # A reviewer opens a review of the challenger from the list of versions.
    _sign_in(page, base, "rita", "reviewer-pass")
    row = page.locator("tr", has=page.get_by_role("button", name=f"Open review of v{version}"))
    row.get_by_label("Customers").fill("6")
    row.get_by_label("Offers each").fill("2")
    row.get_by_role("button", name=f"Open review of v{version}").click()
    expect(page.get_by_role("heading", name=f"Review of version {version}")).to_be_visible()
    review_url = page.url.split("#")[0]
    assert page.locator("table.shap").count() >= 6  # a SHAP chart per explained offer
    assert page.get_by_text(f"Champion, version {server.served.version}").count() == 6

    # Reject a recommendation with a reason, and another with 'other', a comment and the
    # Enter key (which must reject, not approve).
    offers = page.locator("section.slate").first.locator(".challenger li.offer")
    offers.first.get_by_label("Reason").select_option(label="Wrong timing")
    offers.first.get_by_role("button", name=re.compile("^Reject ")).click()
    expect(offers.first.locator("p.decision")).to_have_text("Rejected: Wrong timing by rita")
    offers.nth(1).get_by_label("Reason").select_option(label="Other (say why)")
    offers.nth(1).get_by_label("Comment").fill("Too soon <after> the last visit")
    offers.nth(1).get_by_label("Comment").press("Enter")
    expect(offers.nth(1).locator("p.decision")).to_have_text(
        "Rejected: Other (say why) (“Too soon <after> the last visit”) by rita"
    )

    # Block an offer for a segment (a customer with a known segment and an offer).
    slate = page.locator(
        "section.slate:not([data-segment=''])", has=page.locator(".challenger li.offer")
    )
    slate = slate.nth(0)
    segment = slate.get_attribute("data-segment")
    customer = slate.get_by_role("heading", level=2).inner_text().split("Customer ", 1)[1]
    target = slate.locator(".challenger li.offer").last
    blocked = target.get_attribute("data-offer")
    target.locator("summary", has_text="Block this offer").click()
    target.get_by_label("Why block it").fill("Not for this segment")
    target.get_by_role("button", name=re.compile("^Block ")).click()
    expect(page.get_by_role("status")).to_contain_text(f"Blocked {blocked} for the segment")

    # Approve one item on its own, then the rest slate by slate.
    undecided = page.locator(".challenger li.offer:not(.approved):not(.rejected)").first
    offer = undecided.get_attribute("data-offer")
    undecided.get_by_role("button", name=re.compile("^Approve ")).click()
    expect(page.locator(f'li.offer[data-offer="{offer}"]').first).to_have_class(
        re.compile("approved")
    )
    expect(page.locator("#release")).to_be_attached()  # the new page, parsed to its end
    button = {"role": "button", "name": "undecided in this slate"}
    pending = [
        slate.get_attribute("data-slate")
        for slate in page.locator("section.slate").all()
        if slate.get_by_role(**button).count()
    ]
    for number in pending:
        rest = page.locator(f"#slate-{number}").get_by_role(**button)
        rest.click()
        expect(rest).to_have_count(0)  # true only once the page after the post is shown
    expect(page.locator("#release li.ok").first).to_contain_text("every item reviewed")
    expect(page.locator("#release")).to_contain_text("An approver makes the release decision.")

    # A reviewer's release is refused, with a valid session and CSRF token.
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    refused = browser_context.request.post(
        f"{review_url}/release", form={"csrf": token, "decision": "approve"}
    )
    assert refused.status == 403 and "Only an approver" in refused.text()

    # An approver signs in and releases.
    page.get_by_role("button", name="Sign out").click()
    _sign_in(page, base, "alan", "approver-pass")
    page.goto(review_url)
    shot = tmp_path / "review-page.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("NEXTBEST_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["NEXTBEST_SCREENSHOTS"]) / "review-page.png")
    # the version did not beat its best baseline (set here): the approver ticks the override
    from runtime.registry import BEATS_BASELINE_TAG, set_version_tags

    set_version_tags(server.served.model_name, version, {BEATS_BASELINE_TAG: "false"})
    page.goto(review_url)
    expect(page.locator("#baseline-warning")).to_contain_text("does not beat its best baseline")
    page.get_by_label("Release it anyway").check()
    page.get_by_role("button", name=f"Approve release: make version {version} the champion").click()
    expect(page.get_by_role("status")).to_contain_text(
        f"Released: version {version} is the champion and now serves."
    )

    # Champion moved, /recommend serves it, and the block holds for the whole segment.
    monkeypatch.setenv("NEXTBEST_HOME", server.env["NEXTBEST_HOME"])
    configure_tracking()
    champion = MlflowClient().get_model_version_by_alias(server.served.model_name, CHAMPION)
    assert str(champion.version) == version
    assert champion.tags["review.by"] == "alan" and champion.tags["review.rejected"] == "2"
    answer = _post(f"{base}/recommend", {"customer_id": customer, "channel": "web", "debug": True})
    assert answer["model"]["version"] == version
    assert blocked not in [o["offer_id"] for o in answer["offers"]]
    reasons = [r for e in answer["excluded"] if e["offer_id"] == blocked for r in e["reasons"]]
    assert "blocked_for_segment" in reasons
    import pandas as pd

    customers = pd.read_parquet(server.served.workspace.path / "customers.parquet")
    members = customers.loc[customers["segment"] == segment, "customer_id"].astype(str)
    assert len(members) > 1
    for member in members:
        for channel in ("web", "app"):
            body = {"customer_id": member, "channel": channel, "k": 10}
            offers = _post(f"{base}/recommend", body)["offers"]
            assert blocked not in [o["offer_id"] for o in offers], member

    # The audit log shows it all, and exports.
    page.get_by_role("link", name="Audit log").click()
    for action in ("open_review", "decide", "block", "release"):
        expect(page.get_by_role("cell", name=action, exact=True).first).to_be_visible()
    csv = browser_context.request.get(f"{base}/review/audit.csv")
    assert csv.status == 200 and csv.text().startswith("entry,at,actor,action,target")
