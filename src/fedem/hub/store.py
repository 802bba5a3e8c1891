"""The artifact store: content-addressed files under any fsspec URL (a folder by default, `s3://…` in
production), laid out as `<url>/<sha[:2]>/<sha>`.

An upload streams into `<url>/tmp/` while it is hashed, so a 1 GB file never sits in memory; it is
checked against the declared size (as bytes arrive, so an oversized body is cut off early) and the
declared sha256, then renamed into place. A crash or a cancelled upload therefore leaves at most a
temp file, which `clean_temp` removes at start-up, and never a half-written artifact under its hash.
The store only holds bytes: a blob becomes *visible* when the route inserts its database row, which
happens only after the rename.
"""

import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterable
from pathlib import Path
from typing import IO, Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from starlette.concurrency import run_in_threadpool

from fedem.hub.errors import HubError

SHA256 = re.compile(r"^[0-9a-f]{64}$")
WRITE_BATCH = 1 << 20  # gather network chunks (~64 KiB) into 1 MiB writes: fewer thread hops


def check_sha256(sha256: str) -> str:
    if not SHA256.match(sha256):
        raise HubError(422, "bad_sha256", f"not a lowercase hex sha256: {sha256!r}")
    return sha256


def too_large(size: int, limit: int) -> HubError:
    return HubError(413, "too_large", f"{size} bytes is over this hub's limit of {limit} bytes per file")


class ArtifactStore:
    """Blobs by sha256 on one fsspec file system (the local one gets `os.replace` and fsync)."""

    def __init__(self, url: str) -> None:
        self.url = url
        fs, root = url_to_fs(url)
        self.fs = fs
        self.root = str(root).rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)
        self.fs.makedirs(self.temp_dir, exist_ok=True)

    @property
    def temp_dir(self) -> str:
        return f"{self.root}/tmp"

    def path(self, sha256: str) -> str:
        check_sha256(sha256)
        return f"{self.root}/{sha256[:2]}/{sha256}"

    def exists(self, sha256: str) -> bool:
        return bool(self.fs.exists(self.path(sha256)))

    def local_path(self, sha256: str) -> Path | None:
        """The file itself on a local store (so responses can use sendfile and Range); else None."""
        return Path(self.path(sha256)) if self.is_local else None

    def open(self, sha256: str) -> IO[bytes]:
        return self.fs.open(self.path(sha256), "rb")

    def clean_temp(self) -> int:
        """Remove leftovers of uploads cut off by a crash. Call only while no upload is running (at
        start-up): one store folder is served by one hub process."""
        leftovers = self.fs.ls(self.temp_dir, detail=False)
        for leftover in leftovers:
            self.fs.rm(leftover, recursive=True)
        return len(leftovers)

    async def ingest(self, chunks: AsyncIterable[bytes], sha256: str, size: int, max_bytes: int) -> None:
        """Stream `chunks` into the store as blob `sha256`, or raise (400/413) leaving nothing behind.

        File I/O runs in worker threads so a slow disk never stalls the event loop."""
        target = self.path(sha256)
        if size > max_bytes:
            raise too_large(size, max_bytes)
        temp = f"{self.temp_dir}/{sha256}.{uuid.uuid4().hex}"
        out = await run_in_threadpool(self._open_temp, temp)
        digest = hashlib.sha256()
        received = 0
        try:
            batch = bytearray()
            async for chunk in chunks:
                received += len(chunk)
                if received > max_bytes:
                    raise too_large(received, max_bytes)
                if received > size:
                    raise HubError(400, "size_mismatch", f"body is longer than the declared {size} bytes")
                batch += chunk
                if len(batch) >= WRITE_BATCH:
                    await run_in_threadpool(_write, out, digest, bytes(batch))
                    batch.clear()
            if batch:
                await run_in_threadpool(_write, out, digest, bytes(batch))
            await run_in_threadpool(self._seal, out)
            if received != size:
                raise HubError(400, "size_mismatch", f"received {received} bytes, declared {size}")
            if digest.hexdigest() != sha256:
                raise HubError(
                    400,
                    "hash_mismatch",
                    f"content hashes to {digest.hexdigest()}, not the declared {sha256}",
                )
            await run_in_threadpool(self._publish, temp, target)
        except BaseException:  # including cancellation: synchronous, so it runs to the end
            self._discard(out, temp)
            raise

    def _open_temp(self, temp: str) -> IO[bytes]:
        return open(temp, "wb") if self.is_local else self.fs.open(temp, "wb")

    def _seal(self, out: IO[bytes]) -> None:
        out.flush()
        if self.is_local:
            os.fsync(out.fileno())
        out.close()

    def _publish(self, temp: str, target: str) -> None:
        """Atomic rename into place; on a local disk the directory entry is fsynced too, so the file
        is durable before its database row says it exists."""
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.is_local:
            self.fs.mv(temp, target)
            return
        os.replace(temp, target)
        directory = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _discard(self, out: IO[bytes], temp: str) -> None:
        try:  # an fsspec upload is committed by close(), so a remote one is discarded instead
            discard = None if self.is_local else getattr(out, "discard", None)
            (discard or out.close)()
        except Exception:  # a failed close of a file we delete anyway changes nothing
            pass
        if self.fs.exists(temp):
            self.fs.rm(temp)


def _write(out: IO[bytes], digest: Any, data: bytes) -> None:
    digest.update(data)
    out.write(data)
