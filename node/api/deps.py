"""What every route needs: the node's settings, a database session, and the user behind the
request, from a bearer token (programs) or the dashboard's session cookie (people)."""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations.
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from sqlalchemy.orm import Session

from node.api.auth import LoginThrottle, check_password, user_for_token
from node.core.config import Settings
from node.db.engine import session_scope
from node.db.models import Role, User

COOKIE = "segnode_session"
bearer = HTTPBearer(auto_error=False)
basic_auth = HTTPBasic(auto_error=False)


def settings(request: Request) -> Settings:
    found: Settings = request.app.state.settings
    return found


def session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.sessions) as s:
        yield s


# Committed when the route returns, before the answer goes out: what a client is told is done is done.
Db = Annotated[Session, Depends(session, scope="function")]
Config = Annotated[Settings, Depends(settings)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
BasicCredentials = Annotated[HTTPBasicCredentials | None, Depends(basic_auth)]


class NotLoggedInError(HTTPException):
    """401; the dashboard answers it with the login page instead."""


def token_of(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token, else the session cookie; a cookie counts for a state-changing request only
    when the request comes from the node's own pages (the cookie is SameSite=Strict as well)."""
    if credentials is not None:
        return credentials.credentials
    cookie = request.cookies.get(COOKIE)
    if cookie is None:
        return None
    if request.method not in ("GET", "HEAD"):
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] not in _own_hosts(request):
            raise HTTPException(403, "a request from another site may not act with the session cookie")
    return cookie


def _own_hosts(request: Request) -> set[str | None]:
    """The node's own host (and port) as pages reach it: the request's Host, and api.public_url's
    (a proxy may pass its own upstream address as Host)."""
    hosts = {request.headers.get("host")}
    public_url = request.app.state.settings.api.public_url
    if public_url:
        hosts.add(urlsplit(public_url).netloc)
    return hosts


def current_user(request: Request, db: Db, credentials: Credentials) -> User:
    token = token_of(request, credentials)
    if token is None:
        raise NotLoggedInError(
            401,
            "log in first (POST /api/login) or send an API token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    user = user_for_token(db, token)
    if user is None:
        raise NotLoggedInError(
            401,
            "the token is expired, revoked or unknown: log in again",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


AnyUser = Annotated[User, Depends(current_user)]


def viewer(user: Annotated[User, Depends(current_user)]) -> User:
    """People (and monitoring): viewers and admins; a sender's or a worker's token opens nothing here."""
    if user.role not in (Role.VIEWER, Role.ADMIN):
        raise HTTPException(403, f"{user.name} is a {user.role.value}: this needs the viewer or admin role")
    return user


Viewer = Annotated[User, Depends(viewer)]


def reader(user: Annotated[User, Depends(current_user)]) -> User:
    """Who reads instances over QIDO-RS and WADO-RS: viewers, admins, and workers on other machines."""
    if user.role not in (Role.VIEWER, Role.ADMIN, Role.WORKER):
        raise HTTPException(403, f"{user.name} is a {user.role.value}: reading instances needs another role")
    return user


Reader = Annotated[User, Depends(reader)]


def stower(request: Request, credentials: Credentials, basic: BasicCredentials) -> User:
    """Who stores instances over STOW-RS: a bearer token, or a name and password (HTTP Basic,
    throttled like a login; over HTTPS only, in front of the node); a sender or an admin. Its own
    short session: an upload may last minutes."""
    with session_scope(request.app.state.sessions) as db:
        user = _stower(request, db, credentials, basic)
        db.expunge(user)
    return user


def _stower(
    request: Request,
    db: Session,
    credentials: HTTPAuthorizationCredentials | None,
    basic: HTTPBasicCredentials | None,
) -> User:
    if basic is not None and credentials is None:
        throttle: LoginThrottle = request.app.state.throttle
        address = request.client.host if request.client else "unknown"
        keys = (f"name:{basic.username}", f"address:{address}")
        if throttle.retry_after(*keys) > 0:
            raise HTTPException(429, "too many failed logins: wait and try again")
        found = check_password(db, basic.username, basic.password)
        if found is None:
            throttle.failed(*keys)
            raise NotLoggedInError(401, "wrong name or password", headers={"WWW-Authenticate": "Basic"})
        throttle.succeeded(*keys)
        user = found
    else:
        user = current_user(request, db, credentials)
    if user.role not in (Role.SENDER, Role.ADMIN):
        raise HTTPException(
            403, f"{user.name} is a {user.role.value}; storing needs the sender or admin role"
        )
    return user


Stower = Annotated[User, Depends(stower)]


def remote_worker(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role not in (Role.WORKER, Role.ADMIN):
        raise HTTPException(403, f"{user.name} is a {user.role.value}; this needs the worker or admin role")
    return user


RemoteWorker = Annotated[User, Depends(remote_worker)]


def admin(user: Viewer) -> User:
    if user.role != Role.ADMIN:
        raise HTTPException(403, f"{user.name} is a viewer; this needs the admin role")
    return user


Admin = Annotated[User, Depends(admin)]
