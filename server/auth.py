"""Authorization on the facade: a bearer token on every request, SMART scopes per interaction.

Every request except ``GET /metadata``, ``GET /.well-known/smart-configuration``, the token endpoint
``POST /auth/token`` and the server's public keys ``GET /auth/jwks`` needs
``Authorization: Bearer <token>`` (a token of our token endpoint, or of the external authorization
server configured by ``AUTH_JWKS_URL``/``AUTH_ISSUER``/``AUTH_AUDIENCE``; see
``fhir_iop.security.tokens``). The hook sets ``g.access`` (an :class:`Access`): client, recipient,
purpose and admin from the client's registration, scopes from the token.

* no token, a malformed, badly signed or expired one, or one of a disabled client → **401**
  OperationOutcome with ``WWW-Authenticate: Bearer``;
* a scope that does not allow the interaction on the resource type → **403** OperationOutcome.

The interaction of each route (``RULES``) follows ``fhir_iop.security.scopes``: read, vread,
instance history need ``r``; search and type history ``s``; create ``c``; update ``u``; delete ``d``.
Conditional create and conditional update search before they write, so they also need ``s``;
``_include`` needs ``r`` on every type it can bring in, ``_revinclude`` ``s`` on the type it names.
System history (``GET /_history``) needs ``s`` on ``*``. Batch and transaction entries are each
checked as their own interaction (``check_entry``, called by ``server/transaction.py``): a denied
entry fails a transaction whole (403) and a batch entry on its own. ``AuditEvent`` is for
administrators only, and read-only. A route without a rule is for administrators only.

Emergency: a request with ``X-Fhir-Iop-Emergency: true`` asks for a medical-emergency disclosure
(42 CFR 2.51): allowed only when the client's registration has ``emergency_allowed`` (else 403);
it then acts with ``emergency=True`` and purpose ``ETREAT``, and the audit trail records it.

``INSECURE_NO_AUTH`` (the development flag, default false) switches all of this off: every request
acts as the program itself with every permission (``DEVELOPMENT``) and a warning is logged at start.
"""

from __future__ import annotations

from typing import Callable

from flask import Flask, current_app, g, request

from fhir_iop.security import scopes as smart_scopes
from fhir_iop.security.access import DEVELOPMENT, Access
from fhir_iop.security.tokens import Authority, InvalidToken
from fhir_iop.store.params import RESOURCE_TYPES
from server.errors import FhirHttpError, outcome

EXTENSION = "fhir_iop_auth"
EMERGENCY_HEADER = "X-Fhir-Iop-Emergency"
EMERGENCY_ENVIRON = "HTTP_" + EMERGENCY_HEADER.upper().replace("-", "_")
#: endpoints anyone may call
PUBLIC = {"metadata.metadata", "smart.configuration", "smart.token", "smart.jwks", "static"}
ADMIN_ONLY_TYPES = ("AuditEvent",)
WRITES = ("create", "update", "conditional-update", "delete")

#: endpoint → function(view_args) → [(resource type or "*", interaction), ...]; "admin" for admins only;
#: None to check nothing here (the view checks, like batch/transaction entries)
Rule = Callable[[dict], "list[tuple[str, str]] | str | None"]
RULES: dict[str, Rule] = {}


def rule(endpoint: str):
    """Register the authorization rule of an endpoint (other blueprints use it for their routes)."""
    def register(fn: Rule) -> Rule:
        RULES[endpoint] = fn
        return fn
    return register


def authority() -> Authority:
    return current_app.extensions[EXTENSION]


def init_app(app: Flask) -> None:
    cfg = app.config
    cfg.setdefault("INSECURE_NO_AUTH", False)
    if cfg.get("INSECURE_NO_AUTH"):
        app.logger.warning("!!! INSECURE_NO_AUTH is set: the FHIR API answers EVERY caller without a token, "
                           "as the program itself with every permission. Development only: never with real "
                           "records. !!!")
    store = app.extensions["fhir_iop"].store
    app.extensions[EXTENSION] = Authority(
        store, key_file=cfg.get("SIGNING_KEY_FILE"), alg=cfg.get("SIGNING_ALG") or "ES256",
        issuer=cfg.get("TOKEN_ISSUER") or "fhir-iop", lifetime=int(cfg.get("TOKEN_LIFETIME") or 300),
        jwks_url=cfg.get("AUTH_JWKS_URL"), external_issuer=cfg.get("AUTH_ISSUER"),
        external_audience=cfg.get("AUTH_AUDIENCE"), client_ttl=float(cfg.get("CLIENT_CACHE_SECONDS", 2)))
    app.before_request(authorize_request)


# -- the hook ----------------------------------------------------------------------------------------

def _refuse(status: int, message: str, error: str | None = None):
    from server.formats import respond
    headers = {}
    if status == 401:
        value = 'Bearer realm="fhir-iop"'
        if error:
            safe = "".join(ch for ch in message if " " <= ch <= "~" and ch not in '"\\')[:200]
            value += f', error="{error}", error_description="{safe}"'
        headers["WWW-Authenticate"] = value
    return respond(outcome(message, "login" if status == 401 else "forbidden"), status, headers)


