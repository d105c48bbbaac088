"""Slate assembly: take ranked eligible offers in order, keeping the slate free of
collisions (two offers of one exclusion group, two tiers of one bundle ladder)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.snapshot import Snapshot
from policy.rules import Bundles, MutualExclusion, RuleSet

__all__ = ["Slate", "assemble_slate"]


@dataclass
class Slate:
    """Offer codes chosen in rank order, and those passed over with their reason."""

    chosen: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


def assemble_slate(snapshot: Snapshot, rules: RuleSet, ranked: np.ndarray, k: int) -> Slate:
    """Walk ``ranked`` (offer codes, best first) and keep up to ``k`` that do not collide."""
    exclusion = rules.rule(MutualExclusion)
    group_of: dict[int, str] = {}
    if exclusion:
        for group, offer_ids in exclusion.groups.items():
            for code in snapshot.offers.encode(offer_ids, missing=-1):
                if code >= 0:
                    group_of[int(code)] = group
    check_ladders = rules.rule(Bundles) is not None
    slate = Slate()
    groups_used: set[str] = set()
    ladders_used: set[int] = set()
    for offer in (int(code) for code in ranked):
        if len(slate.chosen) >= k:
            break
        group = group_of.get(offer)
        if group is not None and group in groups_used:
            slate.skipped[offer] = "mutually_exclusive"
            continue
        ladder = int(snapshot.offer_bundle_ladder[offer])
        if check_ladders and ladder >= 0 and ladder in ladders_used:
            slate.skipped[offer] = "bundle_ladder_conflict"
            continue
        slate.chosen.append(offer)
        if group is not None:
            groups_used.add(group)
        if ladder >= 0:
            ladders_used.add(ladder)
    return slate
