"""The PostgreSQL read cache (fhir_iop/store/cache.py): reads by id answered from memory, dropped as
the database announces changes, written by this process or any other; never used when the listener
cannot vouch for it. PostgreSQL only (skipped where it is unreachable)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from server_kit import _pg_schema_url, postgres_reachable
from sqlalchemy import text

from fhir_iop.store import Gone, Store

pytestmark = pytest.mark.skipif(not postgres_reachable(), reason="PostgreSQL is not reachable")


@pytest.fixture
def pg_url():
    yield from _pg_schema_url()


@pytest.fixture
def stores(pg_url):
    """Two stores on one schema, as two processes of one deployment would have (each with its cache
    and listener), and a third without a cache."""
    a, b = Store(pg_url, read_cache_mb=8), Store(pg_url, read_cache_mb=8, migrate=False)
    plain = Store(pg_url, migrate=False)
    yield a, b, plain
    for s in (a, b, plain):
        s.dispose()


def listening(store: Store, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not store.cache.usable():
        assert time.monotonic() < deadline, "the read cache's listener did not start"
        time.sleep(0.02)


def read(store: Store, rt: str, rid: str):
    with store.reading() as tx:
        return tx.read(rt, rid)


def eventually(fn, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_a_repeated_read_is_answered_from_memory_and_a_write_elsewhere_drops_it(stores):
    a, b, plain = stores
    with plain.transaction() as tx:
        pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
    listening(a)
    assert read(a, "Patient", pid).version_id == 1
    hits = a.cache.hits
    with a.reading() as tx:  # the database would say otherwise now: the row comes from memory
        tx.conn.execute(text("SELECT 1"))
        assert tx.read("Patient", pid).version_id == 1
    assert a.cache.hits == hits + 1

    with plain.transaction() as tx:  # another process (no cache of its own) updates it
        tx.update("Patient", pid, {"resourceType": "Patient", "id": pid, "gender": "male"})

    def sees_v2():
        got = read(a, "Patient", pid)
        assert got.version_id == 2 and '"male"' in got.body
    eventually(sees_v2)
    with plain.transaction() as tx:
        tx.delete("Patient", pid)

    def gone():
        try:
            read(a, "Patient", pid)
        except Gone:
            return
        raise AssertionError("still served from the cache")
    eventually(gone)


def test_a_write_in_this_process_is_read_back_at_once(stores):
    a, _, _ = stores
    listening(a)
    with a.transaction() as tx:
        pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
    assert read(a, "Patient", pid).version_id == 1
    for v in (2, 3):  # no waiting for the announcement: the writer drops what it committed
        with a.transaction() as tx:
            tx.update("Patient", pid, {"resourceType": "Patient", "id": pid, "gender": "other", "active": v == 3})
        assert read(a, "Patient", pid).version_id == v


def test_a_change_by_another_program_is_announced_too(stores, pg_url):
    """A change made outside fhir-iop (SQL in another process) reaches the cache through the trigger."""
    a, _, plain = stores
    with plain.transaction() as tx:
        pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
    listening(a)
    read(a, "Patient", pid)
    code = ("import sys\nfrom sqlalchemy import create_engine, text\n"
            "e = create_engine(sys.argv[1])\n"
            "with e.begin() as c:\n"
            "    c.execute(text(\"UPDATE resource SET version_id = 7 WHERE type = 'Patient' AND id = :i\"),"
            " {'i': sys.argv[2]})\n")
    subprocess.run([sys.executable, "-c", code, pg_url, pid], check=True, timeout=60)
    eventually(lambda: _assert(read(a, "Patient", pid).version_id == 7))
    with plain.engine.begin() as c:  # TRUNCATE announces everything
        c.execute(text("TRUNCATE resource CASCADE"))
    eventually(lambda: _assert(len(a.cache._rows) == 0))


def _assert(cond: bool) -> None:
    assert cond


def test_when_its_listener_is_cut_off_the_cache_starts_empty_again(stores):
    """The listening connection dies (a restart, a network fault): whatever the cache held is
    dropped (changes may have gone unheard), and it listens again on a new connection."""
    a, _, plain = stores
    with plain.transaction() as tx:
        pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
    listening(a)
    read(a, "Patient", pid)
    assert ("Patient", pid) in a.cache._rows
    before = a.cache.listener_pid
    with plain.engine.connect() as c:
        assert c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": before}).scalar()
    eventually(lambda: _assert(a.cache.listener_pid not in (None, before) and a.cache.usable()))
    assert ("Patient", pid) not in a.cache._rows
    with plain.transaction() as tx:
        tx.update("Patient", pid, {"resourceType": "Patient", "id": pid, "gender": "male"})

    def held_again():  # (once the update's own announcement has come by)
        assert read(a, "Patient", pid).version_id == 2
        hits = a.cache.hits
        assert read(a, "Patient", pid).version_id == 2 and a.cache.hits == hits + 1
    eventually(held_again)


def test_a_cache_its_listener_does_not_vouch_for_is_not_read(stores):
    a, _, plain = stores
    with plain.transaction() as tx:
        pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
    listening(a)
    read(a, "Patient", pid)
    a.cache.close()  # the listener stops: nothing vouches for what is held
    assert not a.cache.usable()
    hits, misses = a.cache.hits, a.cache.misses
    with plain.transaction() as tx:
        tx.update("Patient", pid, {"resourceType": "Patient", "id": pid, "gender": "male"})
    assert read(a, "Patient", pid).version_id == 2 and (a.cache.hits, a.cache.misses) == (hits, misses)


def test_a_row_read_before_a_change_is_not_kept(stores):
    """The race: a read fetches version 1, a change is announced, then the read offers its row."""
    a, _, plain = stores
    with plain.transaction() as tx:
        pid = tx.create({"resourceType": "Patient", "gender": "female"}).stored.id
    listening(a)
    row, generation = a.cache.get("Patient", pid)
    assert row is None
    with a.reading() as tx:
        old = tx._current_row("Patient", pid)
    a.cache.drop([("Patient", pid)])  # the announcement of a change arrives meanwhile
    a.cache.put("Patient", pid, old, generation)
    assert a.cache.get("Patient", pid)[0] is None


def test_the_cache_keeps_to_its_size(pg_url):
    store = Store(pg_url, read_cache_mb=0.02)  # ~20 KB
    try:
        with store.transaction() as tx:
            ids = [tx.create({"resourceType": "Patient", "name": [{"text": "x" * 500}]}).stored.id for _ in range(60)]
        listening(store)
        for i in ids:
            read(store, "Patient", i)
        assert 0 < len(store.cache._rows) < 60 and store.cache._bytes <= store.cache.max_bytes
        assert list(store.cache._rows)[-1] == ("Patient", ids[-1])  # the least recently read went first
    finally:
        store.dispose()


def test_the_facade_reads_the_database_when_asked_for_no_cache(pg_url):
    from server import create_app
    app = create_app({"DATABASE_URL": pg_url, "TESTING": True, "INSECURE_NO_AUTH": True})
    store = app.extensions["fhir_iop"].store
    try:
        c = app.test_client()
        pid = c.post("/Patient", json={"resourceType": "Patient", "gender": "male"}).json["id"]
        listening(store)
        assert c.get(f"/Patient/{pid}").status_code == 200
        hits = store.cache.hits
        assert c.get(f"/Patient/{pid}").status_code == 200 and store.cache.hits == hits + 1
        r = c.get(f"/Patient/{pid}", headers={"Cache-Control": "no-cache"})
        assert r.status_code == 200 and store.cache.hits == hits + 1
        off = create_app({"DATABASE_URL": pg_url, "TESTING": True, "INSECURE_NO_AUTH": True, "READ_CACHE_MB": 0,
                          "MIGRATE": False})
        assert off.extensions["fhir_iop"].store.cache is None
        off.extensions["fhir_iop"].store.dispose()
    finally:
        store.dispose()


def test_gunicorn_workers_each_read_a_write_made_through_the_other(pg_url, tmp_path):
    """The deployment shape: gunicorn with two workers, each with its read cache. Every update made
    through whichever worker is read back by both, within moments (the notification), and at once
    with ``Cache-Control: no-cache``; If-Match keeps working on the current version."""
    import os
    import shutil
    from pathlib import Path

    import requests
    from server_kit import free_port
    from test_server_http import _stop, _wait_for

    from fhir_iop.security import clients, keys, tokens
    if shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("gunicorn is not installed in this environment")
    store = Store(pg_url)
    clients.register(store, "ops", scopes="system/Patient.cruds", jwks=keys.jwks_of(keys.generate("ES384")))
    auth = {"Authorization": "Bearer " + tokens.issue("ops", "system/Patient.cruds", store=store)}
    store.dispose()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "--workers", "2", "--bind",
                             f"127.0.0.1:{port}", "server:create_app()"], cwd=tmp_path,
                            env={**os.environ, "FHIR_IOP_DATABASE_URL": pg_url,
                                 "FHIR_IOP_AUDIT_SPOOL": str(tmp_path / "spool")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(f"{base}/metadata", proc).status_code == 200
        s = requests.Session()
        s.headers.update(auth)
        pid = s.post(f"{base}/Patient", json={"resourceType": "Patient", "gender": "other"}).json()["id"]
        for _ in range(40):  # both workers read it (and keep it) before the updates
            assert s.get(f"{base}/Patient/{pid}").status_code == 200
        worst = 0.0
        for version in range(2, 12):
            r = s.put(f"{base}/Patient/{pid}", headers={"If-Match": f'W/"{version - 1}"'},
                      json={"resourceType": "Patient", "id": pid, "gender": "other", "birthDate": f"19{version:02d}"})
            assert r.status_code == 200, r.text
            fresh = s.get(f"{base}/Patient/{pid}", headers={"Cache-Control": "no-cache"})
            assert fresh.headers["ETag"] == f'W/"{version}"'
            started = time.monotonic()
            seen = 0
            while seen < 10:  # ten reads in a row at the new version, whichever worker answers
                got = s.get(f"{base}/Patient/{pid}")
                if got.headers["ETag"] == f'W/"{version}"':
                    seen += 1
                else:
                    seen = 0
                    assert time.monotonic() - started < 2.0, "a worker kept serving the previous version"
            worst = max(worst, time.monotonic() - started)
        stale = s.put(f"{base}/Patient/{pid}", headers={"If-Match": 'W/"3"'},
                      json={"resourceType": "Patient", "id": pid, "gender": "male"})
        assert stale.status_code == 412  # writes check the database, never the cache
    finally:
        _stop(proc)
