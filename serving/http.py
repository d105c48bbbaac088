"""The storefront API's front door: one ASGI middleware in front of every route.

In this order, before any handler runs:

* **API keys** (``NEXTBEST_API_KEYS``): every path but the probes (``/healthz``, ``/livez``,
  ``/readyz``), the API's documentation (``/``, ``/docs``, ``/docs.json`` and its static
  files: the contract is no secret) and the review page (its own sign-in) needs
  ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; else a 401. Keys are compared in
  constant time against every key, and never logged.
* **JSON only**: a POST to the API whose ``Content-Type`` is not ``application/json`` is a
  415, so a cross-site ``text/plain`` form post never reaches a handler.
* **Bounded body**: a declared ``Content-Length`` over ``max_body_bytes`` is a 413 before a
  byte is read; a streamed body is counted as it arrives and refused as soon as it passes
  the limit, so the worker never holds more than the limit.
* **Validation**: the body is checked against the endpoint's own input model (the one
  BentoML validates with, so the two never disagree); a 400 states what is wrong and
  logs one line, not a traceback.
* **Refusals are throttled per client address** (``NEXTBEST_REFUSALS_PER_S``, 50): past
  that rate (a bucket of one second's worth), each refusal (400, 401, 413, 415) is
  answered after the wait its turn needs, at most a second, and is not logged one by one.
  A refusal is cheap, but a client looping on them as fast as it can would still take the
  worker's time from everyone else, and fill the log; slowed, it takes a bounded share.
  Valid requests are never delayed, whoever sends them.

And after: every error the API answers (a 4xx or 5xx outside ``/review``) has one shape,
``{"error": str, "detail": [...]?}``, whoever wrote it (BentoML's own bodies are
sometimes a list, Starlette's are plain text or ``{"detail": ...}``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ValidationError

from serving.settings import ServingSettings

__all__ = [
    "DOCS_PAGE",
    "OPEN_PATHS",
    "ApiGuard",
    "RefusalThrottle",
    "cancel_bentoml_request_timers",
    "error_body",
    "key_matches",
    "validation_detail",
]

log = logging.getLogger("nextbest.serving.http")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/healthz", "/livez", "/readyz"})
DOCS = frozenset({"/", "/docs", "/docs/init.js", "/docs.json", "/favicon.ico"})
OPEN_PATHS = PROBES | DOCS
OPEN_PREFIXES = ("/static_content/",)  # swagger-ui's files (the review page: _is_review)


def _is_review(path: str) -> bool:
    """The review page's paths (its own app), and no path that merely starts alike."""
    return path == "/review" or path.startswith("/review/")


