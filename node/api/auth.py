"""Users, passwords and bearer tokens.

Passwords are kept as argon2id hashes (argon2-cffi's defaults); a token is 32 random bytes shown
once and kept as its SHA-256, so the database never holds anything that lets anyone in. A login's
token expires; a token made for a program lasts until it is revoked. Failed logins are counted per
name and per address, and a burst of them locks that name or address out for a while.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from node.db.models import ApiToken, Role, User, utcnow

_HASHER = PasswordHasher()
MIN_PASSWORD_LENGTH = 12
USE_RECORDED_EVERY = timedelta(minutes=1)
# An argon2 hash of a password nobody has: a login for an unknown name costs as much as any other.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user that cannot be made as asked (a taken name, a short password)."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(session: Session, name: str, password: str, role: Role) -> User:
    if not name or len(name) > 64:
        raise UserError("a user name has 1 to 64 characters")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise UserError(f"user {name!r} exists already")
    user = User(name=name, password_hash=_HASHER.hash(password), role=role)
    session.add(user)
    session.flush()
    return user


def check_password(session: Session, name: str, password: str) -> User | None:
    """The user ``name`` if ``password`` is theirs and they are not disabled."""
    user = session.scalar(select(User).where(User.name == name))
    try:
        _HASHER.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    return user


def issue_token(session: Session, user: User, label: str, lifetime: timedelta | None) -> tuple[str, ApiToken]:
    """A new bearer token for ``user`` (shown once) and its row; ``lifetime`` None never expires.
    The user's expired tokens go (each login and each viewer link makes one)."""
    now = utcnow()
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.expires_at <= now))
    token = secrets.token_urlsafe(32)
    expires = now + lifetime if lifetime is not None else None
    row = ApiToken(user_id=user.id, token_hash=_digest(token), label=label[:64], expires_at=expires)
    session.add(row)
    session.flush()
    return token, row


def user_for_token(session: Session, token: str, now: datetime | None = None) -> User | None:
    """The enabled user a live token belongs to; records its use (at most once a minute: a
    dashboard polling every few seconds would otherwise write to the database for each panel)."""
    now = now or utcnow()
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == _digest(token)))
    if row is None or (row.expires_at is not None and row.expires_at <= now) or row.user.disabled:
        return None
    if row.last_used_at is None or row.last_used_at <= now - USE_RECORDED_EVERY:
        row.last_used_at = now
    return row.user


def revoke_token(session: Session, token: str) -> bool:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == _digest(token)))
    if row is None:
        return False
    session.delete(row)
    return True


class LoginThrottle:
    """At most ``attempts`` failed logins per name and per address in ``window_s``; beyond, that
    name or address waits until the window has passed (in this process)."""

    def __init__(self, attempts: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock()

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login for these keys may be tried again; 0 when it may now."""
        now = self._now()
        wait = 0.0
        with self._lock:
            for key in keys:
                failures = self._failures.get(key)
                if not failures:
                    continue
                while failures and failures[0] <= now - self.window_s:
                    failures.popleft()
                if not failures:
                    del self._failures[key]  # a name tried once must not stay in memory for ever
                    continue
                if len(failures) >= self.attempts:
                    wait = max(wait, failures[0] + self.window_s - now)
        return wait

    def failed(self, *keys: str) -> None:
        now = self._now()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)
