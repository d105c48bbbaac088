"""Off-policy value: what another policy's accepted offers (or revenue) per request
would have been on logged traffic. The one home of the estimators: :func:`ips`,
:func:`snips`, :func:`doubly_robust` and :func:`off_policy_estimates` (all three with 95 %
bootstrap intervals over requests) work on plain arrays, one entry per logged, shown
offer; training's evaluation (:func:`off_policy_value`) and the what-if replay
(``measurement.replay``) both call them.

**The weighting.** Logged request i showed offers o with reward r_io (1 if accepted,
accepted, redeemed or purchased; or the feedback's value, for revenue). The logging
policy put o in the slate with probability π0(o | i), its *inclusion* probability; the
target policy with π1(o | i) (a deterministic target: 1 if o is in its slate, else 0).
Each shown offer is weighed by w_io = π1(o | i) / π0(o | i):

    IPS   = 1/R Σ_i Σ_{o shown in i}  w_io · r_io
    SNIPS = IPS · (1/R Σ_i K_i) / (1/R Σ_i Σ_{o shown in i} w_io),   K_i = Σ_o π1(o | i)
    DR    = 1/R Σ_i [ Σ_o π1(o | i) · q(i, o)  +  Σ_{o shown in i} w_io · (r_io − q(i, o)) ]

R counts every request (an empty slate too). E[Σ_shown w_io | i] = K_i, the target's
slate size, hence SNIPS's normaliser. q is a reward model: the direct method's term, which
the weighted residuals correct, so that DR stays unbiased where q is wrong and has less
variance where q is right (:func:`cross_fitted_offer_means`: each offer's mean reward on
the logged rows of the other folds of requests, shrunk towards the overall mean).

These estimate Σ_{o ∈ target slate} E[r | o shown to i], the value of the target's slate
*if an offer's reward does not depend on its rank or on the offers beside it* (the
per-offer, additive model that inclusion weighting needs); a slate-level weighting (the
product of the ranks' propensities) needs no such assumption, but its weights are 0 for
nearly every slate a different policy picks. The logging policy's own value is the plain
mean of rewards per request.

**Inclusion, not per-rank, probabilities.** The serving ledger logs per offer the
probability of being drawn *at its rank given the ranks before* (``propensity``,
:mod:`policy.exploration`; the slate's probability is their product) and, beside it,
its inclusion probability (``inclusion``): only the second is π0 here (an offer drawn
second could also have come first). Workspace exposures carry a ``propensity`` that the
contract defines as the probability the offer was shown in the request, an inclusion
probability.

**Deterministic rows are refused**: a missing probability (the ledger's NULL for a slate
no draw chose), or a ``deterministic`` column that says so (a ledger from before
exploration, say). Such a policy never risked showing anything else, so the offers
another policy would choose have no support in its logs: weighing its rows by 1.0 would
only dress the logging policy's own slates up as an estimate. The result counts the rows
refused (``refused``) and, when nothing is left, says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from features import FeatureBuilder, Requests, Snapshot
from features.candidates import CandidateGenerator
from features.snapshot import ACCEPTED_OUTCOMES
from policy import RuleSet, evaluate
from policy.slate import assemble_slate

__all__ = [
    "Estimate",
    "cross_fitted_offer_means",
    "deterministic_reason",
    "doubly_robust",
    "ips",
    "off_policy_estimates",
    "off_policy_value",
    "snips",
]


class Estimate(TypedDict):
    """One estimate with its 95 % bootstrap interval over requests, and the bootstrap's
    standard error."""

    estimate: float
    ci95_low: float
    ci95_high: float
    std_error: float


def _per_request(requests: np.ndarray, values: np.ndarray, n_requests: int) -> np.ndarray:
    """Σ of ``values`` per request index (0 … n_requests − 1; a request with none: 0)."""
    return np.bincount(
        np.asarray(requests, dtype=np.int64),
        weights=np.asarray(values, dtype=np.float64),
        minlength=n_requests,
    )[:n_requests]


def _weights(logging_inclusion: np.ndarray, target_inclusion: np.ndarray) -> np.ndarray:
    logging = np.asarray(logging_inclusion, dtype=np.float64)
    if np.isnan(logging).any() or (logging <= 0).any():
        raise ValueError(
            "every logging inclusion probability must be a probability above 0; refuse "
            "deterministic rows (NULL) first (deterministic_reason)"
        )
    return np.asarray(target_inclusion, dtype=np.float64) / logging


def _count(requests: np.ndarray, n_requests: int | None) -> int:
    if n_requests is not None:
        return int(n_requests)
    return int(np.max(requests)) + 1 if len(requests) else 0


def ips(
    requests: np.ndarray,
    rewards: np.ndarray,
    logging_inclusion: np.ndarray,
    target_inclusion: np.ndarray,
    n_requests: int | None = None,
) -> float:
    """IPS (module docstring): arrays with one entry per logged, shown offer; ``requests``
    its request's index (0 … R − 1; R = ``n_requests``, default the largest index + 1)."""
    n = _count(requests, n_requests)
    weighted = _weights(logging_inclusion, target_inclusion) * np.asarray(rewards, dtype=float)
    return float(weighted.sum() / n)


