"""The BentoML service: POST /recommend, POST /feedback, GET /metadata, /healthz, /readyz,
and the review page under /review (``serving.review.web``).

One ``@bentoml.service`` class. The model is resolved by alias from the MLflow registry
(``models:/nextbest-ranker-<workspace>@champion``) in ``__init__`` and the resolved version is
logged; with no champion the service serves the rules-only ranking and says so in every
response's ``model`` field. A background thread watches the alias and switches versions
without failing a request; the same thread re-indexes the workspace when its content
fingerprint changes. Settings come from ``serving.settings.ServingSettings.from_env``
(``nextbest serve`` sets them), never from ad-hoc reads; the recommender comes from
``serving.assembly.build_recommender``, as everywhere else.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Annotated, Any, Literal

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, Field

from features.contract import CHANNELS, OUTCOMES
from features.snapshot import MOMENTS, PLACEMENTS
from serving.review.web import site as review_site

__all__ = ["NextBest"]

log = logging.getLogger("nextbest.serving")

Channel = Literal[CHANNELS]  # type: ignore[valid-type]
Placement = Literal[PLACEMENTS]  # type: ignore[valid-type]
Moment = Literal[MOMENTS]  # type: ignore[valid-type]
Outcome = Literal[OUTCOMES]  # type: ignore[valid-type]


class Context(BaseModel):
    """Where the customer is: the product on the page, the cart, the declared moment."""

    product_id: str | None = Field(None, examples=["1082185"])
    cart: list[str] = Field(default_factory=list, examples=[["981760"]])
    moment: Moment | None = Field(None, examples=["browsing"])


ops = FastAPI(title="nextbest operations")


@bentoml.asgi_app(review_site, path="/review")
@bentoml.asgi_app(ops, path="/")
@bentoml.service(name="nextbest", workers=1, traffic={"timeout": 30})
class NextBest:
    """The storefront's one brain: ranked, explained, guarded, logged offers."""

    def __init__(self) -> None:
        from features import Workspace
        from runtime.registry import model_name
        from runtime.settings import resolve_workspace
        from serving.assembly import build_recommender
        from serving.review import Reviews, ReviewStore
        from serving.settings import ServingSettings

        settings = ServingSettings.from_env()
        self.settings = settings
        self.workspace = Workspace(resolve_workspace(settings.workspace))
        self.model_name = model_name(self.workspace.workspace_id)
        self.fingerprint = self.workspace.fingerprint
        self.recommender = build_recommender(
            settings, workspace=self.workspace, if_mismatch="rules_only"
        )
        self.recommender.builder_for(self.recommender.now_s())  # fitted before the first request
        self.ledger = self.recommender.ledger
        log.info(
            "serving %s on workspace %s (%s); clock %s",
            self.recommender.model_info(),
            self.workspace.path,
            self.fingerprint,
            settings.clock,
        )
        self.review = ReviewStore(self.ledger.engine)
        self.reviews = Reviews(self.review)
        self.review_threshold = settings.review_threshold
        self.secure_cookies = settings.secure_cookies
        self._sync_lock = threading.Lock()
        # what was refused is not tried again until it changes (no reload loop)
        self._refused_version: str | None = None
        self._refused_fingerprint: str | None = None
        if self.recommender.model.bundle is None:
            self._refuse_alias_version()
        self._stop = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch_alias, daemon=True, name="nextbest-alias-watcher"
        )
        self._watcher.start()

    def _current_version(self) -> str | None:
        bundle = self.recommender.model.bundle
        return None if bundle is None else bundle.version

    def _watch_alias(self) -> None:
        """Every few seconds: follow the workspace and the alias. What is served (the
        snapshot, its indexes, the model) is frozen out of the garbage collector's reach
        first, and again after each switch: a full collection that walked it held every
        request for 0.3-0.5 s (p99 swung from 30 to 350 ms between 10-second windows under a
        steady load), and those objects live as long as they are served."""
        _freeze_heap()
        while not self._stop.wait(self.settings.reload_seconds):
            serving = (self.recommender, self._current_version())
            self._refresh_snapshot()
            self.sync()
            if (self.recommender, self._current_version()) != serving:
                _freeze_heap(release=True)

    def sync(self) -> None:
        """Apply the reviewers' blocks and follow the alias now (the watcher does it every
        few seconds; the review page calls it right after a block or a release)."""
        from runtime.registry import load_bundle, resolve_version

        with self._sync_lock:
            self._apply_blocks()
            alias = self.settings.alias
            try:
                version, _ = resolve_version(self.model_name, alias=alias)
            except LookupError:
                return
            except Exception:  # the registry being briefly unreachable must not kill serving
                log.exception("could not resolve alias %s", alias)
                return
            if version in (self._current_version(), self._refused_version):
                return
            try:
                bundle = load_bundle(self.model_name, version=version)
                bundle.alias = alias
                previous = self._current_version()
                self.recommender.swap_model(bundle)
                log.info("alias %s moved: version %s → %s", alias, previous, version)
            except Exception:  # a version that cannot load, or does not fit, is refused
                self._refused_version = version
                log.exception(
                    "refused version %s (not tried again until %s moves); still serving %s",
                    version,
                    alias,
                    self._current_version(),
                )

    def _refuse_alias_version(self) -> None:
        """At start without a model: the alias's version, if any, was refused (it does not
        fit the workspace), and is not loaded again every few seconds."""
        from runtime.registry import resolve_version

        try:
            self._refused_version, _ = resolve_version(self.model_name, alias=self.settings.alias)
        except Exception:  # no such alias yet, or the registry unreachable: nothing refused
            self._refused_version = None

    # -- what the review page needs (serving.review.web.ReviewHost) ------------------------
    def review_segments(self) -> list[str]:
        from features.snapshot import UNKNOWN

        return [str(v) for v in self.recommender.snapshot.segments.values if v != UNKNOWN]

    def knows_offer(self, offer_id: str) -> bool:
        from features.snapshot import UNKNOWN

        return offer_id != UNKNOWN and bool(offer_id in self.recommender.snapshot.offers.values)

    def registered_versions(self) -> list[dict[str, Any]]:
        from runtime.registry import registered_versions

        return registered_versions(self.model_name)

    def open_review(
        self, version: str, *, actor: str, sample: int, k: int, threshold: float
    ) -> str:
        """Freeze a review of ``version`` beside what this service serves now."""
        from runtime.registry import load_bundle

        return self.reviews.open_against(
            self.recommender,
            load_bundle(self.model_name, version=version),
            actor=actor,
            sample=sample,
            k=k,
            threshold=threshold,
        )

    def _apply_blocks(self) -> None:
        """Reviewers' segment blocks take effect for serving (read from the database)."""
        from serving.review import segment_blocks

        try:
            self.recommender.blocks = segment_blocks(self.review)
        except Exception:  # the database being briefly unreachable must not stop serving
            log.exception("could not read the review blocks")

    def _refresh_snapshot(self) -> None:
        """When the workspace changes, index it anew and switch to it; requests in flight
        finish on the recommender they started with. A workspace the serving version does
        not fit (its offers changed) is refused, said once, and not loaded again until it
        changes again: the service keeps serving what it served."""
        from serving.assembly import build_recommender

        fingerprint = self.workspace.fingerprint
        if fingerprint in (self.fingerprint, self._refused_fingerprint):
            return
        with self._sync_lock:  # never beside a model swap from sync()
            current = self.recommender
            try:
                fresh = build_recommender(
                    self.settings,
                    workspace=self.workspace,
                    bundle=current.model.bundle,
                    blocks=current.blocks,
                    ledger=self.ledger,
                )
                fresh.builder_for(fresh.now_s())
            except Exception:  # a broken workspace, or one the version does not fit
                self._refused_fingerprint = fingerprint
                log.exception(
                    "workspace changed (%s → %s) but cannot be served as it is; still "
                    "serving %s (retrain and release a version trained on it)",
                    self.fingerprint,
                    fingerprint,
                    self.fingerprint,
                )
                return
            self.recommender = fresh  # one reference assignment: atomic for readers
            log.info(
                "workspace changed (%s → %s): snapshot refreshed", self.fingerprint, fingerprint
            )
            self.fingerprint = fingerprint

    def __is_ready__(self) -> bool:
        return self.ledger.ping()

    @bentoml.api(route="/recommend")
    def recommend(
        self,
        customer_id: Annotated[str, Field(min_length=1, max_length=128, examples=["1029"])],
        channel: Annotated[Channel, Field(examples=["web"])],
        placement: Annotated[Placement, Field(examples=["home"])] = "home",
        context: Context | None = None,
        k: Annotated[int, Field(ge=1, le=25)] = 3,
        debug: bool = False,
        as_of: Annotated[str | None, Field(examples=["2017-06-01T10:00:00"])] = None,
        *,
        ctx: bentoml.Context,
    ) -> dict[str, Any]:
        """Ranked, explained offers for one customer, here and now (logged to the ledger)."""
        if as_of is not None and not _is_time(as_of):
            return _error(
                ctx,
                400,
                f"as_of {as_of!r} is not a date/time; use ISO 8601, e.g. 2017-06-01T10:00:00",
            )
        return _answer(
            self.recommender.recommend(
                customer_id,
                channel=channel,
                placement=placement,
                context=(context or Context.model_validate({})).model_dump(),
                k=k,
                debug=debug,
                as_of=as_of,
            )
        )

    @bentoml.api(route="/constant")
    def constant(self) -> dict[str, bool]:
        """Returns at once: the floor that benchmarks compare /recommend with."""
        return {"ok": True}

    @bentoml.api(route="/feedback")
    def feedback(
        self,
        request_id: Annotated[str, Field(min_length=1, max_length=64)],
        offer_id: Annotated[str, Field(min_length=1, max_length=128)],
        outcome: Outcome,
        value: float | None = None,
        *,
        ctx: bentoml.Context,
    ) -> dict[str, Any]:
        """Record what happened to a served offer. Idempotent on (request, offer, outcome).
        An offer the request did not serve is a 404 ``{"error": ...}``."""
        try:
            recorded = self.ledger.record_feedback(
                request_id=request_id,
                offer_id=offer_id,
                outcome=outcome,
                value=value,
                at_s=self.recommender.now_s(),
            )
        except LookupError as error:
            return _error(ctx, 404, str(error))
        return {
            "request_id": request_id,
            "offer_id": offer_id,
            "outcome": outcome,
            "recorded": recorded,
            "duplicate": not recorded,
        }

    @ops.get("/metadata")
    def metadata(self) -> dict[str, Any]:
        """Model version, feature list, rules version and holdout settings."""
        return self.recommender.metadata()


def _freeze_heap(*, release: bool = False) -> None:
    """Move every live object to the collector's permanent generation, after a full
    collection. ``release``: first unfreeze what an earlier call froze, so that the
    cycles of a recommender or model no longer served are collected (one full pause, on
    a switch, instead of one every few seconds)."""
    import gc

    if release:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


def _is_time(value: str) -> bool:
    import pandas as pd

    try:
        return not pd.isna(pd.Timestamp(value))
    except (ValueError, TypeError):
        return False


def _answer(payload: dict[str, Any]) -> Any:
    """The answer serialised once, as it is. Returned as a response, it skips BentoML's
    validation of a free-form dict and its JSON-schema lookup on every call (a third of a
    /recommend's time on the service's own loop); the OpenAPI still shows the method's
    declared type."""
    from starlette.responses import Response

    return Response(
        json.dumps(payload, default=_plain, allow_nan=False, separators=(",", ":")),
        media_type="application/json",
    )


def _plain(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _error(ctx: bentoml.Context, status: int, message: str) -> dict[str, Any]:
    """An error answered as one JSON object (BentoML's own 4xx bodies are lists)."""
    ctx.response.status_code = status
    return {"error": message}
