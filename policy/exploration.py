"""Exploration after arbitration, with honest propensities.

A deterministic policy shows the arbitration's best offers, so the ledger learns nothing
about the others: no off-policy estimate of another policy is possible. Exploration
draws the slate instead, one rank at a time, without replacement, among the offers
still eligible and free of collisions (exclusion groups, bundle ladders), and records
for each rank the probability of the offer drawn there.

At each rank, with ``remaining`` the offers left in the greedy order (best first, those
rotated out by a per-offer cap after the others; only the first of these two tiers is
drawn from while it has offers), the offer ``o`` is drawn with probability

    p(o) = (1 - rate) · 1[o is the greedy pick] + rate · q(o)

    q(o) = 1 / |remaining|                                    (``epsilon``)
    q(o) = exp(s_o / T) / Σ_{j ∈ remaining} exp(s_j / T)      (``softmax``)

where s is the arbitration score and T the temperature (in the score's units).
``rate`` 1 with ``softmax`` is a plain Plackett-Luce draw; ``rate`` 0 is the greedy,
deterministic slate (:func:`policy.slate.assemble_slate`, with no propensity).

**The slate's probability** is the product of its ranks' probabilities,

    P(slate = (o_1, …, o_n)) = Π_r p_r(o_r | o_1 … o_{r-1}),

each ``p_r`` taken over the offers remaining at rank r. Each rank takes one uniform draw
from ``rng``: seeded from the request's id (:func:`request_rng`), a replay of the request
with the same candidates and scores recomputes the same slate and the same
probabilities.

**An offer's inclusion probability** is the probability that the draw puts it in the
slate at any rank, ``π(o) = Σ_r P(o drawn at rank r)``: what per-offer off-policy
estimators weigh by (:mod:`training.offpolicy`), and not the per-rank figure above (an
offer drawn second could also have come first). It has no closed form once collisions
and tiers shape what remains, so :func:`inclusion_probabilities` estimates it by a
Rao-Blackwellised Monte Carlo of the same draw: ``draws`` slates are drawn in parallel
(vectorised over the draws), and at each rank every remaining offer adds its *exact*
probability of being drawn there given that draw's prefix, rather than a 0/1 for the one
drawn; and the draws' uniforms are stratified at each rank (a Latin hypercube: each one
still uniform), so their picks follow each rank's probabilities closely. Each rank's
term is an unbiased estimate of ``P(o drawn at rank r)``; rank 1's is exact; and an
offer of small probability gets a small, positive, precise figure instead of a count of
rare hits. :func:`draw_slate` logs it for the offers it draws
(``Slate.inclusions``), from the request's generator after the slate's own draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from features.snapshot import Snapshot
from policy.rules import RuleSet
from policy.slate import Collisions, Slate, assemble_slate

__all__ = [
    "INCLUSION_DRAWS",
    "METHODS",
    "Exploration",
    "draw_slate",
    "inclusion_probabilities",
    "request_rng",
    "step_probabilities",
]

Method = Literal["off", "epsilon", "softmax"]
METHODS: tuple[Method, ...] = ("off", "epsilon", "softmax")
INCLUSION_DRAWS = 512
"""Monte-Carlo slates behind each logged inclusion probability (Rao-Blackwellised: the
figures' relative error is far below a plain count's 1/sqrt(draws · π))."""


@dataclass(frozen=True)
class Exploration:
    """How one request's slate is drawn: ``method`` and ``rate`` (the share of each rank's
    probability given to the exploring distribution), and the softmax ``temperature``."""

    method: Method = "off"
    rate: float = 0.0
    temperature: float = 1.0

    @property
    def active(self) -> bool:
        return self.method != "off" and self.rate > 0


def request_rng(request_id: str) -> np.random.Generator:
    """The draw's generator, seeded from the request id alone (a replay recomputes it)."""
    digest = hashlib.sha256(f"nextbest-exploration:{request_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def step_probabilities(scores: np.ndarray, exploration: Exploration) -> np.ndarray:
    """The probability of each remaining offer at one rank; ``scores`` in greedy order
    (the first is the greedy pick)."""
    m = len(scores)
    return _step_matrix(
        np.asarray(scores, dtype=np.float64)[None, :],
        np.ones((1, m), dtype=bool),
        np.zeros(1, dtype=np.int64),
        exploration,
    )[0]


def _step_matrix(
    scores: np.ndarray, pool: np.ndarray, greedy: np.ndarray, exploration: Exploration
) -> np.ndarray:
    """:func:`step_probabilities` for many draws at once: ``scores`` (draws × offers, or
    one row for all), ``pool`` (draws × offers: the offers that rank draws among) and
    ``greedy`` (per draw, the column of its greedy pick); 0 outside the pool."""
    n, m = pool.shape
    s = np.broadcast_to(
        np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf, posinf=np.inf), (n, m)
    )
    finite = np.isfinite(s) & pool
    uniform = pool / np.maximum(pool.sum(axis=1, keepdims=True), 1)
    if exploration.method == "softmax":
        # an unknown score (NaN) is never preferred: weight 0, like -inf
        top = np.max(np.where(finite, s, -np.inf), axis=1, keepdims=True)
        z = (s - np.where(np.isfinite(top), top, 0.0)) / exploration.temperature
        q = np.exp(np.where(finite, z, -np.inf))
        total = q.sum(axis=1, keepdims=True)
        q = np.where(finite.any(axis=1, keepdims=True), q / np.maximum(total, 1e-300), uniform)
    else:
        q = uniform
    p = exploration.rate * q
    p[np.arange(n), greedy] += 1.0 - exploration.rate
    return p


