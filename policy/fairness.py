"""Fairness: exposure, acceptance and lift per group, and their parity ratios.

For each attribute of the customers (``age_band``, ``income_band``,
``household_composition`` on the demo; the rules file's ``fairness.attributes``) and each
of its groups:

* **exposure rate**: offers shown per opportunity (with one offer at most per opportunity,
  the share of opportunities that showed one: the four-fifths rule's selection rate);
* **acceptance rate**: offers accepted per offer shown;
* **lift**, where customers were split into a treated and a control arm: the treated
  customers' mean outcome minus the control customers'.

Each rate is divided by the best group's rate of its attribute (the *parity ratio*); a
ratio under ``min_parity`` is a **breach** when the group's rate also differs from the
best group's at ``max_p_value`` (a two-proportion z-test; none for lifts). Only groups
with at least ``min_group_size`` customers (and offers shown, for acceptance; customers in
each arm, for lift) are judged, and only they can be the best group; smaller groups and
customers without the attribute (group ``UNKNOWN``) are reported, not judged. A lift ratio
is judged only when the best lift is positive (nothing to be at parity with otherwise).

The functions take plain pandas frames, so that training (the slates a model would serve)
and the scorecard (what was served) judge alike:

* :func:`group_table` turns per-customer rows into per-group counts;
* :func:`judge` turns per-group counts (from :func:`group_table`, or another table with
  the same columns) into a :class:`FairnessReport`;
* :func:`fairness_report` does both.

Results name groups by their labels and counts only, never a customer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pandas as pd

from features.snapshot import UNKNOWN
from policy.rules import FairnessSettings

__all__ = [
    "FAIRNESS_TAG",
    "MEASURES",
    "Breach",
    "FairnessReport",
    "GroupRates",
    "breaches_from_tag",
    "fairness_report",
    "group_table",
    "judge",
]

Measure = Literal["exposure", "acceptance", "lift"]
MEASURES: tuple[Measure, ...] = ("exposure", "acceptance", "lift")

FAIRNESS_TAG = "fairness.breaches"
"""Registry tag of a model version: its training's breaches as JSON (a list of
:class:`Breach` dicts; ``[]`` for none). The review page shows them."""
_TAG_LIMIT = 4800  # MLflow caps a tag's value at 5000 characters

COUNT_COLUMNS = ("customers", "opportunities", "offers", "accepted")
LIFT_COLUMNS = (
    "treated_customers",
    "control_customers",
    "treated_outcome",
    "control_outcome",
)
"""Per-group counts :func:`judge` reads (the lift columns are optional): customers,
opportunities, offers shown and accepted (of the treated arm, when there are arms), and
per arm its customers and the sum of their outcomes."""


@dataclass(frozen=True)
class GroupRates:
    """One group of one attribute: its counts, rates and parity ratios (None where
    there is no rate or no judged best group)."""

    attribute: str
    group: str
    customers: int
    opportunities: float
    offers: float
    accepted: float
    exposure_rate: float | None
    acceptance_rate: float | None
    lift: float | None
    exposure_parity: float | None = None
    acceptance_parity: float | None = None
    lift_parity: float | None = None
    judged: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Breach:
    """A judged group whose rate is under ``threshold`` × the best group's."""

    attribute: str
    group: str
    measure: Measure
    rate: float
    best_group: str
    best_rate: float
    ratio: float
    threshold: float
    p_value: float | None = None  # against the best group (None: not tested)

    def describe(self) -> str:
        tested = "" if self.p_value is None else f" (p = {self.p_value:.2g})"
        return (
            f"{self.attribute} {self.group}: {self.measure} {self.rate:.4g} is "
            f"{self.ratio:.2f} of the best group's ({self.best_group}, {self.best_rate:.4g}), "
            f"under {self.threshold:.2f}{tested}"
        )


