"""API users and tokens on a real (SQLite) database: argon2 hashes, tokens kept as hashes that
expire or are revoked, and a throttle on failed logins."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.api.auth import (
    LoginThrottle,
    UserError,
    add_user,
    check_password,
    issue_token,
    revoke_token,
    user_for_token,
)
from node.db import engine as db
from node.db.models import ApiToken, Role, User, utcnow

PASSWORD = "correct horse battery"  # noqa: S105 - a test user's


def test_a_password_is_kept_as_an_argon2_hash_and_checked_against_it(sessions: sessionmaker[Session]) -> None:
    with db.session_scope(sessions) as session:
        add_user(session, "ada", PASSWORD, Role.ADMIN)
    with db.session_scope(sessions) as session:
        stored = session.scalars(select(User)).one()
        assert stored.password_hash.startswith("$argon2id$") and PASSWORD not in stored.password_hash
        assert check_password(session, "ada", PASSWORD) is stored
        assert check_password(session, "ada", PASSWORD + "!") is None
        assert check_password(session, "nobody", PASSWORD) is None
        stored.disabled = True
        assert check_password(session, "ada", PASSWORD) is None


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("ada", "short", "at least 12 characters"),
        ("", PASSWORD, "1 to 64 characters"),
        ("ada", PASSWORD, "exists already"),
    ],
)
def test_users_that_cannot_be_made_are_refused(
    sessions: sessionmaker[Session], name: str, password: str, message: str
) -> None:
    with db.session_scope(sessions) as session:
        add_user(session, "ada", PASSWORD, Role.VIEWER)
    with db.session_scope(sessions) as session, pytest.raises(UserError, match=message):
        add_user(session, name, password, Role.VIEWER)


def test_tokens_are_kept_as_hashes_and_end_when_they_expire_or_are_revoked(
    sessions: sessionmaker[Session],
) -> None:
    with db.session_scope(sessions) as session:
        user = add_user(session, "grace", PASSWORD, Role.VIEWER)
        lasting, _ = issue_token(session, user, "monitoring", None)
        session_token, _ = issue_token(session, user, "login", timedelta(hours=1))
    with db.session_scope(sessions) as session:
        hashes = {t.token_hash for t in session.scalars(select(ApiToken))}
        assert lasting not in hashes and session_token not in hashes and len(hashes) == 2
        found = user_for_token(session, lasting)
        assert found is not None and found.name == "grace"
        assert user_for_token(session, session_token) is not None
        later = utcnow() + timedelta(hours=2)
        assert user_for_token(session, session_token, now=later) is None  # expired
        assert user_for_token(session, lasting, now=later) is not None  # never expires
        assert user_for_token(session, "not-a-token") is None
        assert revoke_token(session, lasting)
        assert user_for_token(session, lasting) is None


def test_a_users_expired_tokens_go_when_they_get_a_new_one(sessions: sessionmaker[Session]) -> None:
    with db.session_scope(sessions) as session:
        user = add_user(session, "grace", PASSWORD, Role.VIEWER)
        other = add_user(session, "alan", PASSWORD, Role.VIEWER)
        lasting, _ = issue_token(session, user, "monitoring", None)
        _, gone = issue_token(session, user, "viewer", timedelta(hours=1))
        _, others = issue_token(session, other, "viewer", timedelta(hours=1))
        gone.expires_at = others.expires_at = utcnow() - timedelta(seconds=1)
    with db.session_scope(sessions) as session:
        issue_token(session, session.scalars(select(User).where(User.name == "grace")).one(), "login", None)
    with db.session_scope(sessions) as session:
        labels = sorted((t.user.name, t.label) for t in session.scalars(select(ApiToken)))
        assert labels == [("alan", "viewer"), ("grace", "login"), ("grace", "monitoring")]  # "viewer" gone
        assert user_for_token(session, lasting) is not None


def test_failed_logins_are_throttled_per_name_and_address() -> None:
    now = [1000.0]
    throttle = LoginThrottle(attempts=3, window_s=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("name:ada", "address:10.0.0.1") == 0
        throttle.failed("name:ada", "address:10.0.0.1")
    assert throttle.retry_after("name:ada", "address:10.0.0.9") == pytest.approx(60.0)  # the name
    assert throttle.retry_after("name:bob", "address:10.0.0.1") == pytest.approx(60.0)  # the address
    assert throttle.retry_after("name:bob", "address:10.0.0.9") == 0
    now[0] += 61.0
    assert throttle.retry_after("name:ada", "address:10.0.0.1") == 0
    throttle.failed("name:ada")
    throttle.succeeded("name:ada")
    assert throttle.retry_after("name:ada") == 0
    throttle.failed("name:someone-once")
    now[0] += 61.0
    assert throttle.retry_after("name:someone-once") == 0
    assert throttle._failures == {}  # nothing kept of names whose failures have passed