def _pooled_step(
    scores: np.ndarray,
    weights: np.ndarray,
    pool: np.ndarray,
    greedy: np.ndarray,
    exploration: Exploration,
) -> np.ndarray:
    """:func:`_step_matrix` for one row of ``scores`` shared by every draw, faster: the
    softmax's ``weights`` (exp of the scores over the temperature, less their maximum;
    NaN: 0) computed once; a draw whose pool's weights all underflow (or are all unknown)
    is computed the exact way."""
    n = len(pool)
    q = pool * weights if exploration.method == "softmax" else pool.astype(np.float64)
    total = q.sum(axis=1, keepdims=True)
    p = exploration.rate * (q / np.where(total > 0, total, 1.0))
    p[np.arange(n), greedy] += 1.0 - exploration.rate
    odd = (total[:, 0] <= 0) & pool.any(axis=1)
    if odd.any():
        p[odd] = _step_matrix(scores[None, :], pool[odd], greedy[odd], exploration)
    return p


def inclusion_probabilities(
    scores: np.ndarray,
    demoted: np.ndarray,
    groups: np.ndarray,
    ladders: np.ndarray,
    k: int,
    exploration: Exploration,
    rng: np.random.Generator,
    draws: int = INCLUSION_DRAWS,
) -> np.ndarray:
    """Each offer's probability of being in the slate that :func:`draw_slate` draws from
    these offers (in the greedy order, with their ``scores``, ``demoted`` flags, exclusion
    ``groups`` and bundle ``ladders`` as integer codes, -1 for none); see the module's
    docstring for the Rao-Blackwellised estimate. Exact (rank 1 only) when ``k`` is 1."""
    m = len(scores)
    scores = np.asarray(scores, dtype=np.float64)
    demoted = np.asarray(demoted, dtype=np.bool_).reshape(-1)
    groups, ladders = np.asarray(groups, dtype=np.int64), np.asarray(ladders, dtype=np.int64)
    if m == 0:
        return np.zeros(0)
    finite = np.isfinite(np.nan_to_num(scores, nan=-np.inf))
    top = scores[finite].max() if finite.any() else 0.0
    weights = np.where(
        finite, np.exp((np.where(finite, scores, top) - top) / exploration.temperature), 0.0
    )
    open_ = np.ones((draws, m), dtype=bool)
    included = np.zeros((draws, m))
    rows = np.arange(draws)
    tiered, grouped, laddered = (
        demoted.any() and not demoted.all(),
        (groups >= 0).any(),
        (ladders >= 0).any(),
    )
    for _ in range(k):
        live = np.asarray(open_.any(axis=1), dtype=np.bool_)
        if not live.any():
            break
        first = np.argmax(open_, axis=1)  # the greedy pick: the first offer still open
        pool = open_ & (demoted[None, :] == demoted[first][:, None]) if tiered else open_
        p = _pooled_step(scores, weights, pool, first, exploration)
        p[~live] = 0.0
        included += p
        cumulative = np.cumsum(p, axis=1)
        u = (rng.permutation(draws) + rng.random(draws)) / draws * cumulative[:, -1]
        # stratified (Latin hypercube over ranks): each draw's uniform is still uniform,
        # and the draws' picks follow each rank's probabilities closely
        pick = np.argmax(cumulative > u[:, None], axis=1)
        pick = np.where(p[rows, pick] > 0, pick, first)  # rounding at the top end: greedy
        open_[rows[live], pick[live]] = False
        if grouped:
            picked = groups[pick]
            open_ &= ~((groups[None, :] == picked[:, None]) & (picked[:, None] >= 0))
        if laddered:
            picked = ladders[pick]
            open_ &= ~((ladders[None, :] == picked[:, None]) & (picked[:, None] >= 0))
    return np.minimum(included.mean(axis=0), 1.0)