@dataclass(frozen=True)
class FairnessReport:
    """Per-group rates and parity ratios of each attribute, and the breaches.

    ``parity[measure][attribute]`` is the lowest parity ratio among the attribute's judged
    groups (None when none could be judged)."""

    min_parity: float
    min_group_size: int
    max_p_value: float | None
    attributes: list[str]
    missing_attributes: list[str]
    groups: list[GroupRates]
    parity: dict[str, dict[str, float | None]]
    breaches: list[Breach]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (no NaN: a missing rate is None)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> pd.DataFrame:
        """One row per (attribute, group)."""
        rows = [{k: v for k, v in asdict(g).items() if k != "judged"} for g in self.groups]
        return pd.DataFrame(rows)

    def metrics(self, prefix: str = "fairness") -> dict[str, float]:
        """Flat metrics: ``{prefix}.{measure}_parity.{attribute}`` (judged attributes only)
        and ``{prefix}.breaches``, the number of breaches."""
        out = {
            f"{prefix}.{measure}_parity.{attribute}": float(value)
            for measure, values in self.parity.items()
            for attribute, value in values.items()
            if value is not None
        }
        out[f"{prefix}.breaches"] = float(len(self.breaches))
        return out

    def summary(self) -> list[str]:
        """What a person reads (the model card, ``nextbest evaluate``): how groups were
        judged, each attribute's lowest parity per measure, and every breach."""
        tested = (
            "" if self.max_p_value is None else f", and a difference at p < {self.max_p_value:g}"
        )
        lines = [
            f"A group is judged with at least {self.min_group_size} customers; a breach is a "
            f"rate under {self.min_parity:g} of its attribute's best group's{tested}."
        ]
        for attribute in self.attributes:
            judged = [
                f"{measure} parity {values[attribute]:.2f}"
                if values.get(attribute) is not None
                else f"{measure} not judged (no group large enough)"
                for measure, values in self.parity.items()
            ]
            groups = sum(g.attribute == attribute for g in self.groups)
            lines.append(f"- {attribute} ({groups} groups): " + ", ".join(judged))
        if self.missing_attributes:
            lines.append("- not in the customers table: " + ", ".join(self.missing_attributes))
        lines += (
            [f"- BREACH: {b.describe()}" for b in sorted(self.breaches, key=lambda b: b.ratio)]
            if self.breaches
            else ["- no breach"]
        )
        return lines

    def tag(self) -> str:
        """The registry tag's value (:data:`FAIRNESS_TAG`): the breaches as JSON, the
        worst first, as many as fit."""
        ordered = sorted(self.breaches, key=lambda b: b.ratio)
        kept: list[dict[str, Any]] = []
        for breach in ordered:
            candidate = json.dumps([*kept, asdict(breach)])
            if len(candidate) > _TAG_LIMIT:
                break
            kept.append(asdict(breach))
        return json.dumps(kept)


def breaches_from_tag(value: str | None) -> list[Breach] | None:
    """The breaches a :data:`FAIRNESS_TAG` value holds; None for a version without the tag
    (trained before fairness was judged) or with one that cannot be read."""
    if value is None:
        return None
    try:
        return [Breach(**item) for item in json.loads(value)]
    except (ValueError, TypeError):
        return None


def _labels(values: pd.Series) -> pd.Series:
    """Group labels: the attribute's values as text, missing ones as UNKNOWN."""
    text = values.astype("object").where(values.notna(), UNKNOWN)
    return text.map(str)


