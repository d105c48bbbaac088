"""The review gate's records: scrypt passwords, roles, blocks that serving obeys, and an
append-only audit log."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nextbest.cli import app
from serving.ledger import SqlLedger
from serving.review import AccessError, ReviewStore, hash_password, verify_password


@pytest.fixture
def store(tmp_path: Path) -> ReviewStore:
    return ReviewStore(SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}").engine)


def test_passwords_are_salted_scrypt_and_checked_in_constant_time() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$") and "correct horse" not in stored
    assert hash_password("correct horse") != stored  # a fresh salt every time
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("correct horse", "md5$abc")
    with pytest.raises(ValueError, match="at least 8 characters"):
        hash_password("short")


def test_users_roles_and_the_same_refusal_for_every_mistake(store: ReviewStore) -> None:
    store.add_user("rita", "reviewer-pass", "reviewer")
    store.add_user("alan", "approver-pass", "approver")
    assert store.authenticate("rita", "reviewer-pass") == "reviewer"
    for username, password in (("rita", "wrong-pass!"), ("nobody", "whatever!")):
        with pytest.raises(AccessError, match=r"^unknown user or wrong password$"):
            store.authenticate(username, password)
    store.require("rita", "reviewer")
    store.require("alan", "reviewer")  # an approver also reviews
    store.require("alan", "approver")
    with pytest.raises(AccessError, match="'rita' is not an approver"):
        store.require("rita", "approver")
    with pytest.raises(ValueError, match="user 'rita' already exists"):
        store.add_user("rita", "another-pass", "reviewer")
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        store.add_user("eve", "some-password", "admin")


def test_blocks_and_the_audit_log(store: ReviewStore) -> None:
    store.add_user("rita", "reviewer-pass", "reviewer")
    with pytest.raises(AccessError, match="unknown user 'mallory'"):
        store.block("item:F1-A1", "student", "irrelevant", actor="mallory")
    store.block("item:F1-A1", "student", "inappropriate for students", actor="rita")
    store.block("item:F1-A1", "student", "again", actor="rita")  # idempotent
    assert [(b["offer_id"], b["segment"], b["blocked_by"]) for b in store.blocks()] == [
        ("item:F1-A1", "student", "rita")
    ]
    log = store.audit_log()
    assert [(e["actor"], e["action"], e["target"]) for e in log] == [
        ("cli", "add_user", "rita"),
        ("rita", "block", "item:F1-A1@student"),
    ]
    assert '"segment": "student"' in log[1]["after"] and log[1]["before"] is None
    assert not hasattr(store, "delete") and not hasattr(store, "update_audit")


def test_a_block_takes_effect_for_serving(small_workspace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from serving.assembly import build_recommender
    from serving.review import segment_blocks
    from serving.settings import ServingSettings

    ledger = SqlLedger(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = ReviewStore(ledger.engine)
    store.add_user("rita", "reviewer-pass", "reviewer")
    recommender = build_recommender(
        ServingSettings(holdout_share=0.0), workspace=small_workspace, bundle=None, ledger=ledger
    )
    customers = small_workspace.read("customers")
    student = customers.loc[customers["segment"] == "student", "customer_id"].iloc[0]
    first = recommender.recommend(student, channel="web", k=1, log_exposure=False)
    offer = first["offers"][0]["offer_id"]
    store.block(offer, "student", "irrelevant", actor="rita")
    recommender.blocks = segment_blocks(store)
    again = recommender.recommend(student, channel="web", k=5, debug=True, log_exposure=False)
    assert offer not in {o["offer_id"] for o in again["offers"]}
    reasons = {e["offer_id"]: e["reasons"] for e in again["excluded"]}
    assert reasons[offer] == ["blocked_for_segment"]


def test_add_user_and_audit_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    runner = CliRunner()
    created = runner.invoke(
        app,
        ["review", "add-user", "alan", "--role", "approver", "--db-url", url],
        input="approver-pass\napprover-pass\n",
    )
    assert created.exit_code == 0, created.output
    scripted = runner.invoke(
        app,
        ["review", "add-user", "rita", "--role", "reviewer", "--password-stdin", "--db-url", url],
        input="reviewer-pass\n",
    )
    assert scripted.exit_code == 0, scripted.output
    bad = runner.invoke(
        app,
        ["review", "add-user", "eve", "--role", "root", "--password-stdin", "--db-url", url],
        input="password123\n",
    )
    assert bad.exit_code == 2 and "unknown role 'root'" in bad.stderr
    store = ReviewStore(SqlLedger(url).engine)
    assert store.authenticate("alan", "approver-pass") == "approver"
    exported = runner.invoke(
        app, ["review", "audit", "--out", str(tmp_path / "audit.csv"), "--db-url", url]
    )
    assert exported.exit_code == 0
    text = (tmp_path / "audit.csv").read_text()
    assert text.splitlines()[0] == "entry,at,actor,action,target,before,after"
    assert "approver-pass" not in text and text.count("add_user") == 2
    for _ in range(5):
        with pytest.raises(AccessError):
            store.sign_in("rita", "wrong-password")
    with pytest.raises(AccessError, match="too many"):
        store.sign_in("rita", "reviewer-pass")
    unlocked = runner.invoke(app, ["review", "unlock", "rita", "--db-url", url])
    assert unlocked.exit_code == 0 and store.sign_in("rita", "reviewer-pass").username == "rita"
    unknown = runner.invoke(
        app,
        ["review", "resolve", "nope", "--as", "alan", "--db-url", url],
        env={"NEXTBEST_HOME": str(tmp_path)},
    )
    assert unknown.exit_code == 2 and "no review 'nope'" in unknown.stderr


def test_sessions_expire_follow_the_role_and_end_on_sign_out(store: ReviewStore) -> None:
    from datetime import datetime

    from serving.review.store import sessions, users

    store.add_user("rita", "reviewer-pass", "reviewer")
    with pytest.raises(AccessError):
        store.sign_in("rita", "wrong-password")
    session = store.sign_in("rita", "reviewer-pass")
    assert store.session(session.token) == session and not session.is_approver
    assert store.session("forged-token") is None and store.session(None) is None
    with store.engine.begin() as connection:  # promoted: the next request sees it
        connection.execute(users.update().values(role="approver"))
    assert store.session(session.token).is_approver  # type: ignore[union-attr]
    store.flash(session, "notice:hello")
    assert store.pop_flash(session) == "notice:hello" and store.pop_flash(session) is None
    other = store.sign_in("rita", "reviewer-pass")
    store.sign_out(session)
    assert store.session(session.token) is None and store.session(other.token) is not None
    with store.engine.begin() as connection:  # eight hours later
        connection.execute(sessions.update().values(expires_at=datetime(2000, 1, 1)))
    assert store.session(other.token) is None
    actions = [e["action"] for e in store.audit_log()]
    assert actions == ["add_user", "sign_in_failed", "sign_in", "sign_in", "sign_out"]


def test_repeated_failures_lock_the_user_out_and_the_csv_export_is_formula_safe(
    store: ReviewStore,
) -> None:
    import csv
    import io

    from serving.review.store import LOCKOUT_FAILURES

    store.add_user("rita", "reviewer-pass", "reviewer")
    store.sign_in("rita", "reviewer-pass")
    for _ in range(LOCKOUT_FAILURES - 1):
        with pytest.raises(AccessError, match="wrong password"):
            store.sign_in("rita", "not-her-password")
    store.sign_in("rita", "reviewer-pass")  # success resets the count
    for _ in range(LOCKOUT_FAILURES):
        with pytest.raises(AccessError, match="wrong password"):
            store.sign_in("rita", "not-her-password")
    with pytest.raises(AccessError, match="too many failed sign-ins"):
        store.sign_in("rita", "reviewer-pass")  # even the right password, for a while
    store.unlock("rita", actor="alan")
    store.sign_in("rita", "reviewer-pass")
    with pytest.raises(AccessError, match="wrong password"):
        store.sign_in('=HYPERLINK("http://x")', "whatever-pass")
    rows = list(csv.reader(io.StringIO(store.audit_csv())))
    assert rows[0] == ["entry", "at", "actor", "action", "target", "before", "after"]
    assert rows[-1][2] == '\'=HYPERLINK("http://x")'  # text in a spreadsheet, not a formula
    actions = [r[3] for r in rows[1:]]
    assert actions.count("sign_in_locked") == 1 and ("alan", "unlock") in [
        (r[2], r[3]) for r in rows[1:]
    ]


def test_concurrent_guesses_cannot_pass_the_lockout_and_unknown_users_cost_scrypt(
    store: ReviewStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from serving.review import store as module

    store.add_user("rita", "reviewer-pass", "reviewer")
    checked: list[str] = []
    real = module.verify_password

    def counting(password: str, stored: str) -> bool:
        checked.append(password)
        return real(password, stored)

    monkeypatch.setattr(module, "verify_password", counting)
    start = threading.Barrier(12)

    def guess(n: int) -> None:
        start.wait()
        with contextlib.suppress(AccessError):
            store.sign_in("rita", f"guess-number-{n}")

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(checked) == module.LOCKOUT_FAILURES  # the rest never reached scrypt
    checked.clear()
    with pytest.raises(AccessError, match="wrong password"):
        store.sign_in("nobody-at-all", "some-password")
    assert checked == ["some-password"]  # an unknown user is checked against a dummy hash
