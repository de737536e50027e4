"""The FHIR interactions on one resource, shared by the REST routes and Bundle entries.

Each takes an open store transaction and returns a :class:`Result`; the caller turns it into an
HTTP response or a Bundle entry, honouring ``Prefer: return=``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_iop.store import Stored, Tx
from fhir_iop.store.repository import instant
from server.errors import outcome
from server.formats import http_date

REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 412: "Precondition Failed",
           415: "Unsupported Media Type", 422: "Unprocessable Entity", 500: "Internal Server Error"}


@dataclass
class Result:
    status: int
    stored: Stored | None = None
    body: dict | str | bytes | None = None  # a Bundle or OperationOutcome instead of the stored resource
    message: str = ""

    def headers(self, base) -> dict:
        """ETag, Last-Modified, and Location after a create; ``base()`` gives the base URL."""
        s = self.stored
        if s is None:
            return {}
        h = {"ETag": f'W/"{s.version_id}"', "Last-Modified": http_date(s.last_updated)}
        if self.status == 201:
            h["Location"] = f"{base()}/{s.type}/{s.id}/_history/{s.version_id}"
        return h

    def payload(self, prefer_return: str | None):
        """The body to send for ``Prefer: return=…`` (None: no body)."""
        if self.body is not None:
            return self.body
        if self.stored is None:
            return None
        if prefer_return == "minimal":
            return None
        if prefer_return == "operationoutcome":
            return outcome(self.message or "done", "informational", "information")
        return self.stored.body

    def entry_response(self, base: str) -> dict:
        r = {"status": f"{self.status} {REASONS.get(self.status, '')}".strip()}
        s = self.stored
        if s is not None:
            if not s.deleted:
                r["location"] = f"{base}/{s.type}/{s.id}/_history/{s.version_id}"
            r["etag"] = f'W/"{s.version_id}"'
            r["lastModified"] = instant(s.last_updated)
        return r


def read(tx: Tx, rt: str, rid: str) -> Result:
    return Result(200, tx.read(rt, rid))


def vread(tx: Tx, rt: str, rid: str, vid: str) -> Result:
    return Result(200, tx.vread(rt, rid, vid))


def create(tx: Tx, rt: str, res: dict, if_none_exist: str | None = None, rid: str | None = None) -> Result:
    from fhir_iop.store import Invalid
    if res.get("resourceType") != rt:
        raise Invalid(f"the body is a {res.get('resourceType')}, the URL names {rt}", status=400)
    w = tx.create(res, if_none_exist, rid)
    if w.outcome == "exists":
        return Result(200, w.stored, message=f"{rt}/{w.stored.id} matches If-None-Exist; nothing created")
    return Result(201, w.stored, message=f"created {rt}/{w.stored.id} version {w.stored.version_id}")


def _written(w, rt) -> Result:
    s = w.stored
    if w.outcome == "created":
        return Result(201, s, message=f"created {rt}/{s.id} version {s.version_id}")
    if w.outcome == "unchanged":
        return Result(200, s, message=f"{rt}/{s.id} unchanged; still version {s.version_id}")
    return Result(200, s, message=f"updated {rt}/{s.id} to version {s.version_id}")


def update(tx: Tx, rt: str, rid: str, res: dict, if_match: int | None = None) -> Result:
    return _written(tx.update(rt, rid, res, if_match), rt)


def conditional_update(tx: Tx, rt: str, query: str, res: dict, if_match: int | None = None) -> Result:
    return _written(tx.conditional_update(rt, query, res, if_match), rt)


def delete(tx: Tx, rt: str, rid: str, if_match: int | None = None) -> Result:
    w = tx.delete(rt, rid, if_match)
    if w is None:
        return Result(204, message=f"{rt}/{rid} was deleted already")
    return Result(204, w.stored, message=f"deleted {rt}/{rid} (version {w.stored.version_id})")
