"""The review sign-in's per-address limit, over HTTP through the service's ASGI app: past
20 attempts a minute from one client address, a 429 with Retry-After, audited once per
window; the per-user lockout stays, and other addresses are not held back."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from serving_helpers import forget_bentoml_metrics

from features import Workspace
from serving.ledger import SqlLedger
from serving.review import ReviewStore

pytestmark = pytest.mark.slow

LIMIT = 20  # attempts per address per minute, as documented in serving/review/web.py


@pytest.fixture(scope="module")
def app_and_store(
    small_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, ReviewStore]]:
    """The service (rules only: no model is registered) and its review store."""
    from starlette.testclient import TestClient

    from serving.service import NextBest

    home = tmp_path_factory.mktemp("signin-limit")
    db_url = f"sqlite:///{home / 'ledger.db'}"
    store = ReviewStore(SqlLedger(db_url).engine)
    store.add_user("rita", "reviewer-pass", "reviewer")
    store.add_user("alan", "approver-pass", "approver")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEXTBEST_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("NEXTBEST_WORKSPACE", str(small_workspace.path))
        patch.setenv("NEXTBEST_DB_URL", db_url)
        patch.setenv("NEXTBEST_RELOAD_SECONDS", "3600")
        patch.setenv("BENTOML_HOME", str(home / "bentoml"))
        forget_bentoml_metrics()
        app = NextBest.to_asgi()
        with TestClient(app, follow_redirects=False, client=("10.0.0.1", 40000)):
            yield app, store


def _from(app: Any, address: str) -> Any:
    from starlette.testclient import TestClient

    return TestClient(app, follow_redirects=False, client=(address, 40000))


def _attempt(client: Any, username: str, password: str) -> Any:
    client.cookies.clear()
    form = client.get("/review/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token, form.text[:2000]
    return client.post(
        "/review/login",
        data={"username": username, "password": password, "csrf": token.group(1), "next": ""},
    )


def _actions(store: ReviewStore) -> list[str]:
    return [entry["action"] for entry in store.audit_log()]


def test_one_address_is_limited_per_window_and_audited_once(
    app_and_store: tuple[Any, ReviewStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, store = app_and_store
    guesser = _from(app, "10.0.0.66")
    # distinct unknown users: the per-user lockout is not what stops them
    for attempt in range(LIMIT):
        response = _attempt(guesser, f"nobody{attempt}", "guess")
        assert response.status_code == 401, (attempt, response.text)
    refused = _attempt(guesser, "rita", "reviewer-pass")  # even the right password
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "Too many sign-in attempts from this address" in refused.text
    assert "nextbest_review=" not in refused.headers.get("set-cookie", "")
    for _ in range(5):
        assert _attempt(guesser, "alan", "guess").status_code == 429
    actions = _actions(store)
    assert actions.count("sign_in_throttled") == 1  # one row for the window, not six
    assert actions.count("sign_in_failed") == LIMIT  # refused attempts reach no password
    assert "sign_in_locked" not in actions  # and lock nobody out

    # another address signs in meanwhile, as the users the guesser named
    assert _attempt(_from(app, "10.0.0.7"), "rita", "reviewer-pass").status_code == 303
    # the window over, the guesser's address is admitted again (and audited again later)
    from serving.review import store as store_module

    later = store_module._now() + timedelta(seconds=61)
    monkeypatch.setattr(store_module, "_now", lambda: later)
    assert _attempt(guesser, "alan", "approver-pass").status_code == 303


def test_the_per_user_lockout_stays(app_and_store: tuple[Any, ReviewStore]) -> None:
    app, store = app_and_store
    for address in ("10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5"):
        assert _attempt(_from(app, address), "rita", "wrong").status_code == 401
    locked = _attempt(_from(app, "10.0.1.6"), "rita", "reviewer-pass")
    assert locked.status_code == 401 and "Too many failed sign-ins for this user" in locked.text
    store.unlock("rita")
