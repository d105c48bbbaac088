"""The BentoML service: POST /recommend, POST /feedback, GET /metadata, /healthz, /readyz,
and the review page under /review (``serving.review.web``).

One ``@bentoml.service`` class. The model is resolved by alias from the MLflow registry
(``models:/nextbest-ranker@champion``) in ``__init__`` and the resolved version is
logged; with no champion the service serves the rules-only ranking and says so in every
response's ``model`` field. A background thread watches the alias and switches versions
without failing a request; the same thread re-indexes the workspace when its content
fingerprint changes. Settings come from ``ServiceSettings.from_env`` (``nextbest serve``
sets them), never from ad-hoc reads.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
from fastapi import FastAPI
from pydantic import BaseModel, Field

from features.contract import CHANNELS, OUTCOMES
from features.snapshot import MOMENTS, PLACEMENTS
from serving.review.web import site as review_site

__all__ = ["NextBest", "ServiceSettings"]

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


@dataclass(frozen=True)
class ServiceSettings:
    """The service's settings, read once from the environment ``nextbest serve`` sets."""

    workspace: Path | None
    db_url: str
    clock: str
    holdout_share: float
    holdout_control: Literal["nothing", "rules_only"]
    alias: str
    reload_seconds: float
    rules: Path | None
    review_threshold: float = 0.2
    secure_cookies: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServiceSettings:
        from nextbest.settings import Settings

        env = dict(os.environ if environ is None else environ)
        settings = Settings.load(env)
        workspace = env.get("NEXTBEST_WORKSPACE")
        return cls(
            workspace=Path(workspace) if workspace else None,
            db_url=env.get("NEXTBEST_DB_URL") or f"sqlite:///{settings.data_dir / 'ledger.db'}",
            clock=env.get("NEXTBEST_CLOCK", "data"),
            holdout_share=float(env.get("NEXTBEST_HOLDOUT_SHARE", "0.05")),
            holdout_control=_control(env.get("NEXTBEST_HOLDOUT_CONTROL", "nothing")),
            alias=env.get("NEXTBEST_MODEL_ALIAS", "champion"),
            reload_seconds=float(env.get("NEXTBEST_RELOAD_SECONDS", "5")),
            rules=Path(env["NEXTBEST_RULES"]) if env.get("NEXTBEST_RULES") else None,
            review_threshold=_threshold(env.get("NEXTBEST_REVIEW_THRESHOLD", "0.2")),
            secure_cookies=env.get("NEXTBEST_SECURE_COOKIES", "").lower() in ("1", "true", "yes"),
        )


ops = FastAPI(title="nextbest operations")


