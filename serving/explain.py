"""The "because": plain language built from the SHAP contributions of the returned offers.

LightGBM's ``pred_contrib`` gives each feature's exact contribution to a row's raw score
(TreeSHAP; the last column is the expected value, and every row sums to its raw score).
Only the returned top-k rows are explained. A customer is only ever told a reason whose
contribution is positive and whose phrase the feature registry has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features import FeatureBuilder, FeatureMatrix, Snapshot, phrase

__all__ = ["COLD_START_BECAUSE", "Explanation", "explain_rows"]

COLD_START_BECAUSE = "Because it is popular with customers like you."
FALLBACK_BECAUSE = "Because it fits what you shop for."
MAX_REASONS = 2
MAX_CONTRIBUTIONS = 5
MAX_CHART = 6


@dataclass
class Explanation:
    because: str
    contributions: list[dict[str, float | str]]
    expected_value: float
    raw_score: float
    strongest: list[dict[str, float | str]]  # by |contribution|, either sign (for review)


def _sentence(reasons: list[str]) -> str:
    if not reasons:
        return FALLBACK_BECAUSE
    text = " and ".join(reasons)
    return f"Because {text}."


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
    contributions = np.asarray(booster.predict(values, pred_contrib=True), dtype=np.float64)
    names = matrix.names
    out = []
    for i, row in enumerate(rows):
        shap = contributions[i, :-1]
        order = np.argsort(-shap, kind="stable")
        positive = [j for j in order if shap[j] > 0]
        evidence = builder.describe_evidence(snapshot, matrix, int(row))
        reasons: list[str] = []
        for j in positive:
            text = phrase(names[j], float(values[i, j]), evidence)
            if text and text not in reasons:
                reasons.append(text)
            if len(reasons) == MAX_REASONS:
                break
        strongest = [j for j in np.argsort(-np.abs(shap), kind="stable") if shap[j] != 0]
        out.append(
            Explanation(
                because=_sentence(reasons),
                contributions=_listed(names, values[i], shap, positive[:MAX_CONTRIBUTIONS]),
                expected_value=float(contributions[i, -1]),
                raw_score=float(contributions[i].sum()),
                strongest=_listed(names, values[i], shap, strongest[:MAX_CHART]),
            )
        )
    return out


def _listed(
    names: list[str], values: np.ndarray, shap: np.ndarray, columns: list[Any]
) -> list[dict[str, float | str]]:
    return [
        {"feature": names[j], "value": _clean(values[j]), "shap": round(float(shap[j]), 6)}
        for j in columns
    ]


def _clean(value: float) -> float | str:
    return "missing" if np.isnan(value) else round(float(value), 4)
