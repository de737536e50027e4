"""The transactional outbox: a change to push is queued in the transaction of the change, once."""

from __future__ import annotations

import pytest
from server_kit import db_url  # noqa: F401  (fixture)
from sync_push_kit import configure, connections, of_type, rows

from fhir_iop.store import Store
from fhir_iop.sync import outbox


@pytest.fixture
def store(db_url):  # noqa: F811
    s = Store(db_url)
    configure(connections(resources={"Encounter": "push", "Patient": "pull"}))
    yield s
    configure(None)
    s.dispose()


def test_a_write_is_queued_in_its_own_transaction(store):
    enc = of_type("Encounter")[0]
    with store.transaction() as tx:
        tx.update("Encounter", enc["id"], enc)
        inside = rows(tx.conn)  # visible inside the writing transaction…
        assert rows(store) == []  # …and not outside it before the commit
    assert [(r.connection, r.resource_type, r.resource_id, r.version_id, r.operation, r.state) for r in inside] == \
        [("riverside", "Encounter", enc["id"], 1, "PUT", "pending")]
    assert [r.id for r in rows(store)] == [inside[0].id]


def test_a_rolled_back_write_leaves_no_message(store):
    enc = of_type("Encounter")[0]
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.update("Encounter", enc["id"], enc)
            assert len(rows(tx.conn)) == 1
            raise RuntimeError("the rest of the transaction failed")
    assert rows(store) == []
    with store.reading() as tx:
        assert tx.count("Encounter") == 0


def test_only_pushed_types_are_queued(store):
    pat = of_type("Patient")[0]  # Patient is pulled from this EHR, not pushed
    with store.transaction() as tx:
        tx.update("Patient", pat["id"], pat)
    assert rows(store) == []


def test_changes_coalesce_into_one_message_with_the_newest_version(store):
    enc = of_type("Encounter")[0]
    with store.transaction() as tx:
        tx.update("Encounter", enc["id"], enc)
    for status in ("in-progress", "onleave"):
        with store.transaction() as tx:
            tx.update("Encounter", enc["id"], {**enc, "status": status})
    with store.transaction() as tx:  # the same content again: no new version, nothing queued
        tx.update("Encounter", enc["id"], {**enc, "status": "onleave"})
    (msg,) = rows(store)
    assert (msg.version_id, msg.operation, msg.state) == (3, "PUT", "pending")
    with store.transaction() as tx:
        tx.delete("Encounter", enc["id"])
    (msg,) = rows(store)
    assert (msg.version_id, msg.operation) == (4, "DELETE")


def _encounter(status: str = "planned") -> dict:
    """An Encounter of the example clinic, in a status it does not have there (so each change is one)."""
    enc = of_type("Encounter")[0]
    assert enc["status"] not in ("planned", "in-progress", "cancelled", "onleave")
    return {**enc, "status": status}


def test_a_message_in_flight_is_not_rewritten(store):
    enc = _encounter()
    with store.transaction() as tx:
        tx.update("Encounter", enc["id"], enc)
    with store.transaction() as tx:
        tx.conn.execute(outbox.sync_outbox.update().values(state=outbox.INFLIGHT, lease_owner="w1"))
        tx.update("Encounter", enc["id"], {**enc, "status": "in-progress"})
    assert [(r.version_id, r.state) for r in rows(store)] == [(1, "inflight"), (2, "pending")]


def test_pulled_writes_are_not_echoed_back(store):
    enc = _encounter()
    with store.transaction(origin="sync:riverside") as tx:
        tx.update("Encounter", enc["id"], enc)
    assert rows(store) == []
    with store.transaction(origin="sync:another-ehr") as tx:  # pulled from anywhere: never pushed
        tx.update("Encounter", enc["id"], {**enc, "status": "in-progress"})
    assert rows(store) == []
    with store.transaction() as tx:  # then changed here: that goes out
        tx.update("Encounter", enc["id"], {**enc, "status": "cancelled"})
    assert [r.version_id for r in rows(store)] == [3]


def test_each_pushing_connection_gets_its_message(store):
    conns = {**connections(name="riverside"), **connections(name="bayshore", recipient="BAYSHORE-FHC",
                                                              resources={"Encounter": "both"})}
    configure(conns)
    enc = of_type("Encounter")[0]
    with store.transaction() as tx:
        tx.update("Encounter", enc["id"], enc)
    assert sorted(r.connection for r in rows(store)) == ["bayshore", "riverside"]


def test_a_consent_change_reopens_withheld_messages(store):
    configure(connections(resources={"Encounter": "push"}))
    enc, consent = of_type("Encounter")[0], of_type("Consent")[0]
    with store.transaction() as tx:
        tx.update("Encounter", enc["id"], enc)
        tx.conn.execute(outbox.sync_outbox.update().values(state=outbox.WITHHELD, last_error="no consent"))
    with store.transaction() as tx:
        tx.update("Consent", consent["id"], consent)
    (msg,) = rows(store)
    assert msg.state == "pending"  # the gate decides again at the next claim


def test_without_connections_nothing_is_queued(store):
    configure({})
    enc = of_type("Encounter")[0]
    with store.transaction() as tx:
        tx.update("Encounter", enc["id"], enc)
    assert rows(store) == []


def test_backfill_skips_what_was_sent_and_what_was_pulled(store):
    conns = connections(resources={"Encounter": "push"})
    mine, again, theirs = of_type("Encounter")[:3]
    theirs["identifier"] = [{"system": "http://ehr.test/fhir/Encounter", "value": "ehr-1"}]  # as pull keeps it
    configure({})
    with store.transaction() as tx:
        for e in (mine, again, theirs):
            tx.update("Encounter", e["id"], e)
    configure(conns)
    assert outbox.backfill(store, conns["riverside"]) == 2
    with store.transaction() as tx:
        tx.conn.execute(outbox.sync_outbox.update().where(outbox.sync_outbox.c.resource_id == mine["id"])
                        .values(state=outbox.SENT))
    assert outbox.backfill(store, conns["riverside"]) == 1  # `again` coalesces; `mine` was sent at that version
    assert sorted((r.resource_id, r.state) for r in rows(store)) == sorted(
        [(mine["id"], "sent"), (again["id"], "pending")])
