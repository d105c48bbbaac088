"""The "because": true statements built from the SHAP contributions of the returned offers.

LightGBM's ``pred_contrib`` gives each feature's exact contribution to a row's raw score
(TreeSHAP; the last column is the expected value, and every row sums to its raw score).
Only the returned top-k rows are explained. A customer is told a *reason* only when its
feature's contribution is positive **and** one of the feature's claims in the registry is
true for the row (a flag that is 1, a share at least its stated level, an offer in the top
fifth of its kind at that moment, ...).

When no positive contribution has a true claim, nothing is passed off as the reason: the
answer says so and gives the strongest true fact about the customer and the offer (the
feature with a true claim and the largest contribution), marked ``"role": "fact"``. The
rules-only ranking has no contributions, so it states facts only; a cold start is ranked
by popularity alone, and says exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features import FeatureBuilder, FeatureMatrix, Snapshot, Statement, row_context
from features.registry import FEATURES

__all__ = [
    "COLD_START_BECAUSE",
    "NON_PERSONAL_BECAUSE",
    "NO_REASON",
    "RULES_ONLY",
    "Explanation",
    "explain_cold_start",
    "explain_facts",
    "explain_non_personal",
    "explain_rows",
]

COLD_START_BECAUSE = "We have no orders from you yet; this is one of our current offers."
COLD_START_LEAD = "Because we have no orders from you yet, we show what sells most"
NON_PERSONAL_BECAUSE = (
    "One of our current offers, shown to everyone (not chosen from your history)."
)
NON_PERSONAL_LEAD = "Shown to everyone, not chosen from your history: it sells most"
NO_REASON = "There is no single reason we can state for this offer"
RULES_ONLY = "One of our current offers"
MAX_REASONS = 2
MAX_CONTRIBUTIONS = 5
MAX_CHART = 6
# Without contributions (the rules-only ranking), the facts most about this customer and
# this offer come first.
FACT_ORDER = (
    "days_since_offer_product_purchase",
    "offer_product_purchases_365d",
    "category_replenishment_due",
    "browsing_intent",
    "category_spend_share",
    "copurchase_lift",
    "days_since_compatible_purchase",
    "is_next_ladder_step",
    "days_since_category_purchase",
    "offer_popularity_30d",
    "category_is_new",
)
_PHRASED = [spec.name for spec in FEATURES if spec.claims]
_FACT_ORDER = list(FACT_ORDER) + [name for name in _PHRASED if name not in FACT_ORDER]


@dataclass
class Explanation:
    because: str
    contributions: list[dict[str, float | str]]
    expected_value: float
    raw_score: float
    strongest: list[dict[str, float | str]]  # by |contribution|, either sign (for review)
    reasons: list[dict[str, Any]]  # each phrase: feature, value, shap, text, role


def reason(statement: Statement, shap: float | None, role: str) -> dict[str, Any]:
    """One phrase as served: ``role`` is "reason" (it raised the score) or "fact"."""
    return {
        "feature": statement.feature,
        "value": statement.value,
        "shap": None if shap is None else float(shap),
        "text": statement.text,
        "role": role,
    }


def sentence(reasons: list[dict[str, Any]], lead: str) -> str:
    """ "Because A and B." for reasons; else ``lead``, and the fact if there is one."""
    said = [r["text"] for r in reasons if r["role"] == "reason"]
    if said:
        return f"Because {' and '.join(said)}."
    facts = [r["text"] for r in reasons if r["role"] == "fact"]
    return f"{lead}; for context, {facts[0]}." if facts else f"{lead}."


def explain_rows(
    booster: Any,
    matrix: FeatureMatrix,
    rows: np.ndarray,
    builder: FeatureBuilder,
    snapshot: Snapshot,
) -> list[Explanation]:
    """Explain ``rows`` of ``matrix`` (the returned offers only)."""
    if not len(rows):
        return []
    values = matrix.values[rows]
    # one thread: a request explains a handful of rows, and OpenMP's start-up costs more
    contributions = np.asarray(
        booster.predict(values, pred_contrib=True, num_threads=1), dtype=np.float64
    )
    names = matrix.names
    out = []
    for i, row in enumerate(rows):
        shap = contributions[i, :-1]
        order = np.argsort(-shap, kind="stable")
        positive = [j for j in order if shap[j] > 0]
        context = row_context(snapshot, builder, matrix, int(row))
        reasons: list[dict[str, Any]] = []
        for j in positive:
            statement = context.say(names[j])
            if statement and statement.text not in {r["text"] for r in reasons}:
                reasons.append(reason(statement, shap[j], "reason"))
            if len(reasons) == MAX_REASONS:
                break
        if not reasons:
            # every positive contribution failed its claim: the strongest true fact instead
            fact = next((s for j in order if (s := context.say(names[j]))), None)
            if fact is not None:
                reasons.append(reason(fact, shap[names.index(fact.feature)], "fact"))
        strongest = [j for j in np.argsort(-np.abs(shap), kind="stable") if shap[j] != 0]
        out.append(
            Explanation(
                because=sentence(reasons, NO_REASON),
                contributions=_listed(names, values[i], shap, positive[:MAX_CONTRIBUTIONS]),
                expected_value=float(contributions[i, -1]),
                raw_score=float(contributions[i].sum()),
                strongest=_listed(names, values[i], shap, strongest[:MAX_CHART]),
                reasons=reasons,
            )
        )
    return out


def explain_facts(
    builder: FeatureBuilder, snapshot: Snapshot, matrix: FeatureMatrix, row: int
) -> tuple[str, list[dict[str, Any]]]:
    """Without a model there are no contributions and no reasons: the first true fact."""
    context = row_context(snapshot, builder, matrix, row)
    fact = next(context.true_statements(_FACT_ORDER), None)
    reasons = [] if fact is None else [reason(fact, None, "fact")]
    return sentence(reasons, RULES_ONLY), reasons


def explain_cold_start(
    builder: FeatureBuilder, snapshot: Snapshot, matrix: FeatureMatrix, row: int
) -> tuple[str, list[dict[str, Any]]] | None:
    """A customer with no orders is ranked by the offer's recent purchases: say how many
    (None if nobody bought it lately; then :data:`COLD_START_BECAUSE`)."""
    count = row_context(snapshot, builder, matrix, row).popularity_count()
    if count is None:
        return None
    return f"{COLD_START_LEAD}: {count.text}.", [reason(count, None, "reason")]


def _listed(
    names: list[str], values: np.ndarray, shap: np.ndarray, columns: list[Any]
) -> list[dict[str, float | str]]:
    return [
        {"feature": names[j], "value": _clean(values[j]), "shap": round(float(shap[j]), 6)}
        for j in columns
    ]


def _clean(value: float) -> float | str:
    return "missing" if np.isnan(value) else round(float(value), 4)


def explain_non_personal(
    builder: FeatureBuilder, snapshot: Snapshot, matrix: FeatureMatrix, row: int
) -> tuple[str, list[dict[str, Any]]] | None:
    """A customer who gave no consent to personalisation is ranked by the offer's recent
    purchases alone, as a cold start is: say how many, and nothing about the customer
    (None if nobody bought it lately; then :data:`NON_PERSONAL_BECAUSE`)."""
    count = row_context(snapshot, builder, matrix, row).popularity_count()
    if count is None:
        return None
    return f"{NON_PERSONAL_LEAD}: {count.text}.", [reason(count, None, "reason")]
