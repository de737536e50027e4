"""GET /metadata: the CapabilityStatement."""

import orjson
from flask import Blueprint

from fhir_iop.store.repository import instant, now
from server.app import base_url, state
from server.capability import capability_statement
from server.formats import respond

bp = Blueprint("metadata", __name__)

#: distinct (base URL, date) statements an application keeps (the base URL follows the Host header
#: unless BASE_URL is set: a client choosing Host headers cannot grow this past it)
KEPT = 16


@bp.get("/metadata")
def metadata():
    """The statement is made once per base URL and day, then served from memory: making it walks
    every type's search parameters (a few milliseconds of CPU), and clients fetch it often."""
    s = state()
    key = (base_url(), instant(now())[:10])
    body = s.capability_statements.get(key)
    if body is None:
        body = orjson.dumps(capability_statement(s.store.registry, key[0]))
        if len(s.capability_statements) >= KEPT:
            s.capability_statements.clear()
        s.capability_statements[key] = body
    return respond(body)
