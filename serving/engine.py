"""The recommender: one request through the whole flow, in process.

candidates → features → eligibility (with the live ledger) → ranker → calibrated
P(accept) × value × lever → slate without collisions → "because" → exposure ledger.

The service, ``nextbest recommend`` and ``nextbest recommend-batch`` all call
:meth:`Recommender.recommend`, so the storefront, a campaign and a back-test get the same
ranking, eligibility, caps, holdouts and explanations.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml

from features import FeatureBuilder, Requests, Snapshot
from features.candidates import CandidateGenerator
from features.contract import OFFER_KINDS
from features.history import second_ceil
from nextbest.registry import MODEL_NAME, ModelBundle
from policy import RuleSet, evaluate, load_rules, parse_rules
from policy.arbitration import Calibrator, offer_tasks, rank_scores
from policy.eligibility import reasons_of
from policy.slate import assemble_slate
from serving.explain import COLD_START_BECAUSE, explain_rows
from serving.ledger import CombinedLedger, ServedOffer, SqlLedger

__all__ = ["Recommender", "ServeSettings", "in_holdout"]

log = logging.getLogger("nextbest.serving")

_BUILDER_CACHE = 8


def in_holdout(key: str, salt: str, share: float) -> bool:
    """Sticky assignment: a hash of the key and the experiment salt, uniform in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass(frozen=True)
class ServeSettings:
    """How the service decides; every field has a safe default."""

    clock: str = "data"
    holdout_share: float = 0.05
    holdout_salt: str = "nextbest-holdout-1"
    holdout_control: Literal["nothing", "rules_only"] = "nothing"
    offer_holdout_share: float = 0.0
    alias: str = "champion"
    rules_path: Path | None = None
    max_candidates: int = 200


@dataclass
class _Model:
    bundle: ModelBundle | None
    rules: RuleSet
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    default_values: dict[str, float] = field(default_factory=dict)
    lever_cap: float = 2.0


