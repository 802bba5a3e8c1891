"""Limits a stranger cannot talk the hub out of: requests per token, and the size of JSON bodies.

- `TokenBuckets`: a token bucket per token id (`rate` requests/s refilled, up to `burst` saved up);
  an empty bucket is a 429 `rate_limited` with `Retry-After`. It lives in the server process, so with
  several workers each enforces its own limit (a donor gets up to workers × rate); a shared limit
  belongs in the reverse proxy or a shared store. Anonymous reads are not counted here.
- `BodySizeLimit`: an ASGI middleware that refuses any request body over `max_bytes` with 413
  `too_large` before the app sees it, by `Content-Length` or, for chunked bodies, by counting. Blob
  uploads (`PUT /api/blobs/…`) are exempt: they stream to disk under their own `max_file_bytes`.
"""

import math
import threading
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedem.hub.errors import HubError

BLOB_UPLOAD_PREFIX = "/api/blobs/"


class TokenBuckets:
    """`take(key)` spends one request from `key`'s bucket or raises 429; `rate=None` means no limit."""

    def __init__(self, rate: float | None, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens left, monotonic time)
        self._lock = threading.Lock()  # sync routes run in a thread pool

    def take(self, key: str) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= self.max_keys:
                self._buckets.clear()  # unknown ids sprayed at the hub must not grow memory without end
            left, then = self._buckets.get(key, (float(self.burst), now))
            left = min(float(self.burst), left + (now - then) * self.rate)
            if left < 1.0:
                self._buckets[key] = (left, now)
                wait = math.ceil((1.0 - left) / self.rate)
                raise HubError(
                    429,
                    "rate_limited",
                    f"too many requests with this token: at most {self.rate:g}/s (bursts of {self.burst}); "
                    f"retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            self._buckets[key] = (left - 1.0, now)


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, except blob uploads (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (
            scope["method"] == "PUT" and scope["path"].startswith(BLOB_UPLOAD_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # Chunked (or lying) bodies: read them here, at most max_bytes, then replay them to the app.
        messages: list[Message] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect: let the app see it
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            messages.append(message)
            more = message.get("more_body", False)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"error": "too_large", "message": f"request bodies are limited to {self.max_bytes} bytes"},
            status_code=413,
            headers={"Connection": "close"},  # the unread rest of the body makes the connection unusable
        )
        await response(scope, receive, send)
