"""What-if replay: the ledger's logged requests served again, in silence, under another
rules file and/or model version.

Each logged, non-holdout request (customer, channel, placement, and its moment as
``as_of``) is recomputed twice through the one recommender factory
(:func:`serving.assembly.build_recommender`) with logging off: once as it was served
(the logged model version, the serving settings' rules: *the logged policy*) and once
under the new rules and/or version (*the new policy*). Nothing is served or logged: the
recommenders read the ledger through a read-only :class:`serving.ledger.SqlLedger`
(which makes no table and refuses to log), with a buffer in a temporary folder.

**The ledger as it was.** Caps, cooldowns and sequencing read the ledger; a replayed
request reads it strictly before its own second (every read's end moved back by one
second), so neither its own slate nor any later one counts against it. Requests of one
customer in one second are replayed as if simultaneous. Neither replay sees what the new
policy would have served before (the history is the logged one), and a request's
context (page, cart, moment) is not in the ledger, so it is replayed without one.

**What it reports** (:class:`ReplayReport`):

* how many slates change: the new policy's against the slate logged (``slates_changed``)
  and against the logged policy's replay (``slates_changed_by_policy``: exploration's
  draws and the caps' cuts taken out);
* which offers gain and lose exposure: per offer, how often it is in the logged slates
  and in the new ones;
* the exclusions by reason code (:func:`policy.evaluate`'s, the offer-level holdout's,
  and the slate's collisions), under the logged policy and under the new one;
* off-policy estimates of the new policy's accepted offers per request and revenue per
  request (:func:`training.offpolicy.off_policy_estimates`: IPS, SNIPS, doubly robust,
  with 95 % bootstrap intervals over requests). The new policy is deterministic (the
  greedy slate), so an offer's target inclusion is 1 if it is in the new slate, else 0;
  the logging inclusion is the ledger's ``inclusion`` (each drawn offer's probability of
  being in its slate: :mod:`policy.exploration`). The reward of a shown offer is 1 if one
  of its outcomes is accepted, redeemed or purchased (revenue: the largest ``value``
  those outcomes state, else 0). DR's reward model is each offer's cross-fitted mean
  reward on the logged rows (:func:`training.offpolicy.cross_fitted_offer_means`).
  Requests whose slate has a deterministic offer (NULL: no exploration, or cut by a cap
  after the draw) are refused and counted; so are explored requests logged before
  inclusion probabilities were (a per-rank propensity, no inclusion) and empty slates.
  The figures are per explored request.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from features import Snapshot, Workspace
from features.snapshot import ACCEPTED_OUTCOMES
from serving.assembly import build_recommender
from serving.engine import Recommender
from serving.ledger import SqlLedger, feedback, slate_offers, slates
from serving.settings import ServingSettings
from training.offpolicy import (
    Estimate,
    cross_fitted_offer_means,
    deterministic_reason,
    off_policy_estimates,
)

__all__ = ["ReplayReport", "read_logged", "replay"]

REWARDS = ("accepted", "revenue")
"""The two values estimated: accepted offers per request, revenue per request."""


@dataclass
class ReplayReport:
    """What a what-if replay found (see the module's docstring); ``to_json`` for the CLI.

    ``exposure``: offer id → {"logged": n, "new": m}; ``reasons``: {"logged": {code: n},
    "new": {code: n}}, each candidate excluded counted once per reason it has;
    ``estimates``: per reward (``accepted``, ``revenue``), logging_policy, ips, snips and
    doubly_robust, each an :class:`training.offpolicy.Estimate`; or ``available`` False
    with a ``reason``."""

    requests: int
    skipped: dict[str, int]
    slates_changed: int
    slates_changed_by_policy: int
    exposure: dict[str, dict[str, int]]
    reasons: dict[str, dict[str, int]]
    estimates: dict[str, Any]
    refused: dict[str, int]
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def gains(self) -> dict[str, int]:
        """Offers shown more often under the new policy: offer id → how many more."""
        return {
            o: e["new"] - e["logged"] for o, e in self.exposure.items() if e["new"] > e["logged"]
        }

    @property
    def losses(self) -> dict[str, int]:
        """Offers shown less often under the new policy: offer id → how many fewer."""
        return {
            o: e["logged"] - e["new"] for o, e in self.exposure.items() if e["new"] < e["logged"]
        }

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["gains"], out["losses"] = self.gains, self.losses
        return json.loads(json.dumps(out, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_logged(engine: sa.Engine, since_s: int | None = None) -> tuple[pd.DataFrame, ...]:
    """The ledger's slates (``request_id``, ``customer_id``, ``channel``, ``placement``,
    ``model_version``, ``mode``, ``holdout``, ``at_s``; from ``since_s`` on), their served
    offers (``request_id``, ``offer_id``, ``rank``, ``propensity``, ``inclusion``: NULL
    in a ledger from before it was logged) and their feedback (``request_id``,
    ``offer_id``, ``outcome``, ``value``). Reads only."""
    columns = {c["name"] for c in sa.inspect(engine).get_columns(slate_offers.name)}
    inclusion = (
        slate_offers.c.inclusion
        if "inclusion" in columns
        else sa.null().label("inclusion")  # a ledger from before inclusion was logged
    )
    head = sa.select(slates)
    if since_s is not None:
        head = head.where(slates.c.at_s >= since_s)
    with engine.connect() as connection:
        logged = pd.DataFrame(connection.execute(head).mappings().all(), columns=slates.c.keys())
        offers = pd.DataFrame(
            connection.execute(
                sa.select(
                    slate_offers.c.request_id,
                    slate_offers.c.offer_id,
                    slate_offers.c.rank,
                    slate_offers.c.propensity,
                    inclusion,
                )
            ).all(),
            columns=["request_id", "offer_id", "rank", "propensity", "inclusion"],
        )
        outcomes = pd.DataFrame(
            connection.execute(
                sa.select(
                    feedback.c.request_id,
                    feedback.c.offer_id,
                    feedback.c.outcome,
                    feedback.c.value,
                )
            ).all(),
            columns=["request_id", "offer_id", "outcome", "value"],
        )
    offers = offers[offers["request_id"].isin(set(logged["request_id"]))]
    return logged, offers.sort_values(["request_id", "rank"]), outcomes


class _Before(SqlLedger):
    """The ledger read-only, and as it was before each replayed request's second: every
    read's end (inclusive, at the request's moment) moved back one second."""

    def counts(
        self, unit: str, customers: Sequence[str], start_s: int, end_s: int, channels: Sequence[str]
    ) -> dict[str, int]:
        return super().counts(unit, customers, start_s, end_s - 1, channels)

    def offer_counts(
        self, unit: str, customers: Sequence[str], start_s: int, end_s: int
    ) -> dict[tuple[str, str], int]:
        return super().offer_counts(unit, customers, start_s, end_s - 1)

    def last_outcomes_by_kind(
        self, customers: Sequence[str], before_s: int
    ) -> dict[tuple[str, str, str], int]:
        return super().last_outcomes_by_kind(customers, before_s - 1)

    def shown_offers(self, customers: Sequence[str], before_s: int) -> set[tuple[str, str]]:
        return super().shown_offers(customers, before_s - 1)


@dataclass
class _Replayed:
    """One policy's replay: per request id, its slate (offer ids by rank) and the reason
    codes of what it excluded."""

    slates: dict[str, list[str]] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)


def replay(
    settings: ServingSettings,
    *,
    workspace: Workspace | Path | None = None,
    rules: Path | None = None,
    version: str | None = None,
    since: pd.Timestamp | None = None,
    k: int | None = None,
    bootstrap_samples: int = 500,
    seed: int = 0,
) -> ReplayReport:
    """Replay the ledger at ``settings.db_url`` (else the settings' default ledger) on
    ``workspace`` under the ``rules`` file and/or model ``version`` (None: as logged),
    from ``since`` on, with slates of ``k`` offers (default: the largest logged slate).
    See the module's docstring for what is read, replayed and estimated."""
    if settings.db_url is None:
        from runtime.settings import Settings

        settings = replace(settings, db_url=settings.ledger_url(Settings.load().require_data_dir()))
    assert settings.db_url is not None
    quiet = replace(settings, holdout_share=0.0, exploration="off")
    with tempfile.TemporaryDirectory(prefix="nextbest-replay-") as scratch:
        ledger = _Before(settings.db_url, buffer_path=Path(scratch) / "buffer.db", read_only=True)
        try:
            since_s = None if since is None else int(pd.Timestamp(since).timestamp())
            logged, offers, outcomes = read_logged(ledger.engine, since_s)
            blocks = _blocks(ledger)
            held = logged["holdout"].astype(bool)
            requests = logged[~held].reset_index(drop=True)
            served = {r: list(g["offer_id"]) for r, g in offers.groupby("request_id", sort=False)}
            size = k or max((len(v) for v in served.values()), default=3)
            factory = _Factory(quiet, workspace, ledger, blocks)
            before = _replay_all(requests, lambda v: factory.get(None, v), size)
            after = _replay_all(requests, lambda v: factory.get(rules, version or v), size)
        finally:
            ledger.dispose()
    ids = list(requests["request_id"])
    exposure: dict[str, dict[str, int]] = {}
    for name, slates_of in (("logged", served), ("new", after.slates)):
        for request in ids:
            for offer in slates_of.get(request, []):
                exposure.setdefault(offer, {"logged": 0, "new": 0})[name] += 1
    estimates, refused = _estimates(
        requests, offers, outcomes, after.slates, bootstrap_samples, seed
    )
    return ReplayReport(
        requests=len(ids),
        skipped={"holdout": int(held.sum())},
        slates_changed=sum(served.get(r, []) != after.slates[r] for r in ids),
        slates_changed_by_policy=sum(before.slates[r] != after.slates[r] for r in ids),
        exposure=dict(sorted(exposure.items())),
        reasons={
            "logged": dict(sorted(before.reasons.items())),
            "new": dict(sorted(after.reasons.items())),
        },
        estimates=estimates,
        refused=refused,
        policy={
            "rules": None if rules is None else str(rules),
            "version": version,
            "slate_size": size,
            "logged_versions": sorted({str(v) for v in requests["model_version"].dropna()}),
        },
    )


def _blocks(ledger: SqlLedger) -> list[Any]:
    """The reviewers' blocks, read where the review page made its tables (never made)."""
    from serving.review.store import ReviewStore, blocks, segment_blocks

    if not sa.inspect(ledger.engine).has_table(blocks.name):
        return []
    return segment_blocks(ReviewStore(ledger.engine))


class _Factory:
    """One recommender per (rules, version), from the one factory, sharing one snapshot."""

    def __init__(
        self,
        settings: ServingSettings,
        workspace: Workspace | Path | None,
        ledger: SqlLedger,
        blocks: list[Any],
    ) -> None:
        self.settings, self.workspace, self.ledger, self.blocks = (
            settings,
            workspace,
            ledger,
            blocks,
        )
        self.snapshot: Snapshot | None = None
        self._made: dict[tuple[str | None, str | None], Recommender] = {}

    def get(self, rules: Path | None, version: str | None) -> Recommender:
        key = (None if rules is None else str(rules), version)
        if key not in self._made:
            settings = self.settings if rules is None else replace(self.settings, rules_path=rules)
            extra: dict[str, Any] = (
                {"version": version} if version is not None else {"bundle": None}
            )
            made = build_recommender(
                settings,
                workspace=self.workspace,
                ledger=self.ledger,
                blocks=self.blocks,
                snapshot=self.snapshot,
                **extra,
            )
            self.snapshot = made.snapshot
            self._made[key] = made
        return self._made[key]


def _replay_all(requests: pd.DataFrame, recommender_for: Any, k: int) -> _Replayed:
    """Each request's slate and exclusions under the recommender ``recommender_for``
    gives for its logged version; requests of one moment, channel, placement and version
    recomputed in one call."""
    out = _Replayed()
    keys = ["at_s", "channel", "placement", "model_version"]
    for (at_s, channel, placement, version), group in requests.groupby(
        keys, sort=True, dropna=False
    ):
        logged_version = None if pd.isna(version) else str(version)
        responses = recommender_for(logged_version).recommend_many(
            list(group["customer_id"]),
            channel=str(channel),
            placement=str(placement),
            k=k,
            debug=True,
            as_of=pd.Timestamp(int(at_s), unit="s"),
            log_exposure=False,
        )
        for request_id, response in zip(group["request_id"], responses, strict=True):
            out.slates[str(request_id)] = [o["offer_id"] for o in response["offers"]]
            out.reasons.update(r for e in response["excluded"] for r in e["reasons"])
    return out


def _estimates(
    requests: pd.DataFrame,
    offers: pd.DataFrame,
    outcomes: pd.DataFrame,
    new_slates: dict[str, list[str]],
    bootstrap_samples: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Off-policy estimates of the new (deterministic) slates' accepted offers and
    revenue per explored request; the requests refused, by reason."""
    mine = offers[offers["request_id"].isin(set(requests["request_id"]))]
    per_request = mine.groupby("request_id").agg(
        deterministic=("propensity", lambda p: bool(p.isna().any())),
        no_inclusion=("inclusion", lambda p: bool(p.isna().any())),
    )
    empty = int((~requests["request_id"].isin(per_request.index)).sum())
    deterministic = per_request["deterministic"]
    no_inclusion = per_request["no_inclusion"] & ~deterministic
    refused = {
        "deterministic": int(deterministic.sum()),
        "no_inclusion_probability": int(no_inclusion.sum()),
        "empty_slate": empty,
    }
    explored = list(per_request.index[~deterministic & ~no_inclusion])
    if not explored:
        late = refused["no_inclusion_probability"]
        reason = (
            deterministic_reason(refused["deterministic"], unit="requests")
            if refused["deterministic"] or not late
            else "no requests with a logged inclusion probability in the evaluation period"
        )
        if late:
            reason += f"; {late} explored requests logged before inclusion probabilities were"
        return {"available": False, "reason": reason}, refused
    index = {r: i for i, r in enumerate(explored)}
    rows = mine[mine["request_id"].isin(index)]
    request = rows["request_id"].map(index).to_numpy(dtype=np.int64)
    codes = {o: i for i, o in enumerate(sorted(set(rows["offer_id"]) | _offers_of(new_slates)))}
    offer = rows["offer_id"].map(codes).to_numpy(dtype=np.int64)
    target = np.array(
        [
            o in new_slates.get(r, ())
            for r, o in zip(rows["request_id"], rows["offer_id"], strict=True)
        ],
        dtype=float,
    )
    slate_request = np.array(
        [index[r] for r in explored for _ in new_slates.get(r, ())], dtype=np.int64
    )
    slate_offer = np.array(
        [codes[o] for r in explored for o in new_slates.get(r, ())], dtype=np.int64
    )
    n = len(explored)
    size = np.bincount(slate_request, minlength=n).astype(float)
    accepted = outcomes[outcomes["outcome"].isin(ACCEPTED_OUTCOMES)]
    by_pair = accepted.groupby(["request_id", "offer_id"])["value"]
    keys = list(zip(rows["request_id"], rows["offer_id"], strict=True))
    was_accepted = set(by_pair.groups)
    revenue_of = by_pair.max().fillna(0.0).to_dict()
    rewards = {
        "accepted": np.array([float(key in was_accepted) for key in keys]),
        "revenue": np.array([float(revenue_of.get(key, 0.0)) for key in keys]),
    }
    out: dict[str, Any] = {"available": True, "requests": n, "logged_offers": len(rows)}
    for name in REWARDS:
        predicted, on_slate = cross_fitted_offer_means(
            request, offer, rewards[name], slate_request, slate_offer, seed=seed
        )
        estimates: dict[str, Estimate] = off_policy_estimates(
            request,
            rewards[name],
            rows["inclusion"].to_numpy(dtype=np.float64),
            target,
            n_requests=n,
            target_size=size,
            predicted=predicted,
            direct=np.bincount(slate_request, weights=on_slate, minlength=n),
            bootstrap_samples=bootstrap_samples,
            seed=seed,
        )
        out[name] = estimates
    return out, refused


def _offers_of(slates_by_request: dict[str, list[str]]) -> set[str]:
    return {o for slate in slates_by_request.values() for o in slate}
