"""The scorecard: what the served offers caused, per offer and weekly cycle, against a control.

Inputs are plain contract frames (``exposures``, ``outcomes``, ``orders``, ``offers``,
``customers``, ``products``), so a test can make them by hand; :func:`load_inputs` reads
them from a workspace and (optionally) the serving ledger.

**Opportunities.** One opportunity is one logged (request, offer) pair. A delivered offer
(``exposures.holdout`` false; a ledger ``slate_offers`` row of a delivered slate) is the
*exposed* arm; a holdout ghost (``exposures.holdout`` true; a ledger ``ghost_offers`` row,
or an offer of a holdout slate) is the *control* arm. Ledger rows that ``nextbest ledger
export`` already copied into the workspace (``ledger:<request>:<offer>``) are counted once.

**Conversion** is measured the same way in both arms, from ``orders`` (a ghost never gets
feedback): an opportunity converts when the customer orders one of the offer's products
(``offers.product_ids``; for an offer without products, a product of its category) within
:data:`ATTRIBUTION_WINDOW` after it. Attach rate = converted / opportunities. Conversion per
exposure from feedback (accepted, redeemed, purchased) is reported for the exposed arm.

**Lift** = attach rate exposed - control, per offer per weekly cycle (weeks start Monday
00:00), with a 95 % bootstrap interval that resamples *customers* (a cluster bootstrap:
a customer's opportunities stay together), seeded. Revenue lifts are per customer with
CUPED (covariate: the customer's spend in the pre-period of the same length before the
first cycle; theta = cov/var pooled over both arms).

**Observational mode.** A workspace with no control arm (the demo: campaigns mailed to
households, no holdout) is compared as mailed against not mailed: for each offer and week
with exposures, every customer never exposed to that offer is a control opportunity at the
offer's first exposure that week. That comparison is observational, not causal (who was
mailed was chosen), and the scorecard says so.

A figure the data cannot give is ``None`` with a reason, never invented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from policy.fairness import FairnessReport, group_table, judge
from policy.rules import FairnessSettings

__all__ = [
    "ATTRIBUTION_WINDOW",
    "BOOTSTRAP_RESAMPLES",
    "BY_DIMENSIONS",
    "COHORT_HORIZONS_DAYS",
    "CONFIDENCE",
    "CONTROL",
    "CONVERTING_OUTCOMES",
    "EXPOSED",
    "RETURN_WINDOW",
    "Figure",
    "Scorecard",
    "ScorecardInputs",
    "build_scorecard",
    "by_group",
    "cuped",
    "load_inputs",
    "measure",
    "observational_control",
    "offer_cycles",
    "opportunities",
    "rate_lift",
    "read_ledger_opportunities",
    "resampled_sums",
    "weekly_lift",
]

ATTRIBUTION_WINDOW = pd.Timedelta(days=7)
"""An order of an offer's product this long after the opportunity counts as its conversion."""
RETURN_WINDOW = pd.Timedelta(days=30)
"""A return (a negative order line of the product) this long after the purchase counts."""
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95
COHORT_HORIZONS_DAYS = (30, 60, 90)
CONVERTING_OUTCOMES = ("accepted", "redeemed", "purchased")
EXPOSED, CONTROL = "exposed", "control"
HOLDOUT_DESIGN, OBSERVATIONAL_DESIGN = "holdout", "observational"
TENURE_BANDS = ((90, "<90d"), (365, "90d-1y"), (730, "1-2y"), (math.inf, ">2y"))
CUSTOMER_DIMENSIONS = ("segment", "age_band", "income_band", "household_composition")
BY_DIMENSIONS = ("offer", "channel", "placement", "segment", "tenure", *CUSTOMER_DIMENSIONS[1:])
"""What ``--by`` accepts: the opportunity's offer, channel and placement, the customer's
segment and tenure band (from ``signup_at``), and the demographic columns (fairness)."""

CYCLE_COLUMNS = (
    "offer_id",
    "week_start",
    "n_exposed",
    "n_control",
    "attach_exposed",
    "attach_control",
    "lift",
    "lift_low",
    "lift_high",
    "margin_uplift",
    "margin_low",
    "margin_high",
)
"""The columns of :func:`offer_cycles`: one row per (offer, weekly cycle)."""

OPPORTUNITY_COLUMNS = [
    "opportunity_id",
    "customer_id",
    "offer_id",
    "at",
    "arm",
    "channel",
    "placement",
    "request_id",
]


@dataclass(frozen=True)
class ScorecardInputs:
    """The contract frames the scorecard reads, plus ledger opportunities not yet exported
    (columns :data:`OPPORTUNITY_COLUMNS`) and ledger feedback (contract ``outcomes``)."""

    exposures: pd.DataFrame
    outcomes: pd.DataFrame
    orders: pd.DataFrame
    offers: pd.DataFrame
    customers: pd.DataFrame
    products: pd.DataFrame
    ledger_opportunities: pd.DataFrame | None = None


# --------------------------------------------------------------------------- opportunities


def week_start(moments: pd.Series) -> pd.Series:
    """The Monday 00:00 that starts each moment's weekly cycle."""
    day = moments.dt.normalize()
    return day - pd.to_timedelta(day.dt.day_of_week, unit="D")