def snips(
    requests: np.ndarray,
    rewards: np.ndarray,
    logging_inclusion: np.ndarray,
    target_inclusion: np.ndarray,
    target_size: np.ndarray,
    n_requests: int | None = None,
) -> float:
    """SNIPS (module docstring); ``target_size`` per request, K_i = Σ_o π1(o | i) (the
    target slate's size, for a deterministic target)."""
    n = _count(requests, n_requests)
    w = _weights(logging_inclusion, target_inclusion)
    total = float(w.sum())
    if total <= 0:
        return float("nan")
    return float((w * np.asarray(rewards, dtype=float)).sum() / total * np.sum(target_size) / n)


def doubly_robust(
    requests: np.ndarray,
    rewards: np.ndarray,
    logging_inclusion: np.ndarray,
    target_inclusion: np.ndarray,
    predicted: np.ndarray,
    direct: np.ndarray,
    n_requests: int | None = None,
) -> float:
    """DR (module docstring): ``predicted`` is q(i, o) for each logged offer; ``direct``
    per request, the direct method's Σ_o π1(o | i) · q(i, o) over the target's slate."""
    n = _count(requests, n_requests)
    w = _weights(logging_inclusion, target_inclusion)
    residual = w * (np.asarray(rewards, dtype=float) - np.asarray(predicted, dtype=float))
    return float((np.sum(direct) + residual.sum()) / n)


def off_policy_estimates(
    requests: np.ndarray,
    rewards: np.ndarray,
    logging_inclusion: np.ndarray,
    target_inclusion: np.ndarray,
    *,
    n_requests: int,
    target_size: np.ndarray,
    predicted: np.ndarray | None = None,
    direct: np.ndarray | None = None,
    bootstrap_samples: int = 500,
    seed: int = 0,
) -> dict[str, Estimate]:
    """The logging policy's value, IPS, SNIPS and (given the reward model's ``predicted``
    and ``direct``) DR, each with its 95 % bootstrap interval: the requests resampled
    with replacement, ``bootstrap_samples`` times, from ``seed``.

    Every estimator is a ratio of means of per-request sums, so a resample is a weighted
    sum of those (its multinomial counts): no Python loop over resamples."""
    w = _weights(logging_inclusion, target_inclusion)
    r = np.asarray(rewards, dtype=np.float64)
    columns = {
        "reward": _per_request(requests, r, n_requests),
        "weighted": _per_request(requests, w * r, n_requests),
        "weight": _per_request(requests, w, n_requests),
        "size": np.asarray(target_size, dtype=np.float64),
    }
    if predicted is not None and direct is not None:
        residual = w * (r - np.asarray(predicted, dtype=np.float64))
        columns["dr"] = np.asarray(direct, dtype=np.float64) + _per_request(
            requests, residual, n_requests
        )
    table = np.stack(list(columns.values()))  # terms × requests
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_requests, np.full(n_requests, 1.0 / n_requests), bootstrap_samples)
    means = {
        name: (table @ np.vstack([np.ones(n_requests), counts]).T / n_requests)[row]
        for row, name in enumerate(columns)
    }  # each: the full sample's mean, then the resamples'
    values = {
        "logging_policy": means["reward"],
        "ips": means["weighted"],
        "snips": np.divide(
            means["weighted"] * means["size"],
            means["weight"],
            out=np.full(len(means["weight"]), np.nan),
            where=means["weight"] > 0,
        ),
    }
    if "dr" in means:
        values["doubly_robust"] = means["dr"]
    out: dict[str, Estimate] = {}
    for name, series in values.items():
        low, high = np.nanpercentile(series[1:], [2.5, 97.5])
        out[name] = Estimate(
            estimate=float(series[0]),
            ci95_low=float(low),
            ci95_high=float(high),
            std_error=float(np.nanstd(series[1:], ddof=1)),
        )
    return out


