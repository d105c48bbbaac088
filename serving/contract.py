"""The storefront API's contract: the limits on what comes in, the shapes of what goes out,
and the OpenAPI document that states both (served at ``/docs.json``).

BentoML writes an OpenAPI from the service's signatures; :func:`openapi` makes it true:
the real body of every status each endpoint can return (``200`` of ``/recommend`` with the
engine's payload, errors in their one shape, the review page's HTML and CSV), the API keys
when they are required, and ``info`` naming nextbest and its version. No BentoML here.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import types
import typing
from collections.abc import Mapping
from datetime import date, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints
from pydantic.json_schema import models_json_schema

from features.contract import OUTCOMES

__all__ = [
    "ISO_MOMENT",
    "MAX_CART_ITEMS",
    "MAX_ID_LENGTH",
    "ErrorBody",
    "FeedbackAnswer",
    "Id",
    "Metadata",
    "ModelSource",
    "RecommendAnswer",
    "WatcherInfo",
    "openapi",
]

MAX_ID_LENGTH = 128  # every id: customer, product, offer, request
MAX_CART_ITEMS = 100  # a cart longer than this is a 400, not seconds of work
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]+$"  # no NUL, no control character
_TIME = r"(T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?)?"
# ISO 8601 on the data's own clock (no zone): a day, or a day and a time
ISO_MOMENT = rf"^[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}{_TIME}$"
Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=PRINTABLE)]

DESCRIPTION = (
    "Explainable next-best offers for a storefront: `POST /recommend` answers ranked, "
    "guarded offers for one customer, each with a true *because*; `POST /feedback` records "
    "what happened to a served offer; `GET /metadata` says what is being served. Errors "
    'are one JSON object, `{{"error": "...", "detail": [...]}}`. Bodies are JSON, at most '
    "{max_body_bytes} bytes; a cart holds at most {cart} ids, an id at most {id} "
    "characters, none of them control characters.{keys}"
)
KEYS_NOTE = (
    " Every endpoint but `/healthz`, `/livez`, `/readyz`, the documentation and the review "
    "page needs an API key: `Authorization: Bearer KEY` or `X-API-Key: KEY`."
)


class ErrorBody(BaseModel):
    """Every error the API answers."""

    error: str
    detail: list[dict[str, Any]] = Field(
        default_factory=list, description="what was wrong, field by field (validation only)"
    )


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    mode: Literal["model", "rules_only", "cold_start", "non_personal"]


class Reason(BaseModel):
    feature: str
    value: float
    shap: float | None
    text: str
    role: Literal["reason", "fact"]


class Contribution(BaseModel):
    feature: str
    value: float | Literal["missing"]
    shap: float


class BundleInfo(BaseModel):
    ladder: str | None
    tier: str | None
    products: list[str]


class Offer(BaseModel):
    offer_id: str
    title: str
    rank: int = Field(ge=1)
    score: float
    probability: float | None
    value: float | None
    because: str
    reasons: list[Reason]
    contributions: list[Contribution]
    expected_value: float = Field(0.0, description="model-ranked offers only")
    raw_score: float = Field(0.0, description="model-ranked offers only")
    shap: list[Contribution] = Field(
        default_factory=list, description="debug only: the strongest, both signs"
    )
    bundle: BundleInfo | None = Field(None, description="bundle offers only")


class Excluded(BaseModel):
    offer_id: str
    reasons: list[str]


class RecommendAnswer(BaseModel):
    """What ``/recommend`` answers (``serving.engine.Recommender._respond``)."""

    request_id: str
    customer_id: str
    as_of: str
    model: ModelInfo
    holdout: bool
    offers: list[Offer]
    degraded: bool = Field(
        False, description="true when the ledger could not be reached: caps fail closed"
    )
    budget_exceeded: bool = Field(
        False,
        description="true when the latency budget was used up before the explanation: the "
        "ranked slate is served with short, true becauses (stated facts)",
    )
    excluded: list[Excluded] = Field(default_factory=list, description="debug only")
    rotated: list[str] = Field(default_factory=list, description="debug only")
    candidates: int = Field(0, description="debug only")
    eligible: int = Field(0, description="debug only")


class FeedbackAnswer(BaseModel):
    request_id: str
    offer_id: str
    outcome: Literal[OUTCOMES]  # type: ignore[valid-type]
    recorded: bool
    duplicate: bool
    buffered: bool = Field(
        False, description="true when kept locally, to be written once the ledger is back"
    )


class EraseAnswer(BaseModel):
    """Item 7 (privacy): what the running service holds of a customer after
    ``POST /admin/erase``."""

    customer_id: str
    in_snapshot: bool = Field(
        description="whether the service's snapshot still holds the customer (always false "
        "in a 200: a workspace that still holds them is a 409)"
    )
    refreshed: bool = Field(
        description="true when the snapshot was indexed anew from the erased workspace for "
        "this call; false when it held nothing of the customer already"
    )


class RulesInfo(BaseModel):
    name: str
    version: int | str
    hash: str


class WorkspaceInfo(BaseModel):
    id: str
    path: str


class HoldoutInfo(BaseModel):
    """The holdout's shape; never its salt (with it anyone could tell who is held out)."""

    share: float
    control: str
    offer_share: float


