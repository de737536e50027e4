"""Every request is audited: one AuditEvent per request (one per entry of a batch or transaction),
written before the response leaves; the AuditEvents are served, read-only, to administrators.

What left or was written is read from the response itself (the resource, the searchset/history
entries, ``Location`` of a create, the URL of a delete) and merged with what the request paths
told :func:`fhir_iop.audit.note` (the Consent that allowed each disclosure, the patient). Denials
and failures are audited too: 401 → outcome 4, 403 → 8, other 4xx → 4, 5xx → 12.

Why after the request and in a transaction of its own: the outcome of a write (its commit) is
known only after the route's transaction ends, and an AuditEvent must not claim a success that
rolled back. A read is never sent unaudited: if the AuditEvent cannot be written the response is
replaced by a 500 OperationOutcome, so nothing is disclosed. A write whose AuditEvent fails is
already committed: the client gets a 500 saying the change was stored but not audited, and the
error log names the request id (the write itself stays in the resource history).

One AuditEvent per batch/transaction entry: each entry is its own interaction (create, read,
search, ...), so ``subtype``, ``action`` and ``entity`` are right per event and an administrator's
``subtype=create`` or ``entity=…`` search finds it; the entries of one Bundle share the request
id (BALP ``XrequestId`` entity) and carry the ``transaction``/``batch`` subtype.

Logs: ``init_app`` installs :mod:`fhir_iop.audit.logs` (werkzeug's request line without its query
string; logged exceptions without their message).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from urllib.parse import urlsplit

import orjson
from flask import Blueprint, Flask, current_app, g, request
from sqlalchemy import select

from fhir_iop.audit import AUDIT_TYPE, Entity, facts, new_id, noted, outcome_for_status, patient_of, record, registry
from fhir_iop.audit.spool import Spool, spool_dir
from fhir_iop.audit.logs import install as install_log_filters
from fhir_iop.security.access import DEVELOPMENT
from fhir_iop.store import NotFound, search
from fhir_iop.store.models import resource
from server.app import request_root, state
from server.errors import FhirHttpError, outcome

log = logging.getLogger("fhir_iop.audit")

_WRITE_ACTIONS = ("create", "update", "delete")
#: public, PHI-free endpoints that are not audited
UNAUDITED = ("/metadata", "/.well-known/smart-configuration")

bp = Blueprint("audit", __name__)


# -- who is asking ------------------------------------------------------------------------------------

def _access():
    a = g._get_current_object().get("access")  # (one context lookup)
    if a is not None:
        return a
    if current_app.config.get("INSECURE_NO_AUTH"):
        return DEVELOPMENT
    return None


def request_id(gg=None, environ: dict | None = None) -> str:
    """This request's id: the client's ``X-Request-Id`` when it is a plausible one, else a new UUID
    (``gg``/``environ``: Flask's g and the WSGI environ, when the caller has them at hand)."""
    gg = gg or g._get_current_object()
    rid = gg.get("audit_request_id")
    if rid is None:
        given = (environ or request.environ).get("HTTP_X_REQUEST_ID", "")
        rid = given if 0 < len(given) <= 64 and given.replace("-", "").isalnum() else new_id()
        gg.audit_request_id = rid
    return rid


# -- the AuditEvent endpoints (admins only, read-only) ------------------------------------------------

def _require_admin(interaction: str):
    a = _access()
    if a is None:
        raise FhirHttpError(401, "authentication required")
    allowed = a.admin
    if allowed and a.scopes is not None:
        try:
            from fhir_iop.security.scopes import allows
            allowed = allows(a.scopes, AUDIT_TYPE, interaction)
        except ImportError:  # pragma: no cover
            allowed = True
    if not allowed:
        raise FhirHttpError(403, "AuditEvents are readable only by administrators with a scope on AuditEvent")


def _read_only():
    raise FhirHttpError(405, "AuditEvents are append-only: they are never created, updated or deleted "
                             "through the API", code="not-supported")


@bp.route("/AuditEvent", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
def audit_search():
    if request.method not in ("GET", "HEAD"):
        _read_only()
    _require_admin("search")
    return _search(list(request.args.items(multi=True)))


@bp.route("/AuditEvent/_search", methods=["POST"])
def audit_search_post():
    _require_admin("search")
    return _search(list(request.args.items(multi=True)) + list(request.form.items(multi=True)))


def _search(params):
    from server import bundles
    from server.app import base_url
    from server.formats import prefer, respond
    s = state()
    q = search.parse(registry(), AUDIT_TYPE, params, strict=prefer().get("handling") == "strict",
                     default_count=s.default_count, max_count=s.max_count)
    if q.include or q.revinclude:  # an include would hand out resources past the Part 2 gate
        q.unknown.append(("_include/_revinclude", "_include and _revinclude are not supported on AuditEvent"))
        q.include, q.revinclude = [], []
    drain()
    with s.store.reading() as tx:
        result = search.run(tx.conn, q, registry())
    return respond(bundles.searchset(base_url(), AUDIT_TYPE, q, result))


@bp.route("/AuditEvent/<rid>", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
def audit_read(rid: str):
    if request.method not in ("GET", "HEAD"):
        _read_only()
    _require_admin("read")
    return _read(rid)


@bp.route("/AuditEvent/<rid>/_history/<vid>", methods=["GET", "HEAD"])
def audit_vread(rid: str, vid: str):
    _require_admin("vread")
    if vid != "1":
        raise NotFound(f"AuditEvent/{rid}/_history/{vid} is not known (AuditEvents have one version)")
    return _read(rid)


@bp.route("/AuditEvent/<path:rest>", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"])
def audit_other(rest: str):
    if request.method not in ("GET", "HEAD"):
        _read_only()
    _require_admin("read")
    raise FhirHttpError(404, f"AuditEvent/{rest} is not supported (read, vread and search are)")


def _read(rid: str):
    from server.formats import http_date, respond
    drain()
    with state().store.reading() as tx:
        row = tx.conn.execute(select(resource.c.body, resource.c.last_updated)
                              .where(resource.c.type == AUDIT_TYPE, resource.c.id == rid)).first()
    if row is None:
        raise NotFound(f"AuditEvent/{rid} is not known")
    return respond(row.body, 200, {"ETag": 'W/"1"', "Last-Modified": http_date(row.last_updated)})


def capability() -> dict:
    """The CapabilityStatement entry of AuditEvent (``server/capability.py`` adds it)."""
    from server.capability import DOCS
    params = [{"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"},
              {"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
               "type": "date", "documentation": DOCS["date"]}]
    for code, p in sorted(registry().for_type(AUDIT_TYPE).items()):
        params.append({"name": code, "definition": p.url, "type": p.type, "documentation": DOCS[p.type]})
    return {"type": AUDIT_TYPE, "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
            "documentation": "The audit trail (IHE BALP patterns): one AuditEvent per request (per batch or "
                             "transaction entry) and per export, push or disclosure. Administrators only (admin "
                             "client and a scope on AuditEvent); append-only: create, update and delete get 405.",
            "interaction": [{"code": c} for c in ("read", "vread", "search-type")],
            "versioning": "no-version", "readHistory": False, "updateCreate": False,
            "conditionalCreate": False, "conditionalRead": "not-supported", "conditionalUpdate": False,
            "conditionalDelete": "not-supported", "referencePolicy": ["literal", "logical"],
            "searchParam": params}


# -- what one request did -----------------------------------------------------------------------------

def _json(data: bytes, mimetype: str):
    if not data:
        return None
    if "xml" in (mimetype or ""):
        from fhir_iop.fhir import r4
        try:
            return r4.from_xml_element(r4.parse_xml(data))
        except Exception:
            return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _entities_of(body) -> list[Entity]:
    """The resources a response body carries (a resource, or a Bundle's entries)."""
    return [e for e, _ in _resources_of(body)]


def _resources_of(body) -> list[tuple[Entity, dict | None]]:
    """(Entity, the resource as it left) for each resource a response body carries."""
    if not isinstance(body, dict):
        return []
    rt = body.get("resourceType")
    if rt == "OperationOutcome":
        return []
    if rt == "Bundle" and body.get("type") in ("searchset", "history", "collection", "document"):
        out = []
        for e in body.get("entry") or ():
            r = e.get("resource")
            if isinstance(r, dict) and r.get("resourceType") not in (None, "OperationOutcome") and r.get("id"):
                out.append((Entity(f"{r['resourceType']}/{r['id']}", patient_of(r)), r))
            elif not r and e.get("fullUrl"):  # a deletion in a history
                t = _ref_from_url(e["fullUrl"])
                if t:
                    out.append((Entity(t), None))
        return out
    if rt and body.get("id"):
        return [(Entity(f"{rt}/{body['id']}", patient_of(body)), body)]
    return []


def with_consents(tx, access, items: list[tuple[Entity, dict | None]]) -> list[Entity]:
    """The entities, each with the Consent that let it leave to an outside recipient (the Part 2 gate's
    decision on the resource as it left); unchanged for internal access or data without Part 2 labels."""
    if access is None or access.recipient is None:
        return [e for e, _ in items]
    from fhir_iop.disclosure import Gate, labelled
    gate = None
    decided: dict = {}  # (patient, type) → Decision: the gate decides by patient, type and access
    out = []
    for e, res in items:
        if res is not None and e.consent is None and labelled(res):
            gate = gate or Gate(tx, access)
            key = (e.patient, res.get("resourceType")) if e.patient else None
            d = decided.get(key) if key else None
            if d is None:
                d = gate.decide(res)
                if key:
                    decided[key] = d
            e = Entity(e.ref, e.patient, d.consent, d.reason if d.reason in ("emergency", "withheld") else e.reason)
        out.append(e)
    return out


def _ref_from_url(url: str) -> str | None:
    segs = [s for s in urlsplit(url).path.split("/") if s]
    for i in range(len(segs) - 1):
        if segs[i][:1].isupper() and segs[i].isalpha() and not segs[i + 1].startswith(("_", "$")):
            return f"{segs[i]}/{segs[i + 1]}"
    return None


def classify(method: str, path: str) -> tuple[str, list[str], str | None, str | None]:
    """(action, extra subtypes, resource type, Type/id) of a REST request."""
    if not path.isprintable():  # a refused NUL path (400) is still audited
        path = "".join(c if c.isprintable() else "\ufffd" for c in path)
    segs = [s for s in path.split("/") if s]
    rt = segs[0] if segs and segs[0][:1].isupper() else None
    ref = f"{segs[0]}/{segs[1]}" if rt and len(segs) >= 2 and not segs[1].startswith(("_", "$")) else None
    if any(s.startswith("$") for s in segs):
        return "operation", [], rt, ref
    if method in ("GET", "HEAD"):
        if not segs:
            return "operation", [], None, None
        if segs == ["_history"]:
            return "history", ["history-system"], None, None
        if rt and len(segs) == 1:
            return "search", [], rt, None
        if rt and len(segs) == 2 and segs[1] == "_history":
            return "history", ["history-type"], rt, None
        if ref and len(segs) == 2:
            return "read", [], rt, ref
        if ref and len(segs) == 3 and segs[2] == "_history":
            return "history", ["history-instance"], rt, ref
        if ref and len(segs) == 4 and segs[2] == "_history":
            return "vread", [], rt, ref
        return "operation", [], rt, ref
    if method == "POST":
        if not segs:
            return "transaction", [], None, None
        if rt and len(segs) == 2 and segs[1] == "_search":
            return "search", [], rt, None
        if rt and len(segs) == 1:
            return "create", [], rt, None
    if method == "PUT" and rt:
        return "update", [], rt, ref
    if method == "DELETE" and rt:
        return "delete", [], rt, ref
    return "operation", [], rt, ref


def _merge(entities: list[Entity], notes: dict[str, Entity]) -> list[Entity]:
    out, seen = [], set()
    for e in entities:
        n = notes.get(e.ref)
        out.append(Entity(e.ref, e.patient or (n.patient if n else None), n.consent if n else None,
                          n.reason if n else None))
        seen.add(e.ref)
    out += [n for ref, n in notes.items() if ref not in seen]
    return out


def _query_of(method: str) -> bytes | None:
    q = request.query_string or b""
    if method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
        form = request.get_data(cache=True)
        q = q + (b"&" if q and form else b"") + form
    return q


def events_for(response, req=None, gg=None) -> list[dict]:
    """The keyword arguments of :func:`fhir_iop.audit.record` for each AuditEvent of this request
    (``req``/``gg``: Flask's request and g, when the caller has them at hand)."""
    req = req or request._get_current_object()
    gg = gg or g._get_current_object()
    method, path, status = req.method, req.path, response.status_code
    action, subtypes, rt, ref = classify(method, path)
    common = {"network": req.remote_addr, "server": request_root(), "request_id": request_id(gg, req.environ)}
    notes = noted(gg)
    body = None
    if status < 400 and not response.is_streamed and response.status_code != 204:
        body = _json(response.get_data(), response.headers.get("Content-Type"))

    if action == "transaction" and isinstance(body, dict) and body.get("type") in ("transaction-response",
                                                                                    "batch-response"):
        return _bundle_events(body, notes, common)
    if action == "transaction":
        kind = _bundle_kind()
        action = kind or "transaction"

    items = _resources_of(body) if status < 400 and action not in _WRITE_ACTIONS and rt != AUDIT_TYPE else []
    entities = [e for e, _ in items]
    if status < 400 and action in _WRITE_ACTIONS:
        entities = _entities_of(body)
    if status < 400 and action in ("create", "update") and not entities:
        loc = response.headers.get("Location") or response.headers.get("Content-Location")
        if loc and (r := _ref_from_url(loc)):
            entities = [Entity(r, _request_patient())]
    if ref and not entities and action in ("read", "vread", "update", "delete"):
        entities = [Entity(ref, _request_patient() if action == "update" else None)]
    written = gg.get("audit_written") or _NOTHING_WRITTEN
    if status < 400 and written["refs"]:
        entities = [Entity(e.ref, e.patient or written["refs"].get(e.ref), e.consent, e.reason) for e in entities]
        if action not in _WRITE_ACTIONS and action not in ("transaction", "batch"):
            entities += [Entity(r, p) for r, p in written["refs"].items() if r not in {e.ref for e in entities}]
    # (the entities so far carry no consent or reason: with nothing noted, merging would change nothing)
    ev = {"action": action, "outcome": outcome_for_status(status),
          "entities": _merge(entities, notes) if status < 400 and notes else entities,
          "subtypes": subtypes, "resource_type": rt, **common}
    if status < 400 and written["count"] and action not in _WRITE_ACTIONS:
        ev["description"] = f"{written['count']} resource(s) written" + (
            f", the first {MAX_WRITTEN} listed" if written["count"] > MAX_WRITTEN else "")
    if items:
        ev["_resources"] = {e.ref: r for e, r in items if r is not None}
    if action in ("search", "history"):
        ev["query"] = _query_of(method)
    if status >= 400:
        ev["description"] = f"HTTP {status}"
    return [ev]


def _request_bundle():
    try:
        data = request.get_data(cache=True)
    except Exception:
        return None
    return _json(data, request.mimetype)


def _bundle_kind() -> str | None:
    b = _request_bundle()
    kind = b.get("type") if isinstance(b, dict) else None
    return kind if kind in ("transaction", "batch") else None


def _request_patient() -> str | None:
    b = _request_bundle()
    return patient_of(b) if isinstance(b, dict) else None


def _bundle_events(body: dict, notes: dict[str, Entity], common: dict) -> list[dict]:
    kind = body["type"].removesuffix("-response")
    req = _request_bundle()
    req_entries = (req.get("entry") or []) if isinstance(req, dict) else []
    req_entries = [x if isinstance(x, dict) else {} for x in req_entries] if isinstance(req_entries, list) else []
    events = []
    for n, e in enumerate(body.get("entry") or ()):
        r = req_entries[n].get("request") or {} if n < len(req_entries) else {}
        r = r if isinstance(r, dict) else {}
        url = str(r.get("url") or "")
        parts = urlsplit(url)
        action, subtypes, rt, ref = classify(str(r.get("method") or "GET").upper(), parts.path)
        if action == "transaction":
            action = "operation"
        resp = e.get("response") or {}
        try:
            status = int(str(resp.get("status", "200")).split()[0])
        except ValueError:
            status = 200
        items = _resources_of(e.get("resource")) if status < 400 else []
        entities = [x for x, _ in items]
        if status < 400 and not entities and (loc := resp.get("location") or e.get("fullUrl")):
            if r2 := _ref_from_url(loc):
                entities = [Entity(r2, patient_of((req_entries[n].get("resource") or {})) if n < len(req_entries)
                                   else None)]
        if not entities and ref and action in ("read", "vread", "update", "delete"):
            entities = [Entity(ref)]
        ev = {"action": action, "outcome": outcome_for_status(status), "subtypes": [*subtypes, kind],
              "entities": [Entity(x.ref, x.patient or (notes[x.ref].patient if x.ref in notes else None),
                                  notes[x.ref].consent if x.ref in notes else None,
                                  notes[x.ref].reason if x.ref in notes else None) for x in entities],
              "resource_type": rt, **common}
        if items and action not in _WRITE_ACTIONS:
            ev["_resources"] = {x.ref: r for x, r in items if r is not None}
        if action == "search":
            ev["query"] = parts.query
        if status >= 400:
            ev["description"] = f"{kind} entry {n}: HTTP {status}"
        events.append(ev)
    return events


#: what a request that wrote nothing has in place of ``g.audit_written`` (read only)
_NOTHING_WRITTEN = {"count": 0, "refs": {}}
#: at most this many written resources are listed in one AuditEvent (a $load-iop writes thousands)
MAX_WRITTEN = 1000


def _written_hook(tx, rid_pk, rt, rid, res) -> None:
    """A store write hook: the resources the current request writes (committed or not: only a
    successful request lists them)."""
    from flask import has_request_context
    if not has_request_context() or rt == AUDIT_TYPE:
        return
    w = g.get("audit_written")
    if w is None:
        w = g.audit_written = {"count": 0, "refs": {}}
    w["count"] += 1
    if len(w["refs"]) < MAX_WRITTEN:
        w["refs"][f"{rt}/{rid}"] = patient_of(res) if res else None


def store_events(store, access, events: list[dict]) -> None:
    """The request's AuditEvents: appended to the audit spool (``fhir_iop.audit.spool``), or, with
    ``AUDIT_SPOOL=off``, written to the store in a transaction of their own. Each names the Consent
    that let each Part 2 resource leave (read in that transaction, or, spooled, in a read opened only
    when an outside recipient got labelled resources). Raises when they cannot be recorded."""
    spool = current_spool()
    if spool is not None and not any(ev.get("_resources") and _needs_consents(access, ev["_resources"])
                                     for ev in events):  # (the common case: nothing to look up)
        for ev in events:
            ev.pop("_resources", None)
        spool.append([facts(access, **ev) for ev in events])
        return
    with ExitStack() as stack:
        tx = stack.enter_context(store.transaction()) if spool is None else None
        for ev in events:
            resources = ev.pop("_resources", None)
            if resources and (tx is not None or _needs_consents(access, resources)):
                tx = tx or stack.enter_context(store.reading())
                ev["entities"] = with_consents(tx, access, [(e, resources.get(e.ref)) for e in ev["entities"]])
        if spool is None:
            for ev in events:
                record(tx, access, **ev)
    if spool is not None:
        spool.append([facts(access, **ev) for ev in events])  # (the shipper builds the AuditEvents)


def _needs_consents(access, resources: dict) -> bool:
    if access is None or access.recipient is None:
        return False
    from fhir_iop.disclosure import labelled
    return any(r is not None and labelled(r) for r in resources.values())


def audit_response(response):
    """The after-request hook: write the request's AuditEvent(s); a 500 if that fails."""
    req = request._get_current_object()
    if req.environ.get("REQUEST_METHOD") == "OPTIONS" or req.path in UNAUDITED:
        return response
    gg = g._get_current_object()
    try:
        access = _access()
        try:
            events = events_for(response, req, gg)
        except Exception as e:  # a body this code cannot read: still one AuditEvent, with what the URL says
            log.warning("audit: request %s described from its URL only (%s)", request_id(), type(e).__name__)
            action, subtypes, rt, ref = classify(request.method, request.path)
            events = [{"action": action if action != "transaction" else "operation",
                       "outcome": outcome_for_status(response.status_code), "entities": [Entity(ref)] if ref else [],
                       "subtypes": subtypes, "resource_type": rt, "network": request.remote_addr,
                       "server": request_root(), "request_id": request_id(),
                       "description": f"HTTP {response.status_code}; the body could not be read for the audit"}]
        store_events(state().store, access, events)
    except Exception as e:
        log.error("audit failed for request %s (%s %s, status %s): %s", g.get("audit_request_id"), request.method,
                  request.url_rule.rule if request.url_rule else "?", response.status_code, type(e).__name__)
        from server.formats import respond
        wrote = request.method in ("POST", "PUT", "DELETE", "PATCH") and response.status_code < 400
        msg = ("the change was stored but could not be audited; the server log names the request"
               if wrote else "the request could not be audited, so nothing was disclosed")
        return respond(outcome(msg, "exception"), 500, {"X-Request-Id": request_id()})
    response.headers["X-Request-Id"] = gg.get("audit_request_id") or request_id(gg, req.environ)
    return response


# -- PHI-free logs: fhir_iop.audit.logs ----------------------------------------------------------------

def _auth_rules() -> None:
    """The authorization layer's rules for the AuditEvent endpoints: read/search need ``r``/``s`` on
    AuditEvent and admin (``server/auth.py`` ADMIN_ONLY_TYPES); writes reach the view, which says 405."""
    try:
        from server import auth
    except ImportError:  # pragma: no cover - no authorization layer in this build
        return

    def reading(interaction):
        return lambda a: [(AUDIT_TYPE, interaction)] if request.method in ("GET", "HEAD", "POST") and (
            request.method != "POST" or request.path.endswith("/_search")) else []

    auth.RULES.update({"audit.audit_search": reading("search"), "audit.audit_search_post": reading("search"),
                       "audit.audit_read": reading("read"), "audit.audit_vread": reading("vread"),
                       "audit.audit_other": reading("read")})


def init_app(app: Flask) -> None:
    install_log_filters()
    _auth_rules()
    from fhir_iop.store.repository import WRITE_HOOKS
    if _written_hook not in WRITE_HOOKS:
        WRITE_HOOKS.append(_written_hook)
    app.register_blueprint(bp)
    app.after_request(audit_response)
    store = app.extensions["fhir_iop"].store
    directory = spool_dir(app.config.get("AUDIT_SPOOL", "auto"), store.url)
    if directory is not None:
        spool = Spool(store, directory, interval=float(app.config.get("AUDIT_SPOOL_INTERVAL", 0.1)),
                      fsync=_flag(app.config.get("AUDIT_SPOOL_FSYNC", False)),
                      shipper=str(app.config.get("AUDIT_SPOOL_SHIPPER", "thread")))
        app.extensions[SPOOL] = spool
        store.on_dispose.append(spool.close)


# -- the audit spool ----------------------------------------------------------------------------------

SPOOL = "fhir_iop_audit_spool"


def _flag(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def current_spool() -> Spool | None:
    return current_app.extensions.get(SPOOL)


def drain() -> None:
    """Ship this process's spooled AuditEvents into the store (before AuditEvents are searched)."""
    spool = current_spool()
    if spool is not None:
        spool.drain()


__all__ = ["audit_response", "bp", "capability", "classify", "drain", "events_for", "init_app", "request_id",
           "store_events"]
