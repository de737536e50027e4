"""searchset and history Bundles. Entries embed the stored JSON text as it is (no re-encoding)
unless ``_elements`` asks for a subset.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

import orjson

from fhir_iop.store import Stored
from fhir_iop.store.repository import instant, now
from fhir_iop.store.search import Query, SearchResult
from server.elements import SUMMARY_MODES, subset, summarize
from server.errors import outcome


def _head(kind: str, total: int | None, links: list[tuple[str, str]]) -> bytes:
    head = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "meta": {"lastUpdated": instant(now())},
            "type": kind}
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": r, "url": u} for r, u in links]
    return orjson.dumps(head)[:-1]


def _assemble(head: bytes, entries: list[bytes]) -> bytes:
    if not entries:
        return head + b"}"
    return head + b',"entry":[' + b",".join(entries) + b"]}"


def _entry(base: str, rt: str, rid: str, body: str | bytes, mode: str | None, extra: dict | None = None) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    parts = [b'{"fullUrl":' + orjson.dumps(f"{base}/{rt}/{rid}") + b',"resource":' + body]
    if mode:
        parts.append(b',"search":{"mode":"' + mode.encode() + b'"}')
    if extra:
        parts.append(b"," + orjson.dumps(extra)[1:-1])
    return b"".join(parts) + b"}"


def searchset(base: str, path: str, q: Query, r: SearchResult, out=None) -> bytes:
    """``out(type, id, body)``: the body as it leaves (``Gate.outgoing``: the redisclosure prohibition on
    Part 2 data for an outside recipient); the gate already left withheld rows out of ``r``."""
    out = out or (lambda rt, rid, body: body)

    def link(offset: int) -> str:
        return f"{base}/{path}?{urlencode(q.link_params(offset))}"

    links = [("self", link(q.offset))]
    if q.summary != "count" and q.count > 0:
        links.append(("first", link(0)))
        if q.offset > 0:
            links.append(("previous", link(max(0, q.offset - q.count))))
        if r.has_next:
            links.append(("next", link(q.offset + q.count)))
        if r.total is not None and r.total > 0:
            links.append(("last", link(((r.total - 1) // q.count) * q.count)))
    entries = []
    for rt, rid, body in r.matches:
        if q.summary in SUMMARY_MODES:
            body = summarize(body, q.summary)
        entries.append(_entry(base, rt, rid, out(rt, rid, subset(body, q.elements) if q.elements else body), "match"))
    for rt, rid, body in r.included:
        entries.append(_entry(base, rt, rid, out(rt, rid, body), "include"))
    if q.unknown:
        oo = outcome("search parameters ignored (Prefer: handling=lenient): "
                     + "; ".join(reason for _, reason in q.unknown), "not-supported", "warning")
        entries.append(b'{"resource":' + orjson.dumps(oo) + b',"search":{"mode":"outcome"}}')
    return _assemble(_head("searchset", r.total, links), entries)


def history(base: str, path: str, total: int, versions: list[Stored], count: int, offset: int,
            extra_params: list[tuple[str, str]], out=None) -> bytes:
    out = out or (lambda rt, rid, body: body)

    def link(off: int) -> str:
        return f"{base}/{path}?{urlencode([*extra_params, ('_count', str(count)), ('_offset', str(off))])}"

    links = [("self", link(offset))]
    if offset > 0:
        links.append(("previous", link(max(0, offset - count))))
    if offset + count < total:
        links.append(("next", link(offset + count)))
    entries = []
    for v in versions:
        url = f"{base}/{v.type}/{v.id}"
        method = v.method or "PUT"
        req = {"method": method, "url": f"{v.type}/{v.id}" if method != "POST" else v.type}
        status = "410 Gone" if v.deleted else ("201 Created" if v.version_id == 1 else "200 OK")
        resp = {"status": status, "etag": f'W/"{v.version_id}"', "lastModified": instant(v.last_updated)}
        if v.deleted:
            entries.append(orjson.dumps({"fullUrl": url, "request": req, "response": resp}))
        else:
            entries.append(_entry(base, v.type, v.id, out(v.type, v.id, v.body), None,
                                  {"request": req, "response": resp}))
    return _assemble(_head("history", total, links), entries)
