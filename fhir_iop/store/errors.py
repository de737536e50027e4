"""What the store raises. The server turns each into an OperationOutcome with its HTTP status.

    StoreError (FhirIopError)
    ├── NotFound            no such resource or version                        404
    ├── Gone                the resource was deleted                           410
    ├── Conflict            the write contradicts the store (id in use…)       409
    ├── PreconditionFailed  If-Match is stale, or a condition matched >1       412
    ├── Invalid             the resource or request is not acceptable          422 / 400
    ├── TooCostly           a search past the limits of fhir_iop.store.search  400
    └── UnknownParameter    a search parameter the store does not support      400 (strict)
"""

from __future__ import annotations

from fhir_iop.errors import FhirIopError


class StoreError(FhirIopError):
    status = 500
    code = "exception"

    def __init__(self, message: str, issues: list[dict] | None = None):
        super().__init__(message)
        self.issues = issues or []


class NotFound(StoreError):
    status, code = 404, "not-found"


class Gone(StoreError):
    status, code = 410, "deleted"


class Conflict(StoreError):
    status, code = 409, "conflict"


class PreconditionFailed(StoreError):
    status, code = 412, "conflict"


class Invalid(StoreError):
    """A resource that fails structure validation (422), or a malformed request (``status=400``)."""
    status, code = 422, "invalid"

    def __init__(self, message: str, issues: list[dict] | None = None, status: int = 422):
        super().__init__(message, issues)
        self.status = status


class UnknownParameter(StoreError):
    status, code = 400, "not-supported"


class TooCostly(StoreError):
    """A search with more criteria, values, sort keys or includes than the store answers (``too-costly``)."""
    status, code = 400, "too-costly"
