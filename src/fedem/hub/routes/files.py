"""Uploading artifacts and publishing revisions.

A push is two steps, like git: `PUT /api/blobs/{sha256}` for each file the hub lacks (`HEAD` tells),
then `POST /api/repos/{ns}/{name}/revisions` with the manifest (paths → sha256). The revision, the
end of the donor's lease and the audit entry are one database transaction, so a refused or
interrupted push leaves the repo exactly as it was.

An adapter version is published `pending` with a `queued` evaluation in that same transaction: it
becomes the head only once the evaluation worker accepts it (docs/evaluation.md). Model and dataset
revisions, published by maintainers, are accepted at once.
"""

from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from fedem.hub import leases, validate
from fedem.hub.auth import CurrentUser, SessionDep
from fedem.hub.errors import HubError
from fedem.hub.models import Blob, Evaluation, File, Lease, Repo, Revision, User, utcnow
from fedem.hub.repos import commit_id, get_repo, get_revision, head
from fedem.hub.schemas import RevisionCreate, RevisionPublic, revision_public
from fedem.hub.settings import HubSettings
from fedem.hub.store import ArtifactStore, check_sha256

router = APIRouter(tags=["files"])


@router.head("/api/blobs/{sha256}")
def blob_exists(sha256: str, session: SessionDep) -> Response:
    """200 (with `X-Blob-Size`) if the hub holds this blob, so a client uploads only what is new."""
    blob = session.get(Blob, check_sha256(sha256))
    if blob is None:
        raise HubError(404, "blob_not_found", f"no blob {sha256}")
    return Response(status_code=200, headers={"X-Blob-Size": str(blob.size)})


@router.put("/api/blobs/{sha256}", status_code=201)
async def upload_blob(sha256: str, request: Request, session: SessionDep, user: CurrentUser) -> JSONResponse:
    """Stream one artifact in. The declared size is `?size=` or else `Content-Length`.

    201 `{"sha256", "size", "created": true}`; 200 with `"created": false` if it was already here;
    400 `hash_mismatch`/`size_mismatch` and 413 `too_large` store nothing."""
    check_sha256(sha256)
    size = _declared_size(request)
    await run_in_threadpool(require_upload_right, session, user)
    existing = await run_in_threadpool(session.get, Blob, sha256)
    if existing is not None:
        if existing.size != size:
            raise HubError(400, "size_mismatch", f"blob {sha256} has {existing.size} bytes, not {size}")
        async for _chunk in request.stream():  # drain, so the connection stays usable
            pass
        return JSONResponse({"sha256": sha256, "size": size, "created": False}, status_code=200)
    settings: HubSettings = request.app.state.settings
    try:
        await request.app.state.store.ingest(request.stream(), sha256, size, settings.max_file_bytes)
    except ClientDisconnect:  # the temp file is gone already; answer quietly instead of logging a 500
        raise HubError(
            400, "upload_interrupted", f"the upload of {sha256} was cut off; nothing stored"
        ) from None
    await run_in_threadpool(_record_blob, session, sha256, size)
    return JSONResponse({"sha256": sha256, "size": size, "created": True}, status_code=201)


@router.post("/api/repos/{namespace}/{name}/revisions", status_code=201, response_model=RevisionPublic)
def push_revision(
    namespace: str, name: str, body: RevisionCreate, request: Request, session: SessionDep, user: CurrentUser
) -> RevisionPublic:
    """Publish a new revision of uploaded blobs (adapters: with your live lease; others: maintainers)."""
    state = request.app.state
    return publish(session, state.store, state.settings, f"{namespace}/{name}", user, body)


def _declared_size(request: Request) -> int:
    raw = request.query_params.get("size") or request.headers.get("content-length")
    if raw is None:
        raise HubError(411, "length_required", "declare the size: a Content-Length header or ?size=")
    if not raw.isdigit():
        raise HubError(400, "bad_size", f"not a size in bytes: {raw!r}")
    return int(raw)


