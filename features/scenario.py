"""A seeded generator of small **synthetic** retail worlds, for tests.

The worlds are made up. They are never the demo data and are always written with
``synthetic: true`` in the workspace manifest. Unlike the demo they hold every table of
the contract, including browse, cart, support, usage, email and loyalty events and
consent, and they plant structure that a test can look for:

* **completion pairs**: buying a family's device makes buying its accessories likely
  within days (``truth.completion_pairs``);
* **upgrade ladders**: three steps per family; heavy usage (≥ 75 %) leads to the next
  step (``truth.upgrade_ladders``);
* **product families**: device, accessories and a consumable that is replenished on a
  cycle (``truth.families``, ``truth.replenishment_days``);
* **moments**: three or more views of a category raise the chance to buy it, and a
  quarter of abandoned carts are bought back within four hours;
* **offers with a known true acceptance lift**: a shown offer is accepted with
  probability ``base + lift × relevant`` (``truth.offer_lift``), and a sticky 5 % holdout
  is logged as ghost exposures so that lift can be measured;
* **bundles**: a mission bundle and one good-better-best ladder per family.

All randomness comes from ``ScenarioConfig.seed``: the same config gives the same world.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.workspace import Workspace, write_workspace

__all__ = ["PlantedTruth", "ScenarioConfig", "World", "make_world", "write_world"]

# name, department, device names by ladder step, accessories, consumable (name, cycle days)
_FAMILIES: tuple[tuple[str, str, tuple[str, str, str], tuple[str, str], tuple[str, int]], ...] = (
    (
        "Coffee",
        "Kitchen",
        ("Basic Brewer", "Barista Pro", "Barista Elite"),
        ("Milk Frother", "Descaler Kit"),
        ("Espresso Beans", 14),
    ),
    (
        "Skincare",
        "Beauty",
        ("Gentle Body Soap", "Hydrating Serum", "Night Repair Set"),
        ("Cotton Pads", "Face Towel"),
        ("Moisturiser Refill", 30),
    ),
    (
        "Camera",
        "Electronics",
        ("Compact Camera", "Mirrorless Camera", "Pro Camera Body"),
        ("Memory Card", "Camera Bag"),
        ("Lens Wipes", 45),
    ),
    (
        "Garden",
        "Outdoor",
        ("Push Mower", "Electric Mower", "Robot Mower"),
        ("Garden Gloves", "Grass Trimmer"),
        ("Lawn Feed", 28),
    ),
    (
        "Baby",
        "Baby",
        ("Travel Cot", "City Stroller", "Travel System"),
        ("Changing Bag", "Rain Cover"),
        ("Nappies", 7),
    ),
    (
        "Pet",
        "Pets",
        ("Dog Bed", "Orthopaedic Dog Bed", "Heated Dog Bed"),
        ("Lead and Collar", "Chew Toy Set"),
        ("Dog Food", 21),
    ),
    (
        "Fitness",
        "Sport",
        ("Yoga Mat", "Adjustable Dumbbells", "Home Gym Bench"),
        ("Resistance Bands", "Water Bottle"),
        ("Protein Powder", 25),
    ),
    (
        "Tea",
        "Kitchen",
        ("Kettle", "Temperature Kettle", "Tea Maker"),
        ("Tea Infuser", "Teapot"),
        ("Loose Leaf Tea", 20),
    ),
)
_FILLER = (
    ("Grocery", "Bakery", ("Sourdough Loaf", "Croissants", "Bagels")),
    ("Grocery", "Dairy", ("Whole Milk", "Greek Yoghurt", "Cheddar")),
    ("Grocery", "Produce", ("Bananas", "Apples", "Spinach")),
    ("Grocery", "Pantry", ("Pasta", "Rice", "Olive Oil")),
)
_SEGMENTS = ("young_family", "professional", "student", "retiree")
_TIERS = (("bronze", 0.0), ("silver", 400.0), ("gold", 1200.0))


@dataclass(frozen=True)
class ScenarioConfig:
    """The size and seed of a synthetic world."""

    n_customers: int = 200
    n_days: int = 120
    n_families: int = 4
    start: str = "2025-01-06"
    seed: int = 0
    holdout_share: float = 0.05
    visit_rate: float = 0.12
    slate_size: int = 3


@dataclass
class PlantedTruth:
    """What the generator planted, for tests to find."""

    completion_pairs: list[tuple[str, str]] = field(default_factory=list)
    upgrade_ladders: dict[str, list[str]] = field(default_factory=dict)
    families: dict[str, list[str]] = field(default_factory=dict)
    replenishment_days: dict[str, int] = field(default_factory=dict)
    offer_lift: dict[str, float] = field(default_factory=dict)
    offer_base_rate: float = 0.02
    bundle_ladders: dict[str, list[str]] = field(default_factory=dict)
    mission_bundles: dict[str, list[str]] = field(default_factory=dict)
    holdout_customers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class World:
    """A synthetic world: contract tables plus the planted truth."""

    config: ScenarioConfig
    tables: dict[str, pd.DataFrame]
    truth: PlantedTruth


@dataclass
class _Catalog:
    products: pd.DataFrame
    family_devices: dict[str, list[str]]
    family_accessories: dict[str, list[str]]
    family_consumable: dict[str, str]
    cycle_days: dict[str, int]
    filler: list[str]
    price: dict[str, float]


def _make_catalog(n_families: int) -> _Catalog:
    rows: list[dict[str, Any]] = []
    devices: dict[str, list[str]] = {}
    accessories: dict[str, list[str]] = {}
    consumable: dict[str, str] = {}
    cycles: dict[str, int] = {}
    for f, (family, department, steps, extras, (refill, cycle)) in enumerate(
        _FAMILIES[:n_families]
    ):
        code = f"F{f + 1}"
        devices[family] = []
        for step, name in enumerate(steps, start=1):
            product_id = f"{code}-D{step}"
            devices[family].append(product_id)
            rows.append(
                dict(
                    product_id=product_id,
                    title=name,
                    department=department,
                    category=f"{family} Devices",
                    product_type="device",
                    price=60.0 * step**1.6,
                    family=family,
                    ladder=f"{family} ladder",
                    ladder_step=step,
                )
            )
        accessories[family] = []
        for a, name in enumerate(extras, start=1):
            product_id = f"{code}-A{a}"
            accessories[family].append(product_id)
            rows.append(
                dict(
                    product_id=product_id,
                    title=name,
                    department=department,
                    category=f"{family} Accessories",
                    product_type="accessory",
                    price=12.0 + 6 * a,
                    family=family,
                )
            )
        product_id = f"{code}-C1"
        consumable[family] = product_id
        cycles[product_id] = cycle
        rows.append(
            dict(
                product_id=product_id,
                title=refill,
                department=department,
                category=f"{family} Refills",
                product_type="consumable",
                price=9.5,
                family=family,
            )
        )
    filler = []
    for department, category, names in _FILLER:
        for i, name in enumerate(names, start=1):
            product_id = f"G-{category[:3].upper()}{i}"
            filler.append(product_id)
            rows.append(
                dict(
                    product_id=product_id,
                    title=name,
                    department=department,
                    category=category,
                    product_type="grocery",
                    price=2.0 + i,
                )
            )
    products = pd.DataFrame(rows)
    products["brand"] = "Synthetic"
    products["cost"] = (products["price"] * 0.6).round(2)
    products["price"] = products["price"].round(2)
    return _Catalog(
        products,
        devices,
        accessories,
        consumable,
        cycles,
        filler,
        dict(zip(products["product_id"], products["price"], strict=True)),
    )


class _Log:
    """Rows of every table, appended by the simulation."""

    def __init__(self) -> None:
        self.orders: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.exposures: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []
        self._order_seq = 0
        self._exposure_seq = 0

    def order(
        self,
        customer: str,
        at: pd.Timestamp,
        items: list[tuple[str, float]],
        prices: dict[str, float],
        discount: float = 0.0,
    ) -> None:
        self._order_seq += 1
        for product_id, quantity in items:
            amount = round(prices[product_id] * quantity - discount, 2)
            self.orders.append(
                dict(
                    order_id=f"SO{self._order_seq:06d}",
                    customer_id=customer,
                    product_id=product_id,
                    ordered_at=at,
                    quantity=quantity,
                    amount=amount,
                    discount=discount,
                    store_id="online",
                )
            )

    def event(self, customer: str, kind: str, at: pd.Timestamp, **extra: Any) -> None:
        self.events.append(dict(customer_id=customer, event_type=kind, occurred_at=at, **extra))

    def exposure(self, **row: Any) -> str:
        self._exposure_seq += 1
        exposure_id = f"SE{self._exposure_seq:07d}"
        self.exposures.append(dict(exposure_id=exposure_id, **row))
        return exposure_id


def _offers(
    catalog: _Catalog,
    families: list[str],
    rng: np.random.Generator,
    start: pd.Timestamp,
    n_days: int,
) -> tuple[pd.DataFrame, PlantedTruth]:
    truth = PlantedTruth()
    rows: list[dict[str, Any]] = []
    lifts = (0.0, 0.05, 0.15, 0.3)
    for family in families:
        devices = catalog.family_devices[family]
        accessories = catalog.family_accessories[family]
        refill = catalog.family_consumable[family]
        truth.families[family] = [*devices, *accessories, refill]
        truth.upgrade_ladders[f"{family} ladder"] = list(devices)
        truth.completion_pairs += [(d, a) for d in devices for a in accessories]
        truth.replenishment_days[refill] = catalog.cycle_days[refill]
        for product_id in [*devices, *accessories, refill]:
            rows.append(
                dict(
                    offer_id=f"item:{product_id}",
                    kind="item",
                    product_ids=[product_id],
                    channels=["sms", "email", "web", "app"]
                    if product_id == refill
                    else ["web", "app", "email"],
                )
            )
        rows.append(
            dict(
                offer_id=f"category:{family} Accessories",
                kind="category",
                category=f"{family} Accessories",
                product_ids=[],
                channels=[],
            )
        )
        mission = f"Start your {family.lower()} kit"
        rows.append(
            dict(
                offer_id=f"bundle:{family}:starter",
                kind="bundle",
                mission=mission,
                product_ids=[devices[0], *accessories],
                channels=["web", "app"],
            )
        )
        truth.mission_bundles[mission] = [devices[0], *accessories]
        ladder = f"{family} kits"
        truth.bundle_ladders[ladder] = []
        for step, tier in enumerate(("good", "better", "best")):
            offer_id = f"bundle:{family}:{tier}"
            truth.bundle_ladders[ladder].append(offer_id)
            rows.append(
                dict(
                    offer_id=offer_id,
                    kind="bundle",
                    bundle_ladder=ladder,
                    bundle_tier=tier,
                    product_ids=[devices[step], *accessories[: step + 1]],
                    channels=["web", "app"],
                )
            )
        rows.append(
            dict(
                offer_id=f"coupon:{family}",
                kind="coupon",
                product_ids=[refill],
                channels=["mailer", "email"],
                target_audiences=[f"{family} club"],
                valid_from=start + pd.Timedelta(days=n_days // 4),
                valid_to=start + pd.Timedelta(days=n_days // 4 + 28),
                discount=2.0,
            )
        )
    offers = pd.DataFrame(rows)
    info = catalog.products.set_index("product_id")
    first = offers["product_ids"].map(lambda ids: ids[0] if ids else None)
    offers["category"] = offers.get("category", pd.Series(dtype="str")).fillna(
        first.map(info["category"])
    )
    offers["department"] = offers["category"].map(
        catalog.products.drop_duplicates("category").set_index("category")["department"]
    )
    offers["value"] = offers["product_ids"].map(
        lambda ids: round(float(sum(catalog.price[p] for p in ids)), 2) if ids else 25.0
    )
    offers["margin"] = (offers["value"] * 0.35).round(2)
    offers["title"] = [_offer_title(row, info) for row in offers.to_dict("records")]
    offers["lever"] = 1.0
    for column in ("target_audiences", "target_segments"):
        if column not in offers:
            offers[column] = None
        offers[column] = offers[column].map(lambda v: v if isinstance(v, list) else [])
    truth.offer_lift = {offer_id: float(rng.choice(lifts)) for offer_id in offers["offer_id"]}
    return offers, truth


def _offer_title(row: dict[str, Any], info: pd.DataFrame) -> str:
    if row["kind"] == "category":
        return f"Explore {row['category']}"
    names = [str(info.loc[p, "title"]) for p in row["product_ids"]]
    if row["kind"] == "bundle":
        mission = row.get("mission")
        if isinstance(mission, str):
            return mission
        return f"{str(row['bundle_tier']).title()} kit: " + ", ".join(names)
    if row["kind"] == "coupon":
        return f"£2 off {names[0]}"
    return names[0]


def _relevant(
    offer: dict[str, Any],
    owned: set[str],
    affinities: set[str],
    catalog: _Catalog,
    audiences: set[str],
    family_of: dict[str, str],
) -> bool:
    products = offer["product_ids"]
    if offer["kind"] == "category":
        family = str(offer["category"]).removesuffix(" Accessories")
        return family in affinities and any(p in owned for p in catalog.family_devices[family])
    if offer["kind"] == "coupon":
        return bool(set(offer["target_audiences"]) & audiences)
    if offer["kind"] == "bundle":
        return family_of[products[0]] in affinities and not (set(products) & owned)
    product = products[0]
    family = family_of[product]
    devices = catalog.family_devices[family]
    if product in devices:
        step = devices.index(product)
        return step > 0 and devices[step - 1] in owned and product not in owned
    return any(d in owned for d in devices) and (
        product not in owned or product == catalog.family_consumable[family]
    )


def make_world(config: ScenarioConfig | None = None) -> World:
    """Build a synthetic world from ``config`` (deterministic in ``config.seed``)."""
    config = config or ScenarioConfig()
    root = np.random.default_rng(config.seed)
    start = pd.Timestamp(config.start)
    end = start + pd.Timedelta(days=config.n_days)
    catalog = _make_catalog(config.n_families)
    families = list(catalog.family_devices)
    family_of = (
        {p: f for f, ps in catalog.family_devices.items() for p in ps}
        | {p: f for f, ps in catalog.family_accessories.items() for p in ps}
        | {p: f for f, p in catalog.family_consumable.items()}
    )
    offers, truth = _offers(catalog, families, root, start, config.n_days)
    offer_rows = offers.to_dict("records")

    customer_ids = [f"S{i:05d}" for i in range(1, config.n_customers + 1)]
    segments = root.choice(_SEGMENTS, size=config.n_customers)
    holdout = root.random(config.n_customers) < config.holdout_share
    truth.holdout_customers = [c for c, h in zip(customer_ids, holdout, strict=True) if h]
    customers = pd.DataFrame(
        {
            "customer_id": customer_ids,
            "segment": segments,
            "signup_at": [
                start - pd.Timedelta(days=int(d)) for d in root.integers(1, 720, config.n_customers)
            ],
            "age_band": root.choice(
                ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"], size=config.n_customers
            ),
        }
    )
    consent_rows: list[dict[str, Any]] = []
    audience_rows: list[dict[str, Any]] = []
    log = _Log()
    final_tiers: list[str] = []

    for index, customer in enumerate(customer_ids):
        rng = np.random.default_rng([config.seed, index])
        size = min(int(rng.integers(1, 3)), len(families))
        affinity = list(rng.choice(families, size=size, replace=False))
        granted = {
            channel: rng.random() < share
            for channel, share in (
                ("email", 0.8),
                ("sms", 0.5),
                ("web", 0.95),
                ("app", 0.9),
                ("mailer", 0.7),
            )
        }
        if rng.random() < 0.9:  # a tenth of customers never stated consent (unknown)
            for channel, ok in granted.items():
                consent_rows.append(
                    dict(
                        customer_id=customer,
                        channel=channel,
                        purpose="marketing",
                        granted=bool(ok),
                        updated_at=start - pd.Timedelta(days=1),
                    )
                )
                consent_rows.append(
                    dict(
                        customer_id=customer,
                        channel=channel,
                        purpose="personalisation",
                        granted=True,
                        updated_at=start - pd.Timedelta(days=1),
                    )
                )
        audiences = {f"{family} club" for family in affinity if rng.random() < 0.6}
        for audience in sorted(audiences):
            audience_rows.append(dict(audience_id=audience, customer_id=customer, added_at=start))
        final_tiers.append(
            _simulate_customer(
                customer,
                rng,
                config,
                start,
                end,
                catalog,
                affinity,
                audiences,
                bool(holdout[index]),
                granted,
                offer_rows,
                truth,
                family_of,
                log,
            )
        )
    customers["loyalty_tier"] = final_tiers

    orders = pd.DataFrame(log.orders).sort_values(["ordered_at", "order_id"], ignore_index=True)
    tables = {
        "customers": customers,
        "products": catalog.products,
        "orders": orders,
        "offers": offers,
        "exposures": pd.DataFrame(log.exposures),
        "outcomes": pd.DataFrame(log.outcomes),
        "events": pd.DataFrame(log.events).sort_values("occurred_at", ignore_index=True),
        "consent": pd.DataFrame(consent_rows),
        "audiences": pd.DataFrame(audience_rows),
        "compatibility": _compatibility(catalog),
    }
    for frame in tables.values():
        for column in frame.columns:
            if pd.api.types.is_datetime64_any_dtype(frame[column]):
                frame[column] = frame[column].dt.floor("s")
    return World(config=config, tables=tables, truth=truth)


def _compatibility(catalog: _Catalog) -> pd.DataFrame:
    rows = []
    for family, devices in catalog.family_devices.items():
        for device in devices:
            for accessory in catalog.family_accessories[family]:
                rows.append((device, accessory, "completes"))
            rows.append((device, catalog.family_consumable[family], "completes"))
        for lower, upper in itertools.pairwise(devices):
            rows.append((lower, upper, "upgrades_to"))
        members = [*devices, *catalog.family_accessories[family], catalog.family_consumable[family]]
        rows += [(a, b, "same_family") for a in members for b in members if a != b]
    return pd.DataFrame(rows, columns=["product_id", "related_product_id", "relation"])


def _simulate_customer(
    customer: str,
    rng: np.random.Generator,
    config: ScenarioConfig,
    start: pd.Timestamp,
    end: pd.Timestamp,
    catalog: _Catalog,
    affinity: list[str],
    audiences: set[str],
    is_holdout: bool,
    granted: dict[str, bool],
    offer_rows: list[dict[str, Any]],
    truth: PlantedTruth,
    family_of: dict[str, str],
    log: _Log,
) -> str:
    """Simulate one customer's days; append their rows to ``log``; return the final tier."""
    prices = catalog.price
    owned: set[str] = set()
    bought_at: dict[str, pd.Timestamp] = {}
    views: dict[str, int] = {}
    scheduled: list[tuple[pd.Timestamp, str, float]] = []
    spend = 0.0
    tier = 0
    rate = config.visit_rate * float(rng.uniform(0.5, 1.5))

    def buy(at: pd.Timestamp, items: list[tuple[str, float]], discount: float = 0.0) -> None:
        nonlocal spend, tier
        log.order(customer, at, items, prices, discount)
        for product_id, quantity in items:
            owned.add(product_id)
            bought_at[product_id] = at
            spend += prices[product_id] * quantity
            family = family_of.get(product_id)
            if family is None:
                continue
            devices = catalog.family_devices[family]
            if product_id in devices:
                _after_device(product_id, at, family, devices)
        while tier + 1 < len(_TIERS) and spend >= _TIERS[tier + 1][1]:
            tier += 1
            log.event(
                customer,
                "loyalty_tier_change",
                at + pd.Timedelta(minutes=5),
                value=float(tier + 1),
                detail=_TIERS[tier][0],
            )

    def _after_device(product_id: str, at: pd.Timestamp, family: str, devices: list[str]) -> None:
        for accessory in catalog.family_accessories[family]:
            if accessory not in owned and rng.random() < 0.6:
                scheduled.append(
                    (at + pd.Timedelta(hours=float(rng.exponential(60))), accessory, 1.0)
                )
        refill = catalog.family_consumable[family]
        cycle = catalog.cycle_days[refill]
        when = at + pd.Timedelta(days=float(rng.uniform(1, 4)))
        while when < end and rng.random() < 0.85:
            scheduled.append((when, refill, 1.0))
            when += pd.Timedelta(days=float(cycle * rng.uniform(0.8, 1.2)))
        if rng.random() < 0.2:
            opened = at + pd.Timedelta(days=float(rng.uniform(1, 10)))
            log.event(customer, "support_opened", opened, product_id=product_id)
            log.event(
                customer,
                "support_resolved",
                opened + pd.Timedelta(hours=float(rng.uniform(2, 72))),
                product_id=product_id,
            )
        step = devices.index(product_id)
        # usage grows towards the device's capacity; at 75 % the next step gets likely
        weeks = int((end - at).days // 7)
        speed = float(rng.uniform(0.04, 0.12))
        for week in range(1, weeks + 1):
            usage = min(1.0, speed * week)
            moment = at + pd.Timedelta(days=7 * week)
            log.event(customer, "usage", moment, product_id=product_id, value=round(usage, 3))
            if usage >= 0.75 and step + 1 < len(devices):
                if rng.random() < 0.5:
                    scheduled.append(
                        (
                            moment + pd.Timedelta(days=float(rng.uniform(0, 7))),
                            devices[step + 1],
                            1.0,
                        )
                    )
                break
        if rng.random() < 0.04:
            returned_at = at + pd.Timedelta(days=float(rng.uniform(2, 14)))
            log.order(customer, returned_at, [(product_id, -1.0)], prices)
            log.outcomes.append(
                dict(
                    customer_id=customer,
                    offer_id=f"item:{product_id}",
                    outcome="returned",
                    occurred_at=returned_at,
                    value=prices[product_id],
                )
            )

    day = 0.0
    week = 0
    while True:
        day += float(rng.exponential(1 / rate))
        if day >= config.n_days:
            break
        visit = start + pd.Timedelta(days=day)
        while week * 7 <= day:  # weekly email to those who agreed to it
            if granted["email"]:
                sent = start + pd.Timedelta(days=7 * week, hours=9)
                if rng.random() < 0.35:
                    log.event(customer, "email_open", sent + pd.Timedelta(hours=2))
                    if rng.random() < 0.3:
                        log.event(customer, "email_click", sent + pd.Timedelta(hours=2, minutes=3))
            week += 1
        due = sorted(s for s in scheduled if s[0] <= visit)
        scheduled[:] = [s for s in scheduled if s[0] > visit]
        for at, product_id, quantity in due:
            if product_id in catalog.family_devices.get(family_of.get(product_id, ""), []) and (
                product_id in owned
            ):
                continue
            buy(at, [(product_id, quantity)])
        log.event(customer, "browse", visit)
        for family in affinity:
            category = f"{family} Devices"
            seen = int(rng.poisson(1.2))
            for v in range(seen):
                log.event(
                    customer,
                    "view",
                    visit + pd.Timedelta(minutes=2 + v),
                    category=category,
                    product_id=catalog.family_devices[family][0],
                )
            views[category] = views.get(category, 0) + seen
            entry = catalog.family_devices[family][0]
            if not any(d in owned for d in catalog.family_devices[family]):
                chance = 0.04 + (0.25 if views[category] >= 3 else 0.0)
                if rng.random() < chance:
                    buy(visit + pd.Timedelta(minutes=15), [(entry, 1.0)])
        if rng.random() < 0.12:
            product_id = str(
                rng.choice(
                    [p for f in affinity for p in catalog.family_accessories[f]] + catalog.filler
                )
            )
            log.event(customer, "cart_add", visit + pd.Timedelta(minutes=20), product_id=product_id)
            log.event(
                customer, "cart_abandon", visit + pd.Timedelta(minutes=50), product_id=product_id
            )
            if rng.random() < 0.25:
                buy(visit + pd.Timedelta(hours=float(rng.uniform(1, 4))), [(product_id, 1.0)])
        basket = list(rng.choice(catalog.filler, size=int(rng.integers(1, 4)), replace=False))
        buy(visit + pd.Timedelta(minutes=30), [(str(p), float(rng.integers(1, 3))) for p in basket])
        _show_offers(
            customer,
            visit,
            rng,
            config,
            offer_rows,
            owned,
            set(affinity),
            catalog,
            audiences,
            is_holdout,
            truth,
            family_of,
            log,
            buy,
        )
    return _TIERS[tier][0]


def _show_offers(
    customer: str,
    visit: pd.Timestamp,
    rng: np.random.Generator,
    config: ScenarioConfig,
    offer_rows: list[dict[str, Any]],
    owned: set[str],
    affinities: set[str],
    catalog: _Catalog,
    audiences: set[str],
    is_holdout: bool,
    truth: PlantedTruth,
    family_of: dict[str, str],
    log: _Log,
    buy: Any,
) -> None:
    """The logging policy: a uniformly random slate of valid offers on the web."""
    valid = [
        o
        for o in offer_rows
        if (pd.isna(o.get("valid_from")) or o["valid_from"] <= visit)
        and (pd.isna(o.get("valid_to")) or visit <= o["valid_to"])
    ]
    size = min(config.slate_size, len(valid))
    chosen = rng.choice(len(valid), size=size, replace=False)
    shown_at = visit + pd.Timedelta(minutes=1)
    request = f"SR-{customer}-{int(visit.timestamp())}"
    for rank, position in enumerate(chosen, start=1):
        offer = valid[int(position)]
        exposure_id = log.exposure(
            customer_id=customer,
            offer_id=offer["offer_id"],
            shown_at=shown_at,
            channel="web",
            placement="home",
            model_version="synthetic-random",
            holdout=is_holdout,
            propensity=size / len(valid),
            request_id=request,
            rank=rank,
        )
        if is_holdout:
            continue
        relevant = _relevant(offer, owned, affinities, catalog, audiences, family_of)
        p_accept = truth.offer_base_rate + truth.offer_lift[offer["offer_id"]] * relevant
        log.outcomes.append(
            dict(
                customer_id=customer,
                offer_id=offer["offer_id"],
                outcome="viewed",
                occurred_at=shown_at,
                exposure_id=exposure_id,
            )
        )
        if rng.random() < p_accept:
            at = shown_at + pd.Timedelta(minutes=3)
            log.outcomes.append(
                dict(
                    customer_id=customer,
                    offer_id=offer["offer_id"],
                    outcome="accepted",
                    occurred_at=at,
                    exposure_id=exposure_id,
                    value=float(offer["value"]),
                )
            )
            products = offer["product_ids"] or [
                catalog.family_accessories[str(offer["category"]).removesuffix(" Accessories")][0]
            ]
            buy(
                at + pd.Timedelta(minutes=1),
                [(p, 1.0) for p in products],
                discount=float(offer.get("discount") or 0.0) if offer["kind"] == "coupon" else 0.0,
            )
        elif rng.random() < 0.3:
            log.outcomes.append(
                dict(
                    customer_id=customer,
                    offer_id=offer["offer_id"],
                    outcome="declined",
                    occurred_at=shown_at + pd.Timedelta(minutes=2),
                    exposure_id=exposure_id,
                )
            )


def write_world(world: World, path: Path | str) -> Workspace:
    """Write a synthetic world as a workspace, marked synthetic in its manifest."""
    return write_workspace(
        path,
        world.tables,
        source={"name": "synthetic scenario", **asdict(world.config)},
        synthetic=True,
        data_quality={"planted_truth": world.truth.to_dict()},
    )
