"""The REST interactions per resource type: read, vread, create, update, delete, history, search."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import parse_qsl, urlencode

from flask import Blueprint, request

from fhir_iop.store import Invalid, Tx, search
from fhir_iop.store.params import date_range
from fhir_iop.store.repository import check_type
from server import bundles, interactions
from server.app import base_url, state
from server.elements import SUMMARY_MODES, summarize
from server.formats import if_match, not_modified, prefer, read_body, respond
from server.interactions import GatedStore, Result, gated

bp = Blueprint("resources", __name__)


def send(result: Result):
    """A Result as an HTTP response, honouring ``Prefer: return=``."""
    req = request._get_current_object()  # (one context lookup)
    env = req.environ
    payload = result.payload(prefer(env).get("return"))
    status = result.status
    if payload is not None and status == 204:
        status = 200
    s = result.stored
    if req.method in ("GET", "HEAD") and status == 200 and s is not None:
        if not_modified(s.version_id, s.last_updated, env):  # conditional read (If-None-Match, If-Modified-Since)
            return respond(None, 304, result.headers(base_url))
        if env.get("QUERY_STRING") and req.args.get("_summary") in SUMMARY_MODES and payload is s.body:  # ?_summary=
            payload = summarize(payload, request.args["_summary"])
    return respond(payload, status, result.headers(base_url))


# -- search -----------------------------------------------------------------------------------------

def run_search(tx: Tx, rt: str, query: str | list[tuple[str, str]], path: str | None = None) -> bytes:
    check_type(rt)
    s = state()
    params = parse_qsl(query, keep_blank_values=True) if isinstance(query, str) else query
    q = search.parse(s.store.registry, rt, params, strict=prefer().get("handling") == "strict",
                     default_count=s.default_count, max_count=s.max_count)
    gate = gated(tx)  # Part 2: withheld rows are left out in SQL; what leaves is marked
    return bundles.searchset(base_url(), path or rt, q, tx.search(q), gate.outgoing)


def store() -> GatedStore:
    """The store for this request: every transaction carries the request's Part 2 gate."""
    return GatedStore(state().store)


@bp.get("/<rtype>")
def search_type(rtype: str):
    check_type(rtype)
    with store().reading() as tx:
        return respond(run_search(tx, rtype, list(request.args.items(multi=True))))


@bp.post("/<rtype>/_search")
def search_post(rtype: str):
    check_type(rtype)
    params = list(request.args.items(multi=True)) + list(request.form.items(multi=True))
    with store().reading() as tx:
        return respond(run_search(tx, rtype, params))


# -- create, update, delete -----------------------------------------------------------------------

@bp.post("/<rtype>")
def create(rtype: str):
    check_type(rtype)
    body = read_body()
    # conditional create: If-None-Exist, or criteria in the query string (as fhirpy's get_or_create sends them)
    criteria = request.headers.get("If-None-Exist") or urlencode(
        [(k, v) for k, v in request.args.items(multi=True) if k not in ("_format", "_pretty")])
    with store().transaction() as tx:
        result = interactions.create(tx, rtype, body, criteria or None)
    return send(result)


@bp.put("/<rtype>")
def conditional_update(rtype: str):
    check_type(rtype)
    query = urlencode([(k, v) for k, v in request.args.items(multi=True) if k not in ("_format", "_pretty")])
    if not query:
        raise Invalid("PUT without an id needs search criteria (conditional update), e.g. ?identifier=system|value",
                      status=400)
    body = read_body()
    with store().transaction() as tx:
        result = interactions.conditional_update(tx, rtype, query, body, if_match())
    return send(result)


@bp.put("/<rtype>/<rid>")
def update(rtype: str, rid: str):
    check_type(rtype)
    body = read_body()
    with store().transaction() as tx:
        result = interactions.update(tx, rtype, rid, body, if_match())
    return send(result)


@bp.delete("/<rtype>")
def conditional_delete(rtype: str):
    check_type(rtype)
    query = urlencode([(k, v) for k, v in request.args.items(multi=True) if k not in ("_format", "_pretty")])
    if not query:
        raise Invalid("DELETE without an id needs search criteria (conditional delete), e.g. ?identifier=system|value",
                      status=400)
    with store().transaction() as tx:
        result = interactions.conditional_delete(tx, rtype, query)
    return send(result)


@bp.delete("/<rtype>/<rid>")
def delete(rtype: str, rid: str):
    check_type(rtype)
    with store().transaction() as tx:
        result = interactions.delete(tx, rtype, rid, if_match())
    return send(result)


# -- read, vread, history -----------------------------------------------------------------------

@bp.get("/<rtype>/<rid>")
def read(rtype: str, rid: str):
    with store().reading() as tx:
        return send(interactions.read(tx, rtype, rid))


@bp.get("/<rtype>/<rid>/_history/<vid>")
def vread(rtype: str, rid: str, vid: str):
    with store().reading() as tx:
        return send(interactions.vread(tx, rtype, rid, vid))


def history_params() -> tuple[datetime | None, int, int]:
    s = state()
    since = request.args.get("_since")
    rng = date_range(since) if since else None
    if since and rng is None:
        raise Invalid(f"_since {since!r} is not a FHIR instant", status=400)
    try:
        count = min(int(request.args.get("_count", s.default_count)), s.max_count)
        offset = int(request.args.get("_offset", 0))
    except ValueError:
        raise Invalid("_count and _offset take integers", status=400) from None
    if offset > search.MAX_OFFSET:
        raise Invalid(f"_offset must be at most {search.MAX_OFFSET}", status=400)
    return (rng[0] if rng else None), max(count, 0), max(offset, 0)


def _history(rtype: str | None, rid: str | None, path: str):
    since, count, offset = history_params()
    with store().reading() as tx:
        total, versions = tx.history(rtype, rid, since, count, offset)
        extra = [("_since", request.args["_since"])] if "_since" in request.args else []
        return respond(bundles.history(base_url(), path, total, versions, count, offset, extra, gated(tx).outgoing))


@bp.get("/<rtype>/_history")
def type_history(rtype: str):
    check_type(rtype)
    return _history(rtype, None, f"{rtype}/_history")


@bp.get("/<rtype>/<rid>/_history")
def instance_history(rtype: str, rid: str):
    check_type(rtype)
    return _history(rtype, rid, f"{rtype}/{rid}/_history")