def group_table(
    customers: pd.DataFrame, measures: pd.DataFrame, attributes: Sequence[str]
) -> pd.DataFrame:
    """Per-group counts of each attribute, from per-customer rows.

    ``customers``: ``customer_id`` and the attribute columns (one row per customer; an
    attribute it lacks is skipped, a missing value is the group UNKNOWN).
    ``measures``: ``customer_id`` and ``offers`` (offers shown), ``accepted``, optionally
    ``opportunities`` (default 1 per row), and for lift ``arm`` (``treated`` or
    ``control``) and ``outcome`` (a number per customer: converted 0/1, revenue, ...).
    Several rows of one customer are summed. A measured customer missing from
    ``customers`` falls in UNKNOWN.

    Returns ``attribute``, ``group`` and the :data:`COUNT_COLUMNS` (of the treated arm when
    there are arms), plus the :data:`LIFT_COLUMNS` when there are arms.
    """
    missing = [c for c in ("customer_id", "offers", "accepted") if c not in measures]
    if missing:
        raise ValueError(f"measures need the columns {missing} (per customer)")
    frame = measures.assign(opportunities=measures.get("opportunities", 1.0))
    has_arms = "arm" in frame
    if has_arms:
        if "outcome" not in frame:
            raise ValueError("measures with an 'arm' column need an 'outcome' column for lift")
        unknown_arms = sorted(set(frame["arm"].dropna().map(str)) - {"treated", "control"})
        if unknown_arms:
            raise ValueError(f"arm is 'treated' or 'control', not {unknown_arms}")
    present = [a for a in attributes if a in customers.columns]
    info = customers.drop_duplicates("customer_id").set_index("customer_id")
    tables = []
    for attribute in present:
        labels = _labels(info[attribute].reindex(frame["customer_id"]))
        rows = frame.assign(group=labels.to_numpy())
        treated = rows[rows["arm"] == "treated"] if has_arms else rows
        grouped = treated.groupby("group", sort=True)
        table = pd.DataFrame(
            {
                "customers": grouped["customer_id"].nunique(),
                "opportunities": grouped["opportunities"].sum(),
                "offers": grouped["offers"].sum(),
                "accepted": grouped["accepted"].sum(),
            }
        )
        if has_arms:
            for arm in ("treated", "control"):
                mine = rows[rows["arm"] == arm].groupby("group")
                table = table.reindex(table.index.union(mine.size().index))
                table[f"{arm}_customers"] = mine["customer_id"].nunique()
                table[f"{arm}_outcome"] = mine["outcome"].sum()
            table = table.fillna(0)
        table["customers"] = table["customers"].fillna(0).astype(int)
        tables.append(table.reset_index().assign(attribute=attribute))
    columns = ["attribute", "group", *COUNT_COLUMNS, *(LIFT_COLUMNS if has_arms else ())]
    if not tables:
        return pd.DataFrame(columns=columns)
    return pd.concat(tables, ignore_index=True)[columns]


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _rates(row: pd.Series, has_lift: bool) -> dict[str, float | None]:
    lift = None
    if has_lift and row["treated_customers"] > 0 and row["control_customers"] > 0:
        lift = float(
            row["treated_outcome"] / row["treated_customers"]
            - row["control_outcome"] / row["control_customers"]
        )
    return {
        "exposure": _ratio(row["offers"], row["opportunities"]),
        "acceptance": _ratio(row["accepted"], row["offers"]),
        "lift": lift,
    }


def _big_enough(row: pd.Series, measure: Measure, size: int, has_lift: bool) -> bool:
    if row["group"] == UNKNOWN:
        return False
    if measure == "exposure":
        return bool(row["customers"] >= size)
    if measure == "acceptance":
        return bool(row["customers"] >= size and row["offers"] >= size)
    return bool(has_lift and row["treated_customers"] >= size and row["control_customers"] >= size)


@dataclass(frozen=True)
class _Parity:
    ratios: list[float | None]
    lowest: float | None
    breaches: list[Breach]


def _parity(
    attribute: str,
    measure: Measure,
    rows: list[dict[str, Any]],
    rates: list[dict[str, float | None]],
    judged: list[dict[Measure, bool]],
    threshold: float,
    max_p_value: float | None,
) -> _Parity:
    """One measure of one attribute: each group's ratio to the best judged group, the
    lowest judged ratio, and the judged groups under ``threshold``."""
    best_rate, best_row = 0.0, None
    for row, rate, ok in zip(rows, rates, judged, strict=True):
        value = rate[measure]
        if ok[measure] and value is not None and value > best_rate:
            best_rate, best_row = value, row
    best_group = "" if best_row is None else str(best_row["group"])
    ratios: list[float | None] = []
    lowest: float | None = None
    breaches: list[Breach] = []
    for row, rate, ok in zip(rows, rates, judged, strict=True):
        value = rate[measure]
        ratio = value / best_rate if best_rate > 0 and value is not None else None
        ratios.append(ratio)
        if value is None or ratio is None or not ok[measure]:
            continue
        lowest = ratio if lowest is None else min(lowest, ratio)
        p_value = _p_value(measure, row, best_row)
        if ratio < threshold and (max_p_value is None or p_value is None or p_value < max_p_value):
            breaches.append(
                Breach(
                    attribute=attribute,
                    group=str(row["group"]),
                    measure=measure,
                    rate=float(value),
                    best_group=best_group,
                    best_rate=float(best_rate),
                    ratio=float(ratio),
                    threshold=threshold,
                    p_value=p_value,
                )
            )
    return _Parity(ratios, lowest, breaches)


