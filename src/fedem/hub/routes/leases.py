"""Leasing adapters: `POST /api/adapters/{repo}/lease`, `POST /api/adapters/lease` (the hub picks),
`DELETE /api/leases/{id}`, listings."""

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from fedem.hub import leases
from fedem.hub.auth import CurrentUser, Maintainer, SessionDep
from fedem.hub.models import AuditEvent, Lease, Revision
from fedem.hub.repos import get_repo
from fedem.hub.schemas import LeasePublic, lease_public

router = APIRouter(tags=["leases"])


class LeaseAny(BaseModel):
    """`POST /api/adapters/lease` body (optional): `among` limits the choice to these adapters."""

    model_config = ConfigDict(extra="forbid")

    among: list[str] | None = Field(default=None, max_length=1000)


def _public(session: SessionDep, lease: Lease) -> LeasePublic:
    start = session.get(Revision, lease.from_revision_id) if lease.from_revision_id else None
    base = session.get(Revision, lease.base_id) if lease.base_id else None
    return lease_public(lease, start, base)


@router.post("/api/adapters/{namespace}/{name}/lease", status_code=201, response_model=LeasePublic)
def lease_adapter(
    namespace: str, name: str, request: Request, session: SessionDep, user: CurrentUser
) -> LeasePublic:
    """Lock an adapter for training; 409 names the holder and the expiry if it is taken."""
    repo = get_repo(session, f"{namespace}/{name}")
    lease = leases.acquire(session, repo, user, request.app.state.settings.lease_ttl_s)
    return _public(session, lease)


@router.post("/api/adapters/lease", status_code=201, response_model=LeasePublic)
def lease_any_adapter(
    request: Request, session: SessionDep, user: CurrentUser, body: LeaseAny | None = None
) -> LeasePublic:
    """Lease the open adapter that most needs work (fewest accepted versions); 404 if none is open."""
    among = body.among if body is not None else None
    lease = leases.acquire_open(session, user, request.app.state.settings.lease_ttl_s, among)
    return _public(session, lease)


@router.delete("/api/leases/{lease_id}", response_model=LeasePublic)
def release_lease(lease_id: str, session: SessionDep, user: CurrentUser) -> LeasePublic:
    """Give a lease back without pushing (its holder or a maintainer)."""
    return _public(session, leases.release(session, lease_id, user))


@router.get("/api/leases", response_model=list[LeasePublic])
def live_leases(session: SessionDep, _user: Maintainer) -> list[LeasePublic]:
    """Leases not yet ended (maintainers)."""
    rows = session.scalars(select(Lease).where(Lease.ended_at.is_(None)).order_by(Lease.started_at)).all()
    return [_public(session, lease) for lease in rows]


@router.get("/api/audit")
def audit_log(session: SessionDep, _user: Maintainer, limit: int = 200) -> list[dict[str, object]]:
    """The newest audit events (maintainers)."""
    newest = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(max(1, min(limit, 5000)))
    rows = session.scalars(newest).all()
    return [
        {
            "at": e.at.isoformat(),
            "actor_id": e.actor_id,
            "action": e.action,
            "repo": e.repo,
            "detail": e.detail,
        }
        for e in rows
    ]
