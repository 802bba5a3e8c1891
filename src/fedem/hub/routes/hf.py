"""The HuggingFace-compatible read API, so unmodified `huggingface_hub` and `transformers` (with
`HF_ENDPOINT` pointing here) download releases: `snapshot_download(repo, revision="v3")`,
`AutoModelForCausalLM.from_pretrained(repo, revision="v3")`.

What the clients read, and so what these routes answer:
- `GET /api/models/{repo}/revision/{rev}`: `id`, `sha` (the 40-hex commit) and `siblings`;
- `GET /api/models/{repo}/tree/{sha}?recursive=true`: files as git-LFS entries, `lfs.oid` = sha256;
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}`: `X-Repo-Commit` (required), `ETag` (required; the
  quoted sha256 — the client names its cache blob after it), `X-Linked-Size`/`Content-Length`
  (checked against the bytes received), `Accept-Ranges` and `Range` (resumed downloads);
  a missing file is 404 with `X-Error-Code: EntryNotFound` (and `X-Repo-Commit`), which transformers
  treats as "optional file absent" rather than an error.
Every file is presented as an LFS file: its sha256 is its identity here, and the LFS pointer text
gives the git blob id the tree listing carries. Reads need no token.
"""

import hashlib
import mimetypes
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from fedem.hub.auth import SessionDep
from fedem.hub.errors import HubError
from fedem.hub.models import File, Revision
from fedem.hub.repos import get_repo, get_revision
from fedem.hub.store import ArtifactStore

router = APIRouter(tags=["huggingface"])

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
READ_CHUNK = 1 << 20


@router.get("/api/models/{namespace}/{name}")
@router.get("/api/models/{namespace}/{name}/revision/{revision}")
def model_info(namespace: str, name: str, session: SessionDep, revision: str = "main") -> dict[str, Any]:
    """`{"id", "modelId", "sha", "private", "gated", "disabled", "tags", "createdAt", "lastModified",
    "siblings": [{"rfilename", "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}`."""
    rev = _revision(session, namespace, name, revision)
    siblings = []
    for f in rev.files:
        pointer = _lfs_pointer(f)
        siblings.append(
            {
                "rfilename": f.path,
                "size": f.size,
                "blobId": _git_blob_id(pointer),
                "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": len(pointer)},
            }
        )
    return {
        "id": rev.repo.name,
        "modelId": rev.repo.name,
        "sha": rev.commit,
        "private": False,
        "gated": False,
        "disabled": False,
        "tags": [rev.repo.kind, rev.tag],
        "createdAt": _hf_time(rev.repo.created_at),
        "lastModified": _hf_time(rev.created_at),
        "siblings": siblings,
    }


@router.get("/api/models/{namespace}/{name}/tree/{revision}")
@router.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
def tree(
    namespace: str,
    name: str,
    revision: str,
    session: SessionDep,
    path: str = "",
    recursive: bool = False,
    expand: bool = False,  # accepted for compatibility; nothing more to expand here
) -> list[dict[str, Any]]:
    """Files (`{"type": "file", "path", "size", "oid", "lfs": {"oid", "size", "pointerSize"}}`) and
    folders (`{"type": "directory", "path", "size": 0, "oid"}`) under `path`, one level or all."""
    rev = _revision(session, namespace, name, revision)
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for f in rev.files:
        if not f.path.startswith(prefix):
            continue
        parts = f.path[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        folders.update(prefix + "/".join(parts[:i]) for i in range(1, min(depth, len(parts) - 1) + 1))
        if recursive or len(parts) == 1:
            pointer = _lfs_pointer(f)
            entries.append(
                {
                    "type": "file",
                    "path": f.path,
                    "size": f.size,
                    "oid": _git_blob_id(pointer),
                    "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": len(pointer)},
                }
            )
    if prefix and not entries and not folders:
        raise HubError(404, "entry_not_found", f"{rev.repo.name}@{rev.tag} has no folder {path!r}").hf(
            "EntryNotFound"
        )
    dirs = [
        {
            "type": "directory",
            "path": d,
            "size": 0,
            "oid": hashlib.sha1(f"{rev.commit}:{d}".encode()).hexdigest(),
        }
        for d in sorted(folders)
    ]
    return dirs + entries


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve(
    namespace: str, name: str, revision: str, path: str, request: Request, session: SessionDep
) -> Response:
    """One file of a revision, with the headers `huggingface_hub` checks; `Range` gives 206."""
    rev = _revision(session, namespace, name, revision)
    entry = next((f for f in rev.files if f.path == path), None)
    if entry is None:
        message = f"{rev.repo.name}@{rev.tag} has no file {path!r}"
        return JSONResponse(
            {"error": "entry_not_found", "message": message},
            status_code=404,
            headers={
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": message,
                "X-Repo-Commit": rev.commit,
            },
        )
    headers = {
        "X-Repo-Commit": rev.commit,
        "ETag": f'"{entry.sha256}"',
        "X-Linked-Etag": f'"{entry.sha256}"',
        "X-Linked-Size": str(entry.size),
        "Accept-Ranges": "bytes",
    }
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if request.method == "HEAD":
        return Response(headers={**headers, "Content-Length": str(entry.size)}, media_type=media_type)
    store: ArtifactStore = request.app.state.store
    local = store.local_path(entry.sha256)
    if local is not None:  # Starlette serves Range (one or several) from a local file itself
        return FileResponse(local, headers=headers, media_type=media_type)
    span = parse_range(request.headers.get("range"), entry.size)
    start, stop = span or (0, entry.size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry.size}"
    headers["Content-Length"] = str(stop - start)
    return StreamingResponse(
        _read(store, entry.sha256, start, stop),
        status_code=206 if span else 200,
        headers=headers,
        media_type=media_type,
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (start, stop) with stop exclusive; None means the whole file
    (no header, or one this reader does not support, such as several ranges — allowed by RFC 9110)."""
    match = RANGE.match(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # a suffix: the last N bytes
        start, stop = max(size - int(last), 0), size
    else:
        start, stop = int(first), min(int(last) + 1, size) if last else size
    if start >= size or start >= stop:
        raise HubError(
            416, "range_not_satisfiable", f"range {header!r} is outside the {size} bytes", size=size
        )
    return start, stop


def _read(store: ArtifactStore, sha256: str, start: int, stop: int) -> Iterator[bytes]:
    with store.open(sha256) as blob:
        blob.seek(start)
        left = stop - start
        while left > 0 and (chunk := blob.read(min(READ_CHUNK, left))):
            left -= len(chunk)
            yield chunk


def _revision(session: SessionDep, namespace: str, name: str, ref: str) -> Revision:
    return get_revision(session, get_repo(session, f"{namespace}/{name}"), ref)


def _hf_time(at: datetime) -> str:
    """The one timestamp shape huggingface_hub parses: `2024-11-16T00:27:02.000000Z`."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lfs_pointer(f: File) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{f.sha256}\nsize {f.size}\n".encode()


def _git_blob_id(content: bytes) -> str:
    """The id git gives a blob (sha1 of a `blob <n>\\0` header and the content)."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()
