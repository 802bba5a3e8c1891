"""Errors as JSON with a clear message: `{"error": code, "message": text}` and an HTTP status.

HuggingFace-compatible routes also set `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`), which `huggingface_hub` reads to raise the right exception.

Every error the hub answers has that one shape — its own `HubError`s, request validation (422), and
Starlette's own 404/405 — and the OpenAPI schema says so (`document_errors`), so a client generated
from the schema, or a fuzzer checking answers against it, knows every 4xx body.
"""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ERROR_SCHEMA = {
    "title": "HubError",
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable code, e.g. lease_required"},
        "message": {"type": "string", "description": "what went wrong, for a person"},
    },
    "additionalProperties": True,  # some errors add fields, e.g. `holder` and `expires_at` on 409 leased
}


class HubError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra

    def hf(self, hf_code: str) -> "HubError":
        """Mark with a HuggingFace `X-Error-Code`."""
        self.headers["X-Error-Code"] = hf_code
        return self


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(HubError)
    async def _hub_error(_request: Request, err: HubError) -> JSONResponse:
        body = {"error": err.code, "message": err.message, **err.extra}
        return JSONResponse(body, status_code=err.status, headers=err.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse(
            {"error": "invalid_request", "message": f"{where}: {first['msg']}"}, status_code=422
        )

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own answers (no such route: 404, wrong method: 405) in the hub's shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(
            {"error": code, "message": str(err.detail)}, status_code=err.status_code, headers=err.headers
        )

    document_errors(app)


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI schema say that any operation may answer 4XX with the error body above
    (replacing FastAPI's 422 `HTTPValidationError`, which the hub never sends)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["HubError"] = ERROR_SCHEMA
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        error = {
            "description": "an error: `{error, message}`",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HubError"}}},
        }
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses["4XX"] = error
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
