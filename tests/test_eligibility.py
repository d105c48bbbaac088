"""Eligibility: every rule type excludes with its reason code, and only when it should."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from features import TABLES, FeatureBuilder, Requests, Snapshot, World, coerce_table
from nextbest.cli import app
from policy import RulesError, assemble_slate, evaluate, load_rules, parse_rules
from policy.eligibility import customer_trace

DAY = pd.Timedelta(days=1)


@pytest.fixture(scope="module")
def base(small_world: World) -> dict[str, pd.DataFrame]:
    return {name: coerce_table(name, small_world.tables[name]) for name in TABLES}


@pytest.fixture(scope="module")
def start(small_world: World) -> pd.Timestamp:
    return pd.Timestamp(small_world.config.start)


def with_customer(
    base: dict[str, pd.DataFrame],
    customer: str = "T1",
    *,
    segment: str = "student",
    orders: list[tuple[str, pd.Timestamp]] = (),  # type: ignore[assignment]
    exposures: list[tuple[str, pd.Timestamp, str]] = (),  # type: ignore[assignment]
    outcomes: list[tuple[str, str, pd.Timestamp]] = (),  # type: ignore[assignment]
    consent: list[tuple[str, bool]] = (),  # type: ignore[assignment]
    audiences: list[str] = (),  # type: ignore[assignment]
) -> Snapshot:
    """The synthetic world plus one hand-made customer with exactly this history."""
    t = {name: frame.copy() for name, frame in base.items()}

    def add(name: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            extra = coerce_table(name, pd.DataFrame(rows))
            t[name] = pd.concat([t[name], extra], ignore_index=True)

    add("customers", [{"customer_id": customer, "segment": segment}])
    add(
        "orders",
        [
            {
                "order_id": f"{customer}-{i}",
                "customer_id": customer,
                "product_id": p,
                "ordered_at": when,
                "quantity": 1,
                "amount": 10.0,
            }
            for i, (p, when) in enumerate(orders)
        ],
    )
    add(
        "exposures",
        [
            {
                "exposure_id": f"{customer}-e{i}",
                "customer_id": customer,
                "offer_id": o,
                "shown_at": when,
                "channel": ch,
                "request_id": f"{customer}-r{i}",
            }
            for i, (o, when, ch) in enumerate(exposures)
        ],
    )
    add(
        "outcomes",
        [
            {"customer_id": customer, "offer_id": o, "outcome": kind, "occurred_at": when}
            for o, kind, when in outcomes
        ],
    )
    add(
        "consent",
        [
            {"customer_id": customer, "channel": ch, "purpose": "marketing", "granted": ok}
            for ch, ok in consent
        ],
    )
    add("audiences", [{"audience_id": a, "customer_id": customer} for a in audiences])
    return Snapshot.from_tables(t)


def reasons(
    snapshot: Snapshot,
    rules: dict[str, Any] | Any,
    when: pd.Timestamp,
    channel: str | None = "web",
    customer: str = "T1",
    **kwargs: Any,
) -> dict[str, list[str]]:
    rule_set = rules if not isinstance(rules, dict) else parse_rules(rules)
    builder = FeatureBuilder(min_pair_orders=3).fit(snapshot, when)
    table = customer_trace(snapshot, rule_set, builder, customer, when, channel=channel)
    if kwargs:
        requests = Requests.build(snapshot, [customer], [when], channel=[channel])
        offers = np.flatnonzero(snapshot.offer_known)
        result = evaluate(
            snapshot, rule_set, requests, np.zeros(len(offers), dtype=np.int64), offers, **kwargs
        )
        return {snapshot.offers.values[o]: result.reasons(i) for i, o in enumerate(offers)}
    return dict(zip(table["offer_id"], table["reasons"], strict=True))


def only(rule: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"rules": [rule], **settings}


def test_active_window(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base)
    rule = only({"type": "active_window"})
    early = reasons(snapshot, rule, start + 10 * DAY)
    assert early["coupon:Coffee"] == ["offer_not_active"]
    assert early["item:F1-A1"] == []
    assert reasons(snapshot, rule, start + 40 * DAY)["coupon:Coffee"] == []


def test_channel_allowed(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base)
    rule = only({"type": "channel_allowed"})
    assert reasons(snapshot, rule, start + 40 * DAY, "web")["coupon:Coffee"] == [
        "channel_not_allowed"
    ]
    assert reasons(snapshot, rule, start + 40 * DAY, "email")["coupon:Coffee"] == []
    assert reasons(snapshot, rule, start + 40 * DAY, "sms")["item:F1-C1"] == []
    assert reasons(snapshot, rule, start + 40 * DAY, "sms")["item:F1-A1"] == ["channel_not_allowed"]


def test_consent(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base, consent=[("email", False), ("web", True)])
    when = start + 40 * DAY
    assert reasons(snapshot, only({"type": "consent"}), when, "email")["item:F1-A1"] == [
        "no_consent"
    ]
    assert reasons(snapshot, only({"type": "consent"}), when, "web")["item:F1-A1"] == []
    # no row for sms: unknown consent follows the rules' setting
    allow = reasons(snapshot, only({"type": "consent"}, unknown_consent="allow"), when, "sms")
    deny = reasons(snapshot, only({"type": "consent"}, unknown_consent="deny"), when, "sms")
    assert allow["item:F1-C1"] == []
    assert deny["item:F1-C1"] == ["consent_unknown"]


def test_targeting_by_audience_and_segment(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    when = start + 40 * DAY
    outsider = with_customer(base)
    member = with_customer(base, audiences=["Coffee club"])
    assert reasons(outsider, only({"type": "targeting"}), when)["coupon:Coffee"] == [
        "not_in_audience"
    ]
    assert reasons(member, only({"type": "targeting"}), when)["coupon:Coffee"] == []
    segmented = dict(base)
    offers = base["offers"].copy()
    offers["target_segments"] = [
        ["retiree"] if o == "item:F1-A1" else [] for o in offers["offer_id"]
    ]
    segmented["offers"] = offers
    student = with_customer(segmented, segment="student")
    retiree = with_customer(segmented, segment="retiree")
    assert reasons(student, only({"type": "targeting"}), when)["item:F1-A1"] == ["not_in_segment"]
    assert reasons(retiree, only({"type": "targeting"}), when)["item:F1-A1"] == []


def test_already_owns_and_replenishment(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base, orders=[("F1-D1", start + 5 * DAY), ("F1-C1", start + 30 * DAY)])
    rule = only({"type": "already_owns", "category_days": {"Coffee Refills": 10}})
    soon = reasons(snapshot, rule, start + 35 * DAY)
    assert soon["item:F1-D1"] == ["already_owns"]
    assert soon["item:F1-C1"] == ["bought_recently"]
    assert soon["item:F1-D2"] == []
    later = reasons(snapshot, rule, start + 45 * DAY)
    assert later["item:F1-D1"] == ["already_owns"]
    assert later["item:F1-C1"] == []


def _repeat_rate(base: dict[str, pd.DataFrame], product: str, when: pd.Timestamp) -> float:
    """Plain pandas: the share of the product's buyers before ``when`` with 2+ orders of it."""
    orders = base["orders"]
    mine = orders[(orders["product_id"] == product) & (orders["ordered_at"] < when)]
    per_buyer = mine.groupby("customer_id")["order_id"].nunique()
    return float((per_buyer >= 2).mean())


