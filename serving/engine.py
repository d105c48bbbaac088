"""The recommender: one request through the whole flow, in process.

candidates → eligibility (with the live ledger) → features of the eligible rows → ranker →
calibrated P(accept) × value × lever → slate without collisions (greedy, or drawn with
its propensities where exploration is on: :mod:`policy.exploration`) → "because" →
exposure ledger (hard caps admitted atomically; the offer-level holdout's ghosts beside).

The service, ``nextbest recommend``, ``nextbest recommend-batch`` (local and Dask) and the
review gate all get their recommender from :func:`serving.assembly.build_recommender` and
call :meth:`Recommender.recommend_many`, so the storefront, a campaign, a back-test and a
reviewer see the same ranking, eligibility, caps, holdouts and explanations.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import yaml

from features import (
    FeatureBuilder,
    FeatureMatrix,
    Requests,
    Snapshot,
    Workspace,
    feature_names,
)
from features.candidates import CandidateGenerator, fit_with_one_lift
from features.contract import OFFER_KINDS
from features.history import second_ceil
from policy import Eligibility, RuleSet, SnapshotLedger, evaluate, load_rules, parse_rules
from policy.arbitration import REPEAT_FEATURE, Calibrator, rank_scores, row_tasks
from policy.eligibility import Limit, hard_limits, personalisation_allowed, reasons_of
from policy.exploration import Exploration, draw_slate, request_rng
from policy.rules import SegmentBlock
from policy.slate import Slate, assemble_slate
from runtime.registry import ModelBundle, ModelMismatchError, model_name
from serving.explain import COLD_START_BECAUSE, NON_PERSONAL_BECAUSE, explain_rows
from serving.ledger import CombinedLedger, ServedOffer, SqlLedger
from serving.settings import ServingSettings

__all__ = ["Recommender", "in_holdout"]

log = logging.getLogger("nextbest.serving")

# builders fitted for past moments (as_of, back-tests): a few, kept apart from the present's
# builder, which no replay can push out
_PAST_BUILDERS = 4
DAY = 86_400


def _waits(waited_s: Sequence[float] | None, n: int) -> np.ndarray | None:
    """Each request's wait before the call, in seconds (finite, not negative, one per
    customer), as an array; None without waits."""
    if waited_s is None:
        return None
    waits = np.asarray(waited_s, dtype=np.float64)
    if waits.shape != (n,):
        raise ValueError(f"waited_s has {waits.size} values for {n} customers")
    if not np.isfinite(waits).all() or (waits < 0).any():
        raise ValueError(f"waited_s must be finite and not negative: {waited_s}")
    return waits


def in_holdout(key: str, salt: str, share: float) -> bool:
    """Sticky assignment: a hash of the key and the experiment salt, uniform in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class _BudgetLog:
    """The latency budget's warning: one line when it is first used up, then at most one
    every ``every_s`` with how many customers went short since (under overload every
    request may go short: a line each would flood the log)."""

    def __init__(self, budget_ms: float, every_s: float = 10.0) -> None:
        self.budget_ms, self.every_s = budget_ms, every_s
        self._lock = threading.Lock()
        self._logged_at: float | None = None
        self._short = 0

    def used_up(self, short: int, spent_ms: float, customers: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._short += short
            if self._logged_at is not None and now - self._logged_at < self.every_s:
                return
            since = "" if self._logged_at is None else f" in the last {now - self._logged_at:.0f} s"
            total, self._short, self._logged_at = self._short, 0, now
        log.warning(
            "latency budget used up (%.0f ms each): %d customer(s) served with short "
            "becauses%s (the last call: %.0f ms of work for %d customer(s))",
            self.budget_ms,
            total,
            since,
            spent_ms,
            customers,
        )


@dataclass(frozen=True)
class _Plan:
    holdout: list[bool]
    modes: list[str]
    control: list[bool]  # the holdout's control ranks by the rules alone
    scoring: np.ndarray


@dataclass
class _Model:
    """Everything that belongs to one model version (or to the rules-only ranking): swapped
    as one reference, so a new version never runs with the old one's candidates, feature
    statistics or calibration."""

    bundle: ModelBundle | None
    rules: RuleSet
    generator: CandidateGenerator
    min_pair_orders: int
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    default_values: dict[str, float] = field(default_factory=dict)
    lever_cap: float = 2.0
    value_cap: float | None = None
    refit_days: int = 28
    present: FeatureBuilder | None = None  # fitted at the data's end: serves every "now"
    builders: OrderedDict[int, FeatureBuilder] = field(default_factory=OrderedDict)  # the past


class Recommender:
    """Holds the snapshot, the model (with its candidate generator and fitted feature
    builders), the ledger and the reviewers' blocks. Build it with
    :func:`serving.assembly.build_recommender`."""

    def __init__(
        self,
        snapshot: Snapshot,
        bundle: ModelBundle | None,
        ledger: SqlLedger,
        settings: ServingSettings,
        *,
        workspace: Workspace,
        blocks: Sequence[SegmentBlock] = (),
    ) -> None:
        self.snapshot = snapshot
        self.ledger = ledger
        self.settings = settings
        self._seen_requests: dict[str, int] = {}  # with a request seed: ids derived, counted
        self.workspace = workspace
        self.workspace_id = workspace.workspace_id
        self.model_name = model_name(self.workspace_id)
        self.catalogue = snapshot.catalogue_fingerprint()
        self.blocks: list[SegmentBlock] = list(blocks)
        # why the reviewers' blocks are not known (unread at a start without the ledger's
        # database): until they are, no offer is shown (a blocked one must never be)
        self.blocks_unread: str | None = None
        self.data_end_s = (
            int(
                max(
                    snapshot.line_seconds.max(initial=0),
                    snapshot.events_by_customer_type.seconds.max(initial=0),
                )
            )
            + 1
        )
        self.data_start_s = int(
            min(
                snapshot.line_seconds.min(initial=self.data_end_s),
                snapshot.events_by_customer_type.seconds.min(initial=self.data_end_s),
            )
        )
        self.reference = pd.Timestamp(self.data_end_s, unit="s")
        self.history = SnapshotLedger(snapshot)
        self._lock = threading.Lock()
        self._fitting = threading.Lock()
        self._budget_log = _BudgetLog(settings.budget_ms)
        ordered = np.unique(snapshot.orders_by_customer.groups)
        self._known = set(snapshot.customers.decode(ordered).tolist())
        self.model = self._model(bundle)

    # -- model -------------------------------------------------------------------------
    def check(self, bundle: ModelBundle) -> None:
        """Refuse a version that does not fit this workspace: other features (or another
        order), another workspace, or another offer catalogue."""
        where = f"version {bundle.version} of {bundle.name}"
        if bundle.feature_names != feature_names():
            raise ModelMismatchError(
                f"{where} was trained on other features than this code computes "
                f"({len(bundle.feature_names)} vs {len(feature_names())}, or another order); "
                "retrain it with 'nextbest train'"
            )
        trained_on = bundle.meta.get("workspace_id")
        if trained_on != self.workspace_id:
            raise ModelMismatchError(
                f"{where} was trained on workspace {trained_on!r}, not on {self.workspace_id!r} "
                f"({self.workspace.path}); serve it on its own workspace, or train one here "
                "with 'nextbest train --workspace …'"
            )
        catalogue = bundle.meta.get("catalogue")
        if catalogue != self.catalogue:
            raise ModelMismatchError(
                f"{where} was trained on another offer catalogue ({catalogue}) than this "
                f"workspace now holds ({self.catalogue}); retrain it with 'nextbest train'"
            )

    def _model(self, bundle: ModelBundle | None) -> _Model:
        settings = self.settings
        if bundle is None:
            rules = load_rules(settings.rules_path)
            min_pair, max_candidates, refit = 20, settings.max_candidates, 28
        else:
            self.check(bundle)
            rules = (
                load_rules(settings.rules_path)
                if settings.rules_path
                else parse_rules(yaml.safe_load(bundle.rules_yaml), source="model rules")
            )
            config = bundle.meta["config"]
            min_pair = int(config.get("min_pair_orders", 20))
            max_candidates = int(config.get("max_candidates", settings.max_candidates))
            refit = int(config.get("refit_features_every_days", 28))
        # the candidates and the present's features read one basket lift, fitted once
        present, generator = fit_with_one_lift(
            self.snapshot,
            self.reference,
            FeatureBuilder(min_pair_orders=min_pair),
            CandidateGenerator(max_candidates=max_candidates, min_pair_orders=min_pair),
        )
        if bundle is None:
            return _Model(None, rules, generator, min_pair, refit_days=refit, present=present)
        return _Model(
            bundle=bundle,
            rules=rules,
            generator=generator,
            min_pair_orders=min_pair,
            calibrators={t: Calibrator.from_dict(c) for t, c in bundle.meta["calibrators"].items()},
            default_values=dict(bundle.meta.get("default_values", {})),
            lever_cap=float(bundle.meta.get("lever_cap", 2.0)),
            value_cap=bundle.meta.get("value_cap"),
            refit_days=refit,
            present=present,
        )

    def swap_model(self, bundle: ModelBundle | None) -> None:
        """Switch to another version; requests in flight finish on the one they started.
        The new version brings its own candidates and feature statistics, fitted before it
        serves (so the first request after a swap does not pay for them)."""
        model = self._model(bundle)
        self.model = model  # one reference assignment: atomic for readers
        log.info("serving %s", self.model_info(model))

    def model_info(self, model: _Model | None = None) -> dict[str, Any]:
        model = model or self.model
        if model.bundle is None:
            return {"name": self.model_name, "version": None, "alias": None, "mode": "rules_only"}
        return {
            "name": model.bundle.name,
            "version": model.bundle.version,
            "alias": model.bundle.alias,
            "mode": "model",
        }

    def builder_for(self, as_of_s: int, model: _Model | None = None) -> FeatureBuilder:
        """The model's feature builder fitted at the data's end, or for an earlier moment
        (back-tests) at the latest step of ``refit_features_every_days`` back from the end
        that is not after it: never later than the moment, and as stale as training's
        builders at most, so that a batch with a moment per customer fits a few.

        The present's builder is kept apart; past moments share a small cache of their
        own (``_PAST_BUILDERS``), so replaying the past never evicts what serves now."""
        model = model or self.model
        step = model.refit_days * DAY
        behind = max(self.data_end_s - as_of_s, 0)
        reference_s = self.data_end_s - step * -(-behind // step)
        present = reference_s == self.data_end_s
        with self._lock:
            if present and model.present is not None:
                return model.present
            if reference_s in model.builders:
                model.builders.move_to_end(reference_s)
                return model.builders[reference_s]
        with self._fitting:  # one fit at a time: concurrent requests wait for it, not redo it
            with self._lock:
                if present and model.present is not None:
                    return model.present
                if reference_s in model.builders:
                    return model.builders[reference_s]
            builder = FeatureBuilder(min_pair_orders=model.min_pair_orders).fit(
                self.snapshot, pd.Timestamp(reference_s, unit="s")
            )
            with self._lock:
                if present:
                    model.present = builder
                else:
                    model.builders[reference_s] = builder
                    while len(model.builders) > _PAST_BUILDERS:
                        model.builders.popitem(last=False)
        return builder

    def is_present(self, as_of_s: int) -> bool:
        """Whether a moment is served by the present's builder (no fit to wait for)."""
        return as_of_s >= self.data_end_s

    def as_of_bounds(self) -> tuple[int, int]:
        """The moments a request's ``as_of`` may name, in seconds, whole days: from the
        data's first day to the end of the day ``as_of_margin_days`` after its end (or
        after the clock's now, if later)."""
        first_day = self.data_start_s - self.data_start_s % DAY
        latest = max(self.data_end_s, self.now_s()) + self.settings.as_of_margin_days * DAY
        return first_day, latest - latest % DAY + DAY - 1

    def reads(self) -> CombinedLedger:
        """What eligibility reads for one call: the workspace's history and the live
        ledger, each customer's outcomes read once."""
        return CombinedLedger(self.snapshot, self.ledger)

    @property
    def generator(self) -> CandidateGenerator:
        return self.model.generator

    def now_s(self) -> int:
        clock = self.settings.clock
        if clock == "data":
            return self.data_end_s
        moment = pd.Timestamp.now() if clock == "now" else pd.Timestamp(clock)
        return second_ceil(moment)

    # -- the request --------------------------------------------------------------------
    def recommend(
        self,
        customer_id: str,
        *,
        channel: str,
        placement: str = "home",
        context: dict[str, Any] | None = None,
        k: int = 3,
        debug: bool = False,
        as_of: Any = None,
        log_exposure: bool = True,
    ) -> dict[str, Any]:
        """One customer's slate: :meth:`recommend_many` with one request."""
        return self.recommend_many(
            [customer_id],
            channel=channel,
            placement=placement,
            contexts=[context or {}],
            k=k,
            debug=debug,
            as_of=as_of,
            log_exposure=log_exposure,
        )[0]

    def recommend_many(
        self,
        customer_ids: list[str],
        *,
        channel: str,
        placement: str = "home",
        contexts: list[dict[str, Any]] | None = None,
        k: int = 3,
        debug: bool = False,
        as_of: Any = None,
        log_exposure: bool = True,
        waited_s: Sequence[float] | None = None,
    ) -> list[dict[str, Any]]:
        """Slates for many customers at one moment, computed together (campaigns), with
        exactly the per-request semantics of the service. ``waited_s``: how long each
        request already waited in the service before this call (the latency budget counts
        it); without it, the call is one job whose n customers share n budgets."""
        model = self.model  # one version for the whole call, even if it is swapped meanwhile
        s = self.snapshot
        contexts = contexts or [{} for _ in customer_ids]
        waits = _waits(waited_s, len(customer_ids))  # checked before anything is done
        t = self.now_s() if as_of is None else second_ceil(as_of)
        requests = self._requests(customer_ids, t, channel, placement, contexts)
        # without consent to personalisation, candidates and features are those of an
        # unknown customer (eligibility still reads the real one: consent, caps, owned)
        personal = personalisation_allowed(s, model.rules, requests)
        profiled = requests if personal.all() else _impersonal(s, requests, personal)
        candidates = model.generator.generate(s, profiled)
        rows, offers = candidates.request, candidates.offer
        builder = self.builder_for(t, model)
        # the budget counts the request's own work, not a past moment's one-off fit
        started = time.perf_counter()
        rules = model.rules.with_blocks(self.blocks) if self.blocks else model.rules
        # features of every candidate only if a rule reads them; else of the eligible ones
        full = builder.build(s, profiled, rows, offers) if rules.needs_features else None
        reads = self.reads()
        # the stop-loss's kills, read for every call: a kill holds from the next request on
        stopped = self.ledger.stopped_offers()
        eligibility = self._eligible(rules, requests, rows, offers, full, reads, stopped)
        eligible = eligibility.eligible.copy()
        if self.blocks_unread is not None:  # the blocks unknown: fails closed, like hard caps
            eligible[:] = False
        # pairs the offer-level experiment withholds: ranked like the others (their ghosts,
        # the ones that would have made the slate, are logged), never served
        held = np.zeros(len(rows), dtype=bool)
        if self.settings.offer_holdout_share > 0:
            held = eligible & self._offer_holdout(customer_ids, rows, offers)
            eligible &= ~held
        keep = np.flatnonzero(eligible | held)
        ranked_rows, ranked_offers = rows[keep], offers[keep]
        matrix = (
            full.take(keep)
            if full is not None
            else builder.build(s, profiled, ranked_rows, ranked_offers)
        )
        plan = self._plan(model, customer_ids, personal)
        score, probability = self._scores(model, matrix, ranked_rows, ranked_offers, plan.scoring)
        request_ids = self._request_ids(customer_ids, t, channel, placement)
        # exploration: only a slate that is logged (its propensities with it), never a
        # holdout's (nor a review's preview, which logs nothing)
        explore = [
            self.settings.exploration_for(channel)
            if log_exposure and not plan.holdout[i]
            else Exploration()
            for i in range(len(customer_ids))
        ]
        withheld = held[keep]
        ranking = (s, rules, ranked_rows, ranked_offers, eligibility.demoted[keep], score)
        slates = self._slates(*ranking, ~withheld, len(customer_ids), k, request_ids, explore)
        ghosts = (
            self._ghosts(self._slates(*ranking, None, len(customer_ids), k), withheld)
            if withheld.any()
            else [[] for _ in customer_ids]
        )
        # the budget used up: the ranked slate now, with a short true because (a fact)
        spent_ms = (time.perf_counter() - started) * 1000
        over_budget = self._over_budget(spent_ms, len(customer_ids), waits)
        explanations = self._explain(model, matrix, builder, slates, plan, ~over_budget)
        responses, logs = self._respond(
            model,
            customer_ids,
            channel,
            placement,
            t,
            plan,
            slates,
            (ranked_offers, score, probability, explanations, builder, matrix),
            (rows, offers, eligibility, eligible) if debug else None,
            request_ids,
            ghosts,
        )
        # the live ledger unread (caps on the history alone), or the blocks
        degraded = reads.degraded or self.blocks_unread is not None
        if log_exposure:
            limits = self._limits(rules, requests, plan, logs)
            # the database down: buffered, and a slate under a hard cap fails closed (empty)
            admitted = self.ledger.log_slates(logs, limits)
            degraded = degraded or getattr(admitted, "buffered", False)
            for response, logged in zip(responses, logs, strict=True):
                if logged["request_id"] in limits:
                    _keep(response, admitted[logged["request_id"]])
        for response, over in zip(responses, over_budget, strict=True):
            response["degraded"] = degraded
            response["budget_exceeded"] = bool(over)
        if over_budget.any():
            self._budget_log.used_up(int(over_budget.sum()), spent_ms, len(customer_ids))
        return responses

    def _over_budget(self, spent_ms: float, n: int, waits: np.ndarray | None) -> np.ndarray:
        """Which customers' budget is used up. A request the service answers has the
        budget from when it was queued for the present's thread: the time it waited there,
        then this call's own work (a batch's, for each of the requests it serves
        together). A call of its own (a campaign's chunk, a test) has n budgets for its
        own work."""
        budget = self.settings.budget_ms
        if waits is None:
            return np.full(n, spent_ms > budget * n)
        return waits * 1000 + spent_ms > budget

    def _request_ids(
        self, customer_ids: list[str], t: int, channel: str, placement: str
    ) -> list[str]:
        """Random ids; derived ones with ``settings.request_seed`` (a replayable run)."""
        seed = self.settings.request_seed
        if seed is None:
            return [uuid.uuid4().hex for _ in customer_ids]
        ids = []
        for customer in customer_ids:
            key = f"{seed}\x1f{customer}\x1f{t}\x1f{channel}\x1f{placement}"
            nth = self._seen_requests[key] = self._seen_requests.get(key, -1) + 1
            ids.append(hashlib.sha256(f"{key}\x1f{nth}".encode()).hexdigest()[:32])
        return ids

    def _limits(
        self, rules: RuleSet, requests: Requests, plan: _Plan, logs: list[dict[str, Any]]
    ) -> dict[str, list[Limit]]:
        """The hard caps each outbound slate must still fit as it is logged."""
        s, out = self.snapshot, {}
        ghost = self.settings.holdout_control == "nothing"  # a holdout slate shown to nobody
        for i, logged in enumerate(logs):
            if (plan.holdout[i] and ghost) or not logged["offers"]:
                continue
            offers = s.offers.encode([o.offer_id for o in logged["offers"]])
            limits = hard_limits(s, rules, requests, i, list(offers), self.history)
            if limits:
                out[logged["request_id"]] = limits
        return out

    # -- the stages of a call -------------------------------------------------------------
    def _requests(
        self,
        customer_ids: list[str],
        t: int,
        channel: str,
        placement: str,
        contexts: list[dict[str, Any]],
    ) -> Requests:
        n = len(customer_ids)
        return Requests.build(
            self.snapshot,
            list(customer_ids),
            [pd.Timestamp(t, unit="s")] * n,
            channel=[channel] * n,
            placement=[placement] * n,
            moment=[c.get("moment") for c in contexts],
            page_product=[c.get("product_id") for c in contexts],
            cart=[[str(p) for p in c.get("cart") or []] for c in contexts],
        )

    def _eligible(
        self,
        rules: RuleSet,
        requests: Requests,
        rows: np.ndarray,
        offers: np.ndarray,
        matrix: FeatureMatrix | None,
        reads: CombinedLedger,
        stopped: frozenset[str] = frozenset(),
    ) -> Eligibility:
        features = None if matrix is None else matrix.columns()
        return evaluate(
            self.snapshot,
            rules,
            requests,
            rows,
            offers,
            ledger=reads,
            features=features,
            stopped=stopped,
        )

    def _offer_holdout(
        self, customer_ids: list[str], rows: np.ndarray, offers: np.ndarray
    ) -> np.ndarray:
        """(customer, offer) pairs held out of the offer-level experiment."""
        settings, values = self.settings, self.snapshot.offers.values
        return np.array(
            [
                in_holdout(
                    f"{customer_ids[r]}:{values[o]}",
                    settings.holdout_salt,
                    settings.offer_holdout_share,
                )
                for r, o in zip(rows, offers, strict=True)
            ],
            dtype=bool,
        )

    def _plan(
        self, model: _Model, customer_ids: list[str], personal: np.ndarray | None = None
    ) -> _Plan:
        """Per customer: the holdout, the mode said in the answer (model, rules_only,
        cold_start, or non_personal: no consent to personalisation, ranked like a cold
        start) and the ranking actually used (the holdout's control may override)."""
        settings = self.settings
        holdout = [
            in_holdout(c, settings.holdout_salt, settings.holdout_share) for c in customer_ids
        ]
        base = "model" if model.bundle is not None else "rules_only"
        modes = [base if c in self._known else "cold_start" for c in customer_ids]
        if personal is not None:
            modes = [
                "non_personal" if m != "cold_start" and not personal[i] else m
                for i, m in enumerate(modes)
            ]
        control = [h and settings.holdout_control == "rules_only" for h in holdout]
        scoring = np.array(["rules_only" if r else m for m, r in zip(modes, control, strict=True)])
        return _Plan(holdout=holdout, modes=modes, control=control, scoring=scoring)

    def _scores(
        self,
        model: _Model,
        matrix: FeatureMatrix,
        rows: np.ndarray,
        offers: np.ndarray,
        scoring: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of the eligible rows, each ranked the way its customer's plan says."""
        score = np.full(len(rows), -np.inf)
        probability = np.full(len(rows), np.nan)
        for mode in np.unique(scoring):
            mine = np.flatnonzero(scoring[rows] == mode)
            if len(mine):
                score[mine], probability[mine] = self._score(model, matrix, offers, mine, mode)
        return score, probability

    @staticmethod
    def _slates(
        s: Snapshot,
        rules: RuleSet,
        rows: np.ndarray,
        offers: np.ndarray,
        demoted: np.ndarray,
        score: np.ndarray,
        among: np.ndarray | None,
        n: int,
        k: int,
        request_ids: Sequence[str] | None = None,
        explore: Sequence[Exploration] | None = None,
    ) -> list[tuple[Slate, list[int]]]:
        """Each request's slate from its eligible rows (``among`` them, if given): best
        first without collisions, or drawn where ``explore`` says (seeded from the
        request's id); and the rows it holds."""
        ranked = np.arange(len(rows)) if among is None else np.flatnonzero(among)
        # best first, but offers rotated out by their per-offer cap after all the others
        ranked = ranked[np.lexsort((-score[ranked], demoted[ranked], rows[ranked]))]
        bounds = np.searchsorted(rows[ranked], np.arange(n + 1))
        slates = []
        for i in range(n):
            mine = ranked[bounds[i] : bounds[i + 1]]
            if explore is not None and request_ids is not None and explore[i].active:
                slate = draw_slate(
                    s,
                    rules,
                    offers[mine],
                    score[mine],
                    demoted[mine],
                    k,
                    explore[i],
                    request_rng(request_ids[i]),
                )
            else:
                slate = assemble_slate(s, rules, offers[mine], k)
            position = {int(offers[j]): int(j) for j in mine}
            slates.append((slate, [position[o] for o in slate.chosen]))
        return slates

    @staticmethod
    def _ghosts(
        unheld: list[tuple[Slate, list[int]]], withheld: np.ndarray
    ) -> list[list[tuple[int, int]]]:
        """Per request, the withheld rows that the greedy slate with them back in would
        have held, with the rank each would have had there."""
        return [
            [(j, rank) for rank, j in enumerate(chosen, start=1) if withheld[j]]
            for _, chosen in unheld
        ]

    def _explain(
        self,
        model: _Model,
        matrix: FeatureMatrix,
        builder: FeatureBuilder,
        slates: list[tuple[Slate, list[int]]],
        plan: _Plan,
        within_budget: np.ndarray,
    ) -> dict[int, Any]:
        """SHAP explanations of the returned offers only (model-ranked slates), for the
        customers whose latency budget is not used up."""
        s = self.snapshot
        explain = [
            j
            for i, (_, chosen) in enumerate(slates)
            if plan.modes[i] == "model" and not plan.control[i] and within_budget[i]
            for j in chosen
        ]
        if model.bundle is None or not explain:
            return {}
        done = explain_rows(model.bundle.booster, matrix, np.array(explain), builder, s)
        return dict(zip(explain, done, strict=True))

    def _respond(
        self,
        model: _Model,
        customer_ids: list[str],
        channel: str,
        placement: str,
        t: int,
        plan: _Plan,
        slates: list[tuple[Slate, list[int]]],
        ranked: tuple[Any, ...],
        debug: tuple[np.ndarray, np.ndarray, Eligibility, np.ndarray] | None,
        request_ids: Sequence[str],
        ghosts: Sequence[Sequence[tuple[int, int]]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The answers, and the ledger rows of what each answer served (each offer with
        its propensity: None for a deterministic slate), with the ghosts of the offers
        the offer-level holdout withheld."""
        s, settings = self.snapshot, self.settings
        offers, score, probability, explanations, builder, matrix = ranked
        moment = pd.Timestamp(t, unit="s")
        responses, logs = [], []
        for i, customer_id in enumerate(customer_ids):
            slate, chosen = slates[i]
            served = [
                self._offer(
                    s,
                    int(offers[j]),
                    rank,
                    score[j],
                    probability[j],
                    explanations.get(j),
                    _ranking(plan, i),  # the ranking used: the holdout's control may differ
                    builder,
                    matrix,
                    j,
                    debug is not None,
                )
                for rank, j in enumerate(chosen, start=1)
            ]
            request_id = request_ids[i]
            holdout = plan.holdout[i]
            drawn: list[float | None] = [None] * len(served)  # deterministic: no draw
            if slate.propensities is not None:
                drawn = list(slate.propensities)
            included: list[float | None] = [None] * len(served)
            if slate.inclusions is not None:
                included = list(slate.inclusions)
            logs.append(
                dict(
                    request_id=request_id,
                    customer_id=customer_id,
                    channel=channel,
                    placement=placement,
                    model_version=None if model.bundle is None else model.bundle.version,
                    mode="holdout_" + settings.holdout_control if holdout else plan.modes[i],
                    holdout=holdout,
                    at_s=t,
                    offers=[
                        ServedOffer(o["offer_id"], o["rank"], o["score"], o["probability"], p, q)
                        for o, p, q in zip(served, drawn, included, strict=True)
                    ],
                    ghosts=[
                        ServedOffer(
                            str(s.offers.values[offers[j]]),
                            rank,
                            _rounded(score[j]),
                            _rounded(probability[j]),
                        )
                        for j, rank in ghosts[i]
                    ],
                )
            )
            response: dict[str, Any] = {
                "request_id": request_id,
                "customer_id": customer_id,
                "as_of": moment.isoformat(),
                "model": self.model_info(model) | {"mode": plan.modes[i]},
                "holdout": holdout,
                "offers": [] if holdout and settings.holdout_control == "nothing" else served,
            }
            if debug is not None:
                response |= self._trace(i, slate, *debug)
            responses.append(response)
        return responses, logs

    def _trace(
        self,
        request: int,
        slate: Slate,
        rows: np.ndarray,
        offers: np.ndarray,
        eligibility: Eligibility,
        eligible: np.ndarray,
    ) -> dict[str, Any]:
        """``debug``: every candidate left out, with all its reason codes."""
        values = self.snapshot.offers.values
        mine = np.flatnonzero(rows == request)
        excluded = [
            {"offer_id": str(values[offers[j]]), "reasons": reasons_of(int(eligibility.mask[j]))}
            for j in mine
            if not eligibility.eligible[j]
        ]
        excluded += [
            {"offer_id": str(values[offers[j]]), "reasons": ["offer_holdout"]}
            for j in mine
            if eligibility.eligible[j] and not eligible[j]
        ]
        excluded += [
            {"offer_id": str(values[o]), "reasons": [why]} for o, why in slate.skipped.items()
        ]
        return {
            "excluded": excluded,
            "rotated": [
                str(values[offers[j]]) for j in mine if eligible[j] and eligibility.demoted[j]
            ],
            "candidates": len(mine),
            "eligible": int(eligible[mine].sum()),
        }

    def _offer(
        self,
        s: Snapshot,
        offer: int,
        rank: int,
        score: float,
        probability: float,
        explanation: Any,
        ranking: str,
        builder: FeatureBuilder,
        matrix: Any,
        row: int,
        debug: bool = False,
    ) -> dict[str, Any]:
        item: dict[str, Any] = {
            "offer_id": str(s.offers.values[offer]),
            "title": _title(s, offer),
            "rank": rank,
            "score": round(float(score), 6),
            "probability": _rounded(probability),
            "value": None if np.isnan(s.offer_value[offer]) else float(s.offer_value[offer]),
            "because": "",
            "reasons": [],
            "contributions": [],
        }
        if explanation is not None:
            item["because"] = explanation.because
            item["reasons"] = explanation.reasons
            item["contributions"] = explanation.contributions
            item["expected_value"] = explanation.expected_value
            item["raw_score"] = explanation.raw_score
            if debug:  # both signs, strongest first: the review page's SHAP chart
                item["shap"] = explanation.strongest
        elif ranking == "non_personal_rules":  # a rules-only holdout: no fact of theirs
            item["because"], item["reasons"] = NON_PERSONAL_BECAUSE, []
        elif ranking == "non_personal":  # popularity alone; nothing said of the customer
            from serving.explain import explain_non_personal

            said = explain_non_personal(builder, s, matrix, row)
            item["because"], item["reasons"] = said or (NON_PERSONAL_BECAUSE, [])
        elif ranking == "cold_start":  # ranked by popularity (not in a rules-only holdout)
            from serving.explain import explain_cold_start

            said = explain_cold_start(builder, s, matrix, row)
            item["because"], item["reasons"] = said or (COLD_START_BECAUSE, [])
        else:
            # the rules-only ranking, or a cold start in a rules-only holdout: facts only
            item["because"], item["reasons"] = _rules_because(builder, s, matrix, row)
        if s.offer_kind[offer] == OFFER_KINDS.index("bundle"):
            products = s.offer_products.values[
                s.offer_products.offsets[offer] : s.offer_products.offsets[offer + 1]
            ]
            item["bundle"] = {
                "ladder": _none_if_missing(s.bundle_ladders, s.offer_bundle_ladder[offer]),
                "tier": _str_or_none(s.offer_bundle_tier[offer]),
                "products": list(s.products.decode(products)),
            }
        return item

    def _score(
        self, model: _Model, matrix: Any, offers: np.ndarray, eligible: np.ndarray, mode: str
    ) -> tuple[np.ndarray, np.ndarray]:
        s = self.snapshot
        chosen = offers[eligible]
        values = matrix.values[eligible]
        if mode in ("cold_start", "non_personal"):
            popularity = np.nan_to_num(values[:, matrix.names.index("offer_popularity_30d")])
            return popularity, np.full(len(chosen), np.nan)
        if mode == "rules_only" or model.bundle is None:
            worth = np.nan_to_num(s.offer_value[chosen], nan=0.0) * s.offer_lever[chosen]
            return worth, np.full(len(chosen), np.nan)
        raw = model.bundle.booster.predict(values, num_threads=1)
        return rank_scores(
            raw,
            row_tasks(s.offer_kind[chosen], values[:, matrix.names.index(REPEAT_FEATURE)]),
            s.offer_value[chosen],
            s.offer_lever[chosen],
            model.calibrators,
            model.default_values,
            model.lever_cap,
            model.value_cap,
        )

    def known_customers(self) -> set[str]:
        """Customers with at least one order in the snapshot (everyone else is cold)."""
        return self._known

    def metadata(self) -> dict[str, Any]:
        model = self.model
        return {
            "snapshot_customers": len(self.known_customers()),
            "model": self.model_info(model),
            "model_source": {  # the registry, or the last-known-good cache (a degraded start)
                "source": model.bundle.source if model.bundle else "none",
                "version": model.bundle.version if model.bundle else None,
                "sha256": model.bundle.sha256 if model.bundle else None,
            },
            "features": list(model.bundle.feature_names) if model.bundle else [],
            "rules": {
                "name": model.rules.name,
                "version": model.rules.version,
                "hash": model.rules.content_hash,
            },
            "workspace": {"id": self.workspace_id, "path": str(self.workspace.path)},
            "catalogue": self.catalogue,
            "data_end": self.reference.isoformat(),
            "clock": self.settings.clock,
            "holdout": {  # never the salt: with it anyone could tell who is held out
                "share": self.settings.holdout_share,
                "control": self.settings.holdout_control,
                "offer_share": self.settings.offer_holdout_share,
            },
            "ledger": self.ledger.backend,
        }


def _ranking(plan: _Plan, request: int) -> str:
    """How a request's offers were ranked, as their "because" must say: the plan's
    scoring, and for a customer who may not be profiled under the holdout's rules-only
    control, ``non_personal_rules`` (its facts would be an unknown customer's, not theirs)."""
    scoring = str(plan.scoring[request])
    if plan.modes[request] == "non_personal" and scoring == "rules_only":
        return "non_personal_rules"
    return scoring


def _impersonal(s: Snapshot, requests: Requests, personal: np.ndarray) -> Requests:
    """The requests as candidates and features see them: the customers who may not be
    profiled (``personal`` False) as the UNKNOWN customer, their context (channel, page,
    cart) kept; their own ids kept too (the live ledger's caps count under them)."""
    from dataclasses import replace

    return replace(requests, customer=np.where(personal, requests.customer, s.customers.unknown))


def _keep(response: dict[str, Any], offers: list[str]) -> None:
    """What a capped slate really carried once logged (a concurrent request may have taken
    the last place under a cap), ranked again from 1."""
    kept = [o for o in response["offers"] if o["offer_id"] in set(offers)]
    for rank, offer in enumerate(kept, start=1):
        offer["rank"] = rank
    response["offers"] = kept


def _rounded(value: float) -> float | None:
    """A score or probability as a served offer states it (None if unknown)."""
    return None if np.isnan(value) else round(float(value), 6)


def _title(s: Snapshot, offer: int) -> str:
    title = s.offer_title.iloc[offer] if hasattr(s.offer_title, "iloc") else s.offer_title[offer]
    return str(title) if isinstance(title, str) else str(s.offers.values[offer])


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _none_if_missing(codes: Any, code: int) -> str | None:
    return None if code < 0 else str(codes.values[code])


def _rules_because(
    builder: FeatureBuilder, s: Snapshot, matrix: Any, row: int
) -> tuple[str, list[dict[str, Any]]]:
    """Without a model there are no contributions: no reason, the strongest plain fact."""
    from serving.explain import explain_facts

    return explain_facts(builder, s, matrix, row)
