"""The hub's database schema (SQLAlchemy 2). Invariants live here, in the database itself:

- a revision number is unique per repo, and so is its 40-hex commit id;
- **at most one live lease per adapter**: a partial unique index on `leases.repo_id` over rows
  whose `ended_at` is NULL, so the guarantee holds with several server processes and on both
  SQLite and PostgreSQL;
- files point at blobs by sha256 (content addressing), and a blob row exists only once its bytes
  were verified and renamed into the store;
- **one evaluation per revision** (unique `evaluations.revision_id`): an adapter version is queued
  for server-side evaluation in the transaction that creates it (docs/evaluation.md).
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (SQLite has no time zones), so that
    SQL comparisons such as `expires_at <= now` mean the same on SQLite and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # "donor" | "maintainer"
    pseudonym: Mapped[str] = mapped_column(String(32), unique=True)
    # a token is `fedem_<token_id>.<secret>`; only the secret's argon2 hash is kept (fedem.hub.auth)
    token_id: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Repo(Base):
    __tablename__ = "repos"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)  # "namespace/name"
    kind: Mapped[str] = mapped_column(String(16))  # "model" | "adapter" | "dataset"
    base_repo: Mapped[str | None] = mapped_column(String(128))  # an adapter's base model repo
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    revisions: Mapped[list["Revision"]] = relationship(back_populates="repo", order_by="Revision.number")


class Revision(Base):
    """An immutable version of a repo: a base release (v1, v2, …) or an adapter version."""

    __tablename__ = "revisions"
    __table_args__ = (UniqueConstraint("repo_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    commit: Mapped[str] = mapped_column(String(40), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    base_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))  # the base release trained on
    contributor_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(String(16), default="accepted")  # "accepted" | "pending" | "rejected"
    description: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    repo: Mapped[Repo] = relationship(back_populates="revisions")
    files: Mapped[list["File"]] = relationship(order_by="File.path", cascade="all, delete-orphan")
    contributor: Mapped[User] = relationship(foreign_keys=[contributor_id])

    @property
    def tag(self) -> str:
        return f"v{self.number}"


class Blob(Base):
    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class File(Base):
    __tablename__ = "files"

    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (
        Index(
            "one_live_lease_per_repo",
            "repo_id",
            unique=True,
            sqlite_where=text("ended_at IS NULL"),
            postgresql_where=text("ended_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id"), index=True)
    holder_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    from_revision_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    base_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    ended_at: Mapped[datetime | None] = mapped_column(default=None)
    outcome: Mapped[str | None] = mapped_column(String(16), default=None)  # "pushed" | "released" | "expired"

    repo: Mapped[Repo] = relationship()
    holder: Mapped[User] = relationship()


class AuditEvent(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(32))
    repo: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


EVALUATION_STATES = ("queued", "running", "done", "failed")


class Evaluation(Base):
    """The server-side evaluation of one submitted adapter version (docs/evaluation.md).

    `state`: queued → running (claimed by one worker, atomically) → done, or failed (an error; the
    revision stays pending). `scores`: `{candidate, previous, base}`, each
    `{bpb: {lang: x}, ppl: {lang: x}, chrf: {pair: x}, bleu: {pair: x}}` (`previous` null when the
    adapter had no accepted version), plus `screening` and `task`. `decision` is set once decided.
    """

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    revision_id: Mapped[int] = mapped_column(ForeignKey("revisions.id"), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # queued|running|done|failed
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[str | None] = mapped_column(String(16), default=None)  # "accepted" | "rejected"
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(128), default=None)

    revision: Mapped[Revision] = relationship()
