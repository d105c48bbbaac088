"""Eligibility rules: a declarative YAML file, validated, versioned by content hash.

Example (``policy/default_rules.yaml`` is the full default)::

    version: 1
    name: default
    consent_purpose: marketing
    unknown_consent: allow        # customers with no consent row for the channel
    rules:
      - type: active_window
      - type: frequency_cap
        per_channel: {max: 3, days: 7}
        total: {max: 6, days: 7}

Each rule has a ``type`` and its own settings; a rule can be switched off with
``enabled: false``. ``load_rules`` raises :class:`RulesError` naming the file, the rule
(by position and type) and the field that is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_RULES",
    "OUTBOUND_CHANNELS",
    "FairnessSettings",
    "RuleSet",
    "RulesError",
    "StopLoss",
    "load_rules",
    "parse_rules",
]

DEFAULT_RULES = Path(__file__).with_name("default_rules.yaml")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True


class ActiveWindow(_Rule):
    """The offer's valid_from ≤ moment ≤ valid_to."""

    type: Literal["active_window"]


class ChannelAllowed(_Rule):
    """The asking channel is among the offer's channels (no channels = all)."""

    type: Literal["channel_allowed"]


class Consent(_Rule):
    """The customer agreed to the channel for the rule set's consent purpose."""

    type: Literal["consent"]


class Targeting(_Rule):
    """Targeted offers only go to their audiences (e.g. a campaign's households) and
    segments."""

    type: Literal["targeting"]


class AlreadyOwns(_Rule):
    """What the customer already bought: a durable is not offered again; a consumable
    comes back when the customer's own cycle says it is due (replenishment).

    The data decides which is which: an item is a consumable when at least
    ``consumable_repeat_rate`` of its buyers bought it again on a later order (its
    category's share when it has fewer than ``min_buyers`` buyers), or when this customer
    bought it on two orders or more; ``null`` treats everything as durable (nothing a
    customer bought comes back: a "new to you" slate).
    ``categories`` overrides both per category. A consumable is due once the days since
    its last purchase reach ``due_share`` × the customer's own mean days between
    purchases of it; bought once so far, it is due (the ranker judges the timing).
    ``category_days`` re-offers a category's items a fixed number of days after a purchase,
    and ``default_days`` every item, whatever the data says. A rules file written before
    replenishment (``default_days: null`` and no ``consumable_repeat_rate``) keeps its
    meaning: nothing the customer bought comes back."""

    type: Literal["already_owns"]
    kinds: list[Literal["item", "category", "coupon", "bundle"]] = ["item", "bundle"]
    consumable_repeat_rate: float | None = Field(0.1, ge=0, le=1)
    min_buyers: int = Field(20, ge=1)
    due_share: float = Field(0.1, ge=0)
    categories: dict[str, Literal["consumable", "durable"]] = {}
    category_days: dict[str, float] = {}
    default_days: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _before_replenishment(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "default_days" in data
            and data["default_days"] is None
            and "consumable_repeat_rate" not in data
        ):
            return {**data, "consumable_repeat_rate": None}
        return data


class CompatibilityRequired(_Rule):
    """Offers of these kinds (or categories) need compatibility evidence: a catalog
    relation, a basket lift of at least ``min_lift`` with something bought, or the
    product family already in use."""

    type: Literal["compatibility_required"]
    kinds: list[Literal["item", "category", "coupon", "bundle"]] = []
    categories: list[str] = []
    min_lift: float = Field(1.5, gt=0)


class Killed(_Rule):
    """Offers switched off by hand (the stop-loss's kills live in the ledger's database,
    with their own reason, ``stop_loss``)."""

    type: Literal["killed"]
    offers: list[str] = []


class OutOfStock(_Rule):
    """Offers whose products are out of stock (any product of an item or bundle; all
    products of a coupon)."""

    type: Literal["out_of_stock"]
    products: list[str] = []


ChannelName = Literal["web", "app", "email", "sms", "mailer"]
OUTBOUND_CHANNELS: list[ChannelName] = ["email", "sms", "mailer"]
"""Channels where nextbest starts the contact (a send), as opposed to answering a page."""


