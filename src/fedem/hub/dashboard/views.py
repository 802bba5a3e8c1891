"""What the dashboard shows, read from the hub's database: plain dataclasses, no HTML.

Every view keeps the hub's single-blind rule (`shown_contributor`): an undecided version and a live
lease name a pseudonym, never a person; credits count only decided (accepted) work, so a name's
numbers never move when it submits something still under review.

Bits-per-byte of a release, for the maturity plot, comes from the hub's own evaluation worker where it
has scored that release as the base of a submission (the server's held-out data, the same for every
release), else from the metrics the release was pushed with (`fedem hub release`/`cpt` record `bpb`
per language; a pushed `fedem evaluate` report has it under `language_modelling`).
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from fedem.hub.models import Evaluation, Lease, Repo, Revision, User
from fedem.hub.schemas import shown_contributor
from fedem.languages import LANGUAGES, adapter_shape


@dataclass(frozen=True)
class ReleaseView:
    repo: str
    tag: str
    number: int
    commit: str
    created_at: datetime
    description: str
    bpb: dict[str, float]  # language → bits per byte on held-out text
    bpb_source: str | None  # "hub evaluation" | "release metrics" | None


@dataclass(frozen=True)
class LeaseView:
    holder: str  # a pseudonym, always
    started_at: datetime
    expires_at: datetime
    from_tag: str | None


@dataclass(frozen=True)
class VersionView:
    tag: str
    parent: str | None
    base: str | None  # "repo@vN"
    contributor: str
    status: str
    description: str
    eval_bpb: float | None  # the donor's own held-out bits per byte
    created_at: datetime


@dataclass(frozen=True)
class AdapterView:
    name: str
    base_repo: str | None
    task: str | None
    language: str | None
    head: str | None
    lease: LeaseView | None
    versions: list[VersionView]  # newest first: the relay lineage, each version continuing its parent

    @property
    def accepted(self) -> int:
        return sum(v.status == "accepted" for v in self.versions)


@dataclass(frozen=True)
class QueueRow:
    id: int
    repo: str
    tag: str
    contributor: str
    state: str
    decision: str | None
    reason: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass
class Credit:
    name: str
    accepted: int = 0
    adapters: set[str] = field(default_factory=set)
    languages: set[str] = field(default_factory=set)
    examples: int = 0
    last: datetime | None = None


@dataclass
class LanguageStats:
    code: str
    name: str
    script: str
    adapters: set[str] = field(default_factory=set)
    accepted: int = 0
    donors: set[str] = field(default_factory=set)
    examples: int = 0
    bpb: float | None = None  # newest release with a score for this language


def _ref(session: Session, revision_id: int | None) -> Revision | None:
    return session.get(Revision, revision_id) if revision_id else None


def _metrics_bpb(metrics: dict[str, Any]) -> dict[str, float]:
    if isinstance(metrics.get("bpb"), dict):
        return {k: float(v) for k, v in metrics["bpb"].items()}
    section = metrics.get("language_modelling")
    if isinstance(section, dict):
        return {k: float(v["bpb"]) for k, v in section.items() if isinstance(v, dict) and "bpb" in v}
    return {}


def _hub_scored_bpb(session: Session) -> dict[int, dict[str, float]]:
    """Release id → the base's bpb per language as the evaluation worker measured it (newest wins)."""
    scored: dict[int, dict[str, float]] = {}
    query = (
        select(Evaluation)
        .options(joinedload(Evaluation.revision))
        .where(Evaluation.state == "done")
        .order_by(Evaluation.id)
    )
    for evaluation in session.scalars(query):
        base_scores = (evaluation.scores or {}).get("base") or {}
        if evaluation.revision.base_id is not None and isinstance(base_scores.get("bpb"), dict):
            scored[evaluation.revision.base_id] = {k: float(v) for k, v in base_scores["bpb"].items()}
    return scored


def releases(session: Session) -> dict[str, list[ReleaseView]]:
    """Each model repo's accepted releases, oldest first."""
    scored = _hub_scored_bpb(session)
    out: dict[str, list[ReleaseView]] = {}
    for repo in session.scalars(select(Repo).where(Repo.kind == "model").order_by(Repo.name)):
        rows = []
        for revision in repo.revisions:
            if revision.status != "accepted":
                continue
            bpb, source = scored.get(revision.id), "hub evaluation"
            if not bpb:
                bpb, source = _metrics_bpb(revision.metrics or {}), "release metrics"
            rows.append(
                ReleaseView(
                    repo=repo.name,
                    tag=revision.tag,
                    number=revision.number,
                    commit=revision.commit,
                    created_at=revision.created_at,
                    description=revision.description,
                    bpb=bpb,
                    bpb_source=source if bpb else None,
                )
            )
        out[repo.name] = rows
    return out


def _live_leases(session: Session) -> dict[int, Lease]:
    query = select(Lease).options(joinedload(Lease.holder)).where(Lease.ended_at.is_(None))
    return {lease.repo_id: lease for lease in session.scalars(query)}


def _lease_view(session: Session, lease: Lease) -> LeaseView:
    start = _ref(session, lease.from_revision_id)
    return LeaseView(lease.holder.pseudonym, lease.started_at, lease.expires_at, start.tag if start else None)