class ModelSource(BaseModel):
    """Where the served model was loaded from: an operator sees a degraded start here."""

    source: Literal["registry", "last-known-good cache", "none"] = Field(
        description="the model registry; the local last-known-good cache (the registry was "
        "unreachable at start, or its version failed its checks); none: the rules alone"
    )
    version: str | None = Field(description="the version served (none: the rules alone)")
    sha256: str | None = Field(description="the sha256 of its LightGBM text model, verified")


class WatcherInfo(BaseModel):
    """The service's watcher, which follows the alias, the reviewers' blocks and the
    workspace every few seconds: an operator sees here that it stopped following."""

    following: bool = Field(description="its last check succeeded")
    checked_at: str | None = Field(
        description="when its last check ended (UTC, ISO 8601); null before the first"
    )
    failing_since: str | None = Field(
        description="when its checks began to fail (UTC, ISO 8601); null while they succeed"
    )
    failure: str | None = Field(
        description="the kind of error its last check met (never the message, which may "
        "hold a URL); null while they succeed"
    )
    registry_reachable: bool = Field(
        description="the model registry (and its artifact store) answered the last time it "
        "was asked; false from the start when a cached copy serves because it did not"
    )


class Metadata(BaseModel):
    """What ``/metadata`` publishes: only these fields, so no secret can slip in."""

    snapshot_customers: int
    model: ModelInfo
    model_source: ModelSource
    features: list[str]
    rules: RulesInfo
    workspace: WorkspaceInfo
    catalogue: str
    data_end: str
    clock: str
    holdout: HoldoutInfo
    ledger: str
    watcher: WatcherInfo


_REF = "#/components/schemas/{model}"
_ERRORS = {
    400: "Invalid input: the message says what, and the limit where there is one",
    401: "A missing or wrong API key",
    404: "The request did not serve that offer",
    409: "The workspace still holds the customer: erase them there first "
    "(`nextbest customer erase ID`)",
    413: "The body is over the limit the message states",
    415: "The body is not application/json",
    503: "The ledger is down and its local buffer is full: retry later",
    500: "An unexpected failure (the server log has it)",
    504: "Not answered within the service's timeout",
}
_PLAIN = {"text/plain": {"schema": {"type": "string"}}}
_DATA_OPERATIONS = {
    ("/recommend", "post"),
    ("/feedback", "post"),
    ("/metadata", "get"),
    ("/admin/erase", "post"),
}


def _error(status: int) -> dict[str, Any]:
    return {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
    }


def _ok(model: str) -> dict[str, Any]:
    return {
        "description": "Successful Response",
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model)}}},
    }


