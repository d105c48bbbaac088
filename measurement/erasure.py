"""Erasing a customer (issue 12, item 7): ``nextbest customer erase ID``.

In this order, each step idempotent:

1. **the workspace** (:func:`features.workspace.erase_customer_rows`): every table with a
   ``customer_id`` loses the customer's rows, and the workspace is written again under the
   contract;
2. **the ledger** (:meth:`serving.ledger.SqlLedger.erase_customer`): the local buffer's
   rows of theirs, then their slates with those slates' offers, ghosts and feedback;
3. **the running service** (``POST /admin/erase``, with the API key if keys are set): its
   snapshot is indexed anew from the erased workspace, so it treats them as unknown;
4. the ledger once more, for a row the service's own buffer flush may have written
   between steps 2 and 3 (normally nothing);
5. **the record** (``erasures``, in the ledger's database): an erasure id, the time, the
   rows removed per table, and at most a keyed hash of the id.

The record holds nothing of the customer. The keyed hash is HMAC-SHA256 of the id under a
secret (``NEXTBEST_ERASURE_SECRET``) that is kept apart from the database: with it,
:func:`reimported` can tell that an erased id came back in a later import; without it,
the table alone cannot be turned back into the id (customer ids are short and
guessable: a plain hash of "S00001" is found by trying every id). Without a secret no
hash is stored, and a re-import cannot be detected.

What is not erased here: a model already trained on the customer's rows (its trees hold
aggregates, not rows: retrain to forget them), and copies outside nextbest (backups, a
PostgreSQL's dead tuples until its vacuum).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from features import Workspace
from features.workspace import erase_customer_rows
from serving.ledger import SqlLedger

__all__ = ["Erasure", "ServiceError", "erase_customer", "keyed_hash", "reimported"]


class ServiceError(RuntimeError):
    """The running service did not forget the customer (its status and message)."""


@dataclass(frozen=True)
class Erasure:
    """One erasure: its id and time, the rows removed per place, and the keyed hash."""

    erasure_id: str
    erased_at: pd.Timestamp
    workspace: dict[str, int]
    ledger: dict[str, int]
    service: dict[str, Any] | None = None
    keyed_hash: str | None = None
    removed: dict[str, int] = field(default_factory=dict)

    @property
    def nothing_left(self) -> bool:
        """True when this erasure found nothing (the customer was erased already)."""
        return not any(self.removed.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "erasure_id": self.erasure_id,
            "erased_at": self.erased_at.isoformat(),
            "removed": self.removed,
            "service": self.service,
            "keyed_hash": self.keyed_hash,
            "nothing_left": self.nothing_left,
        }

    def line(self) -> str:
        """One line for a person: what was removed where (never whose)."""
        if self.nothing_left:
            said = "nothing of this customer was left to remove"
        else:
            said = ", ".join(f"{n} {table}" for table, n in self.removed.items() if n)
            said = f"removed {said}"
        service = (
            "no service asked"
            if self.service is None
            else "the service's snapshot holds nothing of them"
        )
        hashed = "keyed hash kept" if self.keyed_hash else "no keyed hash (no secret set)"
        return f"erasure {self.erasure_id}: {said}; {service}; {hashed}"


def keyed_hash(customer_id: str, secret: str) -> str:
    """HMAC-SHA256 of a customer id under ``secret``, hex."""
    return hmac.new(secret.encode(), customer_id.encode(), hashlib.sha256).hexdigest()


def erase_customer(
    customer_id: str,
    *,
    workspace: Workspace,
    ledger: SqlLedger,
    secret: str | None = None,
    service_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 60.0,
) -> Erasure:
    """Erase one customer from the workspace, the ledger (and its buffer) and, given its
    URL, the running service; record it in the ledger's ``erasures`` table. Raises
    :class:`ServiceError` if the service refuses (the workspace and ledger are erased by
    then, and the erasure is not recorded: run it again)."""
    erasure_id = uuid.uuid4().hex
    erased_at = pd.Timestamp.now(tz="UTC").tz_localize(None).floor("s")
    workspace.require()
    _, from_workspace = erase_customer_rows(workspace, customer_id, source={"erasure": erasure_id})
    from_ledger = ledger.erase_customer(customer_id)
    service = None
    if service_url is not None:
        service = _erase_in_service(service_url, customer_id, api_key, timeout_s)
        again = ledger.erase_customer(customer_id)
        from_ledger = {name: from_ledger[name] + again.get(name, 0) for name in from_ledger}
    removed = _prefixed("workspace", from_workspace) | _prefixed("ledger", from_ledger)
    hashed = None if not secret else keyed_hash(customer_id, secret)
    ledger.record_erasure(erasure_id, erased_at.to_pydatetime(), removed, hashed)
    return Erasure(
        erasure_id=erasure_id,
        erased_at=erased_at,
        workspace=from_workspace,
        ledger=from_ledger,
        service=service,
        keyed_hash=hashed,
        removed=removed,
    )


def reimported(workspace: Workspace, ledger: SqlLedger, secret: str) -> list[str]:
    """The workspace's customers whose id an earlier erasure recorded (by its keyed hash
    under ``secret``): erased, then imported again."""
    erased = {e["keyed_hash"] for e in ledger.erasure_log() if e["keyed_hash"]}
    if not erased:
        return []
    ids = workspace.read("customers", columns=["customer_id"])["customer_id"].astype(str)
    return sorted(c for c in set(ids) if keyed_hash(c, secret) in erased)


def _prefixed(place: str, counts: Mapping[str, int]) -> dict[str, int]:
    return {f"{place}.{table}": int(n) for table, n in counts.items()}


def _erase_in_service(
    url: str, customer_id: str, api_key: str | None, timeout_s: float
) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.post(
            f"{url.rstrip('/')}/admin/erase",
            json={"customer_id": customer_id},
            headers=headers,
            timeout=timeout_s,
        )
    except httpx.HTTPError as error:
        raise ServiceError(f"the service at {url} did not answer: {error}") from None
    if answer.status_code != 200:
        try:
            message = answer.json().get("error", answer.text)
        except ValueError:
            message = answer.text
        raise ServiceError(f"the service at {url} answered {answer.status_code}: {message}")
    return dict(answer.json())
