"""The hub's invariants, checked from its database and its artifact store (docs/reliability.md).

Run after a crash, a restore or a load test; each check returns human-readable problems, `[]` when
the hub is sound:

- `check_store`: every file row points at a blob row, and every blob row at bytes in the store of
  its recorded size whose sha256 is its name — nothing visible without its bytes;
- `check_history`: at most one live lease per adapter; each repo's revision numbers are 1..N, each
  once; an adapter has exactly one version per lease that ended in a push (no lost or duplicated
  version: the push and the lease end are one transaction);
- `check_acknowledged`: every push a client saw acknowledged is there, with the files it sent;
- `overlapping_holds`: what clients saw — no two of them holding one adapter at the same time.
"""

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fedem.hub.models import Blob, File, Lease, Repo, Revision
from fedem.hub.store import ArtifactStore

CHUNK = 1 << 20


@dataclass(frozen=True)
class Acknowledged:
    """A push the hub answered 201 to: the revision's commit and the files sent (path → sha256)."""

    repo: str
    commit: str
    files: dict[str, str]


@dataclass(frozen=True)
class Hold:
    """A time span in which one client knew it held a lease on `repo`: from receiving the 201 to
    sending the push or release that ends it, on one clock (the span lies inside the lease's life)."""

    repo: str
    start: float
    end: float


def _sha256(store: ArtifactStore, sha256: str) -> str:
    digest = hashlib.sha256()
    with store.open(sha256) as blob:
        while chunk := blob.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_store(session: Session, store: ArtifactStore, hash_blobs: bool = True) -> list[str]:
    """Files → blob rows → bytes of the right size (and, with `hash_blobs`, the right sha256)."""
    problems = [
        f"file {path!r} of revision {revision_id} points at blob {sha[:12]}, which has no row"
        for revision_id, path, sha in session.execute(
            select(File.revision_id, File.path, File.sha256)
            .outerjoin(Blob, Blob.sha256 == File.sha256)
            .where(Blob.sha256.is_(None))
        ).tuples()
    ]
    for blob in session.scalars(select(Blob)):
        if not store.exists(blob.sha256):
            problems.append(f"blob {blob.sha256[:12]} has a row but no bytes in the store")
        elif (size := store.fs.size(store.path(blob.sha256))) != blob.size:
            problems.append(f"blob {blob.sha256[:12]} has {size} bytes, its row says {blob.size}")
        elif hash_blobs and _sha256(store, blob.sha256) != blob.sha256:
            problems.append(f"blob {blob.sha256[:12]}'s bytes do not hash to its name")
    return problems


def check_history(session: Session) -> list[str]:
    """Live leases, revision numbering, and one adapter version per pushed lease."""
    problems = [
        f"{name} has {count} live leases"
        for name, count in session.execute(
            select(Repo.name, func.count())
            .join(Lease, Lease.repo_id == Repo.id)
            .where(Lease.ended_at.is_(None))
            .group_by(Repo.name)
            .having(func.count() > 1)
        ).tuples()
    ]
    numbers: dict[str, list[int]] = defaultdict(list)
    for name, number in session.execute(select(Repo.name, Revision.number).join(Revision.repo)).tuples():
        numbers[name].append(number)
    for name, found in numbers.items():
        if sorted(found) != list(range(1, len(found) + 1)):
            problems.append(f"{name}'s revision numbers are not 1..{len(found)}: {sorted(found)}")
    pushed = dict(
        session.execute(
            select(Repo.name, func.count())
            .join(Lease, Lease.repo_id == Repo.id)
            .where(Lease.outcome == "pushed")
            .group_by(Repo.name)
        )
        .tuples()
        .all()
    )
    for name in session.scalars(select(Repo.name).where(Repo.kind == "adapter")):
        versions, leases = len(numbers.get(name, [])), pushed.get(name, 0)
        if versions != leases:
            problems.append(f"{name} has {versions} versions but {leases} leases ended in a push")
    return problems


def check_acknowledged(
    session: Session, store: ArtifactStore, acknowledged: Iterable[Acknowledged]
) -> list[str]:
    """Every acknowledged push is a revision of its repo with exactly the files sent, bytes present."""
    problems = []
    for push in acknowledged:
        revision = session.scalar(select(Revision).where(Revision.commit == push.commit))
        if revision is None or revision.repo.name != push.repo:
            problems.append(f"acknowledged push {push.repo}@{push.commit[:8]} is missing")
            continue
        files = {f.path: f.sha256 for f in revision.files}
        if files != push.files:
            problems.append(f"{push.repo}@{push.commit[:8]} holds other files than were pushed")
        problems += [
            f"{push.repo}@{push.commit[:8]}: {path} has no bytes in the store"
            for path, sha in files.items()
            if not store.exists(sha)
        ]
    return problems


def overlapping_holds(holds: Iterable[Hold]) -> list[str]:
    """Pairs of holds of one adapter that overlap in time: two clients both holding its lease."""
    by_repo: dict[str, list[Hold]] = defaultdict(list)
    for hold in holds:
        by_repo[hold.repo].append(hold)
    problems = []
    for repo, spans in by_repo.items():
        spans.sort(key=lambda h: h.start)
        for before, after in zip(spans, spans[1:], strict=False):
            if after.start < before.end:
                problems.append(f"{repo}: two clients held its lease at once ({after.start:.3f} s)")
    return problems
