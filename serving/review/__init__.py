"""The human review gate: users and roles, segment blocks and the audit log (``store``).

The review page and the release decision build on these records.
"""

from serving.review.reviews import ReleaseError, Reviews
from serving.review.store import (
    REJECT_REASONS,
    ROLES,
    AccessError,
    ReviewStore,
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
    "hash_password",
    "segment_blocks",
    "verify_password",
]
