"""Slate assembly: take ranked eligible offers in order, keeping the slate free of
collisions (two offers of one exclusion group, two tiers of one bundle ladder)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.snapshot import Snapshot
from policy.rules import Bundles, MutualExclusion, RuleSet

__all__ = ["Collisions", "Slate", "assemble_slate"]


@dataclass
class Slate:
    """Offer codes chosen in rank order, and those passed over with their reason.

    ``propensities``: per chosen offer, the probability that it was drawn at its rank
    given the ranks before it (:mod:`policy.exploration`); None for a deterministic slate,
    which no draw chose (see :class:`serving.ledger.ServedOffer`). ``inclusions``: per
    chosen offer, the probability that the draw put it in the slate at any rank
    (:func:`policy.exploration.inclusion_probabilities`); None likewise."""

    chosen: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    propensities: list[float] | None = None
    inclusions: list[float] | None = None


class Collisions:
    """What a slate in the making already holds: exclusion groups and bundle ladders."""

    def __init__(self, snapshot: Snapshot, rules: RuleSet) -> None:
        self.snapshot = snapshot
        exclusion = rules.rule(MutualExclusion)
        self.group_of: dict[int, str] = {}
        if exclusion:
            for group, offer_ids in exclusion.groups.items():
                for code in snapshot.offers.encode(offer_ids, missing=-1):
                    if code >= 0:
                        self.group_of[int(code)] = group
        self.check_ladders = rules.rule(Bundles) is not None
        self.groups_used: set[str] = set()
        self.ladders_used: set[int] = set()

    def reason(self, offer: int) -> str | None:
        """Why ``offer`` cannot join the slate now, or None if it can."""
        group = self.group_of.get(offer)
        if group is not None and group in self.groups_used:
            return "mutually_exclusive"
        ladder = int(self.snapshot.offer_bundle_ladder[offer])
        if self.check_ladders and ladder >= 0 and ladder in self.ladders_used:
            return "bundle_ladder_conflict"
        return None

    def take(self, offer: int) -> None:
        group = self.group_of.get(offer)
        if group is not None:
            self.groups_used.add(group)
        ladder = int(self.snapshot.offer_bundle_ladder[offer])
        if ladder >= 0:
            self.ladders_used.add(ladder)


def assemble_slate(snapshot: Snapshot, rules: RuleSet, ranked: np.ndarray, k: int) -> Slate:
    """Walk ``ranked`` (offer codes, best first) and keep up to ``k`` that do not collide."""
    collisions = Collisions(snapshot, rules)
    slate = Slate()
    for offer in (int(code) for code in ranked):
        if len(slate.chosen) >= k:
            break
        why = collisions.reason(offer)
        if why is not None:
            slate.skipped[offer] = why
            continue
        slate.chosen.append(offer)
        collisions.take(offer)
    return slate