_TRIALS = {"exposure": ("offers", "opportunities"), "acceptance": ("accepted", "offers")}


def _p_value(measure: Measure, row: dict[str, Any], best: dict[str, Any] | None) -> float | None:
    """Two-sided p-value of a two-proportion z-test (pooled) of the group's rate against
    the best group's; None where the rate is no proportion (a lift, several offers per
    opportunity) or there is no best group. Offers shown to one customer are taken as
    independent, which they need not be: the test is a guard against noise, not proof."""
    if best is None or measure not in _TRIALS:
        return None
    events, trials = _TRIALS[measure]
    x1, n1, x2, n2 = (float(r[c]) for r in (row, best) for c in (events, trials))
    if min(n1, n2) <= 0 or x1 > n1 or x2 > n2:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if spread == 0:
        return 1.0
    return math.erfc(abs(x1 / n1 - x2 / n2) / spread / math.sqrt(2))


def judge(
    table: pd.DataFrame,
    settings: FairnessSettings | None = None,
    *,
    attributes: Sequence[str] | None = None,
) -> FairnessReport:
    """Parity ratios and breaches from per-group counts (:func:`group_table`'s columns:
    ``attribute``, ``group``, :data:`COUNT_COLUMNS`, optionally :data:`LIFT_COLUMNS`).
    ``attributes`` are the ones asked for (default: the settings'); those the table lacks
    are listed as missing."""
    settings = settings or FairnessSettings()
    asked = list(attributes if attributes is not None else settings.attributes)
    has_lift = all(c in table for c in LIFT_COLUMNS)
    groups: list[GroupRates] = []
    parity: dict[str, dict[str, float | None]] = {m: {} for m in MEASURES}
    breaches: list[Breach] = []
    present = [a for a in asked if (table["attribute"] == a).any()] if len(table) else []
    for attribute in present:
        rows = list(table[table["attribute"] == attribute].to_dict("records"))
        rates = [_rates(pd.Series(r), has_lift) for r in rows]
        judged = [
            {m: _big_enough(pd.Series(r), m, settings.min_group_size, has_lift) for m in MEASURES}
            for r in rows
        ]
        ratios: list[dict[str, float | None]] = [{} for _ in rows]
        for measure in MEASURES:
            found = _parity(
                attribute, measure, rows, rates, judged, settings.min_parity, settings.max_p_value
            )
            for index, value in enumerate(found.ratios):
                ratios[index][measure] = value
            breaches.extend(found.breaches)
            if measure != "lift" or has_lift:
                parity[measure][attribute] = found.lowest
        for row, rate, ok, ratio in zip(rows, rates, judged, ratios, strict=True):
            groups.append(
                GroupRates(
                    attribute=attribute,
                    group=str(row["group"]),
                    customers=int(row["customers"]),
                    opportunities=float(row["opportunities"]),
                    offers=float(row["offers"]),
                    accepted=float(row["accepted"]),
                    exposure_rate=rate["exposure"],
                    acceptance_rate=rate["acceptance"],
                    lift=rate["lift"],
                    exposure_parity=ratio["exposure"],
                    acceptance_parity=ratio["acceptance"],
                    lift_parity=ratio["lift"],
                    judged={str(m): v for m, v in ok.items()},
                )
            )
    if not has_lift:
        parity.pop("lift")
    return FairnessReport(
        min_parity=settings.min_parity,
        min_group_size=settings.min_group_size,
        max_p_value=settings.max_p_value,
        attributes=present,
        missing_attributes=[a for a in asked if a not in present],
        groups=groups,
        parity=parity,
        breaches=breaches,
    )


def fairness_report(
    customers: pd.DataFrame, measures: pd.DataFrame, settings: FairnessSettings | None = None
) -> FairnessReport:
    """:func:`judge` of :func:`group_table`: per-customer rows in, parity and breaches out."""
    settings = settings or FairnessSettings()
    return judge(group_table(customers, measures, settings.attributes), settings)
