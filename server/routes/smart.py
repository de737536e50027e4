"""SMART discovery and the token endpoint (fhir-iop as the authorization server of backend clients).

``GET /.well-known/smart-configuration`` (SMART App Launch 2, "Conformance"), ``POST /auth/token``
(SMART Backend Services: client_credentials with a private_key_jwt client assertion; answers and
errors in OAuth 2.0 JSON, not OperationOutcome), ``GET /auth/jwks`` (the public keys the server
signs its access tokens with, for resource servers that want to check them).
"""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, current_app, g, request

from fhir_iop.security.keys import CLIENT_ALGS
from fhir_iop.security.tokens import OAuthError
from server.app import base_url

bp = Blueprint("smart", __name__)

TOKEN_PATH = "/auth/token"


def token_url() -> str:
    """The token endpoint's URL (what a client assertion's ``aud`` must be): config ``TOKEN_URL``,
    else the base URL + /auth/token."""
    return current_app.config.get("TOKEN_URL") or base_url() + TOKEN_PATH


def scopes_supported() -> list[str]:
    from fhir_iop.store.params import RESOURCE_TYPES
    return ["system/*.read", "system/*.rs", "system/*.cruds", "system/*.write", "system/*.*",
            *(f"system/{t}.{p}" for t in RESOURCE_TYPES for p in ("read", "rs"))]


def _json(body: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json",
                    headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@bp.get("/.well-known/smart-configuration")
def configuration():
    from server.auth import authority
    a = authority()
    external = {}
    if a.jwks_url and a.external_issuer:
        external = {"external_issuer": a.external_issuer}
    body = {
        "issuer": a.issuer,
        "jwks_uri": base_url() + "/auth/jwks",
        "token_endpoint": token_url(),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ALGS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": scopes_supported(),
        "response_types_supported": ["token"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        **external,
    }
    return _json(body)


@bp.post(TOKEN_PATH)
def token():
    from server.auth import authority
    if request.mimetype != "application/x-www-form-urlencoded":
        return _json(OAuthError("invalid_request", "the token request is a form POST "
                                                   "(application/x-www-form-urlencoded)").body(), 400)
    try:
        body = authority().exchange(request.form, token_url())
    except OAuthError as e:
        current_app.logger.info("token request refused: %s (%s)", e.error, e.description)
        response = _json(e.body(), e.status)
        if e.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="fhir-iop"'
        return response
    # the audit names the client the token went to (the request itself carried no bearer token)
    import jwt

    from fhir_iop.security.access import Access
    g.access = Access(client_id=jwt.decode(body["access_token"], options={"verify_signature": False})["client_id"])
    return _json(body)


@bp.get("/auth/jwks")
def jwks():
    from server.auth import authority
    return _json(authority().keys.jwks())