class Recommender:
    """Holds the snapshot, the fitted feature builder, the model and the ledger."""

    def __init__(
        self,
        snapshot: Snapshot,
        bundle: ModelBundle | None,
        ledger: SqlLedger,
        settings: ServeSettings | None = None,
        *,
        workspace: str = "",
    ) -> None:
        self.snapshot = snapshot
        self.ledger = ledger
        self.settings = settings or ServeSettings()
        self.workspace = workspace
        self.data_end_s = (
            int(
                max(
                    snapshot.line_seconds.max(initial=0),
                    snapshot.events_by_customer_type.seconds.max(initial=0),
                )
            )
            + 1
        )
        self.reference = pd.Timestamp(self.data_end_s, unit="s")
        self.combined = CombinedLedger(snapshot, ledger)
        self._builders: OrderedDict[int, FeatureBuilder] = OrderedDict()
        self._lock = threading.Lock()
        self.generator = CandidateGenerator(max_candidates=self.settings.max_candidates).fit(
            snapshot, self.reference
        )
        self.model = self._model(bundle)
        self.extra_blocks: list[Any] = []
        ordered = np.unique(snapshot.orders_by_customer.groups)
        self._known = set(snapshot.customers.decode(ordered).tolist())
        self.offer_task = offer_tasks(snapshot.offer_kind)

    # -- model -------------------------------------------------------------------------
    def _model(self, bundle: ModelBundle | None) -> _Model:
        if bundle is None:
            rules = load_rules(self.settings.rules_path)
            return _Model(bundle=None, rules=rules)
        rules = (
            load_rules(self.settings.rules_path)
            if self.settings.rules_path
            else parse_rules(yaml.safe_load(bundle.rules_yaml), source="model rules")
        )
        return _Model(
            bundle=bundle,
            rules=rules,
            calibrators={t: Calibrator.from_dict(c) for t, c in bundle.meta["calibrators"].items()},
            default_values=dict(bundle.meta.get("default_values", {})),
            lever_cap=float(bundle.meta.get("lever_cap", 2.0)),
        )

    def with_model(self, bundle: ModelBundle | None, **changes: Any) -> Recommender:
        """Another recommender on the same snapshot, ledger and reviewers' blocks, with
        ``bundle`` and these settings changed (a review's challenger beside the champion)."""
        other = Recommender(
            self.snapshot,
            bundle,
            self.ledger,
            replace(self.settings, **changes),
            workspace=self.workspace,
        )
        other.extra_blocks = list(self.extra_blocks)
        return other

    def swap_model(self, bundle: ModelBundle | None) -> None:
        """Switch to another version; requests in flight finish on the one they started."""
        model = self._model(bundle)
        self.model = model  # one reference assignment: atomic for readers
        log.info("serving %s", self.model_info(model))

    def model_info(self, model: _Model | None = None) -> dict[str, Any]:
        model = model or self.model
        if model.bundle is None:
            return {"name": MODEL_NAME, "version": None, "alias": None, "mode": "rules_only"}
        return {
            "name": MODEL_NAME,
            "version": model.bundle.version,
            "alias": model.bundle.alias,
            "mode": "model",
        }

    def builder_for(self, as_of_s: int) -> FeatureBuilder:
        """The feature builder fitted at the data's end, or at an earlier moment asked for
        (back-tests), never later than the moment itself."""
        reference_s = min(as_of_s, self.data_end_s)
        with self._lock:
            if reference_s in self._builders:
                self._builders.move_to_end(reference_s)
                return self._builders[reference_s]
        min_pair = 20
        if self.model.bundle is not None:
            min_pair = int(self.model.bundle.meta["config"].get("min_pair_orders", 20))
        builder = FeatureBuilder(min_pair_orders=min_pair).fit(
            self.snapshot, pd.Timestamp(reference_s, unit="s")
        )
        with self._lock:
            self._builders[reference_s] = builder
            while len(self._builders) > _BUILDER_CACHE:
                self._builders.popitem(last=False)
        return builder

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
    ) -> list[dict[str, Any]]:
        """Slates for many customers at one moment, computed together (campaigns), with
        exactly the per-request semantics of the service."""
        model = self.model
        n = len(customer_ids)
        contexts = contexts or [{} for _ in range(n)]
        t = self.now_s() if as_of is None else second_ceil(as_of)
        moment = pd.Timestamp(t, unit="s")
        s = self.snapshot
        known_set = self.known_customers()
        settings = self.settings
        holdout = [
            in_holdout(c, settings.holdout_salt, settings.holdout_share) for c in customer_ids
        ]
        requests = Requests.build(
            s,
            list(customer_ids),
            [moment] * n,
            channel=[channel] * n,
            placement=[placement] * n,
            moment=[c.get("moment") for c in contexts],
            page_product=[c.get("product_id") for c in contexts],
            cart=[[str(p) for p in c.get("cart") or []] for c in contexts],
        )
        candidates = self.generator.generate(s, requests)
        rows, offers = candidates.request, candidates.offer
        builder = self.builder_for(t)
        matrix = builder.build(s, requests, rows, offers)
        features = {name: matrix.values[:, j] for j, name in enumerate(matrix.names)}
        rules = model.rules
        if self.extra_blocks:
            rules = rules.with_blocks(self.extra_blocks)
        eligibility = evaluate(
            s, rules, requests, rows, offers, ledger=self.combined, features=features
        )
        eligible = eligibility.eligible.copy()
        if settings.offer_holdout_share > 0:
            for row in np.flatnonzero(eligible):
                key = f"{customer_ids[rows[row]]}:{s.offers.values[offers[row]]}"
                if in_holdout(key, settings.holdout_salt, settings.offer_holdout_share):
                    eligible[row] = False

        base_mode = "model" if model.bundle is not None else "rules_only"
        modes = [base_mode if c in known_set else "cold_start" for c in customer_ids]
        use_rules = [h and settings.holdout_control == "rules_only" for h in holdout]
        scoring = np.array(
            ["rules_only" if r else m for m, r in zip(modes, use_rules, strict=True)]
        )
        score = np.full(len(rows), -np.inf)
        probability = np.full(len(rows), np.nan)
        for mode in np.unique(scoring):
            mine = np.flatnonzero(eligible & (scoring[rows] == mode))
            if len(mine):
                score[mine], probability[mine] = self._score(model, matrix, offers, mine, mode)

        ranked = np.flatnonzero(eligible)
        ranked = ranked[np.lexsort((-score[ranked], rows[ranked]))]
        bounds = np.searchsorted(rows[ranked], np.arange(n + 1))
        slates = []
        for i in range(n):
            mine = ranked[bounds[i] : bounds[i + 1]]
            slate = assemble_slate(s, rules, offers[mine], k)
            position = {int(offers[j]): int(j) for j in mine}
            slates.append((slate, [position[o] for o in slate.chosen]))

        explain = [
            j
            for i, (_, chosen) in enumerate(slates)
            if modes[i] == "model" and not use_rules[i]
            for j in chosen
        ]
        explanations: dict[int, Any] = {}
        if model.bundle is not None and explain:
            done = explain_rows(model.bundle.booster, matrix, np.array(explain), builder, s)
            explanations = dict(zip(explain, done, strict=True))

        responses = []
        logs = []
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
                    modes[i],
                    builder,
                    matrix,
                    j,
                    debug,
                )
                for rank, j in enumerate(chosen, start=1)
            ]
            request_id = uuid.uuid4().hex
            logs.append(
                dict(
                    request_id=request_id,
                    customer_id=customer_id,
                    channel=channel,
                    placement=placement,
                    model_version=None if model.bundle is None else model.bundle.version,
                    mode="holdout_" + settings.holdout_control if holdout[i] else modes[i],
                    holdout=holdout[i],
                    at_s=t,
                    offers=[
                        ServedOffer(o["offer_id"], o["rank"], o["score"], o["probability"])
                        for o in served
                    ],
                )
            )
            response: dict[str, Any] = {
                "request_id": request_id,
                "customer_id": customer_id,
                "as_of": moment.isoformat(),
                "model": self.model_info(model) | {"mode": modes[i]},
                "holdout": holdout[i],
                "offers": [] if holdout[i] and settings.holdout_control == "nothing" else served,
            }
            if debug:
                mine = np.flatnonzero(rows == i)
                response["excluded"] = [
                    {
                        "offer_id": str(s.offers.values[offers[j]]),
                        "reasons": reasons_of(int(eligibility.mask[j])),
                    }
                    for j in mine
                    if not eligibility.eligible[j]
                ] + [
                    {"offer_id": str(s.offers.values[o]), "reasons": [why]}
                    for o, why in slate.skipped.items()
                ]
                response["candidates"] = len(mine)
                response["eligible"] = int(eligible[mine].sum())
            responses.append(response)
        if log_exposure:
            self.ledger.log_slates(logs)
        return responses

    def _offer(
        self,
        s: Snapshot,
        offer: int,
        rank: int,
        score: float,
        probability: float,
        explanation: Any,
        mode: str,
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
            "probability": None if np.isnan(probability) else round(float(probability), 6),
            "value": None if np.isnan(s.offer_value[offer]) else float(s.offer_value[offer]),
            "because": "",
            "reasons": [],
            "contributions": [],
        }
        # a cold start is ranked by popularity, except in a rules-only holdout
        popular = float(
            np.nan_to_num(matrix.values[row, matrix.names.index("offer_popularity_30d")])
        )
        if explanation is not None:
            item["because"] = explanation.because
            item["reasons"] = explanation.reasons
            item["contributions"] = explanation.contributions
            item["expected_value"] = explanation.expected_value
            item["raw_score"] = explanation.raw_score
            if debug:  # both signs, strongest first: the review page's SHAP chart
                item["shap"] = explanation.strongest
        elif mode == "cold_start" and score == popular:
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
        if mode == "cold_start":
            popularity = np.nan_to_num(values[:, matrix.names.index("offer_popularity_30d")])
            return popularity, np.full(len(chosen), np.nan)
        if mode == "rules_only" or model.bundle is None:
            worth = np.nan_to_num(s.offer_value[chosen], nan=0.0) * s.offer_lever[chosen]
            return worth, np.full(len(chosen), np.nan)
        raw = model.bundle.booster.predict(values, num_threads=1)
        return rank_scores(
            raw,
            self.offer_task[chosen],
            s.offer_value[chosen],
            s.offer_lever[chosen],
            model.calibrators,
            model.default_values,
            model.lever_cap,
        )

    def known_customers(self) -> set[str]:
        """Customers with at least one order in the snapshot (everyone else is cold)."""
        return self._known

    def metadata(self) -> dict[str, Any]:
        model = self.model
        return {
            "snapshot_customers": len(self.known_customers()),
            "model": self.model_info(model),
            "features": list(model.bundle.feature_names) if model.bundle else [],
            "rules": {
                "name": model.rules.name,
                "version": model.rules.version,
                "hash": model.rules.content_hash,
            },
            "workspace": self.workspace,
            "data_end": self.reference.isoformat(),
            "clock": self.settings.clock,
            "holdout": {
                "share": self.settings.holdout_share,
                "salt": self.settings.holdout_salt,
                "control": self.settings.holdout_control,
                "offer_share": self.settings.offer_holdout_share,
            },
            "ledger": self.ledger.backend,
        }


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
