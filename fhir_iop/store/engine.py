"""Engines and migrations: SQLite (embedded default) or PostgreSQL, schema brought up to date by Alembic.

SQLite runs in WAL mode with a busy timeout; write transactions start with ``BEGIN IMMEDIATE`` so
two writers queue instead of failing half-way. Reads run in autocommit mode (no BEGIN/COMMIT round
trips: a read is one statement, a search two or three).
PostgreSQL runs at READ COMMITTED; writers lock the rows they change (``SELECT … FOR UPDATE``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url

DEFAULT_DATABASE_URL = "sqlite:///var/fhir-iop.sqlite"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
WRITE = {"fhir_iop_write": True}


def autocommit(engine: Engine, **kwargs) -> Engine:
    """The engine for reads: no BEGIN/COMMIT. SQLite connections are in autocommit mode already
    (BEGIN is emitted by the hook below, which this option skips). PostgreSQL gets a pool of its own
    whose connections stay in autocommit mode, so checking one out and back in costs no switching of
    the isolation level and no reset (there is never a transaction to roll back)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(fhir_iop_autocommit=True)
    return create_engine(engine.url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None, **kwargs)


def make_engine(url: str, **kwargs) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=30000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            options = conn.get_execution_options()
            if options.get("fhir_iop_autocommit"):
                return  # reads: each statement on its own (the connection is in autocommit mode)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("fhir_iop_write") else "BEGIN")
        return engine
    return create_engine(u, **kwargs)


def alembic_config(connection):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations up to ``revision``, once even when several processes start together."""
    from alembic import command
    with engine.connect().execution_options(**WRITE) as conn:
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(5318008)"))
            command.upgrade(alembic_config(conn), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
