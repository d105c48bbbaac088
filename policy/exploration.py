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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from features.snapshot import Snapshot
from policy.rules import RuleSet
from policy.slate import Collisions, Slate, assemble_slate

__all__ = ["METHODS", "Exploration", "draw_slate", "request_rng", "step_probabilities"]

Method = Literal["off", "epsilon", "softmax"]
METHODS: tuple[Method, ...] = ("off", "epsilon", "softmax")


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
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf, posinf=np.inf)
    if exploration.method == "softmax" and np.isfinite(s).any():
        # an unknown score (NaN) is never preferred: weight 0, like -inf
        z = (s - np.max(s[np.isfinite(s)])) / exploration.temperature
        q = np.exp(np.where(np.isfinite(s), z, -np.inf))
        q /= q.sum()
    else:
        q = np.full(m, 1.0 / m)
    p = exploration.rate * q
    p[0] += 1.0 - exploration.rate
    return p


def draw_slate(
    snapshot: Snapshot,
    rules: RuleSet,
    ranked: np.ndarray,
    scores: np.ndarray,
    demoted: np.ndarray,
    k: int,
    exploration: Exploration,
    rng: np.random.Generator,
) -> Slate:
    """Up to ``k`` offers drawn from ``ranked`` (offer codes in the greedy order, with
    their ``scores`` and ``demoted`` flags), with each rank's probability; the greedy
    slate (no propensities) when ``exploration`` is off."""
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
    return slate