def opportunities(exposures: pd.DataFrame, ledger: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per logged (request, offer) pair: :data:`OPPORTUNITY_COLUMNS`, ``arm`` is
    :data:`EXPOSED` or :data:`CONTROL` (holdout). Ledger rows whose id the workspace
    already holds (exported) are dropped; the inputs are not modified."""
    frame = pd.DataFrame(
        {
            "opportunity_id": exposures["exposure_id"].astype(str).to_numpy(),
            "customer_id": exposures["customer_id"].astype(str).to_numpy(),
            "offer_id": exposures["offer_id"].astype(str).to_numpy(),
            "at": pd.to_datetime(exposures["shown_at"]).astype("datetime64[us]").to_numpy(),
            "arm": np.where(exposures["holdout"].astype(bool), CONTROL, EXPOSED),
            "channel": _column(exposures, "channel"),
            "placement": _column(exposures, "placement"),
            "request_id": _column(exposures, "request_id"),
        }
    )
    if ledger is not None and len(ledger):
        fresh = ledger[~ledger["opportunity_id"].isin(frame["opportunity_id"])]
        frame = pd.concat([frame, fresh[OPPORTUNITY_COLUMNS]], ignore_index=True)
    return frame.reset_index(drop=True)


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), None, dtype=object)
    return frame[name].astype(object).where(frame[name].notna(), None).to_numpy()


def observational_control(opps: pd.DataFrame, customers: pd.Series) -> pd.DataFrame:
    """The mailed-vs-not-mailed comparison for a workspace without a control arm: for each
    (offer, week) with exposures, every customer never exposed to that offer becomes a
    control opportunity at the offer's first exposure that week, on the same channel and
    placement. Returns the control rows only."""
    exposed = opps[opps["arm"] == EXPOSED]
    if not len(exposed):
        return opps.iloc[:0]
    everyone = pd.unique(customers.astype(str))
    cycles = (
        exposed.assign(week_start=week_start(exposed["at"]))
        .sort_values("at", kind="stable")
        .groupby(["offer_id", "week_start"], sort=True)
        .first()
        .reset_index()
    )
    # every (cycle, customer), less the customers the cycle's offer ever reached
    cycle_index = np.repeat(np.arange(len(cycles)), len(everyone))
    customer = np.tile(everyone, len(cycles))
    offer = cycles["offer_id"].to_numpy()[cycle_index]
    reached = pd.MultiIndex.from_frame(exposed[["offer_id", "customer_id"]].drop_duplicates())
    keep = ~pd.MultiIndex.from_arrays([offer, customer]).isin(reached)
    cycle_index, customer, offer = cycle_index[keep], customer[keep], offer[keep]
    at = cycles["at"].to_numpy()[cycle_index]
    stamp = pd.Series(cycles["at"].dt.strftime("%Y%m%d").to_numpy()[cycle_index])
    return pd.DataFrame(
        {
            "opportunity_id": (
                "control:" + pd.Series(offer) + ":" + stamp + ":" + customer
            ).to_numpy(),
            "customer_id": customer,
            "offer_id": offer,
            "at": at,
            "arm": CONTROL,
            "channel": cycles["channel"].to_numpy()[cycle_index],
            "placement": cycles["placement"].to_numpy()[cycle_index],
            "request_id": None,
        }
    )


# --------------------------------------------------------------------------- outcomes


def offer_products(offers: pd.DataFrame, products: pd.DataFrame) -> pd.DataFrame:
    """(offer_id, product_id): an offer's own products, else its category's products."""
    own = offers[["offer_id", "product_ids"]].explode("product_ids").dropna()
    own = own.rename(columns={"product_ids": "product_id"})
    bare = offers[offers["product_ids"].map(len) == 0]
    by_category = bare[["offer_id", "category"]].merge(
        products[["product_id", "category"]].dropna(), on="category"
    )[["offer_id", "product_id"]]
    pairs = pd.concat([own, by_category], ignore_index=True).astype(str)
    return pairs.drop_duplicates().reset_index(drop=True)


def _offer_category(offers: pd.DataFrame, pairs: pd.DataFrame, products: pd.DataFrame) -> pd.Series:
    """Each offer's category: its own, else the most common one of its products."""
    own = offers.set_index("offer_id")["category"]
    of_products = (
        pairs.merge(products[["product_id", "category"]].dropna(), on="product_id")
        .groupby("offer_id")["category"]
        .agg(lambda values: values.mode().iloc[0])
    )
    return own.fillna(of_products)


def _first_after(
    left_key: np.ndarray,
    left_at: np.ndarray,
    right_key: np.ndarray,
    right_at: np.ndarray,
    within: pd.Timedelta,
) -> np.ndarray:
    """For each left row, the index of the first right row with the same key at or after
    its moment and within ``within`` (-1: none). Keys are int64, moments datetime64 (taken
    to the millisecond)."""
    found = np.full(len(left_key), -1, dtype=np.int64)
    if not len(left_key) or not len(right_key):
        return found
    keys, _ = pd.factorize(np.concatenate([left_key, right_key]))
    left_dense, right_dense = keys[: len(left_key)], keys[len(left_key) :]
    left_ms = left_at.astype("datetime64[ms]").astype(np.int64)
    right_ms = right_at.astype("datetime64[ms]").astype(np.int64)
    origin = min(left_ms.min(), right_ms.min())
    span = max(left_ms.max(), right_ms.max()) - origin + 1
    # one sortable number per (key, moment): the key's block, then the moment within it
    left_composite = left_dense * span + (left_ms - origin)
    right_composite = right_dense * span + (right_ms - origin)
    order = np.argsort(right_composite, kind="stable")
    ordered = right_composite[order]
    position = np.searchsorted(ordered, left_composite, side="left")
    inside = position < len(ordered)
    candidate = np.where(inside, position, 0)
    ok = (
        inside
        & (right_dense[order][candidate] == left_dense)
        & (ordered[candidate] - left_composite <= within // pd.Timedelta(milliseconds=1))
    )
    found[ok] = order[candidate[ok]]
    return found


def _codes(*columns: pd.Series) -> list[np.ndarray]:
    """Shared integer codes for columns holding the same kind of id."""
    values = pd.concat([c.astype(str) for c in columns], ignore_index=True)
    codes, _ = pd.factorize(values)
    out, start = [], 0
    for column in columns:
        out.append(codes[start : start + len(column)].astype(np.int64))
        start += len(column)
    return out


def _first_pair_after(
    left: pd.DataFrame,
    left_at: str,
    right: pd.DataFrame,
    right_at: str,
    within: pd.Timedelta,
) -> np.ndarray:
    """:func:`_first_after` keyed on (customer_id, offer_id) of both frames."""
    (left_customer, right_customer) = _codes(left["customer_id"], right["customer_id"])
    (left_offer, right_offer) = _codes(left["offer_id"], right["offer_id"])
    width = int(max(left_offer.max(initial=0), right_offer.max(initial=0))) + 1
    return _first_after(
        left_customer * width + left_offer,
        left[left_at].to_numpy("datetime64[ns]"),
        right_customer * width + right_offer,
        right[right_at].to_numpy("datetime64[ns]"),
        within,
    )


def measure(
    opps: pd.DataFrame,
    inputs: ScorecardInputs,
    *,
    window: pd.Timedelta = ATTRIBUTION_WINDOW,
) -> pd.DataFrame:
    """The opportunities with what followed each, measured the same way in both arms:

    ``converted`` (an order of the offer's products within ``window``), ``converted_at``,
    ``days_to_purchase``, ``revenue`` (the converted lines' amount), ``margin`` (the offer's
    margin, else price - cost of the converted lines; NaN when unknown), ``expanded`` (the
    customer's first purchase ever in the offer's category falls in the window),
    ``ordered_any`` (any order in the window: core conversion), ``returned`` (a converted
    product returned within :data:`RETURN_WINDOW`, or a ``returned`` outcome), and
    ``feedback_converted`` (an accepted/redeemed/purchased outcome naming the exposure, or
    without one, within the window; exposed arm only) and ``week_start``."""
    orders, products, offers = inputs.orders, inputs.products, inputs.offers
    result = opps.copy()
    result["week_start"] = week_start(result["at"])
    pairs = offer_products(offers, products)
    bought = orders[orders["quantity"] > 0]
    lines = bought[["customer_id", "product_id", "ordered_at", "amount", "quantity"]].merge(
        pairs, on="product_id"
    )
    first = _first_pair_after(result, "at", lines, "ordered_at", window)
    result["converted"] = first >= 0
    converted_at = np.full(len(result), np.datetime64("NaT"), dtype="datetime64[ns]")
    converted_at[first >= 0] = lines["ordered_at"].to_numpy("datetime64[ns]")[first[first >= 0]]
    result["converted_at"] = converted_at
    result["days_to_purchase"] = (result["converted_at"] - result["at"]).dt.total_seconds() / 86400
    result = _attach_value(result, lines, offers, products, window)
    result = _attach_expansion(result, bought, offers, pairs, products, window)
    result["ordered_any"] = _any_order(result, bought, window)
    result["returned"] = _returned(result, orders, pairs, inputs.outcomes)
    result["feedback_converted"] = _feedback(result, inputs.outcomes, window)
    return result


def _in_window(frame: pd.DataFrame, moment: str, window: pd.Timedelta) -> pd.Series:
    return (frame[moment] >= frame["at"]) & (frame[moment] <= frame["at"] + window)


def _attach_value(
    result: pd.DataFrame,
    lines: pd.DataFrame,
    offers: pd.DataFrame,
    products: pd.DataFrame,
    window: pd.Timedelta,
) -> pd.DataFrame:
    converted = result.loc[result["converted"], ["opportunity_id", "customer_id", "offer_id", "at"]]
    joined = converted.merge(lines, on=["customer_id", "offer_id"])
    joined = joined[_in_window(joined, "ordered_at", window)]
    unit = products.drop_duplicates("product_id").set_index("product_id")
    line_margin = (
        joined["product_id"].map(unit["price"]) - joined["product_id"].map(unit["cost"])
    ) * joined["quantity"]
    per_opp = joined.assign(line_margin=line_margin, uncosted=line_margin.isna()).groupby(
        "opportunity_id"
    )
    revenue = per_opp["amount"].sum()
    # a line without a known cost leaves its opportunity's margin unknown
    from_lines = per_opp["line_margin"].sum().where(per_opp["uncosted"].sum() == 0)
    offer_codes, offer_labels = pd.factorize(result["offer_id"])
    margins = offers.drop_duplicates("offer_id").set_index("offer_id")["margin"]
    offer_margin = margins.reindex(offer_labels).to_numpy(float)[offer_codes]
    costed_offers = _offers_with_costs(offers, products).reindex(offer_labels)
    costed = np.isfinite(offer_margin) | costed_offers.fillna(False).to_numpy(bool)[offer_codes]
    converted = result["converted"].to_numpy()
    ids = result.loc[converted, "opportunity_id"]
    result["revenue"] = 0.0
    result.loc[converted, "revenue"] = revenue.reindex(ids).to_numpy(float)
    line_based = np.full(len(result), np.nan)
    line_based[converted] = from_lines.reindex(ids).to_numpy(float)
    margin = np.where(converted, np.where(np.isfinite(offer_margin), offer_margin, line_based), 0.0)
    # an offer whose margin is unknown is unknown for its unconverted opportunities too
    result["margin"] = np.where(costed, margin, np.nan)
    result["margin_known"] = costed
    return result


def _offers_with_costs(offers: pd.DataFrame, products: pd.DataFrame) -> pd.Series:
    pairs = offer_products(offers, products)
    costed = products.set_index("product_id")[["price", "cost"]].notna().all(axis=1)
    return (
        pairs.assign(ok=pairs["product_id"].map(costed).fillna(False))
        .groupby("offer_id")["ok"]
        .all()
    )


def _attach_expansion(
    result: pd.DataFrame,
    bought: pd.DataFrame,
    offers: pd.DataFrame,
    pairs: pd.DataFrame,
    products: pd.DataFrame,
    window: pd.Timedelta,
) -> pd.DataFrame:
    category = result["offer_id"].map(_offer_category(offers, pairs, products))
    firsts = (
        bought[["customer_id", "product_id", "ordered_at"]]
        .merge(products[["product_id", "category"]].dropna(), on="product_id")
        .groupby(["customer_id", "category"])["ordered_at"]
        .min()
        .rename("first_in_category")
    )
    keyed = pd.MultiIndex.from_arrays([result["customer_id"], category])
    first_in = pd.Series(firsts.reindex(keyed).to_numpy(), index=result.index)
    result["expanded"] = (first_in >= result["at"]) & (first_in <= result["at"] + window)
    return result


def _any_order(result: pd.DataFrame, bought: pd.DataFrame, window: pd.Timedelta) -> np.ndarray:
    opp_customer, order_customer = _codes(result["customer_id"], bought["customer_id"])
    found = _first_after(
        opp_customer,
        result["at"].to_numpy("datetime64[ns]"),
        order_customer,
        bought["ordered_at"].to_numpy("datetime64[ns]"),
        window,
    )
    return found >= 0


def _returned(
    result: pd.DataFrame, orders: pd.DataFrame, pairs: pd.DataFrame, outcomes: pd.DataFrame
) -> np.ndarray:
    returns = orders.loc[orders["quantity"] < 0, ["customer_id", "product_id", "ordered_at"]]
    returns = returns.merge(pairs, on="product_id")
    mask = result["converted"].to_numpy()
    returned = np.zeros(len(result), dtype=bool)
    if mask.any() and len(returns):
        found = _first_pair_after(
            result[mask], "converted_at", returns, "ordered_at", RETURN_WINDOW
        )
        returned[np.flatnonzero(mask)[found >= 0]] = True
    told = outcomes.loc[outcomes["outcome"] == "returned", "exposure_id"].dropna()
    return returned | (result["opportunity_id"].isin(set(told)).to_numpy() & mask)


def _feedback(result: pd.DataFrame, outcomes: pd.DataFrame, window: pd.Timedelta) -> np.ndarray:
    """An outcome that names its exposure converts that one; one that does not, the
    customer's opportunities of that offer in the window before it."""
    converting = outcomes[outcomes["outcome"].isin(CONVERTING_OUTCOMES)]
    named = converting["exposure_id"].notna()
    hit = result["opportunity_id"].isin(set(converting.loc[named, "exposure_id"])).to_numpy()
    anonymous = converting[~named]
    if len(anonymous):
        hit |= _first_pair_after(result, "at", anonymous, "occurred_at", window) >= 0
    return hit & (result["arm"] == EXPOSED).to_numpy()


# --------------------------------------------------------------------------- bootstrap


def resampled_sums(
    customer: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    columns: Sequence[np.ndarray],
    *,
    resamples: int,
    seed: int,
) -> list[np.ndarray]:
    """Each column's sum per group in every cluster-bootstrap resample: within a group,
    its customers are drawn with replacement as many times as it has customers, and a
    customer drawn brings all its rows. One (resamples x n_groups) array per column.
    ``customer``/``group`` are int codes per row.

    Drawing n customers with replacement gives each customer a multinomial(n, 1/n) count;
    customers whose sums are identical are interchangeable, so the counts are drawn per
    distinct sum (multinomial(n, share of each)): exactly the same distribution, and all
    resamples of a group come from one call, with no loop over resamples."""
    values = np.column_stack([np.asarray(c, dtype=float) for c in columns])
    n_customers = int(customer.max(initial=-1)) + 1
    cells, cell_of_row = np.unique(
        group.astype(np.int64) * n_customers + customer, return_inverse=True
    )
    sums = np.column_stack(
        [np.bincount(cell_of_row, weights=v, minlength=len(cells)) for v in values.T]
    )
    cell_group = cells // max(n_customers, 1)
    out = np.full((resamples, n_groups, values.shape[1]), np.nan)
    rng = np.random.default_rng(seed)
    bounds = np.searchsorted(cell_group, np.arange(n_groups + 1))
    for g in range(n_groups):
        block = sums[bounds[g] : bounds[g + 1]]
        if not len(block):
            continue
        kinds, counts = _distinct_rows(block)
        drawn = rng.multinomial(len(block), counts / len(block), size=resamples)
        out[:, g, :] = drawn @ kinds
    return [out[:, :, k] for k in range(values.shape[1])]


def _distinct_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a 2-D array and how often each occurs (a lexsort: much faster
    than ``np.unique(axis=0)``, which sorts the rows as bytes)."""
    order = np.lexsort(block.T[::-1])
    ordered = block[order]
    change = np.flatnonzero(np.any(np.diff(ordered, axis=0) != 0, axis=1)) + 1
    starts = np.concatenate([[0], change])
    return ordered[starts], np.diff(np.concatenate([starts, [len(block)]]))


def _interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - CONFIDENCE) / 2 * 100
    with np.errstate(all="ignore"):
        finite = np.where(np.isfinite(draws), draws, np.nan)
        ok = np.isfinite(finite).any(axis=0)
        low = np.full(draws.shape[1], np.nan)
        high = np.full(draws.shape[1], np.nan)
        if ok.any():
            low[ok], high[ok] = np.nanpercentile(finite[:, ok], [tail, 100 - tail], axis=0)
    return low, high


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan
        )


def rate_lift(
    measured: pd.DataFrame,
    groups: pd.Series,
    value: str,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """Per group: opportunities and the mean of ``value`` per opportunity in each arm, their
    difference (exposed - control) and its cluster-bootstrap interval. A group whose value
    is unknown (NaN) on any row has NaN figures. Index: the group labels."""
    group_codes, labels = pd.factorize(groups, use_na_sentinel=False)
    customer_codes, _ = pd.factorize(measured["customer_id"])
    raw = measured[value].astype(float).to_numpy()
    unknown = np.bincount(group_codes, weights=np.isnan(raw), minlength=len(labels)) > 0
    values = np.nan_to_num(raw)
    exposed = (measured["arm"] == EXPOSED).to_numpy()
    columns = [exposed * 1.0, exposed * values, (~exposed) * 1.0, (~exposed) * values]
    observed = [np.bincount(group_codes, weights=c, minlength=len(labels)) for c in columns]
    draws = resampled_sums(
        customer_codes, group_codes, len(labels), columns, resamples=resamples, seed=seed
    )
    mean_exposed, mean_control = _ratio(observed[1], observed[0]), _ratio(observed[3], observed[2])
    lift_draws = _ratio(draws[1], draws[0]) - _ratio(draws[3], draws[2])
    low, high = _interval(lift_draws)
    table = pd.DataFrame(
        {
            "n_exposed": observed[0].astype(int),
            "n_control": observed[2].astype(int),
            "exposed": mean_exposed,
            "control": mean_control,
            "lift": mean_exposed - mean_control,
            "low": low,
            "high": high,
        },
        index=pd.Index(labels, name="group"),
    )
    table.loc[unknown, ["exposed", "control", "lift", "low", "high"]] = np.nan
    return table


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One row of the scorecard: a measure in each arm, their difference and its interval.
    ``reason`` says why a figure is missing (then the numbers are None)."""

    name: str
    description: str
    exposed: float | None = None
    control: float | None = None
    lift: float | None = None
    low: float | None = None
    high: float | None = None
    n_exposed: int | None = None
    n_control: int | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {key: _clean(value) for key, value in vars(self).items()}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def _from_table(name: str, description: str, table: pd.DataFrame, reason: str | None) -> Figure:
    row = table.iloc[0] if len(table) else None
    if row is None or not np.isfinite(row["exposed"]):
        return Figure(name, description, reason=reason or "no opportunities")
    figure = Figure(
        name,
        description,
        exposed=float(row["exposed"]),
        control=_finite(row["control"]),
        lift=_finite(row["lift"]),
        low=_finite(row["low"]),
        high=_finite(row["high"]),
        n_exposed=int(row["n_exposed"]),
        n_control=int(row["n_control"]),
    )
    if figure.control is None:
        figure.reason = "no control opportunities: no lift"
    return figure


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def cuped(
    y: np.ndarray, x: np.ndarray, exposed: np.ndarray, *, resamples: int, seed: int
) -> dict[str, Any]:
    """The CUPED difference in means of ``y`` (exposed - control) with covariate ``x``:
    theta = cov(x, y) / var(x) over both arms together; y_cuped = y - theta (x - mean x).
    Returns theta, the raw and adjusted differences, their bootstrap intervals (customers
    resampled, theta re-estimated in each resample) and the variance reduction
    1 - var(y_cuped) / var(y)."""
    n = len(y)
    variance_x = float(np.var(x))
    theta = float(np.cov(x, y, bias=True)[0, 1] / variance_x) if variance_x > 0 else 0.0
    adjusted = y - theta * (x - x.mean())
    variance_y = float(np.var(y))
    reduction = 1 - float(np.var(adjusted)) / variance_y if variance_y > 0 else None
    e = exposed.astype(float)
    c = 1 - e
    columns = [e, e * y, e * x, c, c * y, c * x, x * x, x * y]
    draws = resampled_sums(
        np.arange(n), np.zeros(n, dtype=np.int64), 1, columns, resamples=resamples, seed=seed
    )
    w_e, y_e, x_e, w_c, y_c, x_c, xx, xy = (d[:, 0] for d in draws)
    total = w_e + w_c
    sum_x, sum_y = x_e + x_c, y_e + y_c
    with np.errstate(divide="ignore", invalid="ignore"):
        var_x = xx / total - (sum_x / total) ** 2
        theta_b = np.where(var_x > 0, (xy / total - sum_x * sum_y / total**2) / var_x, 0.0)
        raw_b = y_e / w_e - y_c / w_c
        adjusted_b = raw_b - theta_b * (x_e / w_e - x_c / w_c)
    raw_low, raw_high = _interval(raw_b[:, None])
    adj_low, adj_high = _interval(adjusted_b[:, None])
    raw_diff = y[exposed].mean() - y[~exposed].mean()
    return {
        "theta": theta,
        "raw": float(raw_diff),
        "raw_low": float(raw_low[0]),
        "raw_high": float(raw_high[0]),
        "cuped": float(raw_diff - theta * (x[exposed].mean() - x[~exposed].mean())),
        "low": float(adj_low[0]),
        "high": float(adj_high[0]),
        "variance_reduction": reduction,
    }


# --------------------------------------------------------------------------- the scorecard


def _prepare(inputs: ScorecardInputs, weeks: int | None) -> tuple[pd.DataFrame, str]:
    """The opportunities of the last ``weeks`` cycles (all if None), with the observational
    control added when the data has no control arm; and the design's name."""
    opps = opportunities(inputs.exposures, inputs.ledger_opportunities)
    if weeks is not None and len(opps):
        starts = week_start(opps["at"])
        first = starts.max() - pd.Timedelta(weeks=weeks - 1)
        opps = opps[starts >= first].reset_index(drop=True)
    design = HOLDOUT_DESIGN
    if len(opps) and not (opps["arm"] == CONTROL).any():
        design = OBSERVATIONAL_DESIGN
        control = observational_control(opps, inputs.customers["customer_id"])
        opps = pd.concat([opps, control], ignore_index=True)
    return opps, design


def offer_cycles(
    inputs: ScorecardInputs,
    *,
    weeks: int | None = None,
    window: pd.Timedelta = ATTRIBUTION_WINDOW,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    measured: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (offer_id, week_start): ``n_exposed, n_control, attach_exposed,
    attach_control, lift, lift_low, lift_high, margin_uplift, margin_low, margin_high``
    (NaN where unknown: no control, or no known margin). Intervals: 95 % cluster bootstrap
    over customers. ``measured``: the output of :func:`measure` when already computed."""
    if measured is None:
        opps, _ = _prepare(inputs, weeks)
        measured = measure(opps, inputs, window=window)
    columns = list(CYCLE_COLUMNS)
    if not len(measured):
        return pd.DataFrame(columns=columns)
    grouped = measured.groupby(["offer_id", "week_start"], sort=False)
    keys = grouped.ngroup()
    firsts = measured.loc[grouped.head(1).index, ["offer_id", "week_start"]]
    firsts.index = keys.loc[firsts.index].to_numpy()
    attach = rate_lift(measured, keys, "converted", resamples=resamples, seed=seed)
    margin = rate_lift(measured, keys, "margin", resamples=resamples, seed=seed)
    labels = firsts.loc[attach.index]
    table = pd.DataFrame(
        {
            "offer_id": labels["offer_id"].to_numpy(),
            "week_start": labels["week_start"].to_numpy(),
            "n_exposed": attach["n_exposed"].to_numpy(),
            "n_control": attach["n_control"].to_numpy(),
            "attach_exposed": attach["exposed"].to_numpy(),
            "attach_control": attach["control"].to_numpy(),
            "lift": attach["lift"].to_numpy(),
            "lift_low": attach["low"].to_numpy(),
            "lift_high": attach["high"].to_numpy(),
            "margin_uplift": margin["lift"].to_numpy(),
            "margin_low": margin["low"].to_numpy(),
            "margin_high": margin["high"].to_numpy(),
        }
    )
    return table.sort_values(["offer_id", "week_start"]).reset_index(drop=True)[columns]


@dataclass
class Scorecard:
    """The scorecard's figures. ``cycles``: :func:`offer_cycles`; ``weekly``: lift over all
    offers per week; ``figures``: the headline rows; ``revenue``: CUPED revenue lifts per
    customer; ``by``: per-group attach tables; ``notes``: what the data can and cannot
    show."""

    design: str
    window_days: float
    period: tuple[pd.Timestamp | None, pd.Timestamp | None]
    cycles: pd.DataFrame
    weekly: pd.DataFrame
    figures: list[Figure]
    revenue: list[Figure]
    by: dict[str, pd.DataFrame]
    notes: list[str]
    resamples: int
    seed: int
    fairness: FairnessReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "design": self.design,
            "attribution_window_days": self.window_days,
            "period": [_clean(p) if p is not None else None for p in self.period],
            "confidence": CONFIDENCE,
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "unit": "customer"},
            "figures": [f.to_json() for f in self.figures],
            "revenue": [f.to_json() for f in self.revenue],
            "weekly": _records(self.weekly),
            "cycles": _records(self.cycles),
            "by": {name: _records(table) for name, table in self.by.items()},
            "fairness": None if self.fairness is None else self.fairness.to_dict(),
            "notes": list(self.notes),
        }

    def to_html(self) -> str:
        from measurement.report import render_html

        return render_html(self)


def fairness_table(
    measured: pd.DataFrame, customers: pd.DataFrame, attributes: Sequence[str]
) -> pd.DataFrame:
    """:func:`policy.fairness.group_table`'s per-group counts, from the measured
    opportunities: ``opportunities`` (all of a group's, both arms), ``offers`` (those
    shown), ``accepted`` (shown and converted: an order within the window, as the lift
    reads it); and for lift, per customer and arm (``treated``: shown, ``control``: held
    out), the arm's attach rate. Exposure parity then asks whether the holdout fell alike
    on every group, acceptance parity whether the offers shown converted alike, and lift
    parity whether they worked alike."""
    shown = (measured["arm"] == EXPOSED).to_numpy()
    frame = pd.DataFrame(
        {
            "customer_id": measured["customer_id"].to_numpy(),
            "arm": np.where(shown, "treated", "control"),
            "opportunities": 1.0,
            "offers": shown * 1.0,
            "accepted": (shown & measured["converted"].to_numpy().astype(bool)) * 1.0,
            "outcome": measured["converted"].to_numpy() * 1.0,
        }
    )
    counts = group_table(customers, frame.drop(columns=["arm", "outcome"]), attributes)
    per = frame.groupby(["customer_id", "arm"], sort=False, as_index=False).agg(
        outcome=("outcome", "mean"), offers=("offers", "sum"), accepted=("accepted", "sum")
    )
    arms = group_table(customers, per, attributes)
    keys = ["attribute", "group"]
    lift = [c for c in arms.columns if c not in counts.columns]
    return counts.merge(arms[[*keys, *lift]], on=keys, how="outer").fillna(0)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _clean(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def _group_labels(measured: pd.DataFrame, by: str, customers: pd.DataFrame) -> pd.Series:
    if by == "offer":
        return measured["offer_id"]
    if by in ("channel", "placement"):
        return measured[by].fillna("unknown").astype(str)
    attributes = customers.set_index("customer_id")
    if by == "tenure":
        signup = measured["customer_id"].map(attributes["signup_at"])
        days = (measured["at"] - signup).dt.total_seconds() / 86400
        bands = pd.Series("unknown", index=measured.index, dtype=object)
        lower = -math.inf
        for upper, label in TENURE_BANDS:
            bands[(days >= lower) & (days < upper)] = label
            lower = upper
        return bands
    if by in CUSTOMER_DIMENSIONS:
        return measured["customer_id"].map(attributes[by]).fillna("unknown").astype(str)
    raise ValueError(f"cannot group by {by!r}: use one of {', '.join(BY_DIMENSIONS)}")


def by_group(
    measured: pd.DataFrame,
    by: str,
    customers: pd.DataFrame,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """Attach rate per arm, lift and interval per group of ``by`` (:data:`BY_DIMENSIONS`)."""
    table = rate_lift(
        measured,
        _group_labels(measured, by, customers),
        "converted",
        resamples=resamples,
        seed=seed,
    )
    return (
        table.rename_axis(by)
        .reset_index()
        .rename(columns={"exposed": "attach_exposed", "control": "attach_control"})
    )


def _customer_frame(
    measured: pd.DataFrame, orders: pd.DataFrame, window: pd.Timedelta
) -> tuple[pd.DataFrame, pd.Timestamp, pd.Timestamp]:
    """Per customer: arm (exposed if any exposed opportunity), revenue, orders and sessions
    in the period, and spend in the pre-period of the same length before it."""
    start = week_start(measured["at"]).min()
    end = week_start(measured["at"]).max() + pd.Timedelta(weeks=1) + window
    if len(orders):
        end = min(end, orders["ordered_at"].max() + pd.Timedelta(microseconds=1))
    length = end - start
    arm = measured.groupby("customer_id")["arm"].agg(
        lambda a: EXPOSED if (a == EXPOSED).any() else CONTROL
    )
    session = measured["request_id"].where(
        measured["request_id"].notna(), measured["at"].astype(str)
    )
    sessions = measured.assign(session=session).groupby("customer_id")["session"].nunique()
    amount = orders["amount"].fillna(0.0)
    in_period = (orders["ordered_at"] >= start) & (orders["ordered_at"] < end)
    before = (orders["ordered_at"] >= start - length) & (orders["ordered_at"] < start)
    revenue = amount[in_period].groupby(orders.loc[in_period, "customer_id"]).sum()
    baskets = orders.loc[in_period].groupby("customer_id")["order_id"].nunique()
    pre = amount[before].groupby(orders.loc[before, "customer_id"]).sum()
    frame = pd.DataFrame({"arm": arm})
    frame["revenue"] = revenue.reindex(frame.index).fillna(0.0)
    frame["orders"] = baskets.reindex(frame.index).fillna(0).astype(int)
    frame["sessions"] = sessions.reindex(frame.index).astype(int)
    frame["pre_spend"] = pre.reindex(frame.index).fillna(0.0)
    return frame, start, end


def _revenue_figures(
    people: pd.DataFrame, *, resamples: int, seed: int, design: str
) -> list[Figure]:
    exposed = (people["arm"] == EXPOSED).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        metrics = {
            "incremental_revenue_per_session": (
                "Revenue per session (a logged request) per customer, exposed - control",
                (people["revenue"] / people["sessions"]).to_numpy(float),
            ),
            "incremental_aov": (
                "Average order value per customer (customers with an order), exposed - control",
                (people["revenue"] / people["orders"].where(people["orders"] > 0)).to_numpy(float),
            ),
            "incremental_revenue_per_customer": (
                "Revenue per customer in the period, exposed - control",
                people["revenue"].to_numpy(float),
            ),
        }
    figures = []
    for name, (description, y) in metrics.items():
        keep = np.isfinite(y)
        if not (exposed & keep).any() or not (~exposed & keep).any():
            figures.append(Figure(name, description, reason="needs customers in both arms"))
            continue
        x = people["pre_spend"].to_numpy(float)[keep]
        note = (
            None if x.any() else "no spend in the pre-period (the orders start later): CUPED = raw"
        )
        result = cuped(y[keep], x, exposed[keep], resamples=resamples, seed=seed)
        figures.append(
            Figure(
                name,
                description + " (CUPED: pre-period spend)",
                exposed=float(y[keep & exposed].mean()),
                control=float(y[keep & ~exposed].mean()),
                lift=result["cuped"],
                low=result["low"],
                high=result["high"],
                n_exposed=int((keep & exposed).sum()),
                n_control=int((keep & ~exposed).sum()),
                reason=note,
                extra={
                    "theta": result["theta"],
                    "raw_lift": result["raw"],
                    "raw_low": result["raw_low"],
                    "raw_high": result["raw_high"],
                    "variance_reduction": result["variance_reduction"],
                    "design": design,
                },
            )
        )
    return figures


def _cohort_figures(
    measured: pd.DataFrame, orders: pd.DataFrame, *, resamples: int, seed: int
) -> list[Figure]:
    entry = measured.groupby("customer_id").agg(
        entered=("at", "min"),
        arm=("arm", lambda a: EXPOSED if (a == EXPOSED).any() else CONTROL),
    )
    data_end = orders["ordered_at"].max() if len(orders) else None
    joined = orders[["customer_id", "ordered_at", "amount"]].merge(
        entry, left_on="customer_id", right_index=True
    )
    figures = []
    for days in COHORT_HORIZONS_DAYS:
        name = f"cohort_value_{days}d"
        description = f"Revenue per customer in the {days} days after their first opportunity"
        horizon = pd.Timedelta(days=days)
        if data_end is None:
            figures.append(Figure(name, description, reason="no orders"))
            continue
        covered = entry["entered"] >= orders["ordered_at"].min()
        eligible = entry[covered & (entry["entered"] + horizon <= data_end)]
        if not (eligible["arm"] == EXPOSED).any() or not (eligible["arm"] == CONTROL).any():
            figures.append(
                Figure(
                    name,
                    description,
                    reason=f"the orders ({orders['ordered_at'].min():%Y-%m-%d} to "
                    f"{data_end:%Y-%m-%d}) do not span {days} days after the first "
                    "opportunities of customers in both arms",
                )
            )
            continue
        inside = joined[
            (joined["ordered_at"] >= joined["entered"])
            & (joined["ordered_at"] < joined["entered"] + horizon)
        ]
        value = inside.groupby("customer_id")["amount"].sum().reindex(eligible.index).fillna(0.0)
        people = pd.DataFrame(
            {
                "customer_id": eligible.index,
                "arm": eligible["arm"].to_numpy(),
                "v": value.to_numpy(),
            }
        )
        table = rate_lift(
            people, pd.Series(0, index=people.index), "v", resamples=resamples, seed=seed
        )
        figures.append(_from_table(name, description, table, None))
    return figures


def _headline(
    measured: pd.DataFrame,
    *,
    resamples: int,
    seed: int,
    window: pd.Timedelta,
    any_returns: bool,
) -> list[Figure]:
    everything = pd.Series(0, index=measured.index)
    days = f"{window / pd.Timedelta(days=1):g} days"
    rows = [
        (
            "attach_rate",
            f"Opportunities converted (an order of the offer's products within {days})",
            "converted",
        ),
        (
            "margin_per_opportunity",
            "Contribution margin per opportunity (offer margin, or price - cost of the lines)",
            "margin",
        ),
        (
            "category_expansion_rate",
            f"First purchase ever in the offer's category within {days}",
            "expanded",
        ),
        (
            "core_conversion",
            f"Any order at all within {days} (core conversion; includes the offer's)",
            "ordered_any",
        ),
    ]
    figures = []
    for name, description, column in rows:
        table = rate_lift(measured, everything, column, resamples=resamples, seed=seed)
        reason = None
        if column == "margin" and measured["margin"].isna().any():
            reason = "costs unknown: no offer margin, and products without a cost"
        figures.append(_from_table(name, description, table, reason))
    shown = measured[measured["arm"] == EXPOSED]
    rate = float(shown["feedback_converted"].mean()) if len(shown) else None
    figures.append(
        Figure(
            "conversion_per_exposure",
            "Exposures with accepted/redeemed/purchased feedback (exposed arm only: a ghost "
            "gets no feedback)",
            exposed=rate,
            n_exposed=len(shown),
            reason=None if len(shown) else "no exposures",
        )
    )
    figures.append(_returns(measured, any_returns))
    figures.append(_time_to_purchase(measured))
    return figures


def _returns(measured: pd.DataFrame, any_returns: bool) -> Figure:
    converted = measured[measured["converted"]]
    exposed = converted[converted["arm"] == EXPOSED]
    control = converted[converted["arm"] == CONTROL]
    description = (
        f"Converted items returned within {RETURN_WINDOW.days} days: cross-sold (exposed) "
        "against the baseline (control conversions)"
    )
    if not any_returns:
        return Figure(
            "return_rate",
            description,
            reason="the data records no returns (no negative order lines, no 'returned' outcomes)",
        )
    if not len(exposed):
        return Figure("return_rate", description, reason="no cross-sold purchases")
    figure = Figure(
        "return_rate",
        description,
        exposed=float(exposed["returned"].mean()),
        control=float(control["returned"].mean()) if len(control) else None,
        n_exposed=len(exposed),
        n_control=len(control),
    )
    if figure.control is not None:
        figure.lift = figure.exposed - figure.control  # type: ignore[operator]
    else:
        figure.reason = "no control conversions for a baseline"
    return figure


def _time_to_purchase(measured: pd.DataFrame) -> Figure:
    converted = measured[measured["converted"]]
    by_arm = converted.groupby("arm")["days_to_purchase"].median()
    figure = Figure(
        "days_to_secondary_purchase",
        "Median days from the opportunity to the purchase of the offer's product",
        exposed=_finite(by_arm.get(EXPOSED, np.nan)),
        control=_finite(by_arm.get(CONTROL, np.nan)),
        n_exposed=int((converted["arm"] == EXPOSED).sum()),
        n_control=int((converted["arm"] == CONTROL).sum()),
    )
    if figure.exposed is None:
        figure.reason = "no conversions"
    elif figure.control is not None:
        figure.lift = figure.exposed - figure.control
    else:
        figure.reason = "no control conversions to compare with"
    return figure


def weekly_lift(
    measured: pd.DataFrame, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> pd.DataFrame:
    """Attach-rate lift over all offers, per weekly cycle, with its interval."""
    table = rate_lift(measured, measured["week_start"], "converted", resamples=resamples, seed=seed)
    return table.rename_axis("week_start").reset_index().sort_values("week_start")


def _notes(design: str, figures: list[Figure], revenue: list[Figure]) -> list[str]:
    notes = []
    if design == OBSERVATIONAL_DESIGN:
        notes += [
            "OBSERVATIONAL, NOT CAUSAL: this data has no holdout, so the control arm is the "
            "customers not mailed the offer, at the offer's first exposure each week. Who was "
            "mailed was chosen by the retailer, so a difference mixes the offer's effect with "
            "who was targeted; read lifts as associations.",
            "What it can show: attach rates by offer, week, channel and segment; how mailed "
            "and not-mailed customers differ; CUPED's variance reduction on real spend.",
            "What it cannot show: the offers' causal lift (no randomised control), margin "
            "(no costs), and feedback beyond redemptions.",
        ]
    else:
        notes.append(
            "Control arm: holdout ghosts (customer- and offer-level holdouts, shown to nobody); "
            "conversion is read from orders in both arms."
        )
    for figure in figures + revenue:
        if figure.reason:
            notes.append(f"{figure.name}: {figure.reason}.")
    return notes


def build_scorecard(
    inputs: ScorecardInputs,
    *,
    weeks: int | None = None,
    by: Sequence[str] = ("offer", "channel", "segment"),
    window: pd.Timedelta = ATTRIBUTION_WINDOW,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    fairness: FairnessSettings | None = None,
) -> Scorecard:
    """The whole scorecard over the last ``weeks`` cycles (all if None): the offer-cycle
    lifts, weekly lift, headline figures, CUPED revenue lifts, cohort values, the
    per-group tables of ``by`` (:data:`BY_DIMENSIONS`), and exposure, acceptance and lift
    parity per group of the ``fairness`` settings' attributes (the rules file's
    ``fairness:`` section; :mod:`policy.fairness`, as training judges its slates)."""
    for name in by:
        if name not in BY_DIMENSIONS:
            raise ValueError(f"cannot group by {name!r}: use one of {', '.join(BY_DIMENSIONS)}")
    opps, design = _prepare(inputs, weeks)
    if not len(opps):
        empty = offer_cycles(inputs, measured=opps.assign(week_start=pd.NaT))
        return Scorecard(
            design,
            window / pd.Timedelta(days=1),
            (None, None),
            empty,
            pd.DataFrame(),
            [],
            [],
            {},
            ["no opportunities: nothing was served or logged"],
            resamples,
            seed,
        )
    measured = measure(opps, inputs, window=window)
    options = {"resamples": resamples, "seed": seed}
    cycles = offer_cycles(inputs, measured=measured, **options)
    any_returns = bool((inputs.orders["quantity"] < 0).any()) or bool(
        (inputs.outcomes["outcome"] == "returned").any()
    )
    figures = _headline(measured, window=window, any_returns=any_returns, **options)
    people, start, end = _customer_frame(measured, inputs.orders, window)
    revenue = _revenue_figures(people, design=design, **options)
    revenue += _cohort_figures(measured, inputs.orders, **options)
    groups = {name: by_group(measured, name, inputs.customers, **options) for name in by}
    fairness = fairness or FairnessSettings()
    parity = judge(fairness_table(measured, inputs.customers, fairness.attributes), fairness)
    for name in ("segment", "channel"):  # the report plots both
        groups.setdefault(name, by_group(measured, name, inputs.customers, **options))
    return Scorecard(
        design,
        window / pd.Timedelta(days=1),
        (start, end),
        cycles,
        weekly_lift(measured, **options),
        figures,
        revenue,
        groups,
        _notes(design, figures, revenue),
        resamples,
        seed,
        parity,
    )


# --------------------------------------------------------------------------- I/O


def read_ledger_opportunities(url: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ledger's opportunities (:data:`OPPORTUNITY_COLUMNS`; delivered slates' offers
    exposed, holdout slates' offers and ghost offers control) and its feedback as contract
    outcomes. Reads only; raises :class:`serving.export.LedgerExportError` without a ledger."""
    import sqlalchemy as sa

    from serving.export import exposure_id, read_ledger
    from serving.ledger import GHOST_MODE, engine_url, ghost_offers, slates

    rows = read_ledger(url)
    served = rows.served
    engine = sa.create_engine(engine_url(url))
    try:
        with engine.connect() as connection:
            ghosts = pd.DataFrame(columns=served.columns)
            if sa.inspect(connection).has_table(ghost_offers.name):
                ghosts = pd.DataFrame(
                    connection.execute(
                        sa.select(
                            ghost_offers.c.request_id,
                            ghost_offers.c.offer_id,
                            slates.c.customer_id,
                            slates.c.channel,
                            slates.c.placement,
                            slates.c.at_s,
                        ).select_from(ghost_offers.join(slates))
                    )
                    .mappings()
                    .all(),
                    columns=[
                        "request_id",
                        "offer_id",
                        "customer_id",
                        "channel",
                        "placement",
                        "at_s",
                    ],
                ).assign(holdout=True, mode=None)
    finally:
        engine.dispose()
    both = pd.concat([served, ghosts], ignore_index=True)
    opps = pd.DataFrame(
        {
            "opportunity_id": [
                exposure_id(r, o) for r, o in zip(both["request_id"], both["offer_id"], strict=True)
            ],
            "customer_id": both["customer_id"].astype(str).to_numpy(),
            "offer_id": both["offer_id"].astype(str).to_numpy(),
            "at": pd.to_datetime(both["at_s"].astype("int64"), unit="s").astype("datetime64[us]"),
            # a holdout's ghost slate and a ghost offer were shown to nobody; a rules-only
            # holdout's slate was shown (as serving.export exports it)
            "arm": np.where(
                both["holdout"].astype(bool) & both["mode"].isin([GHOST_MODE, None]),
                CONTROL,
                EXPOSED,
            ),
            "channel": both["channel"].to_numpy(),
            "placement": both["placement"].to_numpy(),
            "request_id": both["request_id"].astype(str).to_numpy(),
        }
    )
    given = rows.feedback
    outcomes = pd.DataFrame(
        {
            "customer_id": given["customer_id"].astype(str),
            "offer_id": given["offer_id"].astype(str),
            "outcome": given["outcome"].astype(str),
            "occurred_at": pd.to_datetime(given["at_s"].astype("int64"), unit="s"),
            "value": given["value"].astype(float),
            "exposure_id": [
                exposure_id(r, o)
                for r, o in zip(given["request_id"], given["offer_id"], strict=True)
            ],
        }
    )
    return opps, outcomes


def load_inputs(workspace: Path | None, db_url: str | None = None) -> ScorecardInputs:
    """The scorecard's frames from a workspace (read-only) and, with ``db_url``, the ledger's
    rows not yet exported into it (counted once)."""
    from features.workspace import Workspace

    tables = Workspace(Path(workspace)).require().read_all() if workspace else {}
    from features.contract import empty_table

    def table(name: str) -> pd.DataFrame:
        return tables.get(name, empty_table(name))

    outcomes = table("outcomes")
    ledger = None
    if db_url is not None:
        ledger, feedback = read_ledger_opportunities(db_url)
        known = set(outcomes["exposure_id"].dropna() + "\x1f" + outcomes["outcome"])
        fresh = feedback[~(feedback["exposure_id"] + "\x1f" + feedback["outcome"]).isin(known)]
        outcomes = pd.concat([outcomes, fresh], ignore_index=True)
    return ScorecardInputs(
        exposures=table("exposures"),
        outcomes=outcomes,
        orders=table("orders"),
        offers=table("offers"),
        customers=table("customers"),
        products=table("products"),
        ledger_opportunities=ledger,
    )
