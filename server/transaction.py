"""batch and transaction Bundles (POST to the base URL).

A transaction runs in one store transaction, in the order the spec gives (DELETE, POST, PUT, GET);
any failing entry rolls back everything and the response is that entry's error. Before anything
is written, each POST gets its id (or the match of its ``If-None-Exist``), each conditional PUT its
match, and every ``urn:uuid:`` reference to an entry's ``fullUrl`` is rewritten to ``Type/id``.
A batch runs each entry in a transaction of its own and reports each outcome.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from fhir_iop.store import Invalid, PreconditionFailed, Store, StoreError, Tx
from fhir_iop.store.repository import check_type
from server import interactions
from server.errors import FhirHttpError, error_outcome
from server.interactions import Result

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3, "HEAD": 3}


@dataclass
class Entry:
    n: int
    method: str
    type: str
    id: str | None
    query: str | None
    history: str | None  # version of a vread
    resource: dict | None
    full_url: str | None
    if_none_exist: str | None
    if_match: int | None


def _if_match(value) -> int | None:
    if value is None:
        return None
    v = str(value).strip().removeprefix("W/").strip('"')
    if not v.isdigit():
        raise Invalid(f"ifMatch {value!r} is not a version ETag", status=400)
    return int(v)


def parse_entries(bundle: dict, base: str) -> list[Entry]:
    entries = []
    for n, e in enumerate(bundle.get("entry") or ()):
        req = e.get("request") or {}
        method = str(req.get("method", "")).upper()
        url = req.get("url")
        if method not in ORDER or not isinstance(url, str):
            raise Invalid(f"entry {n}: request.method (GET, POST, PUT or DELETE) and request.url are required",
                          status=400)
        if url.startswith(base + "/"):
            url = url[len(base) + 1:]
        parts = urlsplit(url)
        segs = [s for s in parts.path.split("/") if s]
        if not segs:
            raise Invalid(f"entry {n}: request.url {url!r} names no resource type", status=400)
        check_type(segs[0])
        rid = segs[1] if len(segs) > 1 else None
        hist = segs[3] if len(segs) == 4 and segs[2] == "_history" else None
        if len(segs) > 2 and hist is None or len(segs) == 3:
            raise Invalid(f"entry {n}: request.url {url!r} is not supported in a Bundle", status=400)
        res = e.get("resource")
        if method in ("POST", "PUT") and not isinstance(res, dict):
            raise Invalid(f"entry {n}: a {method} needs a resource", status=400)
        entries.append(Entry(n, method, segs[0], rid, parts.query or None, hist, res, e.get("fullUrl"),
                             req.get("ifNoneExist"), _if_match(req.get("ifMatch"))))
    return entries


def _rewrite(value, refs: dict[str, str]):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "reference" and isinstance(v, str) and v in refs:
                out[k] = refs[v]
            else:
                out[k] = _rewrite(v, refs)
        return out
    if isinstance(value, list):
        return [_rewrite(v, refs) for v in value]
    return value


def _resolve_ids(tx: Tx, entries: list[Entry]) -> tuple[dict[str, str], dict[int, Result]]:
    """fullUrl → Type/id for every entry that creates or updates; the POSTs that matched already."""
    refs: dict[str, str] = {}
    matched: dict[int, Result] = {}
    for e in entries:
        if e.method == "POST":
            if e.if_none_exist:
                found = tx.match(e.type, e.if_none_exist)
                if len(found) > 1:
                    raise PreconditionFailed(f"entry {e.n}: ifNoneExist {e.if_none_exist!r} matches more than one")
                if found:
                    matched[e.n] = Result(200, interactions.outgoing(tx, found[0]))  # Part 2 mark if it leaves
                    e.id = found[0].id
            if e.id is None:
                e.id = str(uuid.uuid4())
        elif e.method == "PUT" and e.id is None and e.query:
            found = tx.match(e.type, e.query)
            if len(found) > 1:
                raise PreconditionFailed(f"entry {e.n}: {e.type}?{e.query} matches more than one resource")
            if len(found) == 1:
                e.id = found[0].id
            elif not found:
                e.id = (e.resource or {}).get("id") or str(uuid.uuid4())
        if e.id and e.full_url and e.method in ("POST", "PUT"):
            refs[e.full_url] = f"{e.type}/{e.id}"
    return refs, matched


def _run(tx: Tx, e: Entry, matched: dict[int, Result], search_fn) -> Result:
    if e.method == "DELETE":
        if e.id is None:
            if not e.query:
                raise Invalid(f"entry {e.n}: DELETE needs an id or search criteria (conditional delete)", status=400)
            return interactions.conditional_delete(tx, e.type, e.query)
        return interactions.delete(tx, e.type, e.id, e.if_match)
    if e.method == "POST":
        if e.n in matched:
            return matched[e.n]
        return interactions.create(tx, e.type, e.resource, None, e.id)
    if e.method == "PUT":
        if e.id is None:
            raise Invalid(f"entry {e.n}: PUT needs Type/id or Type?criteria", status=400)
        res = e.resource if e.resource.get("id") else {**e.resource, "id": e.id}
        if e.query:
            return interactions.conditional_update(tx, e.type, e.query, res, e.if_match)
        return interactions.update(tx, e.type, e.id, res, e.if_match)
    if e.id and e.history:
        return interactions.vread(tx, e.type, e.id, e.history)
    if e.id:
        return interactions.read(tx, e.type, e.id)
    return Result(200, body=search_fn(tx, e.type, e.query or ""))


def _entry(result: Result, base: str, prefer_return: str | None) -> dict:
    out: dict = {"response": result.entry_response(base)}
    if result.stored is not None and not result.stored.deleted:
        out = {"fullUrl": f"{base}/{result.stored.type}/{result.stored.id}", **out}
    payload = result.payload(prefer_return)
    if payload is not None and result.status != 204:
        value = orjson.loads(payload) if isinstance(payload, (str, bytes)) else payload
        if prefer_return == "operationoutcome" and result.body is None:
            out["response"]["outcome"] = value
        else:
            out["resource"] = value
    return out


def process(store: Store, bundle: dict, base: str, prefer_return: str | None, search_fn) -> dict:
    """The response Bundle for a batch or transaction Bundle; raises for a failed transaction."""
    if bundle.get("resourceType") != "Bundle":
        raise FhirHttpError(400, f"POST to the base URL takes a batch or transaction Bundle, "
                                 f"not a {bundle.get('resourceType')}")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise FhirHttpError(400, f"Bundle.type {kind!r}: only batch and transaction Bundles are processed")
    entries = parse_entries(bundle, base)
    results: dict[int, Result | dict] = {}
    from server.auth import check_entry  # each entry's own SMART scope (403)
    if kind == "transaction":
        for e in entries:  # all before anything is written: one denied entry refuses the transaction
            check_entry(e)
        with store.transaction() as tx:
            refs, matched = _resolve_ids(tx, entries)
            for e in entries:
                if e.resource is not None and refs:
                    e.resource = _rewrite(e.resource, refs)
            for e in sorted(entries, key=lambda x: ORDER[x.method]):
                try:
                    results[e.n] = _run(tx, e, matched, search_fn)
                except StoreError as err:
                    err.args = (f"transaction entry {e.n} ({e.method} {e.type}"
                                f"{'/' + e.id if e.id else ''}): {err.args[0]}",)
                    raise
        response = [_entry(results[e.n], base, prefer_return) for e in entries]
    else:
        response = []
        for e in entries:
            try:
                check_entry(e)
                with store.transaction() as tx:
                    _, matched = _resolve_ids(tx, [e]) if e.method == "POST" else ({}, {})
                    res = _run(tx, e, matched, search_fn)
                response.append(_entry(res, base, prefer_return))
            except Exception as err:  # each batch entry fails on its own
                status, oo = error_outcome(err)
                response.append({"response": {"status": f"{status} {interactions.REASONS.get(status, '')}".strip(),
                                              "outcome": oo}})
    return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": f"{kind}-response", "entry": response}

