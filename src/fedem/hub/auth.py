"""Contributors' bearer tokens.

A token is 32 random bytes (URL-safe base64) shown once; the database keeps only its sha256. For a
random 256-bit secret a fast hash is enough — there is nothing to brute-force, unlike a password —
and lookups by hash stay a single indexed query.
"""

import hashlib
import secrets
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedem.hub.errors import HubError
from fedem.hub.models import User

Role = Literal["donor", "maintainer"]
ROLES: tuple[Role, ...] = ("donor", "maintainer")


def new_token() -> str:
    return "fedem_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str, role: Role) -> tuple[User, str]:
    """Add a contributor; returns the row and the token (the only time it exists in clear)."""
    if role not in ROLES:
        raise HubError(422, "bad_role", f"role must be one of {', '.join(ROLES)}")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise HubError(409, "user_exists", f"user {name!r} already exists")
    token = new_token()
    user = User(name=name, role=role, pseudonym="donor-" + secrets.token_hex(4), token_hash=hash_token(token))
    session.add(user)
    session.flush()
    return user, token


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request; routes commit explicitly, anything else rolls back."""
    with request.app.state.db.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_user(request: Request, session: SessionDep) -> User:
    """The contributor behind the `Authorization: Bearer …` header; 401 without a valid one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HubError(401, "unauthorized", "this request needs 'Authorization: Bearer <token>'")
    user = session.scalar(select(User).where(User.token_hash == hash_token(token.strip())))
    if user is None:
        raise HubError(401, "unauthorized", "unknown or revoked token")
    return user


def maintainer(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role != "maintainer":
        raise HubError(403, "forbidden", "only maintainers may do this")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
Maintainer = Annotated[User, Depends(maintainer)]
