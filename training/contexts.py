"""The contexts of training requests: the channel, placement, moment, page product and cart
that serving sees, so that context features (and the rules that read the channel) vary in
training as they do in production.

For each opportunity (a customer at a cut point):

* **channel and placement**: where the workspace logged exposures, a share of the
  opportunities (``context_from_exposures``) draws one of the (channel, placement) pairs
  shown in the 90 days before the cut; the others, and every opportunity of a workspace
  without exposures, draw a channel the catalogue's offers allow, then one of that
  channel's placements (``features.snapshot.CHANNEL_PLACEMENTS``; the post-purchase page
  only right after an order);
* **moment**: what the data says was happening then, as a storefront would declare it
  (an abandoned cart within 4 hours, an order within 48, a resolved ticket within 24, 3
  or more views within a day, a new loyalty tier within 7 days), else none;
* **page product** (product pages): a product the customer bought in the 90 days before
  the cut (people look at what they buy), else one of the 30-day top sellers;
* **cart** (cart and checkout): part of the basket the customer was about to buy: up to
  5 products of their next order within the label horizon, never all of it (what is left
  is what a cross-sell would complete), else of their last basket.

Features still read only what happened before the cut; the cart is what a storefront would
send with the request, and a real cart is the start of the order being placed. Randomness
comes only from the generator passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.contract import CHANNELS
from features.snapshot import CHANNEL_PLACEMENTS, PLACEMENTS, Snapshot

__all__ = ["Contexts", "sample_contexts"]

DAY = 86_400
EXPOSURE_WINDOW_DAYS = 90
CART_SIZE = 5


@dataclass
class Contexts:
    """One context per opportunity, as ``Requests.build`` takes them (ids, not codes)."""

    channel: list[str]
    placement: list[str]
    moment: list[str | None]
    page_product: list[str | None]
    cart: list[list[str]]


def sample_contexts(
    snapshot: Snapshot,
    customers: np.ndarray,
    t: int | np.ndarray,
    rng: np.random.Generator,
    *,
    from_exposures: float = 0.5,
    horizon_days: float = 14,
) -> Contexts:
    """Contexts for ``customers`` (snapshot codes) at moments ``t`` (seconds: one for all,
    or one per customer)."""
    s = snapshot
    n = len(customers)
    at = np.broadcast_to(np.asarray(t, dtype=np.int64), (n,)).copy()
    moments = _moments(s, customers, at)
    channel, placement = _channels(s, at, rng, from_exposures, moments)
    page: list[str | None] = [None] * n
    cart: list[list[str]] = [[] for _ in range(n)]
    lines = s.lines_by_customer
    end = lines.position(customers, at)
    recent = lines.position(customers, at - EXPOSURE_WINDOW_DAYS * DAY)
    start = lines.group_start(customers)
    horizon = lines.position(customers, at + int(horizon_days * DAY))
    top = _top_sellers(s, int(at.min())) if n else np.zeros(0, dtype=np.int64)
    for i in range(n):
        if placement[i] == "pdp":
            if end[i] > recent[i]:
                code = lines.payload["product"][rng.integers(recent[i], end[i])]
                page[i] = str(s.products.values[code])
            elif len(top):
                page[i] = str(s.products.values[rng.choice(top)])
        elif placement[i] in ("cart", "checkout"):
            if horizon[i] > end[i]:  # the next order, from its first line on
                basket, leave = _order_at(lines, int(horizon[i]), end[i], forward=True), 1
            elif end[i] > start[i]:
                basket, leave = _order_at(lines, int(start[i]), end[i] - 1, forward=False), 0
            else:
                continue
            size = min(CART_SIZE, len(basket) - leave)
            if size >= 1:
                keep = rng.permutation(basket)[: rng.integers(1, size + 1)]
                cart[i] = [str(p) for p in s.products.decode(np.sort(keep))]
    return Contexts(channel, placement, moments, page, cart)


def _order_at(lines: Any, bound: int, at: int, *, forward: bool) -> np.ndarray:
    """The distinct products of the order holding line ``at`` (a customer's lines are in
    time order; one order's lines are consecutive), not crossing ``bound``."""
    order = lines.payload["order"]
    first = last = at
    if forward:
        while last + 1 < bound and order[last + 1] == order[at]:
            last += 1
    else:
        while first > bound and order[first - 1] == order[at]:
            first -= 1
    products = lines.payload["product"][first : last + 1]
    return np.unique(products)


def _channels(
    s: Snapshot,
    t: np.ndarray,
    rng: np.random.Generator,
    from_exposures: float,
    moments: list[str | None],
) -> tuple[list[str], list[str]]:
    allowed = np.bitwise_or.reduce(s.offer_channels[s.offer_known]) if s.offer_known.any() else 0
    offered = [c for i, c in enumerate(CHANNELS) if (int(allowed) >> i) & 1] or list(CHANNELS)
    usable = np.flatnonzero((s.exposure_context_channel >= 0) & (s.exposure_context_placement >= 0))
    times = s.exposure_context_seconds[usable]
    lo = np.searchsorted(times, t - EXPOSURE_WINDOW_DAYS * DAY)
    hi = np.searchsorted(times, t)
    channel, placement = [], []
    for i in range(len(t)):
        if hi[i] > lo[i] and rng.random() < from_exposures:
            j = usable[rng.integers(lo[i], hi[i])]
            channel.append(CHANNELS[s.exposure_context_channel[j]])
            placement.append(PLACEMENTS[s.exposure_context_placement[j]])
            continue
        name = offered[rng.integers(len(offered))]
        pages = [
            p
            for p in CHANNEL_PLACEMENTS[name]
            if p != "post_purchase" or moments[i] == "post_purchase"
        ]
        channel.append(name)
        placement.append(pages[rng.integers(len(pages))])
    return channel, placement


def _moments(s: Snapshot, customers: np.ndarray, t: np.ndarray) -> list[str | None]:
    """The moment a storefront would declare, from what happened just before ``t``."""
    n = len(customers)
    at = t
    events, types = s.events_by_customer_type, len(s.event_types)

    def since(name: str) -> np.ndarray:
        last = events.last_before(customers * types + s.event_type_code(name), at)
        return t - events.seconds_at(last)

    order = t - s.orders_by_customer.seconds_at(s.orders_by_customer.last_before(customers, at))
    views = events.count(customers * types + s.event_type_code("view"), at - DAY, at)
    loyalty = t - s.loyalty_by_customer.seconds_at(s.loyalty_by_customer.last_before(customers, at))
    checks = (
        ("cart_abandonment", since("cart_abandon") <= 4 * 3600),
        ("post_purchase", order <= 48 * 3600),
        ("support_resolved", since("support_resolved") <= DAY),
        ("browsing", views >= 3),
        ("loyalty_milestone", loyalty <= 7 * DAY),
    )
    out: list[str | None] = [None] * n
    for name, holds in reversed(checks):  # the first that holds wins
        for i in np.flatnonzero(holds):
            out[i] = name
    return out


def _top_sellers(s: Snapshot, t: int, size: int = 50) -> np.ndarray:
    window = (s.line_seconds < t) & (s.line_seconds >= t - 30 * DAY)
    products = s.line_product[window]
    products = products[products != s.products.unknown]
    if not len(products):
        return np.zeros(0, dtype=np.int64)
    counts = np.bincount(products, minlength=len(s.products))
    return np.argsort(-counts, kind="stable")[: min(size, int((counts > 0).sum()))]
