"""Reader connections held per thread (fhir_iop/store/readers.py): a thread's reads share one
connection; it goes back to the pool when the thread ends, is replaced after a database error and is
never used by a forked child; at most ``limit`` threads hold one; ``dispose`` closes them. On SQLite
and, where it is reachable, PostgreSQL."""

from __future__ import annotations

import os
import threading

import pytest
from server_kit import _pg_schema_url, postgres_reachable
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fhir_iop.store import NotFound, Store

PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Reader"}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/readers.sqlite")
        yield s
        s.dispose()
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable")
    for url in _pg_schema_url():
        s = Store(url)
        yield s
        s.dispose()


def dbapi_of(store: Store):
    with store.reading() as tx:
        tx.read("Patient", "p1")
        return tx.conn.connection.dbapi_connection


def checked_out(store: Store) -> int:
    return store._reader.pool.checkedout()


def in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # pragma: no cover - reported below
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_threads_reads_share_one_connection_and_see_every_commit(store):
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    first = dbapi_of(store)
    assert dbapi_of(store) is first
    # held between reads, the connection is in no transaction: a commit from elsewhere shows at once
    with store.transaction() as tx:
        tx.update("Patient", "p1", {**PATIENT, "gender": "female"})
    with store.reading() as tx:
        assert tx.read("Patient", "p1").version_id == 2
        assert tx.conn.connection.dbapi_connection is first
    with pytest.raises(NotFound):  # the store's own errors keep the connection
        with store.reading() as tx:
            tx.read("Patient", "nope")
    assert dbapi_of(store) is first


def sa_conn_of(store: Store):
    with store.reading() as tx:
        tx.read("Patient", "p1")
        return tx.conn


def test_a_database_error_replaces_the_connection(store):
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    first = sa_conn_of(store)
    with pytest.raises(DBAPIError):
        with store.reading() as tx:
            tx.conn.execute(text("SELECT no_such_column FROM resource"))
    assert first.closed  # given back to the pool, which resets it
    assert sa_conn_of(store) is not first


def test_a_killed_connection_costs_one_read_and_the_next_gets_a_new_one(store):
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a server that drops connections: PostgreSQL")
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    with store.reading() as tx:
        tx.read("Patient", "p1")
        backend = tx.conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with store.engine.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": backend})
        c.commit()
    with pytest.raises(DBAPIError):
        with store.reading() as tx:
            tx.read("Patient", "p1")
    with store.reading() as tx:
        assert tx.read("Patient", "p1").id == "p1"
        assert tx.conn.execute(text("SELECT pg_backend_pid()")).scalar() != backend


def test_a_threads_connection_goes_back_to_the_pool_when_the_thread_ends(store):
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    before = checked_out(store)
    held_in_thread = in_thread(lambda: (dbapi_of(store), checked_out(store)))
    assert held_in_thread[1] == before + 1  # held while the thread lived
    assert checked_out(store) == before  # and back when it ended


def test_past_the_limit_a_thread_checks_out_per_read(store):
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    limit = store._held._limit
    release, ready = threading.Event(), threading.Barrier(limit + 1)

    def hold():
        dbapi_of(store)
        ready.wait(10)
        release.wait(10)

    holders = [threading.Thread(target=hold) for _ in range(limit)]
    for t in holders:
        t.start()
    ready.wait(10)
    try:
        base = checked_out(store)
        # one more thread: served, but holding nothing once its read is over
        assert in_thread(lambda: (dbapi_of(store), checked_out(store))[1]) == base
        assert checked_out(store) == base
    finally:
        release.set()
        for t in holders:
            t.join(10)


def test_dispose_closes_the_held_connections(store):
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    dbapi_of(store)
    assert checked_out(store) >= 1
    store._held.close()
    assert checked_out(store) == 0
    dbapi_of(store)  # reads still work, checking out per read
    assert checked_out(store) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_does_not_use_its_parents_connection(store):
    with store.transaction() as tx:
        tx.create(PATIENT, rid="p1")
    parent = dbapi_of(store)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: read through the store; the connection it holds must be its own
        code = 1
        try:
            dbapi_of(store)
            code = 0 if store._held._local.held.pid == os.getpid() else 3
        finally:
            os.write(w, b"x")
            os._exit(code)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert dbapi_of(store) is parent  # the parent's is still its own, and still works