@bentoml.asgi_app(review_site, path="/review")
@bentoml.asgi_app(ops, path="/")
@bentoml.service(name="nextbest", workers=1, traffic={"timeout": 30})
class NextBest:
    """The storefront's one brain: ranked, explained, guarded, logged offers."""

    def __init__(self) -> None:
        from features import Workspace, load_snapshot
        from nextbest.registry import configure_tracking, load_bundle
        from nextbest.settings import resolve_workspace
        from serving.engine import Recommender, ServeSettings
        from serving.ledger import SqlLedger

        settings = ServiceSettings.from_env()
        self.settings = settings
        configure_tracking()
        workspace = Workspace(resolve_workspace(settings.workspace))
        self.ledger = SqlLedger(settings.db_url)
        try:
            bundle = load_bundle(alias=settings.alias)
        except LookupError:
            bundle = None
            log.warning("no '%s' model yet: serving the rules-only ranking", settings.alias)
        self.workspace = workspace
        self.serve_settings = ServeSettings(
            clock=settings.clock,
            holdout_share=settings.holdout_share,
            holdout_control=settings.holdout_control,
            alias=settings.alias,
            rules_path=settings.rules,
        )
        self.fingerprint = workspace.fingerprint
        self.recommender = Recommender(
            load_snapshot(workspace),
            bundle,
            self.ledger,
            self.serve_settings,
            workspace=str(workspace.path),
        )
        log.info(
            "serving %s on workspace %s (%s)",
            self.recommender.model_info(),
            workspace.path,
            self.fingerprint,
        )
        from serving.review import Reviews, ReviewStore

        self.review = ReviewStore(self.ledger.engine)
        self.reviews = Reviews(self.review)
        self.review_threshold = settings.review_threshold
        self.secure_cookies = settings.secure_cookies
        self._apply_blocks()
        self._load_bundle = load_bundle
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch_alias, daemon=True, name="nextbest-alias-watcher"
        )
        self._watcher.start()

    def _current_version(self) -> str | None:
        bundle = self.recommender.model.bundle
        return None if bundle is None else bundle.version

    def _watch_alias(self) -> None:
        while not self._stop.wait(self.settings.reload_seconds):
            self._refresh_snapshot()
            self.sync()

    def sync(self) -> None:
        """Apply the reviewers' blocks and follow the alias now (the watcher does it every
        few seconds; the review page calls it right after a block or a release)."""
        from nextbest.registry import resolve_version

        with self._sync_lock:
            self._apply_blocks()
            try:
                version, _ = resolve_version(alias=self.settings.alias)
            except LookupError:
                return
            except Exception:  # the registry being briefly unreachable must not kill serving
                log.exception("could not resolve alias %s", self.settings.alias)
                return
            if version == self._current_version():
                return
            try:
                bundle = self._load_bundle(version=version)
                bundle.alias = self.settings.alias
                previous = self._current_version()
                self.recommender.swap_model(bundle)
                log.info("alias %s moved: version %s → %s", self.settings.alias, previous, version)
            except Exception:
                log.exception(
                    "could not load version %s; still serving %s", version, self._current_version()
                )

    # -- what the review page needs (serving.review.web.ReviewHost) ------------------------
    def review_segments(self) -> list[str]:
        from features.snapshot import UNKNOWN

        return [str(v) for v in self.recommender.snapshot.segments.values if v != UNKNOWN]

    def knows_offer(self, offer_id: str) -> bool:
        from features.snapshot import UNKNOWN

        return offer_id != UNKNOWN and bool(offer_id in self.recommender.snapshot.offers.values)

    def registered_versions(self) -> list[dict[str, Any]]:
        from nextbest.registry import registered_versions

        return registered_versions()

    def open_review(
        self, version: str, *, actor: str, sample: int, k: int, threshold: float
    ) -> str:
        """Freeze a review of ``version`` beside what this service serves now."""
        return self.reviews.open_against(
            self.recommender,
            self._load_bundle(version=version),
            actor=actor,
            sample=sample,
            k=k,
            threshold=threshold,
        )

    def _apply_blocks(self) -> None:
        """Reviewers' segment blocks take effect for serving (read from the database)."""
        from serving.review import segment_blocks

        try:
            self.recommender.extra_blocks = segment_blocks(self.review)
        except Exception:  # the database being briefly unreachable must not stop serving
            log.exception("could not read the review blocks")

    def _refresh_snapshot(self) -> None:
        """When the workspace changes, index it anew and switch to it; requests in flight
        finish on the recommender they started with."""
        from features import load_snapshot
        from serving.engine import Recommender

        try:
            fingerprint = self.workspace.fingerprint
            if fingerprint == self.fingerprint:
                return
            current = self.recommender
            fresh = Recommender(
                load_snapshot(self.workspace),
                current.model.bundle,
                self.ledger,
                self.serve_settings,
                workspace=str(self.workspace.path),
            )
            fresh.extra_blocks = list(current.extra_blocks)
            self.recommender = fresh  # one reference assignment: atomic for readers
            log.info(
                "workspace changed (%s → %s): snapshot refreshed", self.fingerprint, fingerprint
            )
            self.fingerprint = fingerprint
        except Exception:  # a half-written or broken workspace must not stop serving
            log.exception("could not refresh the snapshot; still serving %s", self.fingerprint)

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
    ) -> dict[str, Any]:
        """Ranked, explained offers for one customer, here and now (logged to the ledger)."""
        if as_of is not None:
            _parse_time(as_of)
        return self.recommender.recommend(
            customer_id,
            channel=channel,
            placement=placement,
            context=(context or Context.model_validate({})).model_dump(),
            k=k,
            debug=debug,
            as_of=as_of,
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
    ) -> dict[str, Any]:
        """Record what happened to a served offer. Idempotent on (request, offer, outcome)."""
        try:
            recorded = self.ledger.record_feedback(
                request_id=request_id,
                offer_id=offer_id,
                outcome=outcome,
                value=value,
                at_s=self.recommender.now_s(),
            )
        except LookupError as error:
            raise bentoml.exceptions.NotFound(str(error)) from None
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


def _parse_time(value: str) -> None:
    import pandas as pd

    try:
        pd.Timestamp(value)
    except (ValueError, TypeError):
        raise bentoml.exceptions.InvalidArgument(
            f"as_of {value!r} is not a date/time; use ISO 8601, e.g. 2017-06-01T10:00:00"
        ) from None


def _threshold(value: str) -> float:
    share = float(value)
    if not 0 < share <= 1:
        raise ValueError(f"NEXTBEST_REVIEW_THRESHOLD must be in (0, 1], not {value!r}")
    return share


def _control(value: str) -> Literal["nothing", "rules_only"]:
    if value == "nothing":
        return "nothing"
    if value == "rules_only":
        return "rules_only"
    raise ValueError(f"NEXTBEST_HOLDOUT_CONTROL must be 'nothing' or 'rules_only', not {value!r}")