def require_upload_right(session: Session, user: User) -> None:
    """Maintainers upload freely; a donor only while holding a live lease. So a donor's push without
    a lease, or after it expired, is refused at its first byte and stores nothing."""
    if user.role == "maintainer":
        return
    now = utcnow()
    held = session.scalars(
        select(Lease).where(Lease.holder_id == user.id).order_by(Lease.started_at.desc()).limit(20)
    ).all()
    if any(lease.ended_at is None and lease.expires_at > now for lease in held):
        return
    if held and (held[0].outcome == "expired" or held[0].ended_at is None):
        raise HubError(410, "lease_expired", f"your lease {held[0].id} expired; take a new one to upload")
    raise HubError(409, "lease_required", "donors upload artifacts only while holding a live lease")


def _record_blob(session: Session, sha256: str, size: int) -> None:
    """The row that makes a blob visible, written only after its bytes were renamed into place."""
    session.add(Blob(sha256=sha256, size=size))
    try:
        session.commit()
    except IntegrityError:  # the same content uploaded concurrently: identical bytes, already recorded
        session.rollback()


def publish(
    session: Session,
    store: ArtifactStore,
    settings: HubSettings,
    repo_name: str,
    user: User,
    body: RevisionCreate,
) -> RevisionPublic:
    """Check everything, then add the revision, end the lease and audit in one commit."""
    repo = get_repo(session, repo_name)
    validate.check_manifest([f.path for f in body.files], settings.allowed_suffixes)
    lease: Lease | None = None
    if repo.kind == "adapter":
        lease = leases.end_for_push(session, body.lease_id, repo, user)
    elif user.role != "maintainer":
        raise HubError(403, "forbidden", f"only maintainers publish to the {repo.kind} repo {repo.name}")
    shas = {f.sha256 for f in body.files}
    sizes = {b.sha256: b.size for b in session.scalars(select(Blob).where(Blob.sha256.in_(shas)))}
    missing = sorted(shas - sizes.keys())
    if missing:
        raise HubError(422, "missing_blobs", f"{len(missing)} blob(s) not uploaded yet", missing=missing)
    for entry in body.files:
        if sizes[entry.sha256] != entry.size:
            raise HubError(
                422,
                "size_mismatch",
                f"{entry.path!r}: blob has {sizes[entry.sha256]} bytes, not {entry.size}",
            )
        validate.check_content(entry.path, partial(store.open, entry.sha256), entry.size)
    parent = head(session, repo)
    base = _base(session, repo, body.base, lease)
    number = (session.scalar(select(func.max(Revision.number)).where(Revision.repo_id == repo.id)) or 0) + 1
    files = [
        File(path=f.path, sha256=f.sha256, size=f.size) for f in sorted(body.files, key=lambda f: f.path)
    ]
    revision = Revision(
        repo=repo,
        number=number,
        commit=commit_id(repo.name, number, files, parent.commit if parent else None),
        parent_id=parent.id if parent else None,
        base_id=base.id if base else None,
        contributor=user,
        status="pending" if repo.kind == "adapter" else "accepted",
        description=body.description,
        metrics=body.metrics,
        files=files,
    )
    session.add(revision)
    if repo.kind == "adapter":
        session.add(Evaluation(revision=revision, state="queued"))
    leases.audit(
        session,
        user,
        "push",
        repo.name,
        tag=revision.tag,
        commit=revision.commit,
        lease=lease.id if lease else None,
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HubError(409, "conflict", f"another push to {repo.name} landed first; retry") from None
    return revision_public(revision, parent, base)


def _base(session: Session, repo: Repo, ref: str | None, lease: Lease | None) -> Revision | None:
    """The base release a revision was trained on: `repo@tag`, or for an adapter its lease's base."""
    if ref is None:
        return session.get(Revision, lease.base_id) if lease and lease.base_id else None
    base_repo, at, tag = ref.partition("@")
    if not at or not tag:
        raise HubError(422, "bad_base", f"base looks like 'namespace/name@v3', not {ref!r}")
    if repo.base_repo is not None and base_repo != repo.base_repo:
        raise HubError(422, "bad_base", f"{repo.name} is trained on {repo.base_repo}, not {base_repo}")
    return get_revision(session, get_repo(session, base_repo), tag)
