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
        assert current_revision(engine) == "0008"
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_the_hot_current_read_gives_what_the_sqlalchemy_statement_gives(db_url):  # noqa: F811
    """``Tx._current`` reads on the DBAPI cursor; its row must equal the SQLAlchemy ``_CURRENT`` row
    (types included: SQLite's stored DateTime text becomes the same datetime), live and deleted."""
    from fhir_iop.store import Store
    from fhir_iop.store.repository import _CURRENT
    store = Store(db_url)
    try:
        with store.transaction() as tx:
            live = tx.create({"resourceType": "Patient", "gender": "other"}).stored.id
            gone = tx.create({"resourceType": "Patient", "gender": "male"}).stored.id
        with store.transaction() as tx:
            tx.delete("Patient", gone)
        for rid in (live, gone):
            for ctx in (store.reading, store.transaction):
                with ctx() as tx:
                    fast = tx._current("Patient", rid)
                    core = tx.conn.execute(_CURRENT, {"t": "Patient", "i": rid}).first()
                assert (fast.rid, fast.version_id, fast.last_updated, fast.deleted, fast.body) == \
                    (core.rid, core.version_id, core.last_updated, core.deleted, core.body)
                assert type(fast.last_updated) is type(core.last_updated) and type(fast.deleted) is bool
        with store.reading() as tx:
            assert tx._current("Patient", "no-such-id") is None
    finally:
        store.dispose()


def test_upgrading_indexes_the_decimal_quantities_earlier_releases_left_out(db_url):  # noqa: F811
    """Migration 0007: a store written before decimal quantities were indexed (simulated: its
    quantity rows removed, the store at 0006) finds them after the upgrade; other rows stay."""
    from sqlalchemy import delete, func, select

    from fhir_iop.store import Store, search
    from fhir_iop.store.models import search_quantity, search_token
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0006")
        store = Store(db_url, migrate=False)
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "buprenorphine level"},
               "valueQuantity": {"value": 4.5, "unit": "ng/mL", "system": "http://unitsofmeasure.org",
                                 "code": "ng/mL"},
               "component": [{"code": {"text": "a"}, "valueQuantity": {"value": 2, "code": "ng/mL"}}]}
        with store.transaction() as tx:
            oid = tx.create(obs).stored.id
            tx.create({"resourceType": "Patient", "gender": "other"})
        with store.transaction() as tx:
            tokens = tx.conn.execute(select(func.count()).select_from(search_token)).scalar()
            tx.conn.execute(delete(search_quantity))  # what 0006-era indexing left: no decimal rows

        def found(value: str) -> list[str]:
            with store.reading() as tx:
                q = search.parse(store.registry, "Observation", [("value-quantity", value)])
                return [m[1] for m in tx.search(q).matches]
        assert found("4.5") == []
        upgrade(engine)
        assert current_revision(engine) == "0008"
        assert found("4.5") == [oid] and found("4.6") == []
        with store.reading() as tx:
            rows = {(r.param, r.value) for r in tx.conn.execute(select(search_quantity))}
            assert ("value-quantity", 4.5) in rows and ("component-value-quantity", 2.0) in rows
            assert tx.conn.execute(select(func.count()).select_from(search_token)).scalar() == tokens
        store.dispose()
    finally:
        engine.dispose()
