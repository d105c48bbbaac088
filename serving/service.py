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
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

import bentoml
from fastapi import FastAPI
from fastapi.responses import RedirectResponse, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
)

from features.contract import CHANNELS, OUTCOMES
from features.snapshot import MOMENTS, PLACEMENTS
from runtime.processes import DEGRADED
from serving.coalesce import Coalescer
from serving.contract import (
    ISO_MOMENT,
    MAX_CART_ITEMS,
    EraseAnswer,
    FeedbackAnswer,
    Id,
    Metadata,
    RecommendAnswer,
)
from serving.review.web import site as review_site

__all__ = ["NextBest"]

if TYPE_CHECKING:
    from runtime.registry import Stamp

log = logging.getLogger("nextbest.serving")

Channel = Literal[CHANNELS]  # type: ignore[valid-type]
Placement = Literal[PLACEMENTS]  # type: ignore[valid-type]
Moment = Literal[MOMENTS]  # type: ignore[valid-type]
Outcome = Literal[OUTCOMES]  # type: ignore[valid-type]


def _iso_moment(value: str) -> str:
    """ISO 8601 on the data's clock (the pattern ``ISO_MOMENT``), and a real day: anything
    pandas would guess at ("5 March" is year 1, "NaT" no time at all) is refused."""
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"as_of {value!r} is not a day of the calendar") from None


AsOf = Annotated[
    str,
    StringConstraints(pattern=ISO_MOMENT),
    Field(examples=["2017-06-01T10:00:00"]),
    AfterValidator(_iso_moment),
]


class Context(BaseModel):
    """Where the customer is: the product on the page, the cart, the declared moment."""

    model_config = ConfigDict(extra="forbid")

    product_id: Id | None = Field(None, examples=["1082185"])
    cart: list[Id] = Field(default_factory=list, max_length=MAX_CART_ITEMS, examples=[["981760"]])
    moment: Moment | None = Field(None, examples=["browsing"])


