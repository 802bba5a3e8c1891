"""Errors as JSON with a clear message: `{"error": code, "message": text}` and an HTTP status.

HuggingFace-compatible routes also set `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`), which `huggingface_hub` reads to raise the right exception.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.hf_code: str | None = None

    def hf(self, hf_code: str) -> "HubError":
        """Mark with a HuggingFace `X-Error-Code`."""
        self.hf_code = hf_code
        return self


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(HubError)
    async def _hub_error(_request: Request, err: HubError) -> JSONResponse:
        headers = {"X-Error-Code": err.hf_code} if err.hf_code else None
        body = {"error": err.code, "message": err.message, **err.extra}
        return JSONResponse(body, status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse(
            {"error": "invalid_request", "message": f"{where}: {first['msg']}"}, status_code=422
        )
