"""Fixtures for the FHIR facade tests (tests/test_server_*.py import them).

``db_url`` runs a test once on SQLite (a file in tmp_path) and once on PostgreSQL (a schema of its
own in the ``test`` database at 127.0.0.1:5432, or ``FHIR_IOP_TEST_POSTGRES``, dropped afterwards;
skipped when unreachable).
``live`` serves the app on a free loopback port from a thread (werkzeug's threaded server).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from urllib.parse import urlsplit

import pytest

PG_URL = os.environ.get("FHIR_IOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_HOST, PG_PORT = urlsplit(PG_URL).hostname, urlsplit(PG_URL).port or 5432


def postgres_reachable() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False


def _pg_schema_url():
    """A fresh schema in the shared ``test`` database; yields the URL that uses it, drops it after."""
    from sqlalchemy import create_engine, text
    schema = f"fhir_iop_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as e:  # reachable port, unusable server
        admin.dispose()
        pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} is not usable: {e}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fhir.sqlite'}"
        return
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}")
    yield from _pg_schema_url()


@pytest.fixture
def app(db_url):
    """The facade with authorization OFF (``INSECURE_NO_AUTH``): the functional tests act as the program."""
    from server import create_app
    app = create_app({"DATABASE_URL": db_url, "TESTING": True, "INSECURE_NO_AUTH": True})
    yield app
    app.extensions["fhir_iop"].store.dispose()


@pytest.fixture
def secured_app(db_url):
    """The facade as it ships: every request needs a bearer token (``token_for`` makes one)."""
    from server import create_app
    app = create_app({"DATABASE_URL": db_url, "TESTING": True})
    yield app
    app.extensions["fhir_iop"].store.dispose()


def token_for(app, scopes="system/*.read", recipient=None, purpose="TREAT", admin=False,
              emergency_allowed=False) -> str:
    """``Authorization`` header value ("Bearer …") for a freshly registered client of ``app``'s store:
    allowed ``scopes`` (space-separated SMART scopes, "" for none), acting for ``recipient`` (None =
    the program itself) with ``purpose`` (v3-ActReason), ``admin`` and ``emergency_allowed`` as given.
    The token is signed by the app's own key, exactly as its token endpoint would sign it."""
    import uuid as _uuid

    from fhir_iop.security import clients, keys
    store = app.extensions["fhir_iop"].store
    client_key = keys.generate("ES384")  # registered, never used: the token is issued directly
    c = clients.register(store, f"test-{_uuid.uuid4().hex[:12]}", scopes=scopes, jwks=keys.jwks_of(client_key),
                         recipient=recipient, purpose=purpose, admin=admin, emergency_allowed=emergency_allowed)
    return "Bearer " + app.extensions["fhir_iop_auth"].issue(c.client_id, c.scopes)


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    def __init__(self, app):
        from werkzeug.serving import make_server
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live(app):
    with LiveServer(app) as server:
        yield server.url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
