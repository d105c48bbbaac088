"""Off-policy value: what the new policy's attach rate would have been on logged traffic.

Where exposures carry the logging policy's propensity (the probability that it showed
that offer in that request), inverse propensity scoring re-weights the logged outcomes:

    IPS   = 1/R Σ_requests Σ_shown  r · 1[offer ∈ new slate] / p
    SNIPS = IPS · k / (1/R Σ_requests Σ_shown 1[offer ∈ new slate] / p)

where r = 1 if the shown offer was accepted (accepted, redeemed or purchased), and k is
the slate size; the self-normalised form divides by the weights' mean (whose expectation
is k). Both estimate accepted offers per request under the new policy; the logging
policy's own value is the plain mean of accepted offers per request. Intervals are 95 %
bootstrap intervals over requests.

Rows logged by a deterministic policy are refused: a missing propensity (the ledger's
NULL for a slate no draw chose), or a ``deterministic`` column that says so (a ledger
from before exploration, say). Such a policy never risked showing anything else, so the
offers another policy would choose have no support in its logs: weighing its rows by
1.0 would only dress the logging policy's own slates up as an estimate. The result
counts the rows refused (``refused``) and, when nothing is left, says why.

The weights here are each offer's probability of being in the slate at all. The serving
ledger logs, per offer, the probability of being drawn *at its rank given the ranks
before it* (:mod:`policy.exploration`); their product is the slate's probability. That
is not the inclusion probability weighed by here (an offer could have come in at any
rank), so a ledger's rows must not be fed here as they are: turn them into inclusion
probabilities (or weigh whole slates by the slate's probability) first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from features import FeatureBuilder, Requests, Snapshot
from features.candidates import CandidateGenerator
from features.snapshot import ACCEPTED_OUTCOMES
from policy import RuleSet, evaluate
from policy.slate import assemble_slate

__all__ = ["off_policy_value"]


Scorer = Callable[[Snapshot, Requests, np.ndarray, np.ndarray], np.ndarray]


def off_policy_value(
    snapshot: Snapshot,
    exposures: pd.DataFrame,
    outcomes: pd.DataFrame,
    rules: RuleSet,
    score: Scorer,
    *,
    generator: CandidateGenerator,
    builder: FeatureBuilder | None = None,
    start: pd.Timestamp,
    end: pd.Timestamp,
    bootstrap_samples: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """IPS and SNIPS estimates of the policy ``score`` (rows → arbitration score) on the
    exposures logged with a propensity in ``[start, end)``, beside the logging policy.

    The new policy's slates come from the same candidates (``generator``) and the same
    eligibility (``policy.evaluate``) as training's rows and serving's slates."""
    period = exposures[
        ~exposures["holdout"].astype(bool)
        & (exposures["shown_at"] >= start)
        & (exposures["shown_at"] < end)
    ]
    deterministic = period["propensity"].isna()
    if "deterministic" in period.columns:
        deterministic |= period["deterministic"].fillna(False).astype(bool)
    refused = int(deterministic.sum())
    logged = period[~deterministic].copy()
    if logged.empty:
        reason = "no exposures with a logging propensity in the evaluation period"
        if refused:
            reason += (
                f": {refused} exposures refused, logged by a deterministic policy (no "
                "propensity); off-policy estimates need slates drawn with exploration"
            )
        return {"available": False, "reason": reason, "refused": {"deterministic": refused}}
    accepted = set(
        outcomes.loc[outcomes["outcome"].isin(ACCEPTED_OUTCOMES), "exposure_id"].dropna()
    )
    logged["reward"] = logged["exposure_id"].isin(accepted).astype(float)
    logged["request"] = logged["request_id"].fillna(
        logged["customer_id"] + "@" + logged["shown_at"].astype("str")
    )
    requests_frame = logged.drop_duplicates("request")[
        ["request", "customer_id", "shown_at", "channel", "placement"]
    ].reset_index(drop=True)
    slate_size = int(logged.groupby("request").size().max())
    requests = Requests.build(
        snapshot,
        requests_frame["customer_id"].tolist(),
        requests_frame["shown_at"],
        channel=requests_frame["channel"].tolist(),
        placement=requests_frame["placement"].tolist(),
    )
    candidates = generator.generate(snapshot, requests)
    rows, offer_rows = candidates.request, candidates.offer
    features = None
    if rules.needs_features:
        if builder is None:
            raise ValueError("these rules read the candidates' features: pass the builder")
        matrix = builder.build(snapshot, requests, rows, offer_rows)
        features = matrix.columns()
    eligible = evaluate(snapshot, rules, requests, rows, offer_rows, features=features).eligible
    rows, offer_rows = rows[eligible], offer_rows[eligible]
    values = score(snapshot, requests, rows, offer_rows)
    chosen: set[tuple[int, int]] = set()
    for request in range(len(requests)):
        mine = rows == request
        ranked = offer_rows[mine][np.argsort(-values[mine], kind="stable")]
        slate = assemble_slate(snapshot, rules, ranked, slate_size)
        chosen.update((request, offer) for offer in slate.chosen)
    index = {name: i for i, name in enumerate(requests_frame["request"])}
    logged["request_index"] = logged["request"].map(index)
    logged["offer_code"] = snapshot.offers.encode(logged["offer_id"])
    logged["in_new_slate"] = [
        (r, o) in chosen for r, o in zip(logged["request_index"], logged["offer_code"], strict=True)
    ]
    logged["weight"] = logged["in_new_slate"] / logged["propensity"]
    per_request = logged.groupby("request_index").agg(
        reward=("reward", "sum"),
        weighted=("reward", lambda r: float((r * logged.loc[r.index, "weight"]).sum())),
        weight=("weight", "sum"),
    )
    estimates = _estimates(per_request, slate_size)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_request), size=(bootstrap_samples, len(per_request)))
    boot = [_estimates(per_request.iloc[d], slate_size) for d in draws]
    out: dict[str, Any] = {
        "available": True,
        "requests": len(per_request),
        "logged_exposures": len(logged),
        "refused": {"deterministic": refused},
        "slate_size": slate_size,
    }
    for key, value in estimates.items():
        samples = np.array([b[key] for b in boot])
        low, high = np.percentile(samples, [2.5, 97.5])
        out[key] = {"estimate": value, "ci95_low": float(low), "ci95_high": float(high)}
    return out


def _estimates(per_request: pd.DataFrame, slate_size: int) -> dict[str, float]:
    logging = float(per_request["reward"].mean())
    ips = float(per_request["weighted"].mean())
    mean_weight = float(per_request["weight"].mean())
    snips = ips * slate_size / mean_weight if mean_weight > 0 else float("nan")
    return {"logging_policy": logging, "ips": ips, "snips": snips}
