"""The eligibility engine: rules evaluated vectorised over candidate rows, with reasons.

Every row (a request paired with an offer) gets a bitmask of the reasons it is excluded;
0 means eligible. :func:`trace` turns that into the auditable "why not shown" view for
one customer: every offer, eligible or with all its reasons.

Caps, cooldowns, sequencing and redemptions read past exposures and outcomes through a
:class:`Ledger`. :class:`SnapshotLedger` reads them from the workspace snapshot; the
service backs the same interface with its database. Caps count what customers received
(sends, offers served, or views; see ``policy.rules.Cap``), never requests.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import pandas as pd

from features.builder import FeatureBuilder, Requests
from features.contract import CHANNELS, OFFER_KINDS
from features.snapshot import CapIndexes, Snapshot
from policy.rules import (
    ActiveWindow,
    AlreadyOwns,
    BlockedForSegment,
    Bundles,
    ChannelAllowed,
    CompatibilityRequired,
    Consent,
    DeclineCooldown,
    FrequencyCap,
    Killed,
    OutOfStock,
    RuleSet,
    Sequencing,
    Targeting,
)

__all__ = [
    "REASONS",
    "Eligibility",
    "Ledger",
    "Limit",
    "SnapshotLedger",
    "customer_trace",
    "evaluate",
    "hard_limits",
    "personalisation_allowed",
    "reasons_of",
    "trace",
]

DAY = 86_400
Exclude = Callable[[str, np.ndarray], None]

REASONS: dict[str, str] = {
    "category_already_bought": "a category offer is cross-sell, and the customer already buys "
    "in this category",
    "already_redeemed": "the customer already redeemed this coupon",
    "in_cart": "it is already in the cart",
    "offer_not_active": "outside the offer's valid window",
    "channel_not_allowed": "the offer is not allowed on this channel",
    "no_consent": "the customer did not consent to this channel",
    "consent_unknown": "the customer's consent for this channel is unknown",
    "not_in_audience": "the customer is not in the offer's target audience",
    "not_in_segment": "the customer is not in the offer's target segments",
    "already_owns": "the customer already bought it, and it is not a consumable",
    "bought_recently": "the customer bought it recently",
    "not_compatible": "nothing the customer bought makes it compatible",
    "offer_killed": "the offer is switched off",
    "out_of_stock": "its products are out of stock",
    "frequency_cap_channel": "the customer reached the frequency cap on this channel",
    "frequency_cap_total": "the customer reached the frequency cap across channels",
    "frequency_cap_offer": "this offer reached its cap for the customer",
    "declined_cooldown": "the customer declined it recently",
    "sequence_not_met": "it comes only after an offer the customer has not had yet",
    "bundle_mostly_owned": "the customer already owns most of the bundle",
    "bundle_product_unavailable": "a product of the bundle is unavailable",
    "blocked_for_segment": "a reviewer blocked it for the customer's segment",
    "mutually_exclusive": "an offer of the same exclusion group is already in the slate",
    "bundle_ladder_conflict": "another tier of the same bundle ladder is already in the slate",
    "not_due": "a consumable the customer bought, not due yet by their own cycle",
    "stop_loss": "the stop-loss killed it: its lift or margin uplift fell short for "
    "consecutive weekly cycles",
}
_BIT = {code: 1 << i for i, code in enumerate(REASONS)}


def reasons_of(mask: int) -> list[str]:
    """The reason codes in a bitmask, in the order of :data:`REASONS`."""
    return [code for code, bit in _BIT.items() if mask & bit]


Unit = Literal["sends", "served", "viewed"]


class Ledger(Protocol):
    """Past exposures and outcomes, for caps, cooldowns, sequencing and redemptions.

    Customers come as snapshot codes and as their ids (``ids``): a customer the snapshot
    does not know (code UNKNOWN) is still counted under their own id by a live ledger.
    """

    def counts(
        self,
        unit: Unit,
        customers: np.ndarray,
        ids: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
        channels: Sequence[int],
    ) -> np.ndarray:
        """Per customer: sends, offers served or 'viewed' outcomes in [start, end) on any of
        ``channels`` (holdout and empty slates never count)."""
        ...

    def offer_counts(
        self,
        unit: Literal["served", "viewed"],
        customers: np.ndarray,
        ids: np.ndarray,
        offers: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
    ) -> np.ndarray:
        """Per (customer, offer) row: times served (or viewed) in [start, end)."""
        ...

    def last_declined_s(
        self, customers: np.ndarray, ids: np.ndarray, offers: np.ndarray, before_s: np.ndarray
    ) -> np.ndarray:
        """Time (seconds) each customer last declined each offer before ``before_s``, NaN
        if never."""
        ...

    def had_offer(
        self,
        customers: np.ndarray,
        ids: np.ndarray,
        offers: np.ndarray,
        before_s: np.ndarray,
        event: str,
    ) -> np.ndarray:
        """Whether each customer was shown (or accepted) each offer before ``before_s``."""
        ...


@dataclass(frozen=True)
class SnapshotLedger:
    """The ledger as recorded in a workspace's exposures and outcomes. Beside the live
    ledger (``ledger_rows=False``), its caps leave out the rows exported from the live
    ledger, which counts them itself."""

    snapshot: Snapshot
    ledger_rows: bool = True

    @property
    def _caps(self) -> CapIndexes:
        s = self.snapshot
        return s.caps if self.ledger_rows else s.caps_without_ledger_rows

    def counts(
        self,
        unit: Unit,
        customers: np.ndarray,
        ids: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
        channels: Sequence[int],
    ) -> np.ndarray:
        caps = self._caps
        index = {
            "sends": caps.sends_by_customer_channel,
            "served": caps.served_by_customer_channel,
            "viewed": caps.viewed_by_customer_channel,
        }[unit]
        total = np.zeros(len(customers), dtype=np.int64)
        for channel in channels:
            total += index.count(customers * len(CHANNELS) + channel, start_s, end_s)
        return total

    def offer_counts(
        self,
        unit: Literal["served", "viewed"],
        customers: np.ndarray,
        ids: np.ndarray,
        offers: np.ndarray,
        start_s: np.ndarray,
        end_s: np.ndarray,
    ) -> np.ndarray:
        caps = self._caps
        if unit == "served":
            pairs, index = caps.cust_offer_shown, caps.shown_by_cust_offer
        else:
            pairs, index = caps.cust_offer_viewed, caps.viewed_by_cust_offer
        return index.count(pairs.encode(customers, offers), start_s, end_s).astype(np.int64)

    def last_declined_s(
        self, customers: np.ndarray, ids: np.ndarray, offers: np.ndarray, before_s: np.ndarray
    ) -> np.ndarray:
        s = self.snapshot
        index = s.declined_by_cust_offer
        return index.seconds_at(
            index.last_before(s.cust_offer_declined.encode(customers, offers), before_s)
        )

    def had_offer(
        self,
        customers: np.ndarray,
        ids: np.ndarray,
        offers: np.ndarray,
        before_s: np.ndarray,
        event: str,
    ) -> np.ndarray:
        s = self.snapshot
        if event == "accepted":
            pair = s.accepted_by_cust_offer_pairs.encode(customers, offers)
            return s.accepted_by_cust_offer.last_before(pair, before_s) >= 0
        pair = s.caps.cust_offer_shown.encode(customers, offers)
        return s.caps.shown_by_cust_offer.last_before(pair, before_s) >= 0


@dataclass
class Eligibility:
    """Reason bitmasks per row (0 = eligible), and the eligible rows that rotate behind
    the others (an inbound offer over its ``per_offer`` cap)."""

    mask: np.ndarray
    demoted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def __post_init__(self) -> None:
        if len(self.demoted) != len(self.mask):
            self.demoted = np.zeros(len(self.mask), dtype=bool)

    @property
    def eligible(self) -> np.ndarray:
        return self.mask == 0

    def reasons(self, row: int) -> list[str]:
        return reasons_of(int(self.mask[row]))


def evaluate(
    snapshot: Snapshot,
    rules: RuleSet,
    requests: Requests,
    request_of_row: np.ndarray,
    offer_of_row: np.ndarray,
    *,
    ledger: Ledger | None = None,
    features: Mapping[str, np.ndarray] | None = None,
    killed: Sequence[str] = (),
    out_of_stock: Sequence[str] = (),
    stopped: Collection[str] = (),
) -> Eligibility:
    """Which (request, offer) rows exist, and why each other one does not: the one
    eligibility decision that training, evaluation, batch scoring and the live service
    all make.

    First what an offer *is* (always, whatever the rules file says): a category offer is
    cross-sell, so only for a category new to the customer; a coupon is redeemed once; an
    item or bundle already in the cart is not offered again. Then every enabled rule, on
    every row at once. ``features`` (feature name → per-row values) is needed only by
    ``compatibility_required``. ``killed`` and ``out_of_stock`` add run-time lists (the
    stop-loss, an inventory feed) to the rules file's own. Rules that depend on the
    channel are skipped for requests without one. ``stopped``: the offers the stop-loss
    killed (:meth:`serving.ledger.SqlLedger.stopped_offers`), excluded with their own
    reason, ``stop_loss``, whatever the rules file says.
    """
    s = snapshot
    ledger = ledger or SnapshotLedger(snapshot)
    r = np.asarray(request_of_row, dtype=np.int64)
    o = np.asarray(offer_of_row, dtype=np.int64)
    c = requests.customer[r]
    ids = requests.ids[r]
    t = requests.as_of_s[r]
    channel = requests.channel[r]
    has_channel = channel >= 0
    mask = np.zeros(len(r), dtype=np.int64)
    demoted = np.zeros(len(r), dtype=bool)

    def exclude(code: str, where: np.ndarray) -> None:
        mask[np.asarray(where, dtype=bool)] |= _BIT[code]

    _what_offers_are(s, ledger, requests, r, o, c, ids, t, exclude)

    if rules.rule(ActiveWindow):
        exclude("offer_not_active", (t < s.offer_valid_from_s[o]) | (t > s.offer_valid_to_s[o]))

    if rules.rule(ChannelAllowed):
        allowed = (s.offer_channels[o] >> np.maximum(channel, 0)) & 1
        exclude("channel_not_allowed", has_channel & (allowed == 0))

    if rules.rule(Consent):
        purpose = s.consent_purposes.index(rules.consent_purpose)
        group = (c * len(CHANNELS) + np.maximum(channel, 0)) * len(s.consent_purposes) + purpose
        last = s.consent_index.last_before(group, t + 1)  # a consent set at the moment counts
        granted = s.consent_index.payload_at("granted", last)
        exclude("no_consent", has_channel & (granted == 0))
        if rules.unknown_consent == "deny":
            exclude("consent_unknown", has_channel & np.isnan(granted))

    if rules.rule(Targeting):
        _targeting(s, c, o, t, exclude)

    owns_rule = rules.rule(AlreadyOwns)
    if owns_rule:
        _already_owns(s, owns_rule, c, o, t, exclude)

    compatibility = rules.rule(CompatibilityRequired)
    if compatibility and (compatibility.kinds or compatibility.categories):
        if features is None:
            raise ValueError("the compatibility_required rule needs the candidates' features")
        applies = np.isin(s.offer_kind[o], [OFFER_KINDS.index(k) for k in compatibility.kinds])
        applies |= np.isin(
            s.offer_category[o], s.categories.encode(compatibility.categories, missing=-1)
        )
        lift = np.fmax(
            np.nan_to_num(features["copurchase_lift"], nan=0.0),
            np.nan_to_num(features["item_copurchase_lift"], nan=0.0),
        )
        evidence = (
            (lift >= compatibility.min_lift)
            | (features["family_owned"] > 0)
            | ~np.isnan(features["days_since_compatible_purchase"])
        )
        exclude("not_compatible", applies & ~evidence)

    killed_rule = rules.rule(Killed)
    killed_ids = [*(killed_rule.offers if killed_rule else []), *killed]
    if killed_ids:
        exclude("offer_killed", np.isin(o, s.offers.encode(killed_ids, missing=-1)))

    if stopped:
        exclude("stop_loss", np.isin(o, s.offers.encode(sorted(stopped), missing=-1)))

    stock_rule = rules.rule(OutOfStock)
    missing_ids = [*(stock_rule.products if stock_rule else []), *out_of_stock]
    if missing_ids:
        _out_of_stock(s, o, s.products.encode(missing_ids, missing=-1), exclude)

    cap = rules.rule(FrequencyCap)
    if cap:
        _frequency_caps(ledger, cap, requests, r, o, exclude, demoted)

    cooldown = rules.rule(DeclineCooldown)
    if cooldown:
        declined = ledger.last_declined_s(c, ids, o, t)
        exclude("declined_cooldown", ~np.isnan(declined) & (t - declined <= cooldown.days * DAY))

    sequencing = rules.rule(Sequencing)
    if sequencing:
        for step in sequencing.steps:
            gated = o == s.offers.encode([step.offer], missing=-2)[0]
            if gated.any():
                before = s.offers.encode([step.requires], missing=-1)[0]
                had = ledger.had_offer(
                    c[gated], ids[gated], np.full(int(gated.sum()), before), t[gated], step.event
                )
                where = np.zeros(len(r), dtype=bool)
                where[np.flatnonzero(gated)[~had]] = True
                exclude("sequence_not_met", where)

    bundles = rules.rule(Bundles)
    if bundles:
        _bundles(s, bundles, c, o, t, s.products.encode(missing_ids, missing=-1), exclude)

    blocks = rules.rule(BlockedForSegment)
    if blocks and blocks.blocks:
        segment = s.customer_segment[c]
        for block in blocks.blocks:
            offer = s.offers.encode([block.offer], missing=-2)[0]
            seg = s.segments.encode([block.segment], missing=-2)[0]
            exclude("blocked_for_segment", (o == offer) & (segment == seg))
    return Eligibility(mask, demoted & (mask == 0))


def _what_offers_are(
    s: Snapshot,
    ledger: Ledger,
    requests: Requests,
    r: np.ndarray,
    o: np.ndarray,
    c: np.ndarray,
    ids: np.ndarray,
    t: np.ndarray,
    exclude: Exclude,
) -> None:
    kind = s.offer_kind[o]
    category = kind == OFFER_KINDS.index("category")
    if category.any():
        pair = s.cust_category.encode(c[category], s.offer_category[o[category]])
        bought = s.orders_by_cust_category.last_before(pair, t[category]) >= 0
        where = np.zeros(len(o), dtype=bool)
        where[np.flatnonzero(category)[bought]] = True
        exclude("category_already_bought", where)
    coupon = kind == OFFER_KINDS.index("coupon")
    if coupon.any():
        redeemed = ledger.had_offer(c[coupon], ids[coupon], o[coupon], t[coupon], "accepted")
        where = np.zeros(len(o), dtype=bool)
        where[np.flatnonzero(coupon)[redeemed]] = True
        exclude("already_redeemed", where)
    has_cart = requests.cart.lengths()[r] > 0
    goods = has_cart & np.isin(kind, [OFFER_KINDS.index("item"), OFFER_KINDS.index("bundle")])
    if goods.any():
        rows = np.flatnonzero(goods)
        owner, product = requests.cart.expand(r[rows])
        held = s.offer_covers(o[rows][owner], product) & (product >= 0)
        where = np.zeros(len(o), dtype=bool)
        where[rows[np.bincount(owner, weights=held, minlength=len(rows)) > 0]] = True
        exclude("in_cart", where)


def _targeting(s: Snapshot, c: np.ndarray, o: np.ndarray, t: np.ndarray, exclude: Exclude) -> None:
    n = len(o)
    targeted = s.offer_audiences.lengths()[o] > 0
    if targeted.any():
        rows = np.flatnonzero(targeted)
        owner, audience = s.offer_audiences.expand(o[rows])
        member = (
            s.audience_index.last_before(
                s.audience_pairs.encode(c[rows][owner], audience), t[rows][owner] + 1
            )
            >= 0
        )
        in_any = np.bincount(owner, weights=member, minlength=len(rows)) > 0
        where = np.zeros(n, dtype=bool)
        where[rows[~in_any]] = True
        exclude("not_in_audience", where)
    segmented = s.offer_segments.lengths()[o] > 0
    if segmented.any():
        rows = np.flatnonzero(segmented)
        owner, segment = s.offer_segments.expand(o[rows])
        hit = segment == s.customer_segment[c[rows]][owner]
        in_any = np.bincount(owner, weights=hit, minlength=len(rows)) > 0
        where = np.zeros(n, dtype=bool)
        where[rows[~in_any]] = True
        exclude("not_in_segment", where)


def _already_owns(
    s: Snapshot, rule: AlreadyOwns, c: np.ndarray, o: np.ndarray, t: np.ndarray, exclude: Exclude
) -> None:
    applies = np.isin(s.offer_kind[o], [OFFER_KINDS.index(k) for k in rule.kinds])
    applies &= s.offer_kind[o] != OFFER_KINDS.index("bundle")  # bundles: the bundles rule
    cycles = s.purchase_cycles(s.cust_offer_bought.encode(c, o), t)
    n_before, days_since = cycles.occasions, cycles.days_since
    owned = applies & (n_before > 0)
    if not owned.any():
        return
    # consumable or durable: the data's repeat rate, then the rules' own word per category
    if rule.consumable_repeat_rate is None:  # nothing comes back (a "new to you" slate)
        consumable = np.zeros(len(o), dtype=bool)
    else:
        rate = s.repeat_rate(o, t, rule.min_buyers)
        consumable = np.nan_to_num(rate, nan=0.0) >= rule.consumable_repeat_rate
        # a customer who bought it on two orders or more consumes it, whatever others do
        consumable |= n_before >= 2
    category = s.offer_category[o]
    for name, kind in rule.categories.items():
        consumable[category == s.categories.encode([name], missing=-2)[0]] = kind == "consumable"
    # due: the customer's own cycle (mean days between their orders of it)
    due = (n_before < 2) | (cycles.due >= rule.due_share)
    fixed = np.full(len(o), np.nan if rule.default_days is None else rule.default_days)
    for name, days in rule.category_days.items():
        fixed[category == s.categories.encode([name], missing=-2)[0]] = days
    has_fixed = ~np.isnan(fixed)
    exclude("already_owns", owned & ~has_fixed & ~consumable)
    exclude("not_due", owned & ~has_fixed & consumable & ~due)
    exclude("bought_recently", owned & has_fixed & (days_since <= fixed))


def _out_of_stock(s: Snapshot, o: np.ndarray, missing: np.ndarray, exclude: Exclude) -> None:
    owner, product = s.offer_products.expand(o)
    unavailable = np.isin(product, missing)
    count = np.bincount(owner, weights=unavailable, minlength=len(o))
    size = s.offer_products.lengths()[o]
    coupon = s.offer_kind[o] == OFFER_KINDS.index("coupon")
    exclude("out_of_stock", np.where(coupon, (size > 0) & (count == size), count > 0))


@dataclass(frozen=True)
class Limit:
    """A hard cap that a slate must still fit when it is logged: at most ``allowed`` live
    ``unit`` on ``channels`` in [``start_s``, the slate's moment] (the cap minus what the
    recorded history already holds), for the whole slate, or for one offer."""

    unit: Unit
    channels: tuple[str, ...]
    start_s: int
    allowed: int
    offer_id: str | None = None


def hard_limits(
    snapshot: Snapshot,
    rules: RuleSet,
    requests: Requests,
    request: int,
    offers: Sequence[int],
    history: Ledger | None = None,
) -> list[Limit]:
    """The caps a request's slate (offer codes) must fit atomically as it is logged: the
    send caps and per-offer caps of an outbound channel. 'viewed' caps count feedback that
    comes later, so they are checked at eligibility only."""
    rule = rules.rule(FrequencyCap)
    code = int(requests.channel[request])
    if rule is None or code < 0 or CHANNELS[code] not in rule.outbound_channels or not offers:
        return []
    history = history or SnapshotLedger(snapshot)
    one = np.array([request])
    c, ids, t = requests.customer[one], requests.ids[one], int(requests.as_of_s[request])
    limits = []
    outbound = [CHANNELS.index(name) for name in rule.outbound_channels]
    for cap, channels in ((rule.per_channel, [code]), (rule.total, outbound)):
        if cap is None or cap.counts == "viewed":
            continue
        start = t - int(cap.days * DAY)
        seen = int(
            history.counts(cap.counts, c, ids, np.array([start]), np.array([t]), channels)[0]
        )
        names = tuple(CHANNELS[ch] for ch in channels)
        limits.append(Limit(cap.counts, names, start, cap.max - seen))
    offer_cap = rule.per_offer
    if offer_cap is not None and offer_cap.counts == "served":
        start = t - int(offer_cap.days * DAY)
        n = len(offers)
        seen_offers = history.offer_counts(
            "served",
            np.repeat(c, n),
            np.repeat(ids, n),
            np.asarray(offers),
            np.full(n, start),
            np.full(n, t),
        )
        for offer, seen_offer in zip(offers, seen_offers, strict=True):
            limits.append(
                Limit(
                    "served",
                    tuple(CHANNELS),
                    start,
                    offer_cap.max - int(seen_offer),
                    offer_id=str(snapshot.offers.values[offer]),
                )
            )
    return limits


def _frequency_caps(
    ledger: Ledger,
    rule: FrequencyCap,
    requests: Requests,
    r: np.ndarray,
    o: np.ndarray,
    exclude: Exclude,
    demoted: np.ndarray,
) -> None:
    """Sends are capped on outbound channels only (per channel and all together); a
    per-offer cap excludes outbound and rotates inbound."""
    c, ids, t, channel = requests.customer, requests.ids, requests.as_of_s, requests.channel
    outbound_codes = [CHANNELS.index(name) for name in rule.outbound_channels]
    outbound = np.isin(channel, outbound_codes)
    if rule.per_channel is not None:
        cap = rule.per_channel
        capped = np.zeros(len(c), dtype=bool)
        for code in np.unique(channel[outbound]):
            asking = np.flatnonzero(channel == code)
            window = t[asking] - cap.days * DAY
            seen = ledger.counts(cap.counts, c[asking], ids[asking], window, t[asking], [code])
            capped[asking[seen >= cap.max]] = True
        exclude("frequency_cap_channel", capped[r])
    if rule.total is not None and outbound.any():
        cap = rule.total
        asking = np.flatnonzero(outbound)
        window = t[asking] - cap.days * DAY
        seen = ledger.counts(cap.counts, c[asking], ids[asking], window, t[asking], outbound_codes)
        capped = np.zeros(len(c), dtype=bool)
        capped[asking[seen >= cap.max]] = True
        exclude("frequency_cap_total", capped[r])
    offer_cap = rule.per_offer
    if offer_cap is not None:
        rows = np.flatnonzero(channel[r] >= 0)
        if not len(rows):
            return
        tr = t[r[rows]]
        seen = ledger.offer_counts(
            offer_cap.counts, c[r[rows]], ids[r[rows]], o[rows], tr - offer_cap.days * DAY, tr
        )
        over = rows[seen >= offer_cap.max]
        on_outbound = outbound[r[over]]
        where = np.zeros(len(r), dtype=bool)
        where[over[on_outbound]] = True
        exclude("frequency_cap_offer", where)
        demoted[over[~on_outbound]] = True


def _bundles(
    s: Snapshot,
    rule: Bundles,
    c: np.ndarray,
    o: np.ndarray,
    t: np.ndarray,
    missing: np.ndarray,
    exclude,
) -> None:
    bundle = s.offer_kind[o] == OFFER_KINDS.index("bundle")
    if not bundle.any():
        return
    rows = np.flatnonzero(bundle)
    owner, product = s.offer_products.expand(o[rows])
    pair = s.cust_product.encode(c[rows][owner], product)
    owned = s.orders_by_cust_product.last_before(pair, t[rows][owner]) >= 0
    size = np.maximum(s.offer_products.lengths()[o[rows]], 1)
    share = np.bincount(owner, weights=owned, minlength=len(rows)) / size
    where = np.zeros(len(o), dtype=bool)
    where[rows[share > rule.max_owned_share]] = True
    exclude("bundle_mostly_owned", where)
    unavailable = np.bincount(owner, weights=np.isin(product, missing), minlength=len(rows)) > 0
    where = np.zeros(len(o), dtype=bool)
    where[rows[unavailable]] = True
    exclude("bundle_product_unavailable", where)


def trace(snapshot: Snapshot, eligibility: Eligibility, offer_of_row: np.ndarray) -> pd.DataFrame:
    """The "why not shown" view: one row per offer with ``eligible`` and ``reasons``."""
    offers = snapshot.offers.decode(offer_of_row)
    reasons = [reasons_of(int(m)) for m in eligibility.mask]
    return pd.DataFrame(
        {
            "offer_id": offers,
            "title": snapshot.offer_title.to_numpy()[offer_of_row],
            "eligible": eligibility.eligible,
            "reasons": reasons,
            "explanations": [[REASONS[code] for code in codes] for codes in reasons],
        }
    )


def customer_trace(
    snapshot: Snapshot,
    rules: RuleSet,
    builder: FeatureBuilder,
    customer_id: str,
    as_of: object,
    *,
    channel: str | None = None,
    placement: str | None = None,
    ledger: Ledger | None = None,
) -> pd.DataFrame:
    """Every known offer for one customer at one moment: eligible, or all its reasons."""
    requests = Requests.build(
        snapshot, [customer_id], [as_of], channel=[channel], placement=[placement]
    )
    offers = np.flatnonzero(snapshot.offer_known)
    rows = np.zeros(len(offers), dtype=np.int64)
    matrix = builder.build(snapshot, requests, rows, offers)
    features = matrix.columns()
    result = evaluate(snapshot, rules, requests, rows, offers, ledger=ledger, features=features)
    return trace(snapshot, result, offers)


# -- item 7 (privacy): consent to personalisation -----------------------------------------


def personalisation_allowed(snapshot: Snapshot, rules: RuleSet, requests: Requests) -> np.ndarray:
    """Per request: whether the customer's own history may shape the slate on the asking
    channel. False where the customer's latest ``personalisation`` consent record for
    that channel at or before the request's moment says not granted (a withdrawal after
    the moment does not apply to it); an unknown one follows ``unknown_consent`` (allow:
    personalised; deny: not). Always True when the ``consent`` rule is off, and for a
    request without a channel.

    Marketing consent is :func:`evaluate`'s ``no_consent`` exclusion (no offer at all);
    this one decides *how* offers are ranked and explained, not whether there are any
    (``serving.engine`` ranks such a request as for an unknown customer: by popularity,
    with no "because" that cites the customer)."""
    s = snapshot
    allowed = np.ones(len(requests), dtype=bool)
    if not rules.rule(Consent) or "personalisation" not in s.consent_purposes:
        return allowed
    channel = requests.channel
    has_channel = channel >= 0
    purpose = s.consent_purposes.index("personalisation")
    group = (requests.customer * len(CHANNELS) + np.maximum(channel, 0)) * len(
        s.consent_purposes
    ) + purpose
    last = s.consent_index.last_before(group, requests.as_of_s + 1)  # as evaluate's consent
    granted = s.consent_index.payload_at("granted", last)
    allowed[has_channel & (granted == 0)] = False
    if rules.unknown_consent == "deny":
        allowed[has_channel & np.isnan(granted)] = False
    return allowed