def authorize_request():
    app = current_app._get_current_object()  # (one context lookup instead of one per attribute)
    if app.config.get("INSECURE_NO_AUTH"):
        g.access = DEVELOPMENT
        return None
    req = request._get_current_object()  # (one context lookup instead of one per attribute)
    if req.endpoint in PUBLIC:
        return None
    env = req.environ
    header = env.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _refuse(401, "this server needs an access token: Authorization: Bearer <token> "
                            "(SMART Backend Services; see /.well-known/smart-configuration)")
    try:
        verified = app.extensions[EXTENSION].verify(token.strip())  # (authority())
    except InvalidToken as e:
        return _refuse(401, str(e), "invalid_token")
    client = verified.client
    asked = env.get(EMERGENCY_ENVIRON, "").strip().lower()
    emergency = asked in ("true", "1", "yes") and client.emergency_allowed
    # who asked is known from here on, refused or not (the audit trail records it)
    g.access = access = _access_of(verified, emergency)
    if asked not in ("", "false", "0", "no", "true", "1", "yes"):
        return _refuse(403, f"{EMERGENCY_HEADER} takes true or false")
    if asked in ("true", "1", "yes") and not emergency:
        return _refuse(403, f"client {client.client_id} is not allowed medical-emergency access ({EMERGENCY_HEADER})")
    if req.url_rule is None:
        return None  # 404/405 follow
    try:
        needs = required(req.endpoint, req.view_args or {})
        if needs == "admin":
            if not access.admin:
                raise FhirHttpError(403, f"{req.method} {req.path} is for administrators only")
        elif needs:
            for rt, interaction in needs:
                check(rt, interaction, access)
    except FhirHttpError as e:
        return _refuse(e.status, str(e))
    return None


#: (id of a Verified, emergency) → (that Verified, its Access): the token cache hands out the same
#: Verified object while it holds (``CLIENT_CACHE_SECONDS``), so its Access is made once, not per request
_ACCESSES: dict[tuple[int, bool], tuple[object, Access]] = {}


def _access_of(verified, emergency: bool) -> Access:
    key = (id(verified), emergency)
    hit = _ACCESSES.get(key)
    if hit is not None and hit[0] is verified:
        return hit[1]
    client = verified.client
    access = Access(client_id=client.client_id, recipient=client.recipient,
                    purpose="ETREAT" if emergency else client.purpose, emergency=emergency,
                    scopes=verified.scopes, admin=client.admin)
    if len(_ACCESSES) >= 1024:
        _ACCESSES.clear()
    _ACCESSES[key] = (verified, access)
    return access


def required(endpoint: str, view_args: dict):
    fn = RULES.get(endpoint)
    if fn is not None:
        return fn(view_args)
    if request.path.rstrip("/").endswith("$export"):
        return _export_rule(view_args)
    if request.path.rstrip("/").endswith("$validate"):
        rt = view_args.get("rtype") or "*"
        return [(rt, "$validate")]
    return "admin"


# -- checks ------------------------------------------------------------------------------------------

def _access() -> Access:
    from server.access import current_access
    return current_access()


def allowed(rt: str, interaction: str, access: Access | None = None) -> bool:
    access = access or _access()
    if access.scopes is None:  # authorization off (development)
        return True
    if rt in ADMIN_ONLY_TYPES:
        if not access.admin or interaction in WRITES:
            return False
    return smart_scopes.allows(access.scopes, rt, interaction)


def check(rt: str, interaction: str, access: Access | None = None) -> None:
    """Raise 403 unless the current access may do ``interaction`` on ``rt``."""
    if not allowed(rt, interaction, access):
        what = "every resource type" if rt == "*" else rt
        if rt in ADMIN_ONLY_TYPES:
            raise FhirHttpError(403, f"{interaction} on {rt}: AuditEvents are read by administrators only")
        raise FhirHttpError(403, f"the access token's scopes do not allow {interaction} on {what}")


def _include_needs(rt: str, params) -> list[tuple[str, str]]:
    from server.app import state
    registry = state().store.registry
    needs = []
    for name, value in params:
        base = name.split(":")[0]
        if base not in ("_include", "_revinclude"):
            continue
        parts = value.split(":")
        if base == "_revinclude":
            needs.append((parts[0], "search"))
            continue
        p = registry.get(parts[0], parts[1]) if len(parts) in (2, 3) else None
        if len(parts) == 3:
            targets = [parts[2]]
        elif p is not None:
            targets = [t for t in (p.resolve_types or p.targets) if t in RESOURCE_TYPES + ADMIN_ONLY_TYPES]
        else:
            targets = []
        needs += [(t, "read") for t in (targets or ["*"])]
    return needs


def search_needs(rt: str, params) -> list[tuple[str, str]]:
    return [(rt, "search"), *_include_needs(rt, params)]