def _version(session: Session, revision: Revision) -> VersionView:
    base = _ref(session, revision.base_id)
    parent = _ref(session, revision.parent_id)
    eval_bpb = (revision.metrics or {}).get("eval_bpb")
    return VersionView(
        tag=revision.tag,
        parent=parent.tag if parent else None,
        base=f"{base.repo.name}@{base.tag}" if base else None,
        contributor=shown_contributor(revision.contributor, revision.status != "pending"),
        status=revision.status,
        description=revision.description,
        eval_bpb=float(eval_bpb) if isinstance(eval_bpb, int | float) else None,
        created_at=revision.created_at,
    )


def adapters(session: Session, name: str | None = None) -> list[AdapterView]:
    """Every adapter (or the one called `name`) with its lineage and its live lease, if any.

    A lease counts as live until the hub ends it — requests and the sweeper expire it — so one past
    its `expires_at` shows as expired, not as held."""
    leases = _live_leases(session)
    query = select(Repo).where(Repo.kind == "adapter").order_by(Repo.name)
    if name is not None:
        query = query.where(Repo.name == name)
    views = []
    for repo in session.scalars(query):
        versions = [_version(session, r) for r in sorted(repo.revisions, key=lambda r: -r.number)]
        lease = leases.get(repo.id)
        task, language = adapter_shape(repo.name)
        if task is None:  # a name outside the convention: what its donors reported
            reported = [r.metrics for r in reversed(repo.revisions) if (r.metrics or {}).get("task")]
            task, language = (reported[0]["task"], reported[0].get("language")) if reported else (None, None)
        views.append(
            AdapterView(
                name=repo.name,
                base_repo=repo.base_repo,
                task=task,
                language=language,
                head=next((v.tag for v in versions if v.status == "accepted"), None),
                lease=_lease_view(session, lease) if lease else None,
                versions=versions,
            )
        )
    return views


def queue(session: Session, limit: int = 100) -> list[QueueRow]:
    """The newest evaluations, single-blind."""
    query = (
        select(Evaluation)
        .options(joinedload(Evaluation.revision).joinedload(Revision.contributor))
        .order_by(Evaluation.id.desc())
        .limit(limit)
    )
    return [
        QueueRow(
            id=e.id,
            repo=e.revision.repo.name,
            tag=e.revision.tag,
            contributor=shown_contributor(e.revision.contributor, e.decision is not None),
            state=e.state,
            decision=e.decision,
            reason=e.reason,
            created_at=e.created_at,
            finished_at=e.finished_at,
        )
        for e in session.scalars(query)
    ]


def _accepted_adapter_versions(session: Session) -> list[tuple[Revision, Repo, User]]:
    query = (
        select(Revision, Repo, User)
        .join(Repo, Revision.repo_id == Repo.id)
        .join(User, Revision.contributor_id == User.id)
        .where(Repo.kind == "adapter", Revision.status == "accepted")
        .order_by(Revision.created_at)
    )
    return [tuple(row) for row in session.execute(query)]  # type: ignore[misc]


def _language_and_examples(revision: Revision, repo: Repo) -> tuple[str | None, int]:
    """The data's language (the donor's metrics say it; else the adapter's name) and its example count."""
    metrics = revision.metrics or {}
    language = metrics.get("language") or adapter_shape(repo.name)[1]
    examples = metrics.get("train_examples")
    return language, int(examples) if isinstance(examples, int | float) else 0


def credits(session: Session) -> list[Credit]:
    """Contributors by accepted adapter versions (the work that can reach a release), most first."""
    by_name: dict[str, Credit] = {}
    for revision, repo, user in _accepted_adapter_versions(session):
        credit = by_name.setdefault(user.name, Credit(user.name))
        language, examples = _language_and_examples(revision, repo)
        credit.accepted += 1
        credit.adapters.add(repo.name)
        credit.examples += examples
        if language:
            credit.languages.add(language)
        credit.last = revision.created_at
    return sorted(by_name.values(), key=lambda c: (-c.accepted, c.name))


def language_stats(session: Session, newest: dict[str, list[ReleaseView]]) -> list[LanguageStats]:
    """Per language: adapters, accepted versions, donors and training examples contributed, and the
    newest release's bits per byte."""
    stats = {code: LanguageStats(code, lang.name, lang.script) for code, lang in LANGUAGES.items()}
    for repo in session.scalars(select(Repo).where(Repo.kind == "adapter")):
        language = adapter_shape(repo.name)[1]
        if language in stats:
            stats[language].adapters.add(repo.name)
    for revision, repo, user in _accepted_adapter_versions(session):
        language, examples = _language_and_examples(revision, repo)
        if language not in stats:
            continue
        entry = stats[language]
        entry.adapters.add(repo.name)
        entry.accepted += 1
        entry.donors.add(user.name)
        entry.examples += examples
    latest: dict[str, float] = defaultdict(float)
    for rows in newest.values():
        for row in rows:  # oldest first, so the newest score stays
            latest.update(row.bpb)
    for code, value in latest.items():
        if code in stats:
            stats[code].bpb = value
    return list(stats.values())