# BentoML's own root page loads Google Tag Manager, and FastAPI's /docs a CDN's swagger-ui:
# neither is served; /docs is swagger-ui from BentoML's own package, and / sends there
ops = FastAPI(title="nextbest operations", docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.asgi_app(review_site, path="/review")
@bentoml.asgi_app(ops, path="/")
@bentoml.service(name="nextbest", workers=1, traffic={"timeout": 30})
class NextBest:
    """The storefront's one brain: ranked, explained, guarded, logged offers."""

    def __init__(self) -> None:
        """Load everything, or (under ``nextbest serve``) report in one line why not."""
        from runtime.settings import report_start_failure

        try:
            self._start()
        except Exception as error:
            report_start_failure(error)
            raise

    def _start(self) -> None:
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
        # the reviewers' blocks are read below, through the ledger's guard: a start without
        # the ledger's database serves, failing closed until they can be read
        self.recommender = build_recommender(
            settings,
            workspace=self.workspace,
            if_mismatch="rules_only",
            last_known_good=True,
            blocks=(),
        )
        self.recommender.builder_for(self.recommender.now_s())  # fitted before the first request
        self.ledger = self.recommender.ledger
        bundle = self.recommender.model.bundle
        log.info(
            "serving %s from the %s on workspace %s (%s); clock %s",
            self.recommender.model_info(),
            "rules alone" if bundle is None else bundle.source,
            self.workspace.path,
            self.fingerprint,
            settings.clock,
        )
        self.review = ReviewStore(self.ledger)
        self.reviews = Reviews(self.review)
        self.recommender.blocks_unread = "not read yet"
        self._apply_blocks()
        self.review_threshold = settings.review_threshold
        self.secure_cookies = settings.secure_cookies
        self._sync_lock = threading.Lock()
        # the registry did not answer when the model was loaded (a cached copy serves)
        self._registry_down = bundle is not None and bundle.instead_of == "RegistryUnavailable"
        # the watcher's last word, for /metadata (replaced whole: read without a lock)
        self.watching: dict[str, Any] = {
            "following": True,
            "checked_at": None,
            "failing_since": None,
            "failure": None,
        }
        # the store's stamp (runtime.registry.store_stamp) when the alias was last resolved
        # to what is served or refused (None until then), and when (time.monotonic())
        self._resolved_stamp: Stamp | None = None
        self._resolved_at = 0.0
        # what was refused is not tried again until it changes (no reload loop)
        self._refused_version: str | None = None
        self._refused_fingerprint: str | None = None
        if self.recommender.model.bundle is None:
            self._refuse_alias_version()
        import anyio
        import anyio.to_thread

        # one thread serves the present; a replay of the past (as_of) has its own, so a
        # builder it fits never holds up the present's requests
        self._present = anyio.CapacityLimiter(1)
        self._past = anyio.CapacityLimiter(1)
        self._coalescer = Coalescer(
            lambda call: anyio.to_thread.run_sync(call, limiter=self._present),
            max_batch=settings.max_batch,
        )
        self._stop = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch_alias, daemon=True, name="nextbest-alias-watcher"
        )
        self._watcher.start()

    @bentoml.on_shutdown
    def stop(self) -> None:
        """At shutdown the watcher stops, then the ledger closes its connections (and its
        buffer). A service built again in the same process (an app per test module) met
        the earlier ones' watchers still following their stores, through the same registry
        functions; and a service left to the collector left its pooled connections open."""
        self._stop.set()
        self._watcher.join(timeout=10)
        self.ledger.dispose()

    @property
    def watcher_state(self) -> dict[str, Any]:
        """What ``/metadata`` says of the watcher: its last word, and whether the registry
        answered the last time it was asked."""
        return self.watching | {"registry_reachable": not self._registry_down}

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
        frozen = (self.recommender, self._current_version())
        failing = False
        while not self._stop.wait(self.settings.reload_seconds):
            failed: str | None = None
            # each check on its own: a workspace that cannot be read must not stop the
            # reviewers' blocks and the alias from being followed
            for check in (self._refresh_snapshot, self.sync):
                try:
                    check()
                except Exception as error:  # unforeseen: said once, and the watching goes on
                    if not failing:
                        log.exception(
                            "the alias watcher's check failed; tried again every %g s",
                            self.settings.reload_seconds,
                        )
                    failed = type(error).__name__
            if failing and not failed:
                log.info("the alias watcher's check succeeds again")
            now = datetime.now(UTC).isoformat(timespec="seconds")
            self.watching = {
                "following": not failed,
                "checked_at": now,
                "failing_since": (self.watching["failing_since"] or now) if failed else None,
                "failure": failed,
            }
            failing = bool(failed)
            if failed:
                continue
            # a switch made here or by the review page (its own sync()) since the last freeze
            serving = (self.recommender, self._current_version())
            if serving != frozen:
                _freeze_heap(release=True)
                frozen = serving

    def sync(self) -> None:
        """Apply the reviewers' blocks and follow the alias now (the watcher does it every
        few seconds; the review page calls it right after a block or a release)."""
        import time

        from runtime import registry
        from runtime.registry import (
            ModelArtifactError,
            ModelMismatchError,
            load_bundle,
            remember_last_known_good,
            resolve_version,
            store_stamp,
        )

        with self._sync_lock:
            self._apply_blocks()
            alias = self.settings.alias
            # an unchanged SQLite store still says what it said at the last resolve: the
            # registry's ORM is not asked again (8-15 ms of the interpreter every tick),
            # but at least every STAMP_TRUST_S whatever the stamp says
            stamp = store_stamp()
            now = time.monotonic()
            if (
                stamp is not None
                and stamp == self._resolved_stamp
                and now - self._resolved_at < registry.STAMP_TRUST_S
            ):
                return
            try:
                version, _ = resolve_version(self.model_name, alias=alias)
            except LookupError:
                self._resolved_stamp, self._resolved_at = stamp, now  # no such alias, yet
                return
            except Exception as error:  # the registry briefly unreachable must not kill serving
                if not self._registry_down:  # said once per outage, not every few seconds
                    log.warning("could not resolve alias %s: %s", alias, error)
                self._registry_down = True
                return
            if self._registry_down:
                log.info("the model registry answers again (alias %s: version %s)", alias, version)
                self._registry_down = False
            if version in (self._current_version(), self._refused_version):
                self._resolved_stamp, self._resolved_at = stamp, now
                return
            try:
                bundle = load_bundle(self.model_name, version=version)
                bundle.alias = alias
                previous = self._current_version()
                self.recommender.swap_model(bundle)
                log.info("alias %s moved: version %s → %s", alias, previous, version)
            except Exception as error:  # a version that cannot load, or does not fit: refused
                self._refused_version = version
                log.error(
                    "refused version %s: %s (not tried again until %s moves); still serving %s",
                    version,
                    error,
                    alias,
                    self._current_version(),
                    exc_info=not isinstance(error, (ModelArtifactError, ModelMismatchError)),
                )
                return
            try:
                remember_last_known_good(bundle)
            except OSError as error:  # serving goes on; only the fallback copy is stale
                log.warning("could not cache version %s as last known good: %s", version, error)

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
        """Reviewers' segment blocks take effect for serving (read from the database).
        Blocks never read (a start without the ledger's database) keep every slate empty
        until they are: a blocked offer is never shown; blocks read once stay in force
        while the database is away."""
        from serving.ledger import LedgerUnavailable
        from serving.review import segment_blocks

        recommender = self.recommender
        try:
            blocks = segment_blocks(self.review)
        except LedgerUnavailable as error:  # the ledger said so once; said here once too
            if recommender.blocks_unread == "not read yet":
                recommender.blocks_unread = f"the reviewers' blocks cannot be read ({error})"
                log.error(
                    "%s: no offer is shown until they can (every slate empty, degraded); "
                    "read again every %g s",
                    recommender.blocks_unread,
                    self.settings.reload_seconds,
                )
            return
        except Exception:  # the database being briefly unreachable must not stop serving
            log.exception("could not read the review blocks")
            return
        recommender.blocks = blocks
        if recommender.blocks_unread is not None:
            if recommender.blocks_unread != "not read yet":
                log.warning("the reviewers' blocks are read (%d): offers served again", len(blocks))
            recommender.blocks_unread = None

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
                fresh.blocks_unread = current.blocks_unread
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
        """Ready while the ledger's database is in use and the reviewers' blocks are read:
        not while it is down, slow, or its SQLite file was deleted or replaced (answered at
        once then: the ledger is not probed here, its own recovery thread does that). Not
        ready is a 503 that says why (the service still answers, degraded)."""
        if self.ledger.ping() and self.recommender.blocks_unread is None:
            return True
        from starlette.exceptions import HTTPException

        unavailable = self.ledger.unavailable
        why = [f"the ledger is {unavailable}"] if unavailable else []
        if self.recommender.blocks_unread is not None:
            why.append(f"{self.recommender.blocks_unread}: no offer is shown")
        raise HTTPException(
            status_code=503,
            detail=f"{DEGRADED}: " + "; ".join(why or ["the ledger is down"]),
        )

    @bentoml.api(route="/recommend")
    async def recommend(
        self,
        customer_id: Annotated[Id, Field(examples=["1029"])],
        channel: Annotated[Channel, Field(examples=["web"])],
        placement: Annotated[Placement, Field(examples=["home"])] = "home",
        context: Context | None = None,
        k: Annotated[StrictInt, Field(ge=1, le=25)] = 3,
        debug: StrictBool = False,
        as_of: AsOf | None = None,
    ) -> RecommendAnswer:
        """Ranked, explained offers for one customer, here and now (logged to the ledger).
        ``as_of`` replays a past moment (ISO 8601, within the data's range)."""
        import anyio.to_thread

        recommender = self.recommender
        moment_s = None
        if as_of is not None:
            moment_s, refused = _within(recommender, as_of)
            if refused:
                log.warning("POST /recommend refused with 400: %s", refused)
                return _error(400, refused)
        fields = (context or Context.model_validate({})).model_dump()

        def serve(
            customers: list[str], contexts: list[dict[str, Any]], waited_s: list[float]
        ) -> list[dict[str, Any]]:
            return self.recommender.recommend_many(
                customers,
                channel=channel,
                placement=placement,
                contexts=contexts,
                k=k,
                debug=debug,
                as_of=as_of,
                waited_s=waited_s,
            )

        # a replay of the past may have a builder to fit (a second or so): it runs on a
        # thread of its own, and the present's requests never queue behind it; its budget
        # is its own work (not its wait: that thread may be fitting another moment's)
        if moment_s is not None and not recommender.is_present(moment_s):
            answers = await anyio.to_thread.run_sync(
                lambda: serve([customer_id], [fields], [0.0]), limiter=self._past
            )
            return _answer(answers[0])
        # the present: requests that queued while its thread was busy are served together
        # (each with its wait since this submit, for the latency budget)
        key = (channel, placement, k, debug, as_of)
        return _answer(await self._coalescer.submit(key, customer_id, fields, serve))

    @bentoml.api(route="/feedback")
    def feedback(
        self,
        request_id: Annotated[Id, Field(max_length=64)],
        offer_id: Id,
        outcome: Outcome,
        value: Annotated[float | None, Field(allow_inf_nan=False)] = None,
    ) -> FeedbackAnswer:
        """Record what happened to a served offer. Idempotent on (request, offer, outcome).
        An offer the request did not serve is a 404 ``{"error": ...}``. With the ledger's
        database down, the outcome is held in the local buffer (``"buffered": true``) and
        written when it is back; a 503 only if the buffer is full."""
        from serving.ledger import BufferFull

        try:
            receipt = self.ledger.post_feedback(
                request_id=request_id,
                offer_id=offer_id,
                outcome=outcome,
                value=value,
                at_s=self.recommender.now_s(),
            )
        except LookupError as error:
            return _error(404, str(error))
        except BufferFull as error:
            log.error("feedback refused: the ledger is down and %s", error)
            return _error(503, "the ledger is unavailable and its buffer is full; retry")
        return _answer(
            {
                "request_id": request_id,
                "offer_id": offer_id,
                "outcome": outcome,
                "recorded": receipt.recorded,
                "duplicate": not receipt.recorded,
                "buffered": receipt.buffered,
            }
        )

    # -- item 7 (privacy): erasure ------------------------------------------------------------
    @bentoml.api(route="/admin/erase")
    def admin_erase(self, customer_id: Annotated[Id, Field(examples=["1029"])]) -> EraseAnswer:
        """Forget one customer in the running service: once ``nextbest customer erase``
        has removed them from the workspace and the ledger (it calls this last), the
        snapshot is indexed anew from the workspace, so /recommend treats them as an
        unknown customer and no feature in memory holds anything of theirs. A 409 if the
        workspace still holds them. Needs the API key when keys are set."""
        if not self._holds(customer_id):
            return _answer({"customer_id": customer_id, "in_snapshot": False, "refreshed": False})
        self._refresh_snapshot()
        if self._holds(customer_id):
            log.warning("POST /admin/erase refused with 409: the workspace still holds them")
            return _error(
                409,
                "the workspace still holds this customer: run 'nextbest customer erase ID' "
                "(it erases them from the workspace and the ledger, then asks this service)",
            )
        _freeze_heap(release=True)  # the recommender that held them, collected now
        log.info("a customer was erased from the snapshot")
        return _answer({"customer_id": customer_id, "in_snapshot": False, "refreshed": True})

    def _holds(self, customer_id: str) -> bool:
        """Whether the snapshot served now has the customer in any table."""
        from features.snapshot import UNKNOWN

        codes = self.recommender.snapshot.customers.values
        return customer_id != UNKNOWN and customer_id in codes


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