def cross_fitted_offer_means(
    requests: np.ndarray,
    offers: np.ndarray,
    rewards: np.ndarray,
    query_requests: np.ndarray,
    query_offers: np.ndarray,
    *,
    folds: int = 2,
    prior_weight: float = 5.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The reward model q of DR: per offer, the mean reward of its logged rows (shown
    offers: ``requests``, ``offers`` as integer codes, ``rewards``), shrunk towards the
    overall mean with ``prior_weight`` pseudo-rows, fitted on the other ``folds`` of
    requests than the row's own (cross-fitting: a request's reward never predicts
    itself). Returns q for the logged rows and for the query rows (the target slates'
    offers, ``query_requests``, ``query_offers``)."""
    requests = np.asarray(requests, dtype=np.int64)
    offers = np.asarray(offers, dtype=np.int64)
    rewards = np.asarray(rewards, dtype=np.float64)
    query_requests = np.asarray(query_requests, dtype=np.int64)
    query_offers = np.asarray(query_offers, dtype=np.int64)
    n_requests = int(max(requests.max(initial=-1), query_requests.max(initial=-1))) + 1
    n_offers = int(max(offers.max(initial=-1), query_offers.max(initial=-1))) + 1
    fold_of = np.random.default_rng(seed).permutation(n_requests) % max(folds, 1)
    logged_fold, query_fold = fold_of[requests], fold_of[query_requests]
    on_logged, on_query = np.zeros(len(requests)), np.zeros(len(query_requests))
    for fold in range(max(folds, 1)):
        train = logged_fold != fold if folds > 1 else np.ones(len(requests), dtype=bool)
        total = np.bincount(offers[train], weights=rewards[train], minlength=n_offers)
        seen = np.bincount(offers[train], minlength=n_offers)
        overall = float(rewards[train].mean()) if train.any() else 0.0
        means = (total + prior_weight * overall) / (seen + prior_weight)
        on_logged[logged_fold == fold] = means[offers[logged_fold == fold]]
        on_query[query_fold == fold] = means[query_offers[query_fold == fold]]
    return on_logged, on_query


def deterministic_reason(refused: int, unit: str = "exposures") -> str:
    """Why no off-policy estimate is available when ``refused`` rows (or requests, as
    ``unit`` says) were deterministic."""
    reason = f"no {unit} with a logging propensity in the evaluation period"
    if refused:
        reason += (
            f": {refused} {unit} refused, logged by a deterministic policy (no "
            "propensity); off-policy estimates need slates drawn with exploration"
        )
    return reason


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
    """IPS, SNIPS and DR estimates of the policy ``score`` (rows → arbitration score) on the
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
        return {
            "available": False,
            "reason": deterministic_reason(refused),
            "refused": {"deterministic": refused},
        }
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
    slate_rows: list[tuple[int, int]] = []
    for request in range(len(requests)):
        mine = rows == request
        ranked = offer_rows[mine][np.argsort(-values[mine], kind="stable")]
        slate = assemble_slate(snapshot, rules, ranked, slate_size)
        chosen.update((request, offer) for offer in slate.chosen)
        slate_rows += [(request, offer) for offer in slate.chosen]
    index = {name: i for i, name in enumerate(requests_frame["request"])}
    request_index = logged["request"].map(index).to_numpy(dtype=np.int64)
    offer_code = np.asarray(snapshot.offers.encode(logged["offer_id"]), dtype=np.int64)
    target = np.array(
        [(r, o) in chosen for r, o in zip(request_index, offer_code, strict=True)], dtype=float
    )
    n = len(requests_frame)
    slate_request = np.array([r for r, _ in slate_rows], dtype=np.int64)
    slate_offer = np.array([o for _, o in slate_rows], dtype=np.int64)
    rewards = logged["reward"].to_numpy()
    predicted, on_slate = cross_fitted_offer_means(
        request_index, offer_code, rewards, slate_request, slate_offer, seed=seed
    )
    estimates = off_policy_estimates(
        request_index,
        rewards,
        logged["propensity"].to_numpy(dtype=np.float64),
        target,
        n_requests=n,
        target_size=np.bincount(slate_request, minlength=n).astype(float),
        predicted=predicted,
        direct=np.bincount(slate_request, weights=on_slate, minlength=n),
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )
    return {
        "available": True,
        "requests": n,
        "logged_exposures": len(logged),
        "refused": {"deterministic": refused},
        "slate_size": slate_size,
        **estimates,
    }
