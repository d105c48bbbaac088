"""The human review gate.

``store``: users and roles, sessions, segment blocks and the append-only audit log.
``reviews``: frozen samples of a challenger's slates, per-item decisions, the release.
``web``: the server-rendered review page the service mounts under ``/review``.
"""

from serving.review.reviews import ReleaseError, Reviews
from serving.review.store import (
    REJECT_REASONS,
    ROLES,
    AccessError,
    ReviewStore,
    Session,
    hash_password,
    segment_blocks,
    verify_password,
)

__all__ = [
    "REJECT_REASONS",
    "ROLES",
    "AccessError",
    "ReleaseError",
    "ReviewStore",
    "Reviews",
    "Session",
    "hash_password",
    "segment_blocks",
    "verify_password",
]