@ops.get("/metadata", response_model=Metadata)
def metadata() -> dict[str, Any]:
    """Model version, feature list, rules version and holdout settings (never a secret:
    only the fields of ``Metadata`` are published)."""
    service: NextBest = bentoml.get_current_service()
    return service.recommender.metadata() | {"watcher": service.watcher_state}


@ops.get("/", include_in_schema=False)
def root() -> Response:
    return RedirectResponse("/docs", status_code=307)


@ops.get("/docs", include_in_schema=False)
def docs() -> Response:
    from serving.http import DOCS_PAGE, DOCS_POLICY

    return Response(
        DOCS_PAGE, media_type="text/html", headers={"Content-Security-Policy": DOCS_POLICY}
    )


@ops.get("/docs/init.js", include_in_schema=False)
def docs_script() -> Response:
    from serving.http import DOCS_SCRIPT

    return Response(DOCS_SCRIPT, media_type="text/javascript")


@ops.get("/docs.json", include_in_schema=False)
def openapi_document() -> Response:
    import pandas as pd

    service: NextBest = bentoml.get_current_service()
    first, last = (
        pd.Timestamp(s, unit="s").isoformat() for s in service.recommender.as_of_bounds()
    )
    return Response(_openapi(first, last), media_type="application/json")


@cache
def _openapi(first: str, last: str) -> str:
    """The contract as served (``serving.contract.openapi``), made once per as_of range."""
    from serving.contract import openapi
    from serving.settings import ServingSettings

    settings = ServingSettings.from_env()
    service: Any = NextBest  # the bentoml.Service the decorator made of the class
    spec = openapi(
        service.openapi_spec.asdict(),
        inputs=_inputs(),
        keys_required=bool(settings.api_keys),
        max_body_bytes=settings.max_body_bytes,
        as_of_range=(first, last),
    )
    return json.dumps(spec)


