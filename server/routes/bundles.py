"""POST / : batch and transaction Bundles; GET /_history: the history of everything."""

from flask import Blueprint, request

from server import bundles, transaction
from server.app import base_url
from server.formats import prefer, read_body, respond
from server.interactions import gated
from server.routes.resources import history_params, run_search, store

bp = Blueprint("bundles", __name__)


@bp.post("/")
def batch_or_transaction():
    response = transaction.process(store(), read_body(), base_url(), prefer().get("return"), run_search)
    return respond(response)


@bp.get("/_history")
def system_history():
    since, count, offset = history_params()
    with store().reading() as tx:
        total, versions = tx.history(since=since, count=count, offset=offset)
        extra = [("_since", request.args["_since"])] if "_since" in request.args else []
        return respond(bundles.history(base_url(), "_history", total, versions, count, offset, extra,
                                       gated(tx).outgoing))