def _counted(receive: Receive, limit: int) -> Receive:
    """``receive`` that ends a streamed body past ``limit`` bytes as a client gone away,
    so the app never holds more than the limit."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                return {"type": "http.disconnect"}
        return message

    return counted


def error_body(message: str, detail: list[Any] | None = None) -> bytes:
    """The one error shape, serialised."""
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return json.dumps(body, separators=(",", ":")).encode()


def validation_detail(error: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors, without the input (which may be huge, or a secret) or URLs."""
    return [
        {"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]}
        for e in error.errors(include_url=False, include_context=False, include_input=False)
    ]


def key_matches(given: str, keys: Iterable[str]) -> bool:
    """Constant time over every key: no early exit that tells which key came close."""
    supplied = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(supplied, key.encode())
    return found


class _Refused(Exception):
    def __init__(self, status: int, message: str, detail: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


@dataclass
class _Bucket:
    tokens: float
    when: float
    unlogged: int = 0  # refusals waited on and not logged since the last logged one


class RefusalThrottle:
    """A token bucket of refusals per client address: ``rate`` a second, holding at most
    one second's worth. :meth:`take` spends one and says how long to wait first (0 while
    the bucket has tokens; at most ``max_wait_s``, so a client never waits unboundedly and
    the debt stays bounded). ``rate`` 0 never waits."""

    MAX_ADDRESSES = 4096  # past it, the buckets that are full again are forgotten

    def __init__(
        self, rate: float, *, max_wait_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, address: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.MAX_ADDRESSES:
                self._forget_full(now)
            bucket = self._buckets[address] = _Bucket(self.rate, now)
        tokens = self._refilled(bucket, now) - 1
        bucket.tokens, bucket.when = max(tokens, -self.rate * self.max_wait_s), now
        return min(self.max_wait_s, -tokens / self.rate) if tokens < 0 else 0.0

    def not_logged(self, address: str) -> int:
        """One more refusal from ``address`` left out of the log: how many now."""
        bucket = self._buckets[address]
        bucket.unlogged += 1
        return bucket.unlogged

    def take_not_logged(self, address: str) -> int:
        """How many refusals from ``address`` were left out of the log, counting anew."""
        bucket = self._buckets.get(address)
        if bucket is None:
            return 0
        count, bucket.unlogged = bucket.unlogged, 0
        return count

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self.rate, bucket.tokens + (now - bucket.when) * self.rate)

    def _forget_full(self, now: float) -> None:
        for address, bucket in list(self._buckets.items()):
            if not bucket.unlogged and self._refilled(bucket, now) >= self.rate:
                del self._buckets[address]


class ApiGuard:
    """The middleware; ``inputs`` maps each POST route to the model of its JSON body, and
    ``settings`` gives the keys and the body limit."""

    def __init__(
        self,
        app: App,
        *,
        inputs: Mapping[str, type[BaseModel]],
        settings: Callable[[], ServingSettings] = ServingSettings.from_env,
    ) -> None:
        self.app = app
        self.inputs = dict(inputs)
        from runtime.settings import report_start_failure

        try:
            configured = settings()  # when the worker builds its app, not at import
        except Exception as error:  # before the service's own start: said the same way
            report_start_failure(error)
            raise
        self.api_keys = configured.api_keys
        self.max_body_bytes = configured.max_body_bytes
        self.throttle = RefusalThrottle(configured.refusals_per_s)
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if _is_review(path):  # its own sign-in, its own HTML error pages; bounded bodies
            declared = _headers(scope).get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                refused = _Refused(
                    413, f"the body is {declared} bytes; the limit is {self.max_body_bytes} bytes"
                )
                await self._refuse(scope, send, refused)
                return
            await self.app(scope, _counted(receive, self.max_body_bytes), send)
            return
        send = _one_error_shape(send)
        try:
            self._authorise(scope, path)
            model = self.inputs.get(path) if scope["method"] == "POST" else None
            if model is not None:
                body = await self._body(scope, receive)
                self._validate(model, body)
                receive = _replay(body, receive)
        except _Refused as refused:
            await self._refuse(scope, send, refused)
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, refused: _Refused) -> None:
        """Log the refusal and answer it; past the address's rate, after its wait, and
        counted instead of logged (the next logged refusal says how many were not)."""
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.take(address)
        if wait > 0:
            if self.throttle.not_logged(address) == 1:
                log.warning(
                    "refusals from %s are over %d a second: answered after a wait, not logged "
                    "one by one",
                    address,
                    self.throttle.rate,
                )
            await self.sleep(wait)
        else:
            _log_refusal(scope, refused, self.throttle.take_not_logged(address))
        await _answer(send, refused.status, error_body(refused.message, refused.detail))

    def _authorise(self, scope: Scope, path: str) -> None:
        if not self.api_keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return
        if _is_review(path):
            return
        headers = _headers(scope)
        given = headers.get("x-api-key")
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = credentials.strip()
        if given is None:
            raise _Refused(
                401, "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        if not key_matches(given, self.api_keys):
            raise _Refused(401, "the API key is not valid")

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        headers = _headers(scope)
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise _Refused(
                415,
                f"Content-Type must be application/json, not {media_type or 'none'!r}",
            )
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _Refused(400, f"Content-Length {declared!r} is not a number of bytes")
            if int(declared) > limit:
                raise _Refused(
                    413, f"the body is {int(declared)} bytes; the limit is {limit} bytes"
                )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "the client went away before the body was sent")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # counted as it streams: never more than the limit is kept
                raise _Refused(413, f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _validate(model: type[BaseModel], body: bytes) -> None:
        try:
            parsed = json.loads(body or b"{}", parse_constant=_no_constant)
        except (ValueError, RecursionError) as error:
            raise _Refused(400, f"the body is not JSON: {error}") from None
        # a misspelt field is an error, not a default silently taken
        unknown = sorted(set(parsed) - set(model.model_fields)) if isinstance(parsed, dict) else []
        try:
            model.model_validate_json(body or b"{}")
            detail = []
        except ValidationError as error:
            detail = validation_detail(error)
        detail += [
            {"type": "extra_forbidden", "loc": [name], "msg": "Extra inputs are not permitted"}
            for name in unknown
        ]
        if detail:
            said = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in detail
            )
            raise _Refused(400, f"{len(detail)} invalid field(s): {said}", detail)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _log_refusal(scope: Scope, refused: _Refused, unlogged: int = 0) -> None:
    """One line: what was refused and why (never the body, never a header; a newline or
    any other control character in the message is escaped, so no line can be forged), and
    how many refusals before it were left out of the log (throttled)."""
    said = refused.message[:300].encode("unicode_escape").decode("ascii")
    since = f" ({unlogged} throttled refusals before it were not logged)" if unlogged else ""
    log.warning(
        "%s %s refused with %d: %s%s", scope["method"], scope["path"], refused.status, said, since
    )


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, read once here, handed on as if it had not been read."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _one_error_shape(send: Send) -> Send:
    """Rewrite an error response whose body is not ``{"error": str, ...}`` into that shape;
    successful responses pass untouched."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def shaped(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                start = None
                await send(message)
                return
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status = start["status"]
        body = _reshaped(status, b"".join(chunks))
        headers = [
            (k, v)
            for k, v in start["headers"]
            if k.lower() not in (b"content-length", b"content-type")
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send(start | {"headers": headers})
        await send({"type": "http.response.body", "body": body})

    return shaped


def _reshaped(status: int, raw: bytes) -> bytes:
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
        text = raw.decode("utf-8", "replace").strip()
    else:
        text = ""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        detail = body.get("detail")
        return error_body(body["error"], detail if isinstance(detail, list) else None)
    if isinstance(body, list) and body and isinstance(body[0], dict) and "error" in body[0]:
        return error_body(str(body[0]["error"]))  # BentoML's 4xx: a one-element list
    if isinstance(body, dict) and "detail" in body:  # Starlette's and FastAPI's
        detail = body["detail"]
        if isinstance(detail, list):
            return error_body(HTTPStatus(status).phrase, detail)
        return error_body(str(detail))
    return error_body(text or _phrase(status))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>nextbest API</title>
<link rel="stylesheet" href="/static_content/swagger-ui.css">
<link rel="icon" type="image/png" href="/static_content/favicon-light-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/static_content/swagger-ui-bundle.js" charset="utf-8"></script>
<script src="/static_content/swagger-ui-standalone-preset.js" charset="utf-8"></script>
<script src="/docs/init.js" charset="utf-8"></script>
</body>
</html>
"""

# swagger-ui's own settings, from the service (no inline script: the page's policy allows
# scripts from the service only); no validator badge (it would call validator.swagger.io)
DOCS_SCRIPT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
  });
};
"""

# what the docs page may load: the service's own files, nothing from elsewhere
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def cancel_bentoml_request_timers() -> None:
    """BentoML 1.4's ``TimeoutMiddleware`` (the traffic timeout, 30 s here) schedules a
    timer per request and never cancels it: each answered request's timer, with its
    future, its context and the request's tracing span, lives on for the whole timeout. At
    80 requests a second that is 2,400 timers, some 50,000 objects that every full garbage
    collection walks: a 40 ms pause that held every request in flight (a steady load's p99
    doubled in the window it fell in). This makes the same middleware cancel its timer as
    soon as the request is answered, or its handler fails (whose error then reaches the
    server's own error handling at once: BentoML's code waited out the timeout, then
    dropped it); a request past the timeout is still a 504."""
    from bentoml._internal.server.http import traffic

    middleware = traffic.TimeoutMiddleware
    if getattr(middleware, "_nextbest_cancels_timer", False):
        return

    async def call(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)

        def _ended(_: Any) -> None:  # an app that fails before it answers: at once
            if not waiter.done():
                waiter.set_result(None)

        task.add_done_callback(_ended)
        try:
            try:
                await waiter
            finally:
                timer.cancel()
        except TimeoutError:
            if task.cancel():
                timeout = traffic.JSONResponse(
                    {"error": f"Not able to process the request in {self.timeout} seconds"},
                    status_code=504,
                )
                await timeout(scope, receive, send)  # type: ignore[arg-type]
        else:
            await task

    setattr(middleware, "_bentoml_call", middleware.__call__)  # noqa: B010 (kept: the tests' oracle)
    setattr(middleware, "__call__", call)  # noqa: B010
    setattr(middleware, "_nextbest_cancels_timer", True)  # noqa: B010
