"""Repos and their history: create, list, show, log."""

from fastapi import APIRouter
from sqlalchemy import select

from fedem.hub.auth import Maintainer, SessionDep
from fedem.hub.errors import HubError
from fedem.hub.leases import audit
from fedem.hub.models import Repo, Revision
from fedem.hub.repos import check_repo_name, get_repo, head
from fedem.hub.schemas import RepoCreate, RepoPublic, RevisionPublic, repo_public, revision_public

router = APIRouter(tags=["repos"])


def _public(session: SessionDep, repo: Repo) -> RepoPublic:
    newest = head(session, repo)
    return repo_public(repo, newest.tag if newest else None)


@router.post("/api/repos", status_code=201, response_model=RepoPublic)
def create_repo(body: RepoCreate, session: SessionDep, user: Maintainer) -> RepoPublic:
    """Create a model, adapter or dataset repo (maintainers)."""
    name = check_repo_name(body.name)
    if session.scalar(select(Repo).where(Repo.name == name)) is not None:
        raise HubError(409, "repo_exists", f"repo {name!r} already exists")
    if body.kind == "adapter" and body.base_repo is not None:
        base = get_repo(session, body.base_repo)
        if base.kind != "model":
            raise HubError(422, "bad_base_repo", f"{base.name} is not a model repo")
    repo = Repo(name=name, kind=body.kind, base_repo=body.base_repo, created_by=user.id)
    session.add(repo)
    audit(session, user, "create_repo", name, kind=body.kind)
    session.commit()
    return _public(session, repo)


@router.get("/api/repos", response_model=list[RepoPublic])
def list_repos(session: SessionDep) -> list[RepoPublic]:
    return [_public(session, repo) for repo in session.scalars(select(Repo).order_by(Repo.name)).all()]


@router.get("/api/repos/{namespace}/{name}", response_model=RepoPublic)
def show_repo(namespace: str, name: str, session: SessionDep) -> RepoPublic:
    return _public(session, get_repo(session, f"{namespace}/{name}"))


@router.get("/api/repos/{namespace}/{name}/log", response_model=list[RevisionPublic])
def repo_log(namespace: str, name: str, session: SessionDep) -> list[RevisionPublic]:
    """Every revision, newest first, with its lineage (parent, base release, contributor, metrics)."""
    repo = get_repo(session, f"{namespace}/{name}")
    revisions = sorted(repo.revisions, key=lambda r: r.number, reverse=True)
    return [
        revision_public(
            r,
            session.get(Revision, r.parent_id) if r.parent_id else None,
            session.get(Revision, r.base_id) if r.base_id else None,
        )
        for r in revisions
    ]