class Cap(BaseModel):
    """At most ``max`` of ``counts`` within ``days``.

    ``counts`` is the unit: ``sends`` (an email, SMS or mailer that carried at least one
    offer), ``served`` (offers in the slates nextbest returned) or ``viewed`` (the
    storefront's ``viewed`` feedback). Holdout slates and empty slates never count.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    max: int = Field(ge=0)
    days: float = Field(gt=0)
    counts: Literal["sends", "served", "viewed"] = "sends"


class OfferCap(BaseModel):
    """How often one offer may reach one customer: at most ``max`` ``counts`` (``served``
    or ``viewed``) within ``days``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max: int = Field(ge=0)
    days: float = Field(gt=0)
    counts: Literal["served", "viewed"] = "served"


class FrequencyCap(_Rule):
    """Contact caps across channels.

    * ``per_channel`` and ``total`` cap what nextbest *sends*: on each outbound channel,
      and on all of them together. A page view on an inbound channel (web, app) is the
      customer's own visit, never a send: caps never empty a storefront's slates.
    * ``per_offer`` caps how often one offer reaches one customer, on every channel. On an
      inbound channel an offer over its cap rotates behind the others (the slate stays
      full while there is anything else to show); on an outbound channel it is not sent.
    """

    type: Literal["frequency_cap"]
    outbound_channels: list[ChannelName] = Field(default_factory=lambda: list(OUTBOUND_CHANNELS))
    per_channel: Cap | None = None
    total: Cap | None = None
    per_offer: OfferCap | None = None


class DeclineCooldown(_Rule):
    """Not shown again within N days after the customer declined it."""

    type: Literal["decline_cooldown"]
    days: float = Field(30, gt=0)


class Prerequisite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    offer: str
    requires: str
    event: Literal["shown", "accepted"] = "shown"


class Sequencing(_Rule):
    """Offer B only after offer A was shown (or accepted)."""

    type: Literal["sequencing"]
    steps: list[Prerequisite] = []


class MutualExclusion(_Rule):
    """Never two offers of one group in a slate (applied when the slate is assembled)."""

    type: Literal["mutual_exclusion"]
    groups: dict[str, list[str]] = {}


class Bundles(_Rule):
    """A bundle needs its products available and must not be mostly owned already; a
    slate never shows two tiers of one good-better-best ladder."""

    type: Literal["bundles"]
    max_owned_share: float = Field(0.5, ge=0, le=1)


class SegmentBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    offer: str
    segment: str
    reason: str = ""
    by: str = ""


class BlockedForSegment(_Rule):
    """Offers a reviewer blocked for a segment."""

    type: Literal["blocked_for_segment"]
    blocks: list[SegmentBlock] = []


Rule = Annotated[
    ActiveWindow
    | ChannelAllowed
    | Consent
    | Targeting
    | AlreadyOwns
    | CompatibilityRequired
    | Killed
    | OutOfStock
    | FrequencyCap
    | DeclineCooldown
    | Sequencing
    | MutualExclusion
    | Bundles
    | BlockedForSegment,
    Field(discriminator="type"),
]


class StopLoss(BaseModel):
    """The stop-loss's thresholds (the rules file's ``stoploss:`` section; read by
    ``nextbest stoploss run``, :mod:`measurement.stoploss`).

    A weekly cycle *fails* when the upper bound of the offer's 95 % lift interval is below
    ``min_lift``, or the upper bound of its margin-uplift interval is below
    ``min_margin_uplift``: only when the offer is confidently below the bar, so noise
    never kills a winner. An offer is killed after ``consecutive_cycles`` failing cycles in
    a row. A cycle with fewer than ``min_opportunities`` in either arm (exposed, control)
    is *insufficient*: it neither fails nor passes, and it breaks a run of failures."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_lift: float = 0.0
    min_margin_uplift: float = 0.0
    min_opportunities: Annotated[int, Field(ge=1)] = 50
    consecutive_cycles: Annotated[int, Field(ge=1)] = 2


class FairnessSettings(BaseModel):
    """The rules file's ``fairness:`` section: how ``policy.fairness`` judges parity.

    Each group's exposure rate, acceptance rate and lift is divided by the best group's
    (of the same attribute); a ratio under ``min_parity`` is a breach (the four-fifths
    rule at 0.8). A group is judged only with at least ``min_group_size`` customers (its
    offers, for acceptance; each arm, for lift): at 100 the standard error of a rate of
    0.5 is 0.05, a tenth of it, so a ratio of 0.8 is two standard errors from parity;
    at 25 it is one, and a fair group of that size falls under 0.8 about one time in six.
    Smaller groups are reported, not judged.

    A size in customers does not make a rare event common: 1 % acceptance on 600 offers is
    6 acceptances. So a ratio under ``min_parity`` is a breach only when the group's rate
    also differs from the best group's at ``max_p_value`` (a two-proportion z-test, where
    the rate is a proportion; lifts are not tested), as the four-fifths rule is applied
    with a significance test in practice; ``null`` judges by the ratio alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_parity: float = Field(default=0.8, gt=0, le=1)
    attributes: list[str] = ["age_band", "income_band", "household_composition"]
    min_group_size: int = Field(default=100, ge=1)
    max_p_value: float | None = Field(default=0.05, gt=0, le=1)


