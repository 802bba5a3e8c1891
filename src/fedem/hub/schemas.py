"""Request and response bodies of the hub API, kept apart from the ORM tables.

Single-blind review: while an adapter version awaits its evaluation (status `pending`, no decision
yet) every public view names its contributor by pseudonym; the name appears once it is decided.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedem.hub.models import Evaluation, Lease, Repo, Revision, User


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RepoCreate(Strict):
    name: str = Field(description="namespace/name, e.g. seshu/adapter-en-hi")
    kind: Literal["model", "adapter", "dataset"]
    base_repo: str | None = Field(default=None, description="an adapter's base model repo")


class RepoPublic(BaseModel):
    name: str
    kind: str
    base_repo: str | None
    head: str | None = Field(description="tag of the newest accepted revision")
    revisions: int
    created_at: datetime


class FileEntry(Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class RevisionCreate(Strict):
    files: list[FileEntry] = Field(min_length=1)
    description: str = ""
    metrics: dict[str, Any] = {}
    lease_id: str | None = None
    base: str | None = Field(default=None, description="base release trained on, as repo@tag")


class RevisionPublic(BaseModel):
    repo: str
    tag: str
    commit: str
    parent: str | None
    base: str | None
    contributor: str
    status: str
    description: str
    metrics: dict[str, Any]
    created_at: datetime
    files: list[FileEntry]


class LeasePublic(BaseModel):
    lease_id: str
    repo: str
    holder: str
    from_revision: str | None
    base: str | None
    started_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    outcome: str | None


class EvaluationPublic(BaseModel):
    id: int
    repo: str
    tag: str
    commit: str
    base: str | None
    contributor: str = Field(description="a pseudonym until the version is decided, then the name")
    state: str = Field(description="queued | running | done | failed")
    decision: str | None = Field(description="accepted | rejected, once decided")
    reason: str | None
    scores: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None


class DecisionCreate(Strict):
    decision: Literal["accepted", "rejected"]
    reason: str = Field(min_length=1, max_length=2000, description="why; kept with the decision and audited")


class UserCreate(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    role: Literal["donor", "maintainer"]


class UserCreated(BaseModel):
    name: str
    role: str
    pseudonym: str
    token: str = Field(description="shown once; only its hash is stored")


def repo_public(repo: Repo, head_tag: str | None) -> RepoPublic:
    return RepoPublic(
        name=repo.name,
        kind=repo.kind,
        base_repo=repo.base_repo,
        head=head_tag,
        revisions=len(repo.revisions),
        created_at=repo.created_at,
    )


def _ref(revision: Revision | None) -> str | None:
    return f"{revision.repo.name}@{revision.tag}" if revision else None


def shown_contributor(user: User, decided: bool) -> str:
    """Single-blind: the pseudonym until a decision is made, the name afterwards."""
    return user.name if decided else user.pseudonym


def revision_public(revision: Revision, parent: Revision | None, base: Revision | None) -> RevisionPublic:
    return RevisionPublic(
        repo=revision.repo.name,
        tag=revision.tag,
        commit=revision.commit,
        parent=parent.tag if parent else None,
        base=_ref(base),
        contributor=shown_contributor(revision.contributor, revision.status != "pending"),
        status=revision.status,
        description=revision.description,
        metrics=revision.metrics,
        created_at=revision.created_at,
        files=[FileEntry(path=f.path, sha256=f.sha256, size=f.size) for f in revision.files],
    )


def lease_public(lease: Lease, start: Revision | None, base: Revision | None) -> LeasePublic:
    return LeasePublic(
        lease_id=lease.id,
        repo=lease.repo.name,
        holder=lease.holder.pseudonym,
        from_revision=start.tag if start else None,
        base=_ref(base),
        started_at=lease.started_at,
        expires_at=lease.expires_at,
        ended_at=lease.ended_at,
        outcome=lease.outcome,
    )


def evaluation_public(evaluation: Evaluation, base: Revision | None) -> EvaluationPublic:
    revision = evaluation.revision
    return EvaluationPublic(
        id=evaluation.id,
        repo=revision.repo.name,
        tag=revision.tag,
        commit=revision.commit,
        base=_ref(base),
        contributor=shown_contributor(revision.contributor, evaluation.decision is not None),
        state=evaluation.state,
        decision=evaluation.decision,
        reason=evaluation.reason,
        scores=evaluation.scores,
        created_at=evaluation.created_at,
        started_at=evaluation.started_at,
        finished_at=evaluation.finished_at,
        worker=evaluation.worker,
    )
