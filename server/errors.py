"""One error handler: whatever goes wrong leaves as an OperationOutcome with its HTTP status.

Store errors carry their status (404, 409, 410, 412, 422, 400); werkzeug's HTTP errors (404 for an
unknown path, 405 for a method a path does not take, 415…) keep theirs; a database that cannot be
reached or is busy is a 503 with ``Retry-After``; anything else is a 500 whose details go to the log,
not to the client.
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
    if unavailable(e):
        return 503, outcome("the store is unavailable for the moment; nothing was changed by this request "
                            "(a transaction rolls back whole): try again shortly", "transient")
    return 500, outcome("internal server error; the server log has the details", "exception")


#: seconds a client is asked to wait after a 503 (``Retry-After``)
RETRY_AFTER = 5


def unavailable(e: BaseException) -> bool:
    """The database cannot be reached or is busy, as against a fault in a statement: a connection
    lost or refused, the pool exhausted, PostgreSQL's connection-level errors (OperationalError:
    refused, terminated, too many clients; statement faults are other classes), SQLite's
    "database is locked" after its busy timeout."""
    from sqlalchemy import exc
    if isinstance(e, exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(e, exc.DBAPIError):
        return False
    if e.connection_invalidated or isinstance(e, exc.InterfaceError):
        return True
    if not isinstance(e, exc.OperationalError):
        return False
    if type(e.orig).__module__.startswith("psycopg"):
        return True
    text = str(e.orig).lower()
    return "locked" in text or "busy" in text or "unable to open" in text


def init_app(app: Flask) -> None:
    @app.errorhandler(Exception)
    def handle(e: Exception):
        from server.formats import respond
        status, oo = error_outcome(e)
        if status == 503:
            current_app.logger.warning("the store is unavailable (%s): 503", type(e).__name__)
        elif status >= 500:
            current_app.logger.exception("unhandled error", exc_info=e)
        headers = {}
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER)
        if isinstance(e, HTTPException) and status == 405 and e.valid_methods:
            headers["Allow"] = ", ".join(e.valid_methods)
        return respond(oo, status, headers)
