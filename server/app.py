"""The application factory.

Configuration (``FHIR_IOP_`` environment variables, overridden by ``test_config``):

- ``DATABASE_URL``: ``sqlite:///path`` (default ``sqlite:///var/fhir-iop.sqlite``) or
  ``postgresql+psycopg://user@host:port/db``
- ``MIGRATE``: apply the Alembic migrations on start (default true)
- ``BASE_URL``: the public base URL used in links and ``Location`` (default: from the request)
- ``DEFAULT_COUNT`` / ``MAX_COUNT``: search page sizes (50 / 1000)
- ``READ_CACHE_MB``: PostgreSQL only, megabytes of current resources each process keeps for reads by
  id, dropped as the database announces changes (``fhir_iop/store/cache.py``; default 32, 0 = off)
- ``MAPPINGS``: site mappings directory for ``$load-iop`` (as ``--mappings`` on the command line)
- authorization (``server/auth.py``): ``INSECURE_NO_AUTH`` (development only, default false),
  ``SIGNING_KEY_FILE``/``SIGNING_ALG``, ``TOKEN_ISSUER``, ``TOKEN_LIFETIME``, ``TOKEN_URL``,
  ``AUTH_JWKS_URL``/``AUTH_ISSUER``/``AUTH_AUDIENCE`` (an external authorization server),
  ``CLIENT_CACHE_SECONDS`` (how long a process remembers a client's registration, default 2)
- audit (``server/audit_hook.py``, ``fhir_iop/audit/spool.py``; docs/security.md): ``AUDIT_SPOOL``
  (``auto``, ``off`` or a directory), ``AUDIT_SPOOL_SHIPPER`` (``thread`` or ``external``),
  ``AUDIT_SPOOL_INTERVAL`` (seconds, 0.1), ``AUDIT_SPOOL_FSYNC`` (false)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from flask import Flask, current_app, request

from fhir_iop.store import DEFAULT_DATABASE_URL, Store

EXTENSION = "fhir_iop"


@dataclass
class State:
    store: Store
    default_count: int
    max_count: int
    base_url: str | None
    mapping_context: object = None  # built on first $load-iop
    #: (base URL, date) → the CapabilityStatement as JSON (server/routes/metadata.py)
    capability_statements: dict = field(default_factory=dict)


class FhirFlask(Flask):
    """Flask, remembering which views and hooks are plain functions: Flask asks ``inspect`` for each
    of them on every request (``ensure_sync``), which showed in every request's profile. Every view
    and hook here is a plain ``def``; an ``async def`` one would still be wrapped, once."""

    def ensure_sync(self, func):
        known = self._sync.get(func)
        if known is None:
            known = super().ensure_sync(func)
            if len(self._sync) < 1024:  # (a bound method is a new object each time: never many kept)
                self._sync[func] = known
        return known

    @cached_property
    def _sync(self) -> dict:
        return {}


def create_app(test_config: dict | None = None) -> Flask:
    app = FhirFlask(__name__)
    app.config.from_mapping(DATABASE_URL=DEFAULT_DATABASE_URL, MIGRATE=True, BASE_URL=None, DEFAULT_COUNT=50,
                            MAX_COUNT=1000, MAPPINGS=None, MAX_CONTENT_LENGTH=64 * 1024 * 1024, READ_CACHE_MB=32)
    app.config.from_prefixed_env("FHIR_IOP")
    if test_config is not None:  # tests and the command line override the environment
        app.config.from_mapping(test_config)
    store = app.config.get("STORE") or Store(app.config["DATABASE_URL"], migrate=bool(app.config["MIGRATE"]),
                                             read_cache_mb=float(app.config["READ_CACHE_MB"]))
    app.extensions[EXTENSION] = State(store, int(app.config["DEFAULT_COUNT"]), int(app.config["MAX_COUNT"]),
                                      (app.config["BASE_URL"] or "").rstrip("/") or None)
    from server import errors
    from server.routes import bundles, metadata, operations, resources
    errors.init_app(app)
    for module in (metadata, bundles, operations, resources):
        app.register_blueprint(module.bp)
    from server import audit_hook
    audit_hook.init_app(app)  # an AuditEvent for every request; /AuditEvent for admins; PHI-free logs
    from server.routes import export  # FHIR Bulk Data $export (bulk export engineer)
    app.register_blueprint(export.bp)
    from server import auth
    from server.routes import smart
    app.register_blueprint(smart.bp)
    auth.init_app(app)  # bearer token and scopes of every request (server/auth.py)
    from server.routes import sync  # EHR sync: $push/$pull, status, dead letters (sync-push engineer)
    sync.init_app(app)
    from server import formats
    formats.init_app(app)  # keep last: input checks run after authorization (401 before 400/406)
    return app


def state() -> State:
    return current_app.extensions[EXTENSION]


def base_url() -> str:
    s = state()
    return s.base_url or request_root()


#: (scheme, Host, server name and port, script root) → root URL; werkzeug rebuilds ``url_root`` on each
#: access (IRI-decoding it), which showed in every request's profile
_ROOTS: dict[tuple, str] = {}


def request_root() -> str:
    """``request.url_root`` without its trailing slash, remembered per distinct environ values it is
    made of (at most 64: a client choosing Host headers cannot grow it)."""
    req = request._get_current_object()  # (one context lookup)
    e = req.environ
    trusted = current_app.config.get("TRUSTED_HOSTS")
    key = (e.get("wsgi.url_scheme"), e.get("HTTP_HOST"), e.get("SERVER_NAME"), e.get("SERVER_PORT"),
           e.get("SCRIPT_NAME"), tuple(trusted) if trusted else ())
    root = _ROOTS.get(key)
    if root is None:
        root = req.url_root.rstrip("/")
        if len(_ROOTS) >= 64:
            _ROOTS.clear()
        _ROOTS[key] = root
    return root
