"""Simulated storefront traffic with a planted truth, served by the real service.

A test (or a data scientist trying a measurement) needs traffic whose true effect is
known: customers who visit, slates that the service itself chooses and logs, and
customers who respond by a rule the test planted. :func:`simulate_traffic` drives any
service through two callables (a batch of ``/recommend`` bodies to their answers, and a
batch of ``/feedback`` bodies), so the same run works over HTTP, through the ASGI app in
process, or against a :class:`~serving.engine.Recommender`.

The planted truth is per offer (:class:`PlantedLift`): an *opportunity* (the offer was
served to the customer, or it was withheld by the offer-level holdout at the rank it
would have had: a ghost) converts when the customer orders the offer's product within
``window`` after it, with probability ``control_rate`` when withheld and ``control_rate
+ lift`` when shown. Draws are independent per opportunity and seeded, so the attach rate
per opportunity of each arm is exactly the planted one in expectation, and the true lift
of an offer is its ``lift``. A shown offer that converts also gets ``accepted`` feedback
(with the order's amount as its value).

Every customer visits at the same moments, ``visit_every`` apart (so that a service
can serve each moment's requests together), and each conversion's order falls strictly
inside ``window`` after its opportunity: with ``window <= visit_every`` an order is
attributed to its own opportunity only, which keeps the planted rates exactly what an
attribution by window measures.

Nothing here knows how the service ranks: the slates are whatever it served, so a
different policy (another rules file or version) can be run through the same customers
and moments, and its true value per request computed from the truth
(:func:`true_value`) without drawing any noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PlantedLift", "Traffic", "simulate_traffic", "true_value"]

Recommend = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
"""A batch of ``/recommend`` bodies to their answers (in the same order)."""
Feedback = Callable[[list[dict[str, Any]]], None]
"""Posts a batch of ``/feedback`` bodies."""
Ghosts = Callable[[Sequence[str]], Sequence[tuple[str, str]]]
"""The (request_id, offer_id) pairs that the given requests withheld (the ledger's
``ghost_offers``)."""


@dataclass(frozen=True)
class PlantedLift:
    """What an offer truly does: the chance that an opportunity converts within the
    window when the offer is withheld, and how much showing it adds."""

    control_rate: float
    lift: float

    def rate(self, shown: bool) -> float:
        return self.control_rate + (self.lift if shown else 0.0)


@dataclass
class Traffic:
    """What a simulated run served and what the customers did.

    * ``requests``: request_id, customer_id, at (the request's moment), day, holdout.
    * ``opportunities``: request_id, customer_id, offer_id, at, rank, arm (``exposed`` or
      ``control``), rate (the planted conversion probability), converted.
    * ``orders``: contract ``orders`` rows, one per conversion.
    """

    requests: pd.DataFrame
    opportunities: pd.DataFrame
    orders: pd.DataFrame


def simulate_traffic(
    recommend: Recommend,
    feedback: Feedback,
    ghosts: Ghosts,
    *,
    customers: Sequence[str],
    start: pd.Timestamp,
    visits: int,
    truth: Mapping[str, PlantedLift],
    products: Mapping[str, str],
    prices: Mapping[str, float],
    visit_every: pd.Timedelta = pd.Timedelta(days=1),
    window: pd.Timedelta = pd.Timedelta(days=1),
    seed: int = 0,
    channel: str = "web",
    placement: str = "home",
    k: int = 3,
    batch: int = 64,
) -> Traffic:
    """Each customer visits ``visits`` times from ``start``; every visit is one
    ``/recommend`` (with ``as_of`` the visit's moment) whose served offers and ghosts
    convert by ``truth``. ``products`` maps an offer to the product its conversion
    orders (at ``prices``). An offer served that has no planted truth is an error: the
    test must plant every offer the policy can serve."""
    if window > visit_every:
        raise ValueError("window must not exceed visit_every: orders would overlap visits")
    rng = np.random.default_rng(seed)
    requests: list[dict[str, Any]] = []
    opportunities: list[dict[str, Any]] = []
    orders: list[dict[str, Any]] = []
    for day in range(visits):
        moment = start + day * visit_every
        bodies = [
            {
                "customer_id": c,
                "channel": channel,
                "placement": placement,
                "k": k,
                "as_of": moment.isoformat(),
            }
            for c in customers
        ]
        answers = [
            a for i in range(0, len(bodies), batch) for a in recommend(bodies[i : i + batch])
        ]
        served: list[dict[str, Any]] = []
        for body, answer in zip(bodies, answers, strict=True):
            at = pd.Timestamp(body["as_of"])
            requests.append(
                dict(
                    request_id=answer["request_id"],
                    customer_id=body["customer_id"],
                    at=at,
                    day=day,
                    holdout=bool(answer["holdout"]),
                )
            )
            if answer["holdout"]:
                continue  # a customer-level holdout slate: its offers are in the ledger only
            for offer in answer["offers"]:
                served.append(
                    dict(
                        request_id=answer["request_id"],
                        customer_id=body["customer_id"],
                        offer_id=offer["offer_id"],
                        at=at,
                        rank=int(offer["rank"]),
                        arm="exposed",
                    )
                )
        who = {r["request_id"]: r for r in requests[-len(bodies) :]}
        withheld = [
            dict(
                request_id=request_id,
                customer_id=who[request_id]["customer_id"],
                offer_id=offer_id,
                at=who[request_id]["at"],
                rank=0,
                arm="control",
            )
            for request_id, offer_id in ghosts(list(who))
        ]
        # in a fixed order, so that the draws do not depend on the order the ledger reads
        today = sorted(served + withheld, key=lambda o: (o["customer_id"], o["offer_id"], o["arm"]))
        unknown = sorted({o["offer_id"] for o in today} - set(truth))
        if unknown:
            raise KeyError(f"offers served with no planted truth: {unknown}")
        rates = np.array([truth[o["offer_id"]].rate(o["arm"] == "exposed") for o in today])
        converted = rng.random(len(today)) < rates
        # an order strictly inside the window: at least a minute after, a minute before its end
        spare = max(window.total_seconds() - 120.0, 0.0)
        delays = 60.0 + rng.random(len(today)) * spare
        posts: list[dict[str, Any]] = []
        for o, rate, hit, delay in zip(today, rates, converted, delays, strict=True):
            opportunities.append(o | dict(rate=float(rate), converted=bool(hit)))
            shown = o["arm"] == "exposed"
            if not hit:
                continue
            product = products[o["offer_id"]]
            price = float(prices[product])
            orders.append(
                dict(
                    order_id=f"SIM-{o['request_id']}-{product}",
                    customer_id=o["customer_id"],
                    product_id=product,
                    ordered_at=o["at"] + pd.Timedelta(seconds=float(delay)),
                    quantity=1.0,
                    amount=price,
                )
            )
            if shown:
                posts.append(
                    dict(
                        request_id=o["request_id"],
                        offer_id=o["offer_id"],
                        outcome="accepted",
                        value=price,
                    )
                )
        for i in range(0, len(posts), batch):
            feedback(posts[i : i + batch])
    return Traffic(
        requests=pd.DataFrame(requests),
        opportunities=pd.DataFrame(opportunities),
        orders=pd.DataFrame(orders),
    )


def true_value(traffic: Traffic, truth: Mapping[str, PlantedLift]) -> float:
    """The policy's true accepted offers per request on ``traffic``'s requests: the
    planted probability of each served offer, summed per request (no draw's noise);
    customer-level holdout requests are left out, as an off-policy estimate leaves them."""
    requests = traffic.requests[~traffic.requests["holdout"]]
    if requests.empty:
        raise ValueError("no request outside the holdout")
    shown = traffic.opportunities[traffic.opportunities["arm"] == "exposed"]
    total = sum(truth[o].rate(True) for o in shown["offer_id"])
    return float(total) / len(requests)
