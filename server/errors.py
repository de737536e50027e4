"""One error handler: whatever goes wrong leaves as an OperationOutcome with its HTTP status.

Store errors carry their status (404, 409, 410, 412, 422, 400); werkzeug's HTTP errors (404 for an
unknown path, 405 for a method a path does not take, 415…) keep theirs; anything else is a 500
whose details go to the log, not to the client.
"""

from __future__ import annotations

from flask import Flask, current_app
from werkzeug.exceptions import HTTPException

from fhir_iop.errors import FhirIopError
from fhir_iop.store.errors import StoreError

#: HTTP status → OperationOutcome issue code for werkzeug's errors
HTTP_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
              406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly",
              415: "not-supported", 422: "invalid"}


class FhirHttpError(Exception):
    """An error raised by the HTTP layer itself (bad header, unsupported media type…)."""

    def __init__(self, status: int, message: str, code: str | None = None, issues: list[dict] | None = None):
        super().__init__(message)
        self.status, self.code, self.issues = status, code or HTTP_CODES.get(status, "processing"), issues or []


def outcome(message: str, code: str = "processing", severity: str = "error", issues: list[dict] | None = None) -> dict:
    first = {"severity": severity, "code": code, "diagnostics": message}
    return {"resourceType": "OperationOutcome", "issue": [first, *(issues or [])]}


def error_outcome(e: BaseException) -> tuple[int, dict]:
    """(status, OperationOutcome) for any exception."""
    if isinstance(e, StoreError):
        return e.status, outcome(str(e), e.code, issues=e.issues)
    if isinstance(e, FhirHttpError):
        return e.status, outcome(str(e), e.code, issues=e.issues)
    if isinstance(e, HTTPException):
        status = e.code or 500
        message = e.description or e.name
        if status == 413:
            limit = current_app.config.get("MAX_CONTENT_LENGTH")
            message = f"the request body is larger than the server accepts ({limit} bytes)" if limit else message
        return status, outcome(message, HTTP_CODES.get(status, "processing"))
    if isinstance(e, FhirIopError):
        return 400, outcome(str(e), "invalid")
    return 500, outcome("internal server error; the server log has the details", "exception")


def init_app(app: Flask) -> None:
    @app.errorhandler(Exception)
    def handle(e: Exception):
        from server.formats import respond
        status, oo = error_outcome(e)
        if status >= 500:
            current_app.logger.exception("unhandled error", exc_info=e)
        headers = {}
        if isinstance(e, HTTPException) and status == 405 and e.valid_methods:
            headers["Allow"] = ", ".join(e.valid_methods)
        return respond(oo, status, headers)
