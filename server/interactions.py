"""The FHIR interactions on one resource, shared by the REST routes and Bundle entries.

Each takes an open store transaction and returns a :class:`Result`; the caller turns it into an
HTTP response or a Bundle entry, honouring ``Prefer: return=``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

from flask import request

from fhir_iop.disclosure import Gate
from fhir_iop.store import Store, Stored, Tx
from fhir_iop.store.repository import instant
from server.access import current_access
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


# -- 42 CFR Part 2: every store transaction of a request carries the request's gate -----------------

def gated(tx: Tx) -> Gate:
    """The Part 2 gate of the current request on ``tx`` (set once): from then on every read path of
    ``tx`` sees only what the request's access may see (``fhir_iop.disclosure``)."""
    if tx.gate is None:
        tx.gate = Gate(tx, current_access())
    return tx.gate


class GatedStore:
    """The store as one request uses it: every transaction it opens carries the request's gate."""

    def __init__(self, store: Store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    @contextmanager
    def transaction(self, origin: str | None = None):
        with self.store.transaction(origin) as tx:
            gated(tx)
            yield tx

    @contextmanager
    def reading(self, snapshot: bool = False):
        with self.store.reading(snapshot) as tx:
            gated(tx)
            if tx.cache is not None and "no-cache" in request.environ.get("HTTP_CACHE_CONTROL", ""):
                tx.cache = None  # the client asks for what the database holds now (fhir_iop/store/cache.py)
            yield tx


def outgoing(tx: Tx, stored: Stored) -> Stored:
    """``stored`` as it leaves: with the redisclosure prohibition when it is Part 2 data for an
    outside recipient (``Gate.outgoing``)."""
    if stored.body is None:
        return stored
    body = gated(tx).outgoing(stored.type, stored.id, stored.body)
    if body is stored.body:
        return stored
    return replace(stored, body=body.decode() if isinstance(body, bytes) else body)


def read(tx: Tx, rt: str, rid: str) -> Result:
    gated(tx)
    return Result(200, outgoing(tx, tx.read(rt, rid)))


def vread(tx: Tx, rt: str, rid: str, vid: str) -> Result:
    gated(tx)
    return Result(200, outgoing(tx, tx.vread(rt, rid, vid)))


def create(tx: Tx, rt: str, res: dict, if_none_exist: str | None = None, rid: str | None = None) -> Result:
    from fhir_iop.store import Invalid
    if res.get("resourceType") != rt:
        raise Invalid(f"the body is a {res.get('resourceType')}, the URL names {rt}", status=400)
    gated(tx)
    w = tx.create(res, if_none_exist, rid)
    if w.outcome == "exists":
        return Result(200, outgoing(tx, w.stored), message=f"{rt}/{w.stored.id} matches If-None-Exist; nothing created")
    return Result(201, outgoing(tx, w.stored), message=f"created {rt}/{w.stored.id} version {w.stored.version_id}")


def _written(w, rt, tx: Tx | None = None) -> Result:
    s = outgoing(tx, w.stored) if tx is not None else w.stored  # what a write sends back leaves too
    if w.outcome == "created":
        return Result(201, s, message=f"created {rt}/{s.id} version {s.version_id}")
    if w.outcome == "unchanged":
        return Result(200, s, message=f"{rt}/{s.id} unchanged; still version {s.version_id}")
    return Result(200, s, message=f"updated {rt}/{s.id} to version {s.version_id}")


def update(tx: Tx, rt: str, rid: str, res: dict, if_match: int | None = None) -> Result:
    gated(tx)
    return _written(tx.update(rt, rid, res, if_match), rt, tx)


def conditional_update(tx: Tx, rt: str, query: str, res: dict, if_match: int | None = None) -> Result:
    gated(tx)
    return _written(tx.conditional_update(rt, query, res, if_match), rt, tx)


def conditional_delete(tx: Tx, rt: str, query: str) -> Result:
    """DELETE Type?criteria (conditionalDelete: single): delete the one match; nothing to do if none
    matches (what this request may not see does not match); 412 if several do."""
    from fhir_iop.store.errors import PreconditionFailed
    found = tx.match(rt, query)
    if len(found) > 1:
        raise PreconditionFailed(f"{rt}?{query} matches more than one resource; conditional delete removes one")
    if not found:
        return Result(204, message=f"no {rt} matches {query!r}; nothing deleted")
    return delete(tx, rt, found[0].id)


def delete(tx: Tx, rt: str, rid: str, if_match: int | None = None) -> Result:
    gated(tx)
    w = tx.delete(rt, rid, if_match)
    if w is None:
        return Result(204, message=f"{rt}/{rid} was deleted already")
    return Result(204, w.stored, message=f"deleted {rt}/{rid} (version {w.stored.version_id})")
