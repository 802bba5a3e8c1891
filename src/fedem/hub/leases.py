"""Leases: the lock that keeps two donors from training the same adapter at once.

Rules (docs/hub.md):
- at most one live lease per adapter — enforced by the partial unique index
  `one_live_lease_per_repo`, so two processes racing both try to insert and exactly one commits;
- a lease lives `lease_ttl_s` (3 h by default); every check compares `expires_at` with the time of
  the request, so an expired lease is never honoured, even between sweeps;
- pushing a version needs the caller's live lease on that adapter and ends it in the same
  transaction as the new revision; a push after expiry gets 410 and stores nothing;
- the holder (or a maintainer) can release without pushing; the sweeper marks expired leases ended;
- every lease event is written to the audit log.
"""

import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedem.hub.errors import HubError
from fedem.hub.models import AuditEvent, Lease, Repo, User, utcnow
from fedem.hub.repos import get_repo, head


def audit(session: Session, actor: User | None, action: str, repo: str | None, **detail: object) -> None:
    session.add(AuditEvent(actor_id=actor.id if actor else None, action=action, repo=repo, detail=detail))


def live_lease(session: Session, repo: Repo) -> Lease | None:
    return session.scalar(select(Lease).where(Lease.repo_id == repo.id, Lease.ended_at.is_(None)))


def expire_due(session: Session, now: datetime | None = None) -> int:
    """End every lease whose time is up (the sweeper's job, also done before each acquire)."""
    now = now or utcnow()
    due = session.scalars(select(Lease).where(Lease.ended_at.is_(None), Lease.expires_at <= now)).all()
    for lease in due:
        ended = session.execute(
            update(Lease)
            .where(Lease.id == lease.id, Lease.ended_at.is_(None))
            .values(ended_at=now, outcome="expired")
        )
        if ended.rowcount:  # type: ignore[attr-defined]
            audit(
                session, None, "lease_expired", lease.repo.name, lease=lease.id, holder=lease.holder.pseudonym
            )
    session.commit()
    return len(due)


def acquire(session: Session, repo: Repo, user: User, ttl_s: int) -> Lease:
    """Lease `repo` to `user`, or raise 409 naming the (pseudonymous) holder and the expiry."""
    if repo.kind != "adapter":
        raise HubError(422, "not_an_adapter", f"{repo.name} is a {repo.kind} repo; only adapters are leased")
    now = utcnow()
    expire_due(session, now)
    start = head(session, repo)
    base = head(session, get_repo(session, repo.base_repo)) if repo.base_repo else None
    lease = Lease(
        id=uuid.uuid4().hex,
        repo_id=repo.id,
        holder_id=user.id,
        from_revision_id=start.id if start else None,
        base_id=base.id if base else None,
        started_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    session.add(lease)
    audit(session, user, "lease", repo.name, lease=lease.id, expires_at=lease.expires_at.isoformat())
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        holder = live_lease(session, repo)
        raise HubError(
            409,
            "leased",
            f"{repo.name} is leased" + (f" until {holder.expires_at.isoformat()}" if holder else ""),
            holder=holder.holder.pseudonym if holder else None,
            expires_at=holder.expires_at.isoformat() if holder else None,
        ) from None
    return lease


def _owned(session: Session, lease_id: str, user: User) -> Lease:
    lease = session.get(Lease, lease_id)
    if lease is None:
        raise HubError(404, "lease_not_found", f"no lease {lease_id!r}")
    if lease.holder_id != user.id and user.role != "maintainer":
        raise HubError(403, "forbidden", "this lease is held by someone else")
    return lease


def end_for_push(session: Session, lease_id: str | None, repo: Repo, user: User) -> Lease:
    """Check and end the caller's live lease on `repo` for a push (commit with the new revision)."""
    if lease_id is None:
        raise HubError(409, "lease_required", f"pushing to {repo.name} needs your live lease on it")
    lease = _owned(session, lease_id, user)
    if lease.repo_id != repo.id or lease.holder_id != user.id:
        raise HubError(409, "lease_required", f"lease {lease_id} is not your lease on {repo.name}")
    now = utcnow()
    if lease.outcome == "expired" or (lease.ended_at is None and lease.expires_at <= now):
        raise HubError(410, "lease_expired", f"lease {lease_id} expired at {lease.expires_at.isoformat()}")
    ended = session.execute(
        update(Lease)
        .where(Lease.id == lease.id, Lease.ended_at.is_(None), Lease.expires_at > now)
        .values(ended_at=now, outcome="pushed")
    )
    if not ended.rowcount:  # type: ignore[attr-defined]
        raise HubError(409, "lease_ended", f"lease {lease_id} already ended ({lease.outcome})")
    audit(session, user, "lease_pushed", repo.name, lease=lease.id)
    return lease


def release(session: Session, lease_id: str, user: User) -> Lease:
    """End a lease without pushing (its holder, or a maintainer)."""
    lease = _owned(session, lease_id, user)
    ended = session.execute(
        update(Lease)
        .where(Lease.id == lease.id, Lease.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome="released")
    )
    if not ended.rowcount:  # type: ignore[attr-defined]
        raise HubError(409, "lease_ended", f"lease {lease_id} already ended ({lease.outcome})")
    audit(session, user, "lease_released", lease.repo.name, lease=lease.id)
    session.commit()
    session.refresh(lease)
    return lease