def draw_slate(
    snapshot: Snapshot,
    rules: RuleSet,
    ranked: np.ndarray,
    scores: np.ndarray,
    demoted: np.ndarray,
    k: int,
    exploration: Exploration,
    rng: np.random.Generator,
    *,
    inclusions: bool = True,
) -> Slate:
    """Up to ``k`` offers drawn from ``ranked`` (offer codes in the greedy order, with
    their ``scores`` and ``demoted`` flags), with each rank's probability and each drawn
    offer's inclusion probability (:func:`inclusion_probabilities`; ``inclusions=False``
    skips its Monte Carlo, many times the draw's own cost, for a draw that is studied,
    not logged); the greedy slate (no propensities) when ``exploration`` is off."""
    if not exploration.active:
        return assemble_slate(snapshot, rules, ranked, k)
    collisions = Collisions(snapshot, rules)
    codes = [int(code) for code in ranked]
    groups = np.array([collisions.group_of.get(code, "") for code in codes], dtype=object)
    ladders = np.asarray(snapshot.offer_bundle_ladder)[np.asarray(ranked, dtype=np.int64)]
    scores = np.asarray(scores, dtype=np.float64)
    demoted = np.asarray(demoted, dtype=bool)
    drawn: list[float] = []
    slate = Slate(propensities=drawn)
    open_ = np.ones(len(codes), dtype=bool)  # not drawn, and free of collisions so far
    while len(slate.chosen) < k and open_.any():
        pool = np.flatnonzero(open_)
        tier = pool[demoted[pool] == demoted[pool[0]]]
        p = step_probabilities(scores[tier], exploration)
        cumulative = np.cumsum(p)
        u = rng.random() * cumulative[-1]
        pick = min(int(np.searchsorted(cumulative, u, side="right")), len(tier) - 1)
        position = int(tier[pick])
        slate.chosen.append(codes[position])
        drawn.append(float(p[pick]))
        open_[position] = False
        # what can no longer join: same exclusion group, or (bundles checked) same ladder
        if groups[position]:
            for j in np.flatnonzero(open_ & (groups == groups[position])):
                slate.skipped[codes[j]] = "mutually_exclusive"
                open_[j] = False
        if collisions.check_ladders and ladders[position] >= 0:
            for j in np.flatnonzero(open_ & (ladders == ladders[position])):
                slate.skipped[codes[j]] = "bundle_ladder_conflict"
                open_[j] = False
    if not inclusions:
        return slate
    group_codes = {name: i for i, name in enumerate(sorted(set(groups.tolist()) - {""}))}
    inclusion = inclusion_probabilities(
        scores,
        demoted,
        np.array([group_codes.get(g, -1) for g in groups], dtype=np.int64),
        ladders if collisions.check_ladders else np.full(len(codes), -1),
        k,
        exploration,
        rng,
    )
    column = {code: i for i, code in enumerate(codes)}
    slate.inclusions = [float(inclusion[column[code]]) for code in slate.chosen]
    return slate
