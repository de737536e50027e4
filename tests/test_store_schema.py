"""The Alembic migrations create exactly the tables fhir_iop/store/models.py describes."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from server_kit import db_url  # noqa: F401  (fixture)

from fhir_iop.store.engine import current_revision, make_engine, upgrade
from fhir_iop.store.models import metadata


def test_migrations_match_the_models(db_url):  # noqa: F811
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        upgrade(engine)  # again: nothing to do
        assert current_revision(engine) == "0006"
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
    finally:
        engine.dispose()