def _inputs() -> dict[str, Any]:
    """Each POST route and the model of its body."""
    service: Any = NextBest
    return {api.route: api.input_spec for api in service.apis.values()}


def _guard() -> None:
    """The front door (``serving.http.ApiGuard``): keys, JSON only, bounded bodies, one
    validation with one log line, one error shape."""
    from serving.http import ApiGuard, cancel_bentoml_request_timers

    cancel_bentoml_request_timers()
    service: Any = NextBest  # the bentoml.Service the decorator made of the class
    service.add_asgi_middleware(ApiGuard, inputs=_inputs())


def _within(recommender: Any, as_of: str) -> tuple[int, str | None]:
    """The moment in seconds, and why it is refused (None: it is not)."""
    import pandas as pd

    from features.history import second_ceil

    moment_s = second_ceil(as_of)
    first, last = recommender.as_of_bounds()
    if first <= moment_s <= last:
        return moment_s, None
    day = lambda s: pd.Timestamp(s, unit="s").isoformat()  # noqa: E731
    return moment_s, (
        f"as_of {as_of} is outside the data's range: from {day(first)} (its first day) to "
        f"{day(last)} ({recommender.settings.as_of_margin_days} days after its end)"
    )


def _answer(payload: dict[str, Any]) -> Any:
    """The answer serialised once, as it is. Returned as a response, it skips BentoML's
    validation of the declared model and its JSON-schema lookup on every call (a third
    of a /recommend's time on the service's own loop); the OpenAPI shows the declared
    model (``serving.contract``), which the contract test checks every answer against."""
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


def _error(status: int, message: str) -> Any:
    """An error answered as one JSON object, ``{"error": message}``."""
    from starlette.responses import Response

    from serving.http import error_body

    return Response(error_body(message), status_code=status, media_type="application/json")


_guard()
