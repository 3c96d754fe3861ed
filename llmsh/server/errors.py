"""Errors as OpenAI's API shapes them: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
          503: "server_error", 500: "server_error"}


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI-shaped error body.

    message: one line for the client; param: the request field at fault (dotted path) or None;
    code: a short machine-readable reason (``context_length_exceeded``, ``invalid_api_key``...);
    headers: extra response headers (``Retry-After`` for 503).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
