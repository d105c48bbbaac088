"""The review page: server-rendered HTML under ``/review`` on the service, no JavaScript.

One ``nextbest serve`` gives the storefront API and this page. Reviewers sign in, read
every sampled customer's slate (the challenger beside the champion, the because text, a
small SHAP bar chart per offer), approve or reject each recommendation with a reason,
block an offer for a segment, and an approver makes the release decision.

Access: a session is a random token in an HttpOnly, SameSite=Lax cookie (the database
keeps only its hash, and the user's role is read anew on every request); every form
carries the session's CSRF token, and the sign-in form a double-submit token. Sign-in is
limited per user (a lockout after repeated failures) and per client address (a 429 with
Retry-After past ``ADDRESS_ATTEMPTS`` a minute, audited once per window). Nothing
but the stylesheet and the sign-in page answers without a session. Every action lands in
the store's append-only audit log, which the page shows and exports as CSV.

The page reads and writes through :class:`ReviewHost` (the BentoML service implements
it), so it holds no state of its own and any number of workers can serve it.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from features import FEATURES
from serving.ledger import LedgerUnavailable
from serving.review.reviews import ReleaseError, Reviews
from serving.review.store import REJECT_REASONS, AccessError, ReviewStore, Session, Throttled

__all__ = ["COOKIE", "ReviewHost", "site"]

log = logging.getLogger("nextbest.review")

COOKIE = "nextbest_review"
LOGIN_COOKIE = "nextbest_login_csrf"
REASON_LABELS = {
    "irrelevant": "Irrelevant",
    "wrong_timing": "Wrong timing",
    "inappropriate": "Inappropriate or unsafe",
    "explanation_wrong": "Explanation wrong or misleading",
    "other": "Other (say why)",
}
assert tuple(REASON_LABELS) == REJECT_REASONS
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_HERE = Path(__file__).parent
templates = Jinja2Templates(directory=_HERE / "templates")
_DESCRIPTIONS = {spec.name: spec.description for spec in FEATURES}

site = FastAPI(title="nextbest review", docs_url=None, redoc_url=None, openapi_url=None)
site.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")


class ReviewHost(Protocol):
    """What the page needs from the service it is mounted on."""

    review: ReviewStore
    reviews: Reviews
    review_threshold: float  # approval needs a rejection rate under this (configured)
    secure_cookies: bool  # Secure cookies even when a proxy speaks plain HTTP to us

    def review_segments(self) -> list[str]:
        """The segments an offer can be blocked for."""
        ...

    def open_review(
        self, version: str, *, actor: str, sample: int, k: int, threshold: float
    ) -> str:
        """Freeze a new review of ``version``; its id."""
        ...

    def registered_versions(self) -> list[dict[str, Any]]: ...

    def knows_offer(self, offer_id: str) -> bool:
        """Whether the catalogue being served has this offer."""
        ...

    def sync(self) -> None:
        """Apply blocks and the champion alias now (not at the next watcher tick)."""
        ...


def host() -> ReviewHost:
    """The service instance the page is mounted on (overridable in tests)."""
    import bentoml

    service: ReviewHost = bentoml.get_current_service()
    return service


Host = Annotated[ReviewHost, Depends(host)]


class Refused(Exception):
    """A request the page answers with an error page (status and plain message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SignInFirst(Exception):
    """No session: pages send the visitor to sign in, forms are refused."""


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _page(
    request: Request,
    name: str,
    context: dict[str, Any],
    status: int = 200,
    session: Session | None = None,
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        name,
        {
            "base": _base(request),
            "session": session,
            "reason_labels": REASON_LABELS,
            "describe": _DESCRIPTIONS,
        }
        | context,
        status_code=status,
    )
    response.headers.update(HEADERS)
    return response


def _redirect(to: str) -> RedirectResponse:
    response = RedirectResponse(to, status_code=303)
    response.headers.update(HEADERS)
    return response


@site.exception_handler(SignInFirst)
def _sign_in_first(request: Request, _: Exception) -> Response:
    if request.method in ("GET", "HEAD"):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return _redirect(f"{_base(request)}/login?next={quote(target)}")
    return _page(
        request, "error.html", {"title": "Sign in first", "message": "Sign in first."}, 401
    )


@site.exception_handler(RequestValidationError)
def _invalid(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(
        f"{'/'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in error.errors()
    )
    return _page(
        request, "error.html", {"title": "Not understood", "message": problems or "Bad form."}, 400
    )


@site.exception_handler(Refused)
def _refused(request: Request, error: Exception) -> Response:
    assert isinstance(error, Refused)
    titles = {403: "Not allowed", 404: "Not found"}
    return _page(
        request,
        "error.html",
        {"title": titles.get(error.status, "Refused"), "message": error.message},
        error.status,
    )


@site.exception_handler(LedgerUnavailable)
def _ledger_unavailable(request: Request, error: Exception) -> Response:
    """The ledger's database is down, silent or its file gone: a page that says so, at
    once (the ledger's own bounds), never a plain 500."""
    return _page(
        request,
        "error.html",
        {"title": "The review database is unavailable", "message": f"{error} Try again soon."},
        503,
    )


def signed_in(request: Request, review_host: Host) -> Session:
    """The request's session (pages); no session, no page."""
    session = review_host.review.session(request.cookies.get(COOKIE))
    if session is None:
        raise SignInFirst()
    return session


async def acting(request: Request, session: Annotated[Session, Depends(signed_in)]) -> Session:
    """The session of a form post whose CSRF token matches (every action)."""
    form = await request.form()
    if not _same(str(form.get("csrf", "")), session.csrf):
        raise Refused(403, "This form did not come from your page (or it expired): reload it.")
    return session


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of tokens (bytes: any text a client sends is comparable)."""
    return hmac.compare_digest(given.encode(), expected.encode())


Viewer = Annotated[Session, Depends(signed_in)]
Actor = Annotated[Session, Depends(acting)]


def _say(review_host: ReviewHost, session: Session, kind: str, text: str) -> None:
    review_host.review.flash(session, f"{kind}:{text}")


def _heard(review_host: ReviewHost, session: Session) -> dict[str, str] | None:
    message = review_host.review.pop_flash(session)
    if message is None:
        return None
    kind, _, text = message.partition(":")
    return {"kind": kind, "text": text}


# -- signing in and out ---------------------------------------------------------------------
def _safe_next(request: Request, target: str | None) -> str:
    """Where to go after signing in: a path on this page only (never another host)."""
    base = _base(request)
    parts = urlsplit(target or "")
    if (
        target
        and not parts.scheme
        and not parts.netloc
        and "\\" not in target
        and parts.path.startswith(f"{base}/")
        and not parts.path.startswith("//")
    ):
        return target
    return f"{base}/"


@site.get("/login", response_class=HTMLResponse)
def login_page(request: Request, review_host: Host, next: str | None = None) -> Response:
    if review_host.review.session(request.cookies.get(COOKIE)) is not None:
        return _redirect(_safe_next(request, next))
    return _login_form(request, review_host, next, None, 200)


def _secure(request: Request, review_host: ReviewHost) -> bool:
    return request.url.scheme == "https" or review_host.secure_cookies


def _login_form(
    request: Request,
    review_host: ReviewHost,
    target: str | None,
    error: str | None,
    status: int,
) -> Response:
    token = secrets.token_urlsafe(24)
    response = _page(
        request,
        "login.html",
        {"next": _safe_next(request, target), "login_csrf": token, "error": error},
        status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=_secure(request, review_host),
        path=f"{_base(request)}/login",
        max_age=3600,
    )
    return response


@site.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    review_host: Host,
    username: Annotated[str, Form(max_length=64)] = "",
    # an empty default (not a password): a form without the field is a failed sign-in
    password: Annotated[str, Form(max_length=1024)] = "",  # nosec B107
    next: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    try:  # counted first: every attempt, whatever its form, user or password
        review_host.review.admit_address(request.client.host if request.client else "-")
    except Throttled as error:
        message = str(error)
        page = _login_form(request, review_host, next, message[:1].upper() + message[1:] + ".", 429)
        page.headers["Retry-After"] = str(error.retry_after)
        return page
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not _same(csrf, expected):
        return _login_form(request, review_host, next, "The sign-in form expired: try again.", 403)
    try:
        session = review_host.review.sign_in(username, password)
    except AccessError as error:
        message = str(error)
        return _login_form(request, review_host, next, message[:1].upper() + message[1:] + ".", 401)
    response = _redirect(_safe_next(request, next))
    response.set_cookie(
        COOKIE,
        session.token,
        httponly=True,
        samesite="lax",
        secure=_secure(request, review_host),
        path=f"{_base(request)}/",
        max_age=8 * 3600,
    )
    response.delete_cookie(LOGIN_COOKIE, path=f"{_base(request)}/login")
    return response


@site.post("/logout")
def logout(request: Request, review_host: Host, session: Actor) -> Response:
    review_host.review.sign_out(session)
    response = _redirect(f"{_base(request)}/login")
    response.delete_cookie(COOKIE, path=f"{_base(request)}/")
    return response


# -- the list of reviews ----------------------------------------------------------------------
@site.get("/", response_class=HTMLResponse)
def review_list(request: Request, review_host: Host, session: Viewer) -> Response:
    rows = review_host.reviews.list_reviews()
    open_versions = {r["version"] for r in rows if r["status"] in ("open", "releasing")}
    versions = review_host.registered_versions()
    return _page(
        request,
        "list.html",
        {
            "reviews": rows,
            "versions": versions,
            "open_versions": open_versions,
            "threshold": review_host.review_threshold,
            "flash": _heard(review_host, session),
        },
        session=session,
    )


@site.post("/open")
def open_review(
    request: Request,
    review_host: Host,
    session: Actor,
    version: Annotated[str, Form(max_length=32)],
    sample: Annotated[int, Form(ge=3, le=500)] = 50,
    k: Annotated[int, Form(ge=1, le=10)] = 3,
) -> Response:
    """Open a review; the rejection threshold is the service's setting, not the form's."""
    try:
        review_id = review_host.open_review(
            version,
            actor=session.username,
            sample=sample,
            k=k,
            threshold=review_host.review_threshold,
        )
    except Exception as error:  # an unknown version, a registry hiccup: said, not a 500
        log.warning("could not open a review of version %s: %s", version, error)
        _say(review_host, session, "error", f"Could not open a review of {version}: {error}")
        return _redirect(f"{_base(request)}/")
    _say(review_host, session, "notice", f"Opened a review of version {version}.")
    return _redirect(f"{_base(request)}/{review_id}")


# -- the audit log ------------------------------------------------------------------------
@site.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, review_host: Host, session: Viewer) -> Response:
    entries = list(reversed(review_host.review.audit_log()))
    return _page(request, "audit.html", {"entries": entries}, session=session)


@site.get("/audit.csv")
def audit_csv(review_host: Host, session: Viewer) -> Response:
    return Response(
        review_host.review.audit_csv(),
        media_type="text/csv; charset=utf-8",
        headers=HEADERS | {"Content-Disposition": 'attachment; filename="nextbest-audit.csv"'},
    )


@site.post("/unblock")
def unblock(
    request: Request,
    review_host: Host,
    session: Actor,
    offer: Annotated[str, Form(max_length=128)],
    segment: Annotated[str, Form(max_length=128)],
    back: Annotated[str, Form()] = "",
) -> Response:
    review_host.review.unblock(offer, segment, actor=session.username)
    review_host.sync()
    _say(review_host, session, "notice", f"Lifted the block of {offer} for {segment}.")
    return _redirect(_safe_next(request, back))


# -- one review -----------------------------------------------------------------------------
def _load(review_host: ReviewHost, review_id: str) -> dict[str, Any]:
    try:
        return review_host.reviews.review(review_id)
    except KeyError:
        raise Refused(404, f"There is no review {review_id!r}.") from None


@site.get("/{review_id}", response_class=HTMLResponse)
def review_page(request: Request, review_id: str, review_host: Host, session: Viewer) -> Response:
    review = _load(review_host, review_id)
    blocked = {(b["offer_id"], b["segment"]): b for b in review_host.review.blocks()}
    counts = review["counts"]
    conditions = [
        (
            "every item reviewed",
            counts["decided"] == counts["items"],
            f"{counts['decided']} of {counts['items']}",
        ),
        (
            f"rejection rate under {review['threshold']:.0%}",
            counts["rejection_rate"] < review["threshold"],
            f"{counts['rejection_rate']:.0%}",
        ),
        ("released by an approver", session.is_approver, f"you are a {session.role}"),
    ]
    quality = review_host.reviews.quality(review_id)
    slates = [_slate_view(slate) for slate in review["slates"]]
    shown = sorted({bar["feature"] for s in slates for o in s["offers"] for bar in o["chart"]})
    return _page(
        request,
        "review.html",
        {
            "review": review,
            "slates": slates,
            "glossary": [(name, _DESCRIPTIONS.get(name, "")) for name in shown],
            "segments": review_host.review_segments(),
            "blocked": blocked,
            "conditions": conditions,
            "quality": quality,
            "flash": _heard(review_host, session),
        },
        session=session,
    )


def _slate_view(slate: dict[str, Any]) -> dict[str, Any]:
    """What the template shows of one frozen slate: offers with their chart, what changed
    against the champion, and the eligibility trace in counts."""
    challenger = slate["challenger"]
    champion = slate["champion"] or {"offers": []}
    theirs = {o["offer_id"] for o in champion["offers"]}
    ours = {o["offer_id"] for o in challenger["offers"]}
    offers = [
        o | {"new": o["offer_id"] not in theirs, "chart": shap_chart(o)}
        for o in challenger["offers"]
    ]
    excluded = challenger.get("excluded", [])
    reasons = Counter(reason for e in excluded for reason in e["reasons"])
    return slate | {
        "offers": offers,
        "champion_offers": [o | {"dropped": o["offer_id"] not in ours} for o in champion["offers"]],
        "champion_version": (champion.get("model") or {}).get("version"),
        "excluded": excluded,
        "exclusion_counts": reasons.most_common(),
        "undecided": sum(o["decision"] is None for o in offers),
    }


def shap_chart(offer: dict[str, Any], width: int = 120) -> list[dict[str, Any]]:
    """Bars for the offer's strongest contributions (both signs), scaled to the largest:
    each bar is half of ``width`` at most, right of the axis when it raises the score."""
    rows = offer.get("shap") or offer.get("contributions") or []
    largest = max((abs(float(r["shap"])) for r in rows), default=0.0)
    half = width / 2
    bars = []
    for r in rows:
        shap = float(r["shap"])
        length = 0.0 if largest == 0 else max(1.0, abs(shap) / largest * half)
        bars.append(
            {
                "feature": r["feature"],
                "value": r["value"],
                "shap": shap,
                "x": half if shap >= 0 else half - length,
                "length": round(length, 1),
                "sign": "up" if shap >= 0 else "down",
            }
        )
    return bars


@contextmanager
def _answered(review_host: ReviewHost, session: Session, what: str) -> Iterator[None]:
    """A review action: an unknown review, slate or offer is a 404 page; a decision the
    rules refuse is said on the next page."""
    try:
        yield
    except KeyError as error:
        raise Refused(404, str(error.args[0])) from None
    except ValueError as error:
        _say(review_host, session, "error", f"{what}: {error}.")


def _slate_anchor(request: Request, review_id: str, slate: int | None) -> str:
    return f"{_base(request)}/{review_id}" + (f"#slate-{slate}" if slate else "")


@site.post("/{review_id}/decide")
def decide(
    request: Request,
    review_id: str,
    review_host: Host,
    session: Actor,
    slate: Annotated[int, Form()],
    offer: Annotated[str, Form(max_length=128)],
    decision: Annotated[str, Form()],
    reason: Annotated[str, Form()] = "",
    comment: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    with _answered(review_host, session, f"Slate {slate}, {offer}"):
        review_host.reviews.decide(
            review_id,
            slate,
            offer,
            decision,
            actor=session.username,
            reason=reason or None,
            comment=comment.strip() or None,
        )
    return _redirect(_slate_anchor(request, review_id, slate))


@site.post("/{review_id}/approve-slate")
def approve_slate(
    request: Request,
    review_id: str,
    review_host: Host,
    session: Actor,
    slate: Annotated[int, Form()],
) -> Response:
    with _answered(review_host, session, f"Slate {slate}"):
        review_host.reviews.approve_rest(review_id, slate, actor=session.username)
    return _redirect(_slate_anchor(request, review_id, slate))


@site.post("/{review_id}/block")
def block(
    request: Request,
    review_id: str,
    review_host: Host,
    session: Actor,
    offer: Annotated[str, Form(max_length=128)],
    segment: Annotated[str, Form(max_length=128)],
    reason: Annotated[str, Form(max_length=500)] = "",
    slate: Annotated[int | None, Form()] = None,
) -> Response:
    _load(review_host, review_id)
    if segment not in review_host.review_segments():
        _say(review_host, session, "error", f"There is no segment {segment!r}.")
    elif not review_host.knows_offer(offer):
        _say(review_host, session, "error", f"There is no offer {offer!r}.")
    elif not reason.strip():
        _say(review_host, session, "error", "Say why the offer is blocked.")
    elif not review_host.review.block(offer, segment, reason.strip(), actor=session.username):
        _say(review_host, session, "notice", f"{offer} was already blocked for {segment}.")
    else:
        review_host.sync()
        _say(
            review_host,
            session,
            "notice",
            f"Blocked {offer} for the segment {segment}: serving no longer offers it there.",
        )
    return _redirect(_slate_anchor(request, review_id, slate))


@site.post("/{review_id}/release")
def release(
    request: Request,
    review_id: str,
    review_host: Host,
    session: Actor,
    decision: Annotated[str, Form()],
    override_baseline: Annotated[str | None, Form()] = None,
) -> Response:
    if decision not in ("approve", "reject"):
        raise Refused(400, "The release decision is approve or reject.")
    _load(review_host, review_id)
    try:
        outcome = review_host.reviews.release(
            review_id,
            approve=decision == "approve",
            actor=session.username,
            override_baseline=override_baseline == "yes",
        )
    except AccessError:
        raise Refused(403, "Only an approver can make the release decision.") from None
    except ReleaseError as error:
        _say(review_host, session, "error", f"Not released: {error}.")
        return _redirect(f"{_base(request)}/{review_id}#release")
    review_host.sync()
    if outcome["status"] == "approved":
        text = f"Released: version {outcome['version']} is the champion and now serves."
    else:
        text = f"Rejected: version {outcome['version']} is tagged and the champion is unchanged."
    _say(review_host, session, "notice", text)
    return _redirect(f"{_base(request)}/{review_id}")
