"""Leases: the lock that keeps two donors from training the same adapter at once.

Rules (docs/hub.md):
- at most one live lease per adapter — enforced by the partial unique index
  `one_live_lease_per_repo`, so two processes racing both try to insert and exactly one commits;
- a lease lives `lease_ttl_s` (3 h by default); every check compares `expires_at` with the time of
  the request, so an expired lease is never honoured, even between sweeps;
- pushing a version needs the caller's live lease on that adapter and ends it in the same
  transaction as the new revision; a push after expiry gets 410 and stores nothing;
- the holder (or a maintainer) can release without pushing; the sweeper marks expired leases ended;
- every lease event is written to the audit log;
- `acquire_open` leases "the open adapter that most needs work" for a donor who names none.
"""

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fedem.hub.errors import HubError
from fedem.hub.models import AuditEvent, Lease, Repo, Revision, User, utcnow
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


def open_adapters(session: Session, among: list[str] | None = None) -> list[Repo]:
    """Adapters a donor could start on now, the one that most needs work first.

    Open means: no live lease, and a base release to train on (an adapter whose base repo has no
    accepted revision cannot be trained yet). Most need of work means the fewest accepted versions;
    ties go to the adapter whose newest accepted version is oldest (never-trained ones first), then
    to the name, so the order is stable. `among` restricts the choice to those names (a donor's
    client passes the adapters its data fits).
    """
    accepted = {
        repo_id: (count, newest)
        for repo_id, count, newest in session.execute(
            select(Revision.repo_id, func.count(), func.max(Revision.created_at))
            .where(Revision.status == "accepted")
            .group_by(Revision.repo_id)
        ).tuples()
    }
    leased = set(session.scalars(select(Lease.repo_id).where(Lease.ended_at.is_(None))))
    query = select(Repo).where(Repo.kind == "adapter")
    if among is not None:
        query = query.where(Repo.name.in_(among))
    released = {repo.name for repo in session.scalars(select(Repo).where(Repo.id.in_(list(accepted))))}
    candidates = [
        repo
        for repo in session.scalars(query)
        if repo.id not in leased and repo.base_repo is not None and repo.base_repo in released
    ]
    oldest = datetime.min.replace(tzinfo=UTC)

    def need(repo: Repo) -> tuple[int, datetime, str]:
        count, newest = accepted.get(repo.id, (0, None))
        return count, newest or oldest, repo.name

    return sorted(candidates, key=need)


def acquire_open(session: Session, user: User, ttl_s: int, among: list[str] | None = None) -> Lease:
    """Lease the open adapter that most needs work (`open_adapters`), or 404 `no_open_adapter`.

    Another donor may take the first choice between the listing and the insert; the unique index
    makes that a 409 from `acquire`, and the next candidate is tried.
    """
    expire_due(session)
    for repo in open_adapters(session, among):
        try:
            return acquire(session, repo, user, ttl_s)
        except HubError as err:
            if err.status != 409:
                raise
    scope = f" among {len(among)} named adapter(s)" if among is not None else ""
    raise HubError(404, "no_open_adapter", f"no adapter{scope} is open for training right now")


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
