"""Contributors' bearer tokens: issued once, stored as argon2 hashes, checked in constant time.

A token is `fedem_<id>.<secret>`: `id` is 16 random hex digits, stored in clear and indexed, so finding
the user is one indexed query; `secret` is 32 random bytes (URL-safe base64), of which the database
keeps only an argon2id hash. A leaked database therefore yields no usable token, and argon2's
comparison is constant-time. Argon2 is memory-hard on purpose, so each process remembers the tokens
it has verified (`_verified`, keyed by token id, holding the secret's sha256 and the hash it was
checked against); a repeat request costs an HMAC-style `compare_digest`, not another 30 ms argon2 run.

Tokens issued before argon2 (`fedem_<secret>`, no dot; the database kept their sha256) stay valid:
migration 0003 moved each such row to id = the first 16 hex digits of that sha256 and hash =
argon2(sha256), and `split_token` maps an old token onto the same (id, secret) pair.

Per-token rate limits (`fedem.hub.limits.TokenBuckets`) apply before the argon2 check, so guessing the
secret of a known token id is throttled like any other use of it.
"""

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from typing import Annotated, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedem.hub.errors import HubError
from fedem.hub.models import User

Role = Literal["donor", "maintainer"]
ROLES: tuple[Role, ...] = ("donor", "maintainer")
TOKEN_PREFIX = "fedem_"
TOKEN_ID = re.compile(r"[0-9a-f]{16}")
# OWASP's minimum for argon2id (19 MiB, 2 passes, 1 lane): ~30 ms here. The secret is 256 random bits,
# so the work factor is defence in depth, not what keeps it safe; more would only slow every first use.
HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
VERIFIED_CACHE_SIZE = 10_000

# token id → (the argon2 hash it was verified against, sha256 of the secret); per process
_verified: dict[str, tuple[str, bytes]] = {}


def new_token() -> tuple[str, str, str]:
    """A fresh token: (token, its id, the argon2 hash of its secret)."""
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{token_id}.{secret}", token_id, HASHER.hash(secret)


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None. A pre-argon2 token (no dot) maps to the pair
    migration 0003 stored for it: id = sha256(token)[:16], secret = sha256(token) in hex."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    body = token[len(TOKEN_PREFIX) :]
    token_id, dot, secret = body.partition(".")
    if not dot:
        digest = hashlib.sha256(token.encode()).hexdigest()
        return digest[:16], digest
    if not TOKEN_ID.fullmatch(token_id) or not secret:
        return None
    return token_id, secret


def verify_secret(token_id: str, secret: str, stored_hash: str) -> bool:
    """Constant-time check of `secret` against its stored argon2 hash, remembered per process."""
    digest = hashlib.sha256(secret.encode()).digest()
    known = _verified.get(token_id)
    if known is not None and known[0] == stored_hash:
        return hmac.compare_digest(known[1], digest)
    try:
        HASHER.verify(stored_hash, secret)
    except (VerificationError, InvalidHashError):
        return False
    if len(_verified) >= VERIFIED_CACHE_SIZE:
        _verified.clear()  # rare; the cost is one argon2 run per active token
    _verified[token_id] = (stored_hash, digest)
    return True


def create_user(session: Session, name: str, role: Role) -> tuple[User, str]:
    """Add a contributor; returns the row and the token (the only time it exists in clear)."""
    if role not in ROLES:
        raise HubError(422, "bad_role", f"role must be one of {', '.join(ROLES)}")
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise HubError(409, "user_exists", f"user {name!r} already exists")
    token, token_id, token_hash = new_token()
    user = User(
        name=name,
        role=role,
        pseudonym="donor-" + secrets.token_hex(4),
        token_id=token_id,
        token_hash=token_hash,
    )
    session.add(user)
    session.flush()
    return user, token


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request; routes commit explicitly, anything else rolls back."""
    with request.app.state.db.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_user(request: Request, session: SessionDep) -> User:
    """The contributor behind `Authorization: Bearer …`: 401 without a valid token, 429 over its rate."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HubError(401, "unauthorized", "this request needs 'Authorization: Bearer <token>'")
    parts = split_token(token.strip())
    if parts is None:
        raise HubError(401, "unauthorized", "malformed token: expected fedem_<id>.<secret>")
    token_id, secret = parts
    request.app.state.rate_limits.take(token_id)
    user = session.scalar(select(User).where(User.token_id == token_id))
    if user is None or not verify_secret(token_id, secret, user.token_hash):
        raise HubError(401, "unauthorized", "unknown or revoked token")
    # End the read transaction, so the connection goes back to the pool while the route waits for a
    # worker thread; holding it there deadlocked the pool under 200 donors (docs/reliability.md).
    session.commit()
    return user


def maintainer(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role != "maintainer":
        raise HubError(403, "forbidden", "only maintainers may do this")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
Maintainer = Annotated[User, Depends(maintainer)]