def check_entry(entry) -> None:
    """Check one batch/transaction entry (``server.transaction.Entry``) as its own interaction;
    raises 403 naming the entry."""
    from urllib.parse import parse_qsl
    method, rt, rid, query = entry.method, entry.type, entry.id, entry.query
    if method == "DELETE":
        needs = [(rt, "delete")] + ([(rt, "search")] if rid is None else [])  # conditional delete searches
    elif method == "POST":
        needs = [(rt, "create")] + ([(rt, "search")] if entry.if_none_exist else [])
    elif method == "PUT":
        needs = [(rt, "conditional-update"), (rt, "search")] if rid is None or query else [(rt, "update")]
    elif rid and entry.history:
        needs = [(rt, "vread")]
    elif rid:
        needs = [(rt, "read")]
    else:
        needs = search_needs(rt, parse_qsl(query or "", keep_blank_values=True))
    try:
        for t, interaction in needs:
            check(t, interaction)
    except FhirHttpError as e:
        raise FhirHttpError(403, f"entry {entry.n} ({method} {rt}{'/' + rid if rid else ''}): {e}") from None


def _criteria() -> bool:
    return any(k not in ("_format", "_pretty") for k in request.args)


def _export_rule(view_args, default=("*",)):
    """Bulk Data kick-off: ``s`` (and so, in v1 terms, read) on every type exported (``_type``, in
    the query or a POSTed Parameters body, else the export's default types)."""
    types = [t.strip() for v in request.args.getlist("_type") for t in v.split(",") if t.strip()]
    if request.method == "POST" and not types:
        try:
            body = request.get_json(force=True, silent=True) or {}
            types = [t.strip() for p in body.get("parameter") or () if p.get("name") == "_type"
                     for t in str(p.get("valueString", "")).split(",") if t.strip()]
        except Exception:  # the view answers bad bodies
            types = []
    needs = [(t, "search") for t in (types or default)]
    if view_args.get("gid"):
        needs.append(("Group", "read"))
    return needs


def _bulk_default(name: str):
    def fn(view_args):
        from fhir_iop.bulk import runner
        return _export_rule(view_args, getattr(runner, name))
    return fn


def _params():
    return list(request.args.items(multi=True)) + (list(request.form.items(multi=True))
                                                    if request.method == "POST" and request.form else [])


RULES.update({
    "resources.read": lambda a: [(a["rtype"], "read")],
    "resources.vread": lambda a: [(a["rtype"], "vread")],
    "resources.instance_history": lambda a: [(a["rtype"], "history-instance")],
    "resources.type_history": lambda a: [(a["rtype"], "history-type")],
    "resources.search_type": lambda a: search_needs(a["rtype"], _params()),
    "resources.search_post": lambda a: search_needs(a["rtype"], _params()),
    "resources.create": lambda a: [(a["rtype"], "create")] + (
        [(a["rtype"], "search")] if request.headers.get("If-None-Exist") or _criteria() else []),
    "resources.update": lambda a: [(a["rtype"], "update")],
    "resources.conditional_update": lambda a: [(a["rtype"], "conditional-update"), (a["rtype"], "search")],
    "resources.delete": lambda a: [(a["rtype"], "delete")],
    "resources.conditional_delete": lambda a: [(a["rtype"], "delete"), (a["rtype"], "search")],
    # the history of everything includes the AuditEvents when they are stored as resources: admins only then
    "bundles.system_history": lambda a: [("*", "history-system")] + [(t, "history-type") for t in ADMIN_ONLY_TYPES
                                                                     if t in RESOURCE_TYPES],
    "bundles.batch_or_transaction": lambda a: None,  # each entry: check_entry
    "operations.validate_type": lambda a: [(a["rtype"], "$validate")],
    "operations.load_iop": lambda a: [("*", "$load-iop")],
    # Bulk Data export (server/routes/export.py): kick-off by exported types; status, manifest, files
    # and cancel belong to the job's client (the view checks that)
    "export.group_export": _bulk_default("GROUP_TYPES"),
    "export.patient_export": _bulk_default("PATIENT_TYPES"),
    "export.system_export": _bulk_default("SYSTEM_TYPES"),
    "export.status": lambda a: None,
    "export.cancel": lambda a: None,
    "export.download": lambda a: None,
})


def capability_security(base: str) -> dict:
    """``CapabilityStatement.rest.security``: SMART on FHIR (service code from the R4 binding
    http://terminology.hl7.org/CodeSystem/restful-security-service) and the SMART ``oauth-uris``
    extension (https://hl7.org/fhir/smart-app-launch/, "Conformance") with the token endpoint; there
    is no ``authorize`` endpoint (backend services only), which SMART 2 discovers through
    /.well-known/smart-configuration anyway."""
    token = (current_app.config.get("TOKEN_URL") if current_app else None) or base + "/auth/token"
    return {
        "cors": False,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR"}],
                     "text": "SMART Backend Services: client_credentials with a signed JWT assertion (RS384/ES384)"}],
        "description": "Every interaction needs a bearer token; SMART v1 and v2 system/ scopes are enforced per "
                       "interaction and resource type (see /.well-known/smart-configuration). 42 CFR Part 2 "
                       "records leave only under a consent covering the client's recipient and purpose.",
        "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                       "extension": [{"url": "token", "valueUri": token}]}],
    }
