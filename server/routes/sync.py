"""EHR sync endpoints (administrators only): start a push or pull, see the state, replay dead letters.

* ``POST [base]/sync/[connection]/$push`` — sends due outbox messages of that connection, at most
  ``_count`` (default ``SYNC_PUSH_LIMIT``, 200), **synchronously** in the request (bounded, so the
  request ends; a continuous sync is ``fhir-iop sync push --loop``, any number of them). Answers a
  ``Parameters`` with one ``valueInteger`` per outcome (sent, pending, dead, withheld).
* ``POST [base]/sync/[connection]/$pull`` — one incremental pull of that connection, at most
  ``_count`` pages per type (default ``SYNC_PULL_PAGES``, 20), synchronously; the cursors keep
  the place for the next call. ``Parameters`` with counts per outcome and ``error`` per type.
* ``POST [base]/$sync`` — both, for every configured connection.
* ``GET [base]/sync/status`` — JSON per connection: messages per state, pull cursors and bulk job
  state, the last run of each direction (with its last error), the oldest dead letters (ids,
  resource type/id, the EHR's reason).
* ``POST [base]/sync/dead-letters/$replay`` — dead letters back to pending: all, or those named by
  a ``Parameters`` body (``connection`` valueString, ``id`` valueInteger repeated, ``withheld``
  valueBoolean to release withheld messages too). ``Parameters`` with ``replayed``.

These are operations of this server, not FHIR-defined ones: they are not in ``/metadata``.
No rule in ``server/auth.py`` names them, so authorization admits administrators only; the views
check ``Access.admin`` again. Connections come from ``SYNC_CONFIG`` (``FHIR_IOP_SYNC_CONFIG``: the
connections file), read when the app is created; ``SYNC_CONNECTIONS`` (a dict) overrides it in
tests. Loading them also points the outbox write hook at them, so API writes queue for those EHRs.
Errors are OperationOutcomes: 404 for an unknown connection, 403 for a non-admin.
"""

from __future__ import annotations

from flask import Blueprint, current_app, request

from fhir_iop.sync import outbox
from server.access import current_access
from server.app import state
from server.errors import FhirHttpError
from server.formats import read_body, respond

bp = Blueprint("sync", __name__)
EXTENSION = "fhir_iop_sync"


def init_app(app) -> None:
    """Read the connections (once) and register the blueprint."""
    conns = app.config.get("SYNC_CONNECTIONS")
    if conns is None and app.config.get("SYNC_CONFIG"):
        from fhir_iop.sync.config import load
        conns = load(app.config["SYNC_CONFIG"])
    if conns is not None:
        outbox.configure(conns)
    app.extensions[EXTENSION] = conns or {}
    app.register_blueprint(bp)


def _connections() -> dict:
    return current_app.extensions.get(EXTENSION) or {}


def _admin() -> None:
    if not current_access().admin:
        raise FhirHttpError(403, f"{request.method} {request.path} is for administrators only")


def _connection(name: str):
    conns = _connections()
    if name not in conns:
        raise FhirHttpError(404, f"no EHR connection named {name!r} is configured", "not-found")
    return conns[name]


def _count(default_key: str, default: int) -> int:
    raw = request.args.get("_count")
    if raw is None:
        return int(current_app.config.get(default_key) or default)
    if not raw.isdigit() or not 1 <= int(raw) <= 10000:
        raise FhirHttpError(400, "_count must be an integer from 1 to 10000")
    return int(raw)


def _parameters(counts: dict, errors: dict | None = None, prefix: str = "") -> list[dict]:
    out = [{"name": f"{prefix}{k}", "valueInteger": int(v)} for k, v in sorted(counts.items())]
    out += [{"name": "error", "valueString": f"{k}: {v}"} for k, v in sorted((errors or {}).items())]
    return out


def _push(conn, limit: int) -> list[dict]:
    from fhir_iop.sync.push import push
    return _parameters(push(state().store, conn, limit=limit))


def _pull(conn, pages: int) -> list[dict]:
    from fhir_iop.sync.pull import pull
    result = pull(state().store, conn, max_pages=pages)
    return _parameters(result.by_outcome(), result.errors)


@bp.post("/sync/<name>/$push")
def push_one(name: str):
    _admin()
    conn = _connection(name)
    return respond({"resourceType": "Parameters",
                    "parameter": [{"name": "connection", "valueString": name},
                                  *_push(conn, _count("SYNC_PUSH_LIMIT", 200))]})


@bp.post("/sync/<name>/$pull")
def pull_one(name: str):
    _admin()
    conn = _connection(name)
    return respond({"resourceType": "Parameters",
                    "parameter": [{"name": "connection", "valueString": name},
                                  *_pull(conn, _count("SYNC_PULL_PAGES", 20))]})


@bp.post("/$sync")
def sync_all():
    _admin()
    params = []
    for name, conn in sorted(_connections().items()):
        part = [{"name": "connection", "valueString": name}]
        if conn.push_types:
            part.append({"name": "push", "part": _push(conn, int(current_app.config.get("SYNC_PUSH_LIMIT") or 200))})
        if conn.pull_types:
            part.append({"name": "pull", "part": _pull(conn, int(current_app.config.get("SYNC_PULL_PAGES") or 20))})
        params.append({"name": "result", "part": part})
    return respond({"resourceType": "Parameters", "parameter": params})


@bp.get("/sync/status")
def status():
    _admin()
    from fhir_iop.sync.push import status as sync_status
    return respond(sync_status(state().store, _connections(), request.args.get("connection")), fmt="json")


@bp.post("/sync/dead-letters/$replay")
def replay():
    _admin()
    from fhir_iop.sync.push import replay as do_replay
    connection, ids, withheld = None, [], False
    if request.get_data(cache=True):
        body = read_body()
        if body.get("resourceType") != "Parameters":
            raise FhirHttpError(400, "the body of $replay is a Parameters resource (or nothing)")
        for p in body.get("parameter") or []:
            name = p.get("name")
            if name == "connection" and isinstance(p.get("valueString"), str):
                connection = p["valueString"]
            elif name == "id" and isinstance(p.get("valueInteger"), int):
                ids.append(p["valueInteger"])
            elif name == "withheld" and isinstance(p.get("valueBoolean"), bool):
                withheld = p["valueBoolean"]
            else:
                raise FhirHttpError(400, f"$replay: unknown or mistyped parameter {name!r} "
                                         "(connection valueString, id valueInteger, withheld valueBoolean)")
    if connection is not None and connection not in _connections():
        raise FhirHttpError(404, f"no EHR connection named {connection!r} is configured", "not-found")
    states = (outbox.DEAD, outbox.WITHHELD) if withheld else (outbox.DEAD,)
    n = do_replay(state().store, connection, ids, states)
    return respond({"resourceType": "Parameters", "parameter": [{"name": "replayed", "valueInteger": n}]})
