"""A thin client for storefront engineers: the standard library only, no nextbest deps.

    from nextbest.client import NextBestClient

    client = NextBestClient("http://127.0.0.1:3000")
    slate = client.recommend("1029", channel="web", placement="pdp",
                             product_id="1082185", cart=["981760"], k=3)
    for offer in slate["offers"]:
        show(offer["title"], offer["because"])
    client.feedback(slate["request_id"], slate["offers"][0]["offer_id"], "accepted", value=4.99)

Errors from the service (4xx) raise :class:`NextBestError` with its status and message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["NextBestClient", "NextBestError"]


class NextBestError(RuntimeError):
    """The service refused a request (its status and message are kept)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}")


class NextBestClient:
    """POST /recommend and /feedback, GET /metadata, with a timeout per call."""

    def __init__(self, base_url: str = "http://127.0.0.1:3000", *, timeout: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise NextBestError(error.code, error.read().decode(errors="replace")) from None

    def recommend(
        self,
        customer_id: str,
        *,
        channel: str,
        placement: str = "home",
        k: int = 3,
        product_id: str | None = None,
        cart: list[str] | None = None,
        moment: str | None = None,
        debug: bool = False,
    ) -> dict[str, Any]:
        """Ranked offers with their "because" (see the README's API section)."""
        context: dict[str, Any] = {"cart": list(cart or [])}
        if product_id is not None:
            context["product_id"] = product_id
        if moment is not None:
            context["moment"] = moment
        return dict(
            self._call(
                "POST",
                "/recommend",
                {
                    "customer_id": customer_id,
                    "channel": channel,
                    "placement": placement,
                    "k": k,
                    "context": context,
                    "debug": debug,
                },
            )
        )

    def feedback(
        self, request_id: str, offer_id: str, outcome: str, value: float | None = None
    ) -> dict[str, Any]:
        """Record viewed/accepted/declined/purchased/returned/redeemed (idempotent)."""
        return dict(
            self._call(
                "POST",
                "/feedback",
                {
                    "request_id": request_id,
                    "offer_id": offer_id,
                    "outcome": outcome,
                    "value": value,
                },
            )
        )

    def metadata(self) -> dict[str, Any]:
        return dict(self._call("GET", "/metadata"))
