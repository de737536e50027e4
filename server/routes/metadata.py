"""GET /metadata: the CapabilityStatement."""

from flask import Blueprint

from server.app import base_url, state
from server.capability import capability_statement
from server.formats import respond

bp = Blueprint("metadata", __name__)


@bp.get("/metadata")
def metadata():
    return respond(capability_statement(state().store.registry, base_url()))
