"""The one error a request can end in: an HTTP status and OpenAI's error body.

    raise RequestError(400, "messages[0].content[1].image_url: not a data:, http(s) or file:// URL",
                       param="messages")

The body is OpenAI's: {"error": {"message", "type", "code", "param"}}; `type` follows the status
(400 invalid_request_error, 401 authentication_error, 404 not_found_error, 413
request_too_large, 503 server_busy) unless given.
"""
from __future__ import annotations

from vlm_dist.errors import UserError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 422: "invalid_request_error", 500: "internal_server_error",
               503: "server_busy"}


class RequestError(UserError, ValueError):
    """A request the server refuses: `status` (4xx, or 503 when busy) and OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "code": self.code, "param": self.param}}