class RuleSet(BaseModel):
    """A validated rules file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = Field(1, ge=1)
    name: str = "rules"
    consent_purpose: Literal["marketing", "personalisation"] = "marketing"
    unknown_consent: Literal["allow", "deny"] = "allow"
    rules: list[Rule]
    stoploss: StopLoss = StopLoss()
    fairness: FairnessSettings = FairnessSettings()

    def rule(self, kind: type[_Rule]) -> Any:
        """The enabled rule of this type, or None."""
        for rule in self.rules:
            if isinstance(rule, kind) and rule.enabled:
                return rule
        return None

    @property
    def needs_features(self) -> bool:
        """Whether eligibility reads the candidates' features (``compatibility_required``
        with something to check): otherwise features are built for eligible rows only."""
        rule = self.rule(CompatibilityRequired)
        return bool(rule and (rule.kinds or rule.categories))

    @property
    def content_hash(self) -> str:
        """A short hash of the rules' content: their version identity. The ``stoploss`` and
        ``fairness`` thresholds are left out: they judge measured cycles and groups, not
        which rows are eligible, so they change no model (and hashes from before the
        sections existed still hold)."""
        judged = {"stoploss", "fairness"}
        canonical = json.dumps(self.model_dump(mode="json", exclude=judged), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)

    def with_blocks(self, blocks: list[SegmentBlock]) -> RuleSet:
        """A copy with extra segment blocks (from a review)."""
        existing = self.rule(BlockedForSegment)
        others = [r for r in self.rules if not isinstance(r, BlockedForSegment)]
        merged = BlockedForSegment(
            type="blocked_for_segment",
            blocks=[*(existing.blocks if existing else []), *blocks],
        )
        return self.model_copy(update={"rules": [*others, merged]})


class RulesError(ValueError):
    """A rules file is not valid."""


def parse_rules(data: Any, *, source: str = "<rules>") -> RuleSet:
    """Validate parsed YAML (a mapping) into a :class:`RuleSet`."""
    if not isinstance(data, dict):
        raise RulesError(
            f"{source}: a rules file is a mapping with a 'rules' list, not {type(data).__name__}"
        )
    try:
        rule_set = RuleSet.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        location = list(first["loc"])
        where = ""
        if len(location) >= 2 and location[0] == "rules" and isinstance(location[1], int):
            index = location[1]
            rules = data.get("rules") or []
            kind = (
                rules[index].get("type")
                if index < len(rules) and isinstance(rules[index], dict)
                else None
            )
            rest = [str(part) for part in location[2:] if part != kind]
            where = f"rule {index + 1} ({kind or 'no type'})" + (
                f", field '{'.'.join(rest)}'" if rest else ""
            )
        else:
            where = "field '" + ".".join(str(part) for part in location) + "'"
        raise RulesError(
            f"{source}: {where}: {first['msg']} (got {first.get('input')!r})"
        ) from None
    types = [rule.type for rule in rule_set.rules]
    duplicated = sorted({t for t in types if types.count(t) > 1})
    if duplicated:
        raise RulesError(
            f"{source}: rule type {duplicated[0]!r} appears more than once; merge them"
        )
    return rule_set


def load_rules(path: Path | str | None = None) -> RuleSet:
    """Read and validate a rules file (default: the packaged ``default_rules.yaml``)."""
    file = Path(path) if path is not None else DEFAULT_RULES
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise RulesError(f"{file}: no such rules file") from None
    except yaml.YAMLError as error:
        raise RulesError(f"{file}: not valid YAML ({error})") from None
    return parse_rules(data, source=str(file))
