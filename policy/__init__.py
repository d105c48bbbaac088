"""policy: the guardrails between candidates and the ranker.

Declarative eligibility rules with reason codes (``rules``, ``eligibility``), slate
assembly without collisions (``slate``), and exploration with logged propensities
(``exploration``). Training and serving both use it.
"""

from policy.eligibility import (
    REASONS,
    Eligibility,
    Ledger,
    SnapshotLedger,
    customer_trace,
    evaluate,
    trace,
)
from policy.exploration import Exploration, draw_slate
from policy.rules import DEFAULT_RULES, RulesError, RuleSet, load_rules, parse_rules
from policy.slate import Slate, assemble_slate

__all__ = [
    "DEFAULT_RULES",
    "REASONS",
    "Eligibility",
    "Exploration",
    "Ledger",
    "RuleSet",
    "RulesError",
    "Slate",
    "SnapshotLedger",
    "assemble_slate",
    "customer_trace",
    "draw_slate",
    "evaluate",
    "load_rules",
    "parse_rules",
    "trace",
]
