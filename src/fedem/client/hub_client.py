"""`HubClient`: the hub's HTTP API as typed Python calls (docs/hub.md lists the routes).

Artifacts can be larger than memory, so nothing here reads a whole file: pushes hash and upload in
1 MiB chunks, pulls stream into a `.part` file that a later pull resumes with an HTTP Range request.
Blobs are content-addressed, so a push first asks (HEAD) which ones the hub already holds and
uploads only the rest. Only calls that are safe to repeat (GET, HEAD, a blob PUT — the same bytes
under the same hash) are retried after a dropped connection; any call is retried when the connection
could not even be opened, since then nothing reached the server.
"""

import fnmatch
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from fedem.errors import UserError

CHUNK = 1 << 20
RATE_WAIT_CAP_S = 30.0  # the longest a client waits for its rate-limit bucket before a retry
T = TypeVar("T")


class HubAPIError(Exception):
    """The hub answered with an error: its HTTP status, the `error` code and `message` of its JSON body."""

    def __init__(
        self, status: int, code: str, message: str, body: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status, self.code, self.message, self.body = status, code, message, body
        self.retry_after = retry_after  # seconds, from a 429's `Retry-After`


class TransferError(Exception):
    """A download that cannot be trusted: its sha256 differs from the revision's record (the partial
    file is deleted), or the hub named a path outside the destination folder."""


@dataclass
class Transfer:
    """What a push or pull did: the revision (as the hub's log shows it) and the files moved or reused."""

    revision: dict[str, Any]
    moved: list[str] = field(default_factory=list)  # uploaded (push) or downloaded (pull)
    reused: list[str] = field(default_factory=list)  # already on the hub (push) or already in dest (pull)
    bytes: int = 0


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            yield block


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    for block in _chunks(path):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


def _error(response: httpx.Response) -> HubAPIError:
    try:
        body = response.json()
    except ValueError:
        body = None
    raw_wait = response.headers.get("retry-after", "")
    wait = float(raw_wait) if raw_wait.replace(".", "", 1).isdigit() else None
    if isinstance(body, dict) and "error" in body:
        return HubAPIError(response.status_code, str(body["error"]), str(body.get("message", "")), body, wait)
    text = response.text.strip()[:300] or response.reason_phrase
    return HubAPIError(response.status_code, f"http_{response.status_code}", text, body, wait)


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        response.read()
        raise _error(response)
    return response


def _inside(dest: Path, rel: str) -> Path:
    """`dest/rel`, refusing paths that would land outside `dest` (a hub is not trusted with our disk)."""
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise TransferError(f"refusing unsafe path from the hub: {rel!r}")
    return dest.joinpath(*parts)


def collect(folder: Path, include: list[str] | None = None) -> list[tuple[str, Path]]:
    """The files a push sends: (posix path relative to `folder`, path), sorted; hidden files and
    `.part` leftovers are skipped; `include` globs match the relative path or the file name."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(p.startswith(".") for p in rel.split("/")) or rel.endswith(".part"):
            continue
        if include and not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(path.name, g) for g in include):
            continue
        found.append((rel, path))
    return found


class HubClient:
    """One hub, one identity. `token` is needed for writes (`Authorization: Bearer`); reads are open.

    `retries` extra attempts follow a dropped connection, waiting `backoff_s`, then twice, four times
    as long, and a 429 (over the hub's per-token rate limit: the request was not processed, so any
    request may be repeated), waiting what its `Retry-After` says, at most `RATE_WAIT_CAP_S`. The
    underlying `httpx.Client` is `self.http` (tests attach event hooks to it).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.25,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retries, self.backoff_s = retries, backoff_s

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "HubClient":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _retry(self, call: Callable[[], T], idempotent: bool) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except httpx.TransportError as err:
                safe = idempotent or isinstance(err, httpx.ConnectError | httpx.ConnectTimeout)
                if not safe or attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2**attempt)
            except HubAPIError as err:
                if err.status != 429 or attempt == self.retries:
                    raise
                time.sleep(min(err.retry_after or self.backoff_s * 2**attempt, RATE_WAIT_CAP_S))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        idempotent = method in ("GET", "HEAD", "PUT")
        return self._retry(lambda: _check(self.http.request(method, path, **kwargs)), idempotent).json()

    # --- API calls -----------------------------------------------------------------------------------

    def whoami(self) -> dict[str, str]:
        return self._json("GET", "/api/whoami")

    def add_user(self, name: str, role: str) -> dict[str, str]:
        """A new contributor (maintainers); the answer holds their token, which the hub never shows again."""
        return self._json("POST", "/api/users", json={"name": name, "role": role})

    def create_repo(self, name: str, kind: str, base_repo: str | None = None) -> dict[str, Any]:
        return self._json("POST", "/api/repos", json={"name": name, "kind": kind, "base_repo": base_repo})

    def repos(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/repos")

    def repo(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/api/repos/{name}")

    def log(self, name: str) -> list[dict[str, Any]]:
        """Every revision of `name`, newest first, each with its files and their sha256."""
        return self._json("GET", f"/api/repos/{name}/log")

    def revision(self, name: str, revision: str = "main") -> dict[str, Any]:
        """One log entry: `main` (the newest accepted revision), a tag `vN` or a commit id."""
        wanted = self.repo(name)["head"] if revision == "main" else revision
        for entry in self.log(name) if wanted else []:
            if wanted in (entry["tag"], entry["commit"]):
                return entry
        raise HubAPIError(404, "revision_not_found", f"{name} has no revision {revision!r}")

    def hf_revision(self, name: str, revision: str = "main") -> dict[str, Any]:
        """The HuggingFace-style view `huggingface_hub` reads: {id, sha, siblings}."""
        return self._json("GET", f"/api/models/{name}/revision/{quote(revision, safe='')}")

    def lease(self, adapter: str) -> dict[str, Any]:
        return self._json("POST", f"/api/adapters/{adapter}/lease")

    def lease_any(self, among: list[str] | None = None) -> dict[str, Any]:
        """Lease the open adapter that most needs work (the hub picks; `among` limits its choice);
        404 `no_open_adapter` when every one is taken or has no base release yet."""
        return self._json("POST", "/api/adapters/lease", json={"among": among} if among is not None else None)

    def release(self, lease_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/leases/{quote(lease_id, safe='')}")

    def has_blob(self, sha256: str) -> bool:
        response = self._retry(lambda: self.http.head(f"/api/blobs/{sha256}"), idempotent=True)
        if response.status_code == 404:
            return False
        _check(response)
        return True

    def upload_blob(self, path: Path, sha256: str, size: int) -> dict[str, Any]:
        """Stream `path` to the hub (a generator body with an explicit Content-Length, so the hub can
        refuse an oversized file before reading it). The hub re-hashes it and refuses a mismatch."""
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}

        def put() -> httpx.Response:  # a fresh generator per attempt
            return _check(self.http.put(f"/api/blobs/{sha256}", content=_chunks(path), headers=headers))

        return self._retry(put, idempotent=True).json()

    def push(
        self,
        repo: str,
        folder: str | os.PathLike[str],
        description: str = "",
        metrics: dict[str, Any] | None = None,
        lease_id: str | None = None,
        base: str | None = None,
        include: list[str] | None = None,
    ) -> Transfer:
        """Make a new revision of `repo` from the files of `folder` (adapter repos need `lease_id`)."""
        root = Path(folder)
        if not root.is_dir():
            raise UserError(f"{root} is not a folder")
        files = collect(root, include)
        if not files:
            raise UserError(f"no files to push in {root}" + (f" matching {include}" if include else ""))
        hashed = [(rel, path, *sha256_file(path)) for rel, path in files]
        done: set[str] = set()
        transfer = Transfer(revision={})
        for rel, path, digest, size in hashed:
            if digest in done or self.has_blob(digest):
                transfer.reused.append(rel)
            else:
                self.upload_blob(path, digest, size)
                transfer.moved.append(rel)
                transfer.bytes += size
            done.add(digest)
        entries = [{"path": rel, "sha256": digest, "size": size} for rel, _, digest, size in hashed]
        body: dict[str, Any] = {"files": entries, "description": description, "metrics": metrics or {}}
        if lease_id:
            body["lease_id"] = lease_id
        if base:
            body["base"] = base
        transfer.revision = self._json("POST", f"/api/repos/{repo}/revisions", json=body)
        return transfer

    def pull(self, repo: str, revision: str = "main", dest: str | os.PathLike[str] = ".") -> Transfer:
        """Download a revision's files into `dest`; files already there with the right hash are kept,
        and an interrupted download continues from its `.part` file."""
        info = self.revision(repo, revision)
        root = Path(dest)
        transfer = Transfer(revision=info)
        for entry in info["files"]:
            target = _inside(root, entry["path"])
            if target.is_file() and target.stat().st_size == entry["size"]:
                if sha256_file(target)[0] == entry["sha256"]:
                    transfer.reused.append(entry["path"])
                    continue
            transfer.bytes += self._download(repo, info["commit"], entry, target)
            transfer.moved.append(entry["path"])
        return transfer

    def _download(self, repo: str, commit: str, entry: dict[str, Any], target: Path) -> int:
        """Fetch one file by commit (immutable, so resuming never mixes two versions); returns the
        bytes received. The hash is updated while writing, seeded from the `.part` on resume."""
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        url = f"/{repo}/resolve/{commit}/{quote(entry['path'])}"
        received, digest = 0, hashlib.sha256()

        def attempt() -> None:
            nonlocal received, digest
            have = part.stat().st_size if part.exists() else 0
            if have > entry["size"]:
                part.unlink()
                have = 0
            digest = hashlib.sha256()
            for block in _chunks(part) if have else ():
                digest.update(block)
            if have and have == entry["size"]:
                return
            # identity encoding: the offsets of a Range must be offsets in the file itself
            headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
            with self.http.stream("GET", url, headers=headers) as response:
                _check(response)
                resumed = response.status_code == 206
                if not resumed:  # the whole file came back: start over
                    digest = hashlib.sha256()
                with part.open("ab" if resumed else "wb") as out:
                    for block in response.iter_raw(CHUNK):
                        out.write(block)
                        digest.update(block)
                        received += len(block)

        self._retry(attempt, idempotent=True)
        if digest.hexdigest() != entry["sha256"]:
            part.unlink(missing_ok=True)
            raise TransferError(f"{repo}@{commit[:8]}:{entry['path']} did not match its sha256; pull again")
        os.replace(part, target)
        return received
