"""Finding repos and revisions by the names clients use.

A revision reference is a tag (`v3`), a 40-hex commit id, or `main` — the newest *accepted*
revision, which is also what a new lease starts from.
"""

import hashlib
import json
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedem.hub.errors import HubError
from fedem.hub.models import File, Repo, Revision

REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}/[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_repo_name(name: str) -> str:
    if not REPO_NAME.match(name) or ".." in name:
        raise HubError(
            422, "bad_repo_name", f"repo names look like 'namespace/name' (letters, digits, ._-): {name!r}"
        )
    return name


def get_repo(session: Session, name: str) -> Repo:
    repo = session.scalar(select(Repo).where(Repo.name == name))
    if repo is None:
        raise HubError(404, "repo_not_found", f"no repo {name!r}").hf("RepoNotFound")
    return repo


def head(session: Session, repo: Repo) -> Revision | None:
    """The newest accepted revision of a repo."""
    return session.scalar(
        select(Revision)
        .where(Revision.repo_id == repo.id, Revision.status == "accepted")
        .order_by(Revision.number.desc())
        .limit(1)
    )


def get_revision(session: Session, repo: Repo, ref: str) -> Revision:
    """Resolve `main`, `vN` or a commit id within `repo`."""
    query = select(Revision).where(Revision.repo_id == repo.id)
    found: Revision | None
    if ref == "main":
        found = head(session, repo)
    elif re.fullmatch(r"v\d+", ref):
        found = session.scalar(query.where(Revision.number == int(ref[1:])))
    elif re.fullmatch(r"[0-9a-f]{40}", ref):
        found = session.scalar(query.where(Revision.commit == ref))
    else:
        found = None
    if found is None:
        raise HubError(404, "revision_not_found", f"{repo.name} has no revision {ref!r}").hf(
            "RevisionNotFound"
        )
    return found


def commit_id(repo: str, number: int, files: list[File], parent: str | None) -> str:
    """A 40-hex id for a revision, derived from its content (the shape HF clients expect)."""
    manifest = {
        "repo": repo,
        "number": number,
        "parent": parent,
        "files": [[f.path, f.sha256] for f in files],
    }
    return hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
