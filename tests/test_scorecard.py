"""The scorecard (issue 12, item 3): attach rates, lift with a customer-bootstrap interval,
CUPED, the observational mode, the CLI's HTML and JSON, and the report in Chromium.

Oracles are independent: counts written by hand for hand-made frames, CUPED recomputed
with a least-squares fit, planted lifts in a seeded synthetic frame, and the interval's
coverage over many simulated experiments."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# the browser and its flags, as the review page's browser test drives it
from test_review_browser import CHROMIUM, FLAGS
from typer.testing import CliRunner

from features.contract import coerce_table, empty_table
from measurement.scorecard import (
    CONTROL,
    EXPOSED,
    ScorecardInputs,
    build_scorecard,
    cuped,
    measure,
    offer_cycles,
    opportunities,
    rate_lift,
)
from nextbest.cli import app

MONDAY = pd.Timestamp("2025-01-06")  # a Monday: the first weekly cycle starts here
DAY = pd.Timedelta(days=1)


def _table(name: str, rows: list[dict[str, object]]) -> pd.DataFrame:
    return coerce_table(name, pd.DataFrame(rows)) if rows else empty_table(name)


def _hand_made() -> ScorecardInputs:
    """One item offer (product P1, margin 5) and one category offer (no products: category
    'Tea', products T1, T2). Week 1: A, B, E exposed, C, D control (holdout ghosts).
    Orders: A buys P1 on day 2 (in the window), B on day 10 (too late), E on day 7 (the
    window's last moment), C on day 1, D buys P2 (not the offer's). Week 2: A exposed to the
    category offer and buys T2 on day 9 (day 2 of week 2); C control, buys nothing."""
    customers = _table("customers", [{"customer_id": c, "segment": "s" + c} for c in "ABCDE"])
    products = _table(
        "products",
        [
            {"product_id": "P1", "category": "Coffee", "price": 10.0, "cost": 6.0},
            {"product_id": "P2", "category": "Coffee", "price": 10.0, "cost": 6.0},
            {"product_id": "T1", "category": "Tea", "price": 4.0},
            {"product_id": "T2", "category": "Tea", "price": 4.0},
        ],
    )
    offers = _table(
        "offers",
        [
            {"offer_id": "item", "kind": "item", "product_ids": ["P1"], "margin": 5.0},
            {"offer_id": "tea", "kind": "category", "product_ids": [], "category": "Tea"},
        ],
    )
    shown = MONDAY + pd.Timedelta(hours=9)

    def exposure(i: str, customer: str, offer: str, at: pd.Timestamp, holdout: bool) -> dict:
        return {
            "exposure_id": i,
            "customer_id": customer,
            "offer_id": offer,
            "shown_at": at,
            "channel": "web",
            "placement": "home",
            "holdout": holdout,
        }

    exposures = _table(
        "exposures",
        [
            exposure("e1", "A", "item", shown, False),
            exposure("e2", "B", "item", shown, False),
            exposure("e3", "E", "item", shown, False),
            exposure("g1", "C", "item", shown, True),
            exposure("g2", "D", "item", shown, True),
            exposure("e4", "A", "tea", shown + 7 * DAY, False),
            exposure("g3", "C", "tea", shown + 7 * DAY, True),
        ],
    )

    def line(order: str, customer: str, product: str, at: pd.Timestamp) -> dict:
        return {
            "order_id": order,
            "customer_id": customer,
            "product_id": product,
            "ordered_at": at,
            "quantity": 1.0,
            "amount": 10.0,
        }

    orders = _table(
        "orders",
        [
            line("o1", "A", "P1", shown + 2 * DAY),
            line("o2", "B", "P1", shown + 10 * DAY),
            line("o3", "E", "P1", shown + 7 * DAY),
            line("o4", "C", "P1", shown + DAY),
            line("o5", "D", "P2", shown + DAY),
            line("o6", "A", "T2", shown + 9 * DAY),
        ],
    )
    outcomes = _table(
        "outcomes",
        [
            {
                "customer_id": "A",
                "offer_id": "item",
                "outcome": "accepted",
                "occurred_at": shown + DAY,
                "exposure_id": "e1",
            }
        ],
    )
    return ScorecardInputs(exposures, outcomes, orders, offers, customers, products)


def test_hand_made_attach_rates_lift_and_margin() -> None:
    cycles = offer_cycles(_hand_made(), resamples=200, seed=1)
    item = cycles[cycles["offer_id"] == "item"].iloc[0]
    assert item["week_start"] == MONDAY
    assert (item["n_exposed"], item["n_control"]) == (3, 2)
    # A and E convert (E on the window's last moment), B too late; C converts, D bought P2
    assert item["attach_exposed"] == pytest.approx(2 / 3)
    assert item["attach_control"] == pytest.approx(1 / 2)
    assert item["lift"] == pytest.approx(2 / 3 - 1 / 2)
    assert item["lift_low"] <= item["lift"] <= item["lift_high"]
    # the offer's margin (5) per converted opportunity
    assert item["margin_uplift"] == pytest.approx(5 * 2 / 3 - 5 * 1 / 2)
    tea = cycles[cycles["offer_id"] == "tea"].iloc[0]
    assert tea["week_start"] == MONDAY + 7 * DAY
    # a category offer converts on any product of its category (T2); no product has a cost
    assert (tea["attach_exposed"], tea["attach_control"], tea["lift"]) == (1.0, 0.0, 1.0)
    assert np.isnan(tea["margin_uplift"]) and np.isnan(tea["margin_low"])


def test_hand_made_scorecard_figures_and_feedback() -> None:
    card = build_scorecard(_hand_made(), resamples=200, by=("offer", "segment"))
    figures = {f.name: f for f in card.figures}
    attach = figures["attach_rate"]
    assert (attach.n_exposed, attach.n_control) == (4, 3)
    assert attach.exposed == pytest.approx(3 / 4) and attach.control == pytest.approx(1 / 3)
    # feedback: A's accepted outcome follows e1; that is 1 of 4 exposures
    assert figures["conversion_per_exposure"].exposed == pytest.approx(1 / 4)
    # margin unknown for the tea offer: said so, not invented
    margin = figures["margin_per_opportunity"]
    assert margin.lift is None and "cost" in (margin.reason or "")
    # first purchase ever in the offer's category (item: P1's Coffee) within the window:
    # exposed A (Coffee day 2), E (day 7), A (Tea day 2 of week 2), not B (day 10): 3 of 4;
    # control C (Coffee day 1), D (P2 is Coffee too, day 1), not C for Tea: 2 of 3
    expansion = figures["category_expansion_rate"]
    assert expansion.exposed == pytest.approx(3 / 4)
    assert expansion.control == pytest.approx(2 / 3)
    assert figures["days_to_secondary_purchase"].exposed == pytest.approx(2.0)
    by_offer = card.by["offer"].set_index("offer")
    assert by_offer.loc["item", "attach_exposed"] == pytest.approx(2 / 3)
    payload = card.to_json()
    json.dumps(payload)  # plain JSON: no NaN, no timestamps
    assert payload["design"] == "holdout"
    cohort = {f["name"]: f for f in payload["revenue"]}["cohort_value_90d"]
    assert cohort["lift"] is None and "span" in cohort["reason"]


def test_ledger_rows_already_exported_are_counted_once() -> None:
    inputs = _hand_made()
    ledger = pd.DataFrame(
        {
            "opportunity_id": ["e1", "ledger:r9:item"],  # e1: already in the workspace
            "customer_id": ["A", "D"],
            "offer_id": ["item", "item"],
            "at": [MONDAY, MONDAY],
            "arm": [EXPOSED, CONTROL],
            "channel": ["web", "web"],
            "placement": ["home", "home"],
            "request_id": ["r1", "r9"],
        }
    )
    opps = opportunities(inputs.exposures, ledger)
    assert len(opps) == len(inputs.exposures) + 1
    assert opps["opportunity_id"].is_unique


def test_observational_mode_compares_mailed_with_not_mailed() -> None:
    inputs = _hand_made()
    mailed = inputs.exposures[~inputs.exposures["holdout"]].reset_index(drop=True)
    card = build_scorecard(
        ScorecardInputs(
            mailed,
            inputs.outcomes,
            inputs.orders,
            inputs.offers,
            inputs.customers,
            inputs.products,
        ),
        resamples=100,
    )
    assert card.design == "observational"
    assert any("NOT CAUSAL" in note for note in card.notes)
    item = card.cycles[card.cycles["offer_id"] == "item"].iloc[0]
    # never mailed the item offer: C and D; C bought P1 the next day, D did not
    assert (item["n_exposed"], item["n_control"]) == (3, 2)
    assert item["attach_control"] == pytest.approx(1 / 2)


def test_cuped_matches_an_independent_least_squares_recomputation() -> None:
    rng = np.random.default_rng(3)
    n = 400
    x = rng.gamma(2.0, 50.0, n)
    exposed = rng.random(n) < 0.5
    y = 0.8 * x + 10 * exposed + rng.normal(0, 20, n)
    result = cuped(y, x, exposed, resamples=300, seed=0)
    slope = np.linalg.lstsq(np.column_stack([np.ones(n), x]), y, rcond=None)[0][1]
    assert result["theta"] == pytest.approx(slope)
    adjusted = pd.Series(y - slope * (x - x.mean()))
    by_arm = adjusted.groupby(exposed).mean()
    assert result["cuped"] == pytest.approx(by_arm[True] - by_arm[False])
    assert result["raw"] == pytest.approx(y[exposed].mean() - y[~exposed].mean())
    reduction = 1 - adjusted.var(ddof=0) / np.var(y)
    assert result["variance_reduction"] == pytest.approx(reduction)
    assert result["variance_reduction"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    # the adjustment narrows the interval, and both cover the planted 10
    assert result["high"] - result["low"] < result["raw_high"] - result["raw_low"]
    assert result["low"] <= 10 <= result["high"]


def _clustered(rng: np.random.Generator, n_customers: int, lift: float) -> pd.DataFrame:
    """Customers with 1-8 opportunities each, a customer-level arm and a customer-level
    propensity to convert (so opportunities of one customer are correlated)."""
    counts = rng.integers(1, 9, n_customers)
    customer = np.repeat(np.arange(n_customers), counts)
    arm_exposed = rng.random(n_customers) < 0.5
    base = rng.beta(1.0, 6.0, n_customers)
    p = np.clip(base[customer] + lift * arm_exposed[customer], 0, 1)
    return pd.DataFrame(
        {
            "customer_id": customer.astype(str),
            "arm": np.where(arm_exposed[customer], EXPOSED, CONTROL),
            "converted": rng.random(len(customer)) < p,
        }
    )


def test_cluster_bootstrap_interval_covers_about_95_percent() -> None:
    rng = np.random.default_rng(11)
    covered, replications = 0, 200
    for i in range(replications):
        frame = _clustered(rng, 120, 0.05)
        table = rate_lift(
            frame, pd.Series(0, index=frame.index), "converted", resamples=200, seed=i
        )
        covered += bool(table["low"].iloc[0] <= 0.05 <= table["high"].iloc[0])
    assert 0.89 <= covered / replications <= 0.99


def _planted_world(lifts: dict[str, float], seed: int = 5) -> ScorecardInputs:
    rng = np.random.default_rng(seed)
    n = 1500
    names = [f"C{i:04d}" for i in range(n)]
    holdout = rng.random(n) < 0.5
    base = rng.beta(2.0, 12.0, n)
    exposures, orders = [], []
    for week in range(2):
        for offer, lift in lifts.items():
            seen = rng.integers(0, 3, n)  # 0-2 requests per customer, offer and week
            for c in np.flatnonzero(seen):
                for k in range(seen[c]):
                    at = MONDAY + pd.Timedelta(weeks=week, days=int(rng.integers(0, 5)), hours=k)
                    exposures.append(
                        {
                            "exposure_id": f"{offer}:{week}:{c}:{k}",
                            "customer_id": names[c],
                            "offer_id": offer,
                            "shown_at": at,
                            "channel": "web",
                            "holdout": bool(holdout[c]),
                        }
                    )
                    p = base[c] + (0 if holdout[c] else lift)
                    if rng.random() < p:
                        orders.append(
                            {
                                "order_id": f"o{len(orders)}",
                                "customer_id": names[c],
                                "product_id": f"P-{offer}",
                                # within the window of this opportunity and of no later one
                                # of the same customer and offer (those come a day on)
                                "ordered_at": at + pd.Timedelta(minutes=30),
                                "quantity": 1.0,
                                "amount": 12.0,
                            }
                        )
    return ScorecardInputs(
        _table("exposures", exposures),
        empty_table("outcomes"),
        _table("orders", orders),
        _table(
            "offers",
            [{"offer_id": o, "kind": "item", "product_ids": [f"P-{o}"]} for o in lifts],
        ),
        _table("customers", [{"customer_id": c} for c in names]),
        _table("products", [{"product_id": f"P-{o}"} for o in lifts]),
    )


def test_planted_lifts_fall_inside_their_intervals() -> None:
    lifts = {"winner": 0.10, "flat": 0.0, "loser": -0.06}
    inputs = _planted_world(lifts)
    cycles = offer_cycles(inputs, resamples=500, seed=2)
    assert len(cycles) == 2 * len(lifts)
    for row in cycles.itertuples():
        assert row.lift_low <= lifts[row.offer_id] <= row.lift_high, row
    winner = cycles[cycles["offer_id"] == "winner"]
    assert (winner["lift_low"] > 0).all()  # the winner is told from zero


def test_measure_does_not_modify_its_inputs() -> None:
    inputs = _hand_made()
    before = inputs.exposures.copy()
    opps = opportunities(inputs.exposures)
    kept = opps.copy()
    measure(opps, inputs)
    pd.testing.assert_frame_equal(inputs.exposures, before)
    pd.testing.assert_frame_equal(opps, kept)


def test_unknown_grouping_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="cannot group by 'colour': use one of offer"):
        build_scorecard(_hand_made(), by=("colour",), resamples=20)


@pytest.fixture(scope="module")
def small_report(small_workspace, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("scorecard") / "report.html"
    result = CliRunner().invoke(
        app,
        [
            "scorecard",
            "--workspace",
            str(small_workspace.path),
            "--weeks",
            "8",  # leaves the 120-day world a pre-period for CUPED
            "--resamples",
            "200",
            "--by",
            "tenure",
            "--by",
            "segment",
            "--by",
            "channel",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_cli_writes_html_and_json_with_the_same_numbers(small_report) -> None:  # type: ignore[no-untyped-def]
    out, payload = small_report
    assert payload["design"] == "holdout"  # the small world logs a 5 % holdout as ghosts
    figures = {f["name"]: f for f in payload["figures"]}
    attach = figures["attach_rate"]
    assert attach["n_control"] > 0 and attach["low"] <= attach["lift"] <= attach["high"]
    assert set(payload["by"]) >= {"tenure", "segment", "channel"}
    assert payload["cycles"] and set(payload["cycles"][0]) >= {"lift_low", "margin_uplift"}
    assert {row["week_start"] for row in payload["weekly"]} == {
        row["week_start"] for row in payload["cycles"]
    }
    assert len(payload["weekly"]) == 8
    revenue = {f["name"]: f for f in payload["revenue"]}
    per_customer = revenue["incremental_revenue_per_customer"]
    assert per_customer["reason"] is None  # the 8 weeks before are the pre-period
    assert 0 <= per_customer["extra"]["variance_reduction"] < 1
    assert revenue["cohort_value_90d"]["lift"] is None  # 8 weeks do not span 90 days
    page = out.read_text()
    assert f"{attach['lift']:.4g}" in page
    assert page.count("src='data:image/png;base64,") >= 3


@pytest.mark.slow
def test_report_opens_in_chromium_with_its_plots_and_nothing_external(
    small_report, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    out, _ = small_report
    requested: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1200, "height": 1400},
        )
        try:
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(out.as_uri())
            assert page.title() == "nextbest scorecard"
            images = page.locator("img")
            assert images.count() >= 3
            for i in range(images.count()):
                # each plot decoded and laid out: a real picture, not a broken link
                assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 100")
            alts = [images.nth(i).get_attribute("alt") for i in range(images.count())]
            assert {"lift per week", "attach rate by segment", "attach rate by channel"} <= set(
                alts
            )
            assert page.locator("script").count() == 0
            assert page.locator("link[rel=stylesheet]").count() == 0
            shot = tmp_path / "scorecard.png"
            page.screenshot(path=str(shot))
        finally:
            context.close()
    external = [u for u in requested if not re.match(r"^(file:|data:)", u)]
    assert external == []
    if os.environ.get("NEXTBEST_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["NEXTBEST_SCREENSHOTS"]) / "scorecard.png")


def _seconds(moment: pd.Timestamp) -> int:
    return int((moment - pd.Timestamp(0)).total_seconds())


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    url: str = request.getfixturevalue("fresh_postgres")
    return url


def test_ledger_opportunities_are_read_and_counted_once_after_export(
    ledger_url: str, tmp_path: Path
) -> None:
    from features.workspace import write_workspace
    from measurement.scorecard import load_inputs
    from serving.export import export_ledger
    from serving.ledger import GHOST_MODE, ServedOffer, SqlLedger

    given = _hand_made()
    workspace = write_workspace(
        tmp_path / "ws",
        {
            "exposures": given.exposures,
            "outcomes": given.outcomes,
            "orders": given.orders,
            "offers": given.offers,
            "customers": given.customers,
            "products": given.products,
        },
        source={"name": "hand-made"},
    )
    at = _seconds(MONDAY + pd.Timedelta(hours=10))
    ledger = SqlLedger(ledger_url)
    try:

        def slate(request: str, customer: str, mode: str, ghosts: tuple[str, ...] = ()) -> None:
            def offer(offer_id: str) -> ServedOffer:
                return ServedOffer(offer_id=offer_id, rank=1, score=1.0, probability=0.5)

            ledger.log_slate(
                request_id=request,
                customer_id=customer,
                channel="web",
                placement="home",
                model_version="1",
                mode=mode,
                holdout=mode == GHOST_MODE,
                at_s=at,
                offers=[offer("item")],
                ghosts=[offer(g) for g in ghosts],
            )

        # B is served the item offer (B's order of P1 on day 10 is too late for it); D's
        # holdout slate is a ghost; E is served the item and the tea offer is a ghost
        slate("r1", "B", "model")
        slate("r2", "D", GHOST_MODE)
        slate("r3", "E", "model", ghosts=("tea",))
        ledger.record_feedback(
            request_id="r1", offer_id="item", outcome="accepted", value=None, at_s=at + 60
        )
    finally:
        ledger.dispose()

    def counts() -> tuple[int, int, float]:
        card = build_scorecard(load_inputs(workspace.path, ledger_url), resamples=50)
        figures = {f.name: f for f in card.figures}
        attach, feedback = figures["attach_rate"], figures["conversion_per_exposure"]
        assert attach.n_exposed is not None and attach.n_control is not None
        assert feedback.exposed is not None
        return attach.n_exposed, attach.n_control, feedback.exposed

    # workspace 4 exposed + 3 control; ledger r1, r3 item exposed; r2 item, r3 tea control
    before = counts()
    assert before[:2] == (4 + 2, 3 + 2)
    assert before[2] == pytest.approx(2 / 6)  # e1's and r1's accepted feedback
    export_ledger(ledger_url, workspace)
    assert counts() == pytest.approx(before)  # exported rows are not counted twice


def test_return_rate_of_cross_sold_items_against_control_conversions() -> None:
    given = _hand_made()
    card = build_scorecard(given, resamples=20)
    missing = {f.name: f for f in card.figures}["return_rate"]
    assert missing.exposed is None and "no returns" in (missing.reason or "")
    returned = pd.concat(
        [
            given.orders,
            _table(
                "orders",
                [
                    {
                        "order_id": "r1",
                        "customer_id": "A",
                        "product_id": "P1",
                        "ordered_at": MONDAY + 5 * DAY,  # A's P1 of day 2, brought back
                        "quantity": -1.0,
                        "amount": -10.0,
                    }
                ],
            ),
        ],
        ignore_index=True,
    )
    inputs = ScorecardInputs(
        given.exposures, given.outcomes, returned, given.offers, given.customers, given.products
    )
    rate = {f.name: f for f in build_scorecard(inputs, resamples=20).figures}["return_rate"]
    # cross-sold: A's item (returned), E's item, A's tea; baseline: C's item (kept)
    assert (rate.n_exposed, rate.n_control) == (3, 1)
    assert rate.exposed == pytest.approx(1 / 3) and rate.control == 0.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--by", "colour"], "cannot group by 'colour': use one of offer"),
        (["--db-url", "sqlite:////nonexistent/ledger.db"], "no ledger at"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(small_workspace, extra, message) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(
        app, ["scorecard", "--workspace", str(small_workspace.path), "--resamples", "10", *extra]
    )
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_scorecard_judges_parity_per_group_by_hand() -> None:
    """Two groups of two customers, counted by hand: both had 3 of their 5 opportunities
    shown (exposure 0.6 each); group x converted 2 of its 3 offers shown, group y 1 of 3
    (acceptance parity 0.5, a breach of the four-fifths rule); lift by customer means:
    x (1/2 + 1) / 2 - (1 + 0) / 2 = 0.25, y (0 + 1) / 2 - (1 + 1) / 2 = -0.5."""
    from measurement.scorecard import fairness_table
    from policy.fairness import judge
    from policy.rules import FairnessSettings

    rows = [  # customer, arm, converted
        ("c1", "exposed", True),
        ("c1", "exposed", False),
        ("c1", "control", True),
        ("c2", "exposed", True),
        ("c2", "control", False),
        ("c3", "exposed", False),
        ("c3", "exposed", False),
        ("c3", "control", True),
        ("c4", "exposed", True),
        ("c4", "control", True),
    ]
    measured = pd.DataFrame(rows, columns=["customer_id", "arm", "converted"])
    customers = pd.DataFrame({"customer_id": ["c1", "c2", "c3", "c4"], "age_band": list("xxyy")})
    settings = FairnessSettings(attributes=["age_band"], min_group_size=1, max_p_value=None)
    report = judge(fairness_table(measured, customers, settings.attributes), settings)
    table = report.table().set_index("group")
    assert table.loc["x", "exposure_rate"] == pytest.approx(0.6)
    assert table.loc["y", "exposure_rate"] == pytest.approx(0.6)
    assert table.loc["x", "acceptance_rate"] == pytest.approx(2 / 3)
    assert table.loc["y", "acceptance_rate"] == pytest.approx(1 / 3)
    assert table.loc["y", "acceptance_parity"] == pytest.approx(0.5)
    assert table.loc["x", "lift"] == pytest.approx(0.25)
    assert table.loc["y", "lift"] == pytest.approx(-0.5)
    breached = {(b.group, b.measure) for b in report.breaches}
    assert ("y", "acceptance") in breached and ("y", "exposure") not in breached