def openapi(
    spec: dict[str, Any],
    *,
    inputs: Mapping[str, type[BaseModel]],
    keys_required: bool,
    max_body_bytes: int,
    as_of_range: tuple[str, str],
) -> dict[str, Any]:
    """BentoML's OpenAPI (``Service.openapi_spec.asdict()``), made true; a new dict.

    ``inputs`` are the POST routes' body models (their optional fields take ``null``,
    which BentoML's document leaves out), ``as_of_range`` the first and last moment an
    ``as_of`` may name on this service's data (JSON Schema cannot state a date range: the
    field's description and example do)."""
    spec = copy.deepcopy(spec)
    spec["info"] = {
        "title": "nextbest",
        "version": importlib.metadata.version("nextbest"),
        "description": DESCRIPTION.format(
            max_body_bytes=max_body_bytes,
            cart=MAX_CART_ITEMS,
            id=MAX_ID_LENGTH,
            keys=KEYS_NOTE if keys_required else "",
        ),
    }
    _, top = models_json_schema(
        [
            (m, "serialization")
            for m in (ErrorBody, RecommendAnswer, FeedbackAnswer, Metadata, EraseAnswer)
        ],
        ref_template=_REF,
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(top["$defs"])
    paths = spec["paths"]
    paths.pop("/constant", None)
    storefront = {
        "/recommend": ("RecommendAnswer", ()),
        "/feedback": ("FeedbackAnswer", (404, 503)),
        "/admin/erase": ("EraseAnswer", (409,)),
    }
    for path, (answer, extra) in storefront.items():
        operation = paths[path]["post"]
        operation["responses"] = {"200": _ok(answer)} | {
            str(s): _error(s) for s in sorted((400, 413, 415, 500, 504, *extra))
        }
        body = operation["requestBody"]
        body["required"] = True
        schema = body["content"]["application/json"]["schema"]
        schema["additionalProperties"] = False  # a misspelt field is a 400 (serving.http)
        _nullable(schema, inputs[path])
    paths["/recommend"]["post"]["responses"]["200"]["links"] = _feedback_links(paths)
    as_of = paths["/recommend"]["post"]["requestBody"]["content"]["application/json"]
    as_of = as_of["schema"]["properties"]["as_of"]
    first, last = as_of_range
    as_of["description"] = (
        f"Replay a past moment: ISO 8601 on the data's clock (no zone), from {first} (the "
        f"data's first day) to {last} (a margin after its end); absent, the service's clock."
    )
    as_of["pattern"] = moment_pattern(date.fromisoformat(first[:10]), date.fromisoformat(last[:10]))
    as_of["examples"] = [last[:10]]
    paths["/metadata"]["get"]["responses"] = {"200": _ok("Metadata")}
    for probe in ("/healthz", "/livez", "/readyz", "/metrics"):
        paths[probe]["get"]["responses"] = {"200": {"description": "OK", "content": _PLAIN}}
    paths["/readyz"]["get"]["responses"]["503"] = {
        "description": "Not ready (the ledger cannot be reached)",
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
    }
    if keys_required:
        spec["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, item in paths.items():
            for method, operation in item.items():
                if (path, method) in _DATA_OPERATIONS or path == "/metrics":
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
                    operation["responses"]["401"] = _error(401)
    for path, item in paths.items():
        if path.startswith("/review"):
            for operation in item.values():
                operation["responses"] = _review_responses(path)
    _prune(spec)
    return spec


def _feedback_links(paths: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI links from a served slate to ``POST /feedback``: the feedback a storefront
    posts names the slate's ``request_id`` and one of its offers (an offer it did not serve
    is a 404). Tools that follow links (swagger-ui shows them, schemathesis's stateful
    phase posts them) then send feedback on slates really served."""
    target = paths["/feedback"]["post"]["operationId"]
    return {
        "FeedbackOnTheFirstOffer": {
            "operationId": target,
            "description": "What happened to the slate's first offer (any offer of `offers` "
            "is posted the same way, with its own `offer_id`); `outcome`, and `value` where "
            "there is one, are the storefront's. An empty slate has no offer to post on.",
            # a literal body with runtime expressions embedded, in braces (OpenAPI 3.0.3,
            # "Runtime Expressions"): each takes the type of the value it points at
            "requestBody": {
                "request_id": "{$response.body#/request_id}",
                "offer_id": "{$response.body#/offers/0/offer_id}",
            },
        }
    }


def moment_pattern(first: date, last: date) -> str:
    """:data:`ISO_MOMENT` narrowed to the days from ``first`` to ``last``: the one way
    JSON Schema can say a range of dates (a month a line, its days listed where the
    range cuts it)."""
    months: list[str] = []
    day = first
    while day <= last:
        end = min(last, _month_end(day))
        if day.day == 1 and end == _month_end(day):  # the whole month, its real days only
            days = _WHOLE_MONTH[end.day]
        else:
            days = "(" + "|".join(f"{d:02d}" for d in range(day.day, end.day + 1)) + ")"
        months.append(f"{day:%Y-%m}-{days}")
        day = end + timedelta(days=1)
    return f"^({'|'.join(months)}){_TIME}$"


_WHOLE_MONTH = {
    28: "(0[1-9]|1[0-9]|2[0-8])",
    29: "(0[1-9]|[12][0-9])",
    30: "(0[1-9]|[12][0-9]|30)",
    31: "(0[1-9]|[12][0-9]|3[01])",
}


def _month_end(day: date) -> date:
    following = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return following - timedelta(days=1)


def _nullable(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """OpenAPI 3.0's ``nullable`` on the body's optional fields that take ``null``."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
            continue
        if type(None) not in typing.get_args(annotation):
            continue
        prop = schema["properties"][name]
        if "$ref" in prop:  # a $ref's siblings are ignored in 3.0
            prop["allOf"] = [{"$ref": prop.pop("$ref")}]
        prop["nullable"] = True


def _prune(spec: dict[str, Any]) -> None:
    """Drop the component schemas nothing refers to any more (BentoML's and FastAPI's
    own error models, the output descriptors replaced by the real answers)."""
    schemas = spec["components"]["schemas"]
    wanted: set[str] = set()
    todo = [json.dumps(spec["paths"])]
    while todo:
        for name in re.findall(r"#/components/schemas/([^\"]+)", todo.pop()):
            if name not in wanted and name in schemas:
                wanted.add(name)
                todo.append(json.dumps(schemas[name]))
    for name in set(schemas) - wanted:
        del schemas[name]


def _review_responses(path: str) -> dict[str, Any]:
    """The review page answers HTML (its CSV export, CSV), redirects to its sign-in, and
    its own error pages: 400 a form not understood, 401 no session (forms), 403 not
    allowed (role or CSRF), 404 no such review."""
    html = {"text/html": {"schema": {"type": "string"}}}
    page = {"text/csv": {"schema": {"type": "string"}}} if path.endswith(".csv") else html
    return {
        "200": {"description": "The page", "content": page},
        "303": {"description": "Redirect: to the sign-in page, or after a form"},
        "400": {"description": "A form not understood", "content": html},
        "401": {"description": "Not signed in", "content": html},
        "403": {"description": "Not allowed: the role, or an expired form", "content": html},
        "404": {"description": "No such review", "content": html},
    }