def test_replenishment_consumables_come_back_when_due_durables_never(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    when = start + 60 * DAY
    # the world's own data: Coffee Refills F1-C1 is bought again by most of its buyers,
    # the machine F1-D1 by almost none (the default threshold is 0.1)
    assert _repeat_rate(base, "F1-C1", when) > 0.5 and _repeat_rate(base, "F1-D1", when) < 0.05
    rule = only({"type": "already_owns", "due_share": 0.5})
    once = with_customer(base, orders=[("F1-C1", start + 50 * DAY), ("F1-D1", start + 50 * DAY)])
    got = reasons(once, rule, when)
    assert got["item:F1-C1"] == []  # a consumable bought once: due (the ranker judges)
    assert got["item:F1-D1"] == ["already_owns"]  # a durable: never again
    # a customer who bought the machine's item twice consumes it: their cycle is 30 days
    twice = with_customer(base, orders=[("F1-D1", start + 10 * DAY), ("F1-D1", start + 40 * DAY)])
    assert reasons(twice, rule, start + 45 * DAY)["item:F1-D1"] == ["not_due"]  # 5 < 15 days
    assert reasons(twice, rule, start + 55 * DAY)["item:F1-D1"] == []  # 15 days: due
    # the rules' own word beats the data's
    durable = only(
        {"type": "already_owns", "due_share": 0.5, "categories": {"Coffee Refills": "durable"}}
    )
    assert reasons(once, durable, when)["item:F1-C1"] == ["already_owns"]
    never = only({"type": "already_owns", "consumable_repeat_rate": None})
    assert reasons(once, never, when)["item:F1-C1"] == ["already_owns"]
    assert reasons(twice, never, start + 55 * DAY)["item:F1-D1"] == ["already_owns"]
    # a version trained before replenishment carries rules that said so with
    # default_days: null, and serving it keeps that meaning
    before = only({"type": "already_owns", "default_days": None, "category_days": {}})
    assert parse_rules(before).rules[0].consumable_repeat_rate is None  # type: ignore[union-attr]
    assert reasons(twice, before, start + 55 * DAY)["item:F1-D1"] == ["already_owns"]
    every = only({"type": "already_owns", "default_days": 10})
    assert reasons(twice, every, start + 45 * DAY)["item:F1-D1"] == ["bought_recently"]
    assert reasons(twice, every, start + 55 * DAY)["item:F1-D1"] == []


def test_compatibility_required(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    stranger = with_customer(base, orders=[("G-BAK1", start + 5 * DAY)])
    owner = with_customer(base, orders=[("F1-D1", start + 5 * DAY)])
    rule = only({"type": "compatibility_required", "kinds": ["item"], "min_lift": 1.5})
    assert reasons(stranger, rule, start + 40 * DAY)["item:F1-A1"] == ["not_compatible"]
    assert reasons(owner, rule, start + 40 * DAY)["item:F1-A1"] == []
    assert reasons(stranger, rule, start + 40 * DAY)["category:Coffee Accessories"] == []


def test_killed_from_rules_and_at_run_time(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    snapshot = with_customer(base)
    rule = only({"type": "killed", "offers": ["item:F1-A1"]})
    got = reasons(snapshot, rule, start + 40 * DAY, killed=["item:F1-A2"])
    assert got["item:F1-A1"] == ["offer_killed"]
    assert got["item:F1-A2"] == ["offer_killed"]
    assert got["item:F1-D1"] == []


def test_out_of_stock(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base)
    got = reasons(snapshot, only({"type": "out_of_stock", "products": ["F1-A1"]}), start + 40 * DAY)
    assert got["item:F1-A1"] == ["out_of_stock"]
    assert got["bundle:Coffee:good"] == ["out_of_stock"]  # Basic Brewer + Milk Frother
    assert got["item:F1-A2"] == []
    assert got["coupon:Coffee"] == []  # a coupon is out only when all its products are


def test_send_caps_count_outbound_sends_and_never_page_views(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    when = start + 40 * DAY
    shown = [("item:F1-A1", when - i * DAY, "email") for i in range(1, 4)]  # 3 emails
    shown += [("item:F1-C1", when - 2 * DAY, "sms")]  # 1 text
    shown += [("item:F1-A2", when - i * DAY / 10, "web") for i in range(1, 9)]  # 8 pages
    snapshot = with_customer(base, exposures=shown)
    rule = only(
        {
            "type": "frequency_cap",
            "per_channel": {"max": 3, "days": 7},
            "total": {"max": 5, "days": 7},
        }
    )
    assert set(map(tuple, reasons(snapshot, rule, when, "email").values())) == {
        ("frequency_cap_channel",)
    }
    assert set(map(tuple, reasons(snapshot, rule, when, "sms").values())) == {()}
    # 8 slates on the web in a day are page views, not sends: nothing is capped there
    assert set(map(tuple, reasons(snapshot, rule, when, "web").values())) == {()}
    assert set(map(tuple, reasons(snapshot, rule, when, "app").values())) == {()}
    total = only({"type": "frequency_cap", "total": {"max": 4, "days": 7}})  # 3 + 1 sends
    assert set(map(tuple, reasons(snapshot, total, when, "mailer").values())) == {
        ("frequency_cap_total",)
    }
    assert set(map(tuple, reasons(snapshot, total, when, "web").values())) == {()}
    assert set(map(tuple, reasons(snapshot, rule, when + 10 * DAY, "email").values())) == {()}


def test_the_counting_unit_is_the_rules_files_own(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    when = start + 40 * DAY
    # one email carrying three offers, of which the customer viewed one
    sent = [("item:F1-A1", when - DAY, "email"), ("item:F1-A2", when - DAY, "email")]
    sent += [("item:F1-C1", when - DAY, "email")]
    snapshot = with_customer(base, exposures=sent)

    def capped(counts: str, limit: int) -> bool:
        rule = only(
            {"type": "frequency_cap", "per_channel": {"max": limit, "days": 7, "counts": counts}}
        )
        got = set(map(tuple, reasons(snapshot, rule, when, "email").values()))
        return got == {("frequency_cap_channel",)}

    # the three exposures share no request id here, so each is a send of its own
    assert capped("sends", 3) and not capped("sends", 4)
    assert capped("served", 3) and not capped("served", 4)
    assert not capped("viewed", 1)
    viewed = with_customer(
        base, exposures=sent, outcomes=[("item:F1-A1", "viewed", when - DAY + pd.Timedelta(1, "m"))]
    )
    rule = only({"type": "frequency_cap", "per_channel": {"max": 1, "days": 7, "counts": "viewed"}})
    # an outcome counts for caps through the exposure it follows; this one names none
    assert set(map(tuple, reasons(viewed, rule, when, "email").values())) == {()}


def test_a_per_offer_cap_rotates_inbound_and_excludes_outbound(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    when = start + 40 * DAY
    shown = [("item:F1-A1", when - pd.Timedelta(hours=h), "web") for h in (1, 2, 3)]
    snapshot = with_customer(base, exposures=shown)
    rule = parse_rules(only({"type": "frequency_cap", "per_offer": {"max": 3, "days": 1}}))
    offers = np.flatnonzero(snapshot.offer_known)
    a1 = int(snapshot.offers.encode(["item:F1-A1"])[0])
    for channel, excluded in (("web", False), ("app", False), ("email", True)):
        requests = Requests.build(snapshot, ["T1"], [when], channel=[channel])
        result = evaluate(snapshot, rule, requests, np.zeros(len(offers), dtype=np.int64), offers)
        row = int(np.flatnonzero(offers == a1)[0])
        assert result.reasons(row) == (["frequency_cap_offer"] if excluded else [])
        assert bool(result.demoted[row]) is (not excluded)
        others = np.arange(len(offers)) != row
        assert not result.demoted[others].any() and result.eligible[others].all()
    later = Requests.build(snapshot, ["T1"], [when + DAY], channel=["email"])
    result = evaluate(snapshot, rule, later, np.zeros(len(offers), dtype=np.int64), offers)
    assert result.eligible.all()


def test_what_an_offer_is_holds_whatever_the_rules(
    base: dict[str, pd.DataFrame], start: pd.Timestamp
) -> None:
    """A category offer is for a new category, a coupon is redeemed once, and what is in the
    cart is not offered again: with no rules at all."""
    when = start + 40 * DAY
    snapshot = with_customer(
        base,
        orders=[("F1-A1", start + 5 * DAY)],  # a Coffee Accessories purchase
        outcomes=[("coupon:Coffee", "redeemed", start + 35 * DAY)],
    )
    none = {"rules": []}
    got = reasons(snapshot, none, when)
    assert got["category:Coffee Accessories"] == ["category_already_bought"]
    assert got["category:Skincare Accessories"] == []
    assert got["coupon:Coffee"] == ["already_redeemed"]
    assert got["coupon:Skincare"] == []
    before = reasons(snapshot, none, start + 5 * DAY)  # strictly before the purchase
    assert before["category:Coffee Accessories"] == [] and before["coupon:Coffee"] == []
    offers = np.flatnonzero(snapshot.offer_known)
    requests = Requests.build(
        snapshot, ["T1"], [when], channel=["web"], placement=["cart"], cart=[["F2-A1", "nope"]]
    )
    result = evaluate(
        snapshot, parse_rules(none), requests, np.zeros(len(offers), dtype=np.int64), offers
    )
    in_cart = {snapshot.offers.values[o] for i, o in enumerate(offers) if result.reasons(i)}
    in_cart -= {"category:Coffee Accessories", "coupon:Coffee"}
    # the item and the bundles holding F2-A1; the coupon for it stays (a saving on it)
    assert in_cart == {
        "item:F2-A1",
        "bundle:Skincare:starter",
        "bundle:Skincare:good",
        "bundle:Skincare:better",
        "bundle:Skincare:best",
    }


def test_decline_cooldown(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base, outcomes=[("item:F1-A1", "declined", start + 30 * DAY)])
    rule = only({"type": "decline_cooldown", "days": 14})
    assert reasons(snapshot, rule, start + 35 * DAY)["item:F1-A1"] == ["declined_cooldown"]
    assert reasons(snapshot, rule, start + 35 * DAY)["item:F1-A2"] == []
    assert reasons(snapshot, rule, start + 45 * DAY)["item:F1-A1"] == []


def test_sequencing(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    rule = only(
        {
            "type": "sequencing",
            "steps": [{"offer": "item:F1-D2", "requires": "item:F1-D1", "event": "shown"}],
        }
    )
    fresh = with_customer(base)
    seen = with_customer(base, exposures=[("item:F1-D1", start + 20 * DAY, "web")])
    assert reasons(fresh, rule, start + 40 * DAY)["item:F1-D2"] == ["sequence_not_met"]
    assert reasons(seen, rule, start + 40 * DAY)["item:F1-D2"] == []
    assert reasons(seen, rule, start + 19 * DAY)["item:F1-D2"] == ["sequence_not_met"]


def test_bundles_mostly_owned(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    snapshot = with_customer(base, orders=[("F1-A1", start + 5 * DAY), ("F1-A2", start + 6 * DAY)])
    got = reasons(snapshot, only({"type": "bundles", "max_owned_share": 0.5}), start + 40 * DAY)
    assert got["bundle:Coffee:best"] == ["bundle_mostly_owned"]  # owns 2 of 3
    assert got["bundle:Coffee:good"] == []  # owns 1 of 2: not most of it
    assert got["bundle:Skincare:best"] == []


def test_blocked_for_segment(base: dict[str, pd.DataFrame], start: pd.Timestamp) -> None:
    rule = only(
        {
            "type": "blocked_for_segment",
            "blocks": [{"offer": "item:F1-A1", "segment": "student", "by": "reviewer"}],
        }
    )
    student = with_customer(base, segment="student")
    retiree = with_customer(base, segment="retiree")
    assert reasons(student, rule, start + 40 * DAY)["item:F1-A1"] == ["blocked_for_segment"]
    assert reasons(retiree, rule, start + 40 * DAY)["item:F1-A1"] == []


def test_mutual_exclusion_and_bundle_ladders_shape_the_slate(
    base: dict[str, pd.DataFrame],
) -> None:
    snapshot = Snapshot.from_tables(base)
    rules = parse_rules(
        {
            "rules": [
                {"type": "mutual_exclusion", "groups": {"machines": ["item:F1-D2", "item:F1-D3"]}},
                {"type": "bundles"},
            ]
        }
    )
    ranked = snapshot.offers.encode(
        [
            "item:F1-D3",
            "bundle:Coffee:best",
            "item:F1-D2",
            "bundle:Coffee:better",
            "item:F1-A1",
            "item:F2-A1",
        ]
    )
    slate = assemble_slate(snapshot, rules, ranked, k=3)
    chosen = list(snapshot.offers.decode(np.array(slate.chosen)))
    assert chosen == ["item:F1-D3", "bundle:Coffee:best", "item:F1-A1"]
    skipped = {snapshot.offers.values[o]: why for o, why in slate.skipped.items()}
    assert skipped == {
        "item:F1-D2": "mutually_exclusive",
        "bundle:Coffee:better": "bundle_ladder_conflict",
    }


def test_default_rules_trace_lists_every_offer_with_all_reasons(
    base: dict[str, pd.DataFrame],
    start: pd.Timestamp,
) -> None:
    snapshot = with_customer(base, orders=[("F1-D1", start + 5 * DAY)], consent=[("web", True)])
    got = reasons(snapshot, load_rules(), start + 10 * DAY, "web")
    assert set(got) == set(base["offers"]["offer_id"])
    assert got["coupon:Coffee"] == ["offer_not_active", "channel_not_allowed", "not_in_audience"]
    assert got["item:F1-D1"] == ["already_owns"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"rules": [{"type": "teleport"}]}, r"rule 1 \(teleport\): Input tag 'teleport'"),
        (
            {"rules": [{"type": "decline_cooldown", "days": -3}]},
            r"rule 1 \(decline_cooldown\), field 'days': Input should be greater than 0",
        ),
        (
            {"rules": [{"type": "killed", "offer": ["x"]}]},
            r"rule 1 \(killed\), field 'offer': Extra inputs are not permitted",
        ),
        (
            {"rules": [{"type": "killed"}, {"type": "killed"}]},
            r"rule type 'killed' appears more than once",
        ),
        ({"unknown_consent": "maybe", "rules": []}, r"field 'unknown_consent'"),
        (["not", "a", "mapping"], r"a rules file is a mapping with a 'rules' list"),
    ],
)
def test_rules_files_are_validated_with_clear_errors(data: Any, match: str) -> None:
    with pytest.raises(RulesError, match=match):
        parse_rules(data, source="rules.yaml")


def test_rules_files_on_disk(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"no such rules file"):
        load_rules(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("rules: [\n")
    with pytest.raises(RulesError, match=r"bad.yaml: not valid YAML"):
        load_rules(tmp_path / "bad.yaml")
    default = load_rules()
    assert default.content_hash == load_rules().content_hash
    (tmp_path / "copy.yaml").write_text(default.to_yaml())
    assert load_rules(tmp_path / "copy.yaml").content_hash == default.content_hash


def test_eligibility_command_prints_the_trace(small_workspace, start: pd.Timestamp) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(
        app,
        [
            "eligibility",
            "S00001",
            "--as-of",
            str(start + 10 * DAY),
            "--channel",
            "web",
            "-w",
            str(small_workspace.path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    trace = json.loads(result.stdout)
    assert trace["rules"]["hash"] == load_rules().content_hash
    by_offer = {row["offer_id"]: row for row in trace["offers"]}
    assert "offer_not_active" in by_offer["coupon:Coffee"]["reasons"]
    assert trace["eligible"] + trace["excluded"] == len(by_offer)
    bad = CliRunner().invoke(
        app,
        [
            "eligibility",
            "S00001",
            "--as-of",
            "2025-02-01",
            "--channel",
            "fax",
            "-w",
            str(small_workspace.path),
        ],
    )
    assert bad.exit_code == 2
    assert "'fax' is not one of" in " ".join(bad.output.split())
