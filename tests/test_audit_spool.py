"""The audit spool (fhir_iop.audit.spool): AuditEvents reach a local file before the response, reach the
store exactly once afterwards — across crashes, an unreachable store, refused lines and several
shippers — and an administrator's search sees every request answered. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import orjson
import pytest
from click.testing import CliRunner
from server_kit import db_url, token_for  # noqa: F401  (fixtures)
from sqlalchemy import select, update

from fhir_iop.audit import Entity, build, facts, from_facts
from fhir_iop.audit.spool import SUFFIX, Spool, ship_segments, spool_dir
from fhir_iop.security.access import Access
from fhir_iop.store import Store
from fhir_iop.store.models import resource

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "SPOOL-1"}],
           "name": [{"family": "Ashgrove", "given": ["Tamsin"]}], "birthDate": "1980-05-06", "gender": "female"}


def make_app(db_url, **config):  # noqa: F811
    from server import create_app
    return create_app({"DATABASE_URL": db_url, "TESTING": True, **config})


def create_patients(app, n: int):
    """``n`` Patients created through the API (``n`` audited requests); the app's store."""
    writer = token_for(app, scopes="system/Patient.cruds")
    c = app.test_client()
    for _ in range(n):
        assert c.post("/Patient", json=PATIENT, headers={"Authorization": writer}).status_code == 201
    return app.extensions["fhir_iop"].store


def stored_ids(store) -> list[str]:
    with store.reading() as tx:
        return list(tx.conn.execute(select(resource.c.id).where(resource.c.type == "AuditEvent")).scalars())


def segments(directory) -> list:
    return sorted(directory.glob("*" + SUFFIX)) if directory.is_dir() else []


def an_event(n: int = 0) -> dict:
    return build(Access("spool-test", recipient=None, purpose="TREAT"), "read", 0,
                 [Entity(f"Patient/p{n}", f"Patient/p{n}")], network="127.0.0.1", server="http://test",
                 request_id=str(uuid.uuid4()), resource_type="Patient")


@pytest.fixture
def store(db_url):  # noqa: F811
    s = Store(db_url)
    yield s
    s.dispose()


# -- through the facade ---------------------------------------------------------------------------

def test_the_auditevent_is_spooled_before_the_response_and_stored_once_drained(db_url):  # noqa: F811
    app = make_app(db_url, AUDIT_SPOOL_INTERVAL=3600)  # the thread never ships on its own here
    try:
        store, spool = app.extensions["fhir_iop"].store, app.extensions["fhir_iop_audit_spool"]
        writer = token_for(app, scopes="system/Patient.cruds")
        c = app.test_client()
        pid = c.post("/Patient", json=PATIENT, headers={"Authorization": writer}).get_json()["id"]
        r = c.get(f"/Patient/{pid}", headers={"Authorization": writer})
        assert r.status_code == 200
        spooled = b"".join(p.read_bytes() for p in segments(spool.dir))
        lines = [from_facts(orjson.loads(x)) for x in spooled.splitlines()]  # (as the shipper builds them)
        assert [ev["action"] for ev in lines] == ["C", "R"]
        read = lines[1]
        ident = [e for e in read["entity"] if e["type"].get("code") == "XrequestId"][0]["what"]["identifier"]["value"]
        assert ident == r.headers["X-Request-Id"]
        assert stored_ids(store) == []  # nothing shipped yet: the spool holds it
        assert (os.stat(spool.dir).st_mode & 0o777) == 0o700
        assert all((os.stat(p).st_mode & 0o777) == 0o600 for p in segments(spool.dir))
        # an administrator's search drains the spool first
        admin = token_for(app, scopes="system/AuditEvent.rs", admin=True)
        found = c.get(f"/AuditEvent?entity=Patient/{pid}", headers={"Authorization": admin}).get_json()
        assert sorted(e["resource"]["action"] for e in found["entry"]) == ["C", "R"]
        assert sorted(stored_ids(store)) == sorted(ev["id"] for ev in lines)
        left = [from_facts(orjson.loads(x)) for p in segments(spool.dir) for x in p.read_bytes().splitlines()]
        assert [ev["action"] for ev in left] == ["E"]  # only the search's own AuditEvent, spooled after it
    finally:
        app.extensions["fhir_iop"].store.dispose()


def test_the_spool_thread_ships_on_its_own(db_url):  # noqa: F811
    app = make_app(db_url, AUDIT_SPOOL_INTERVAL=0.05)
    try:
        store = create_patients(app, 5)
        deadline = time.monotonic() + 20
        while len(stored_ids(store)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stored_ids(store)) == 5
    finally:
        app.extensions["fhir_iop"].store.dispose()


def test_an_external_shipper_stores_what_the_facade_spooled(db_url, tmp_path):  # noqa: F811
    directory = tmp_path / "spool"
    app = make_app(db_url, AUDIT_SPOOL=str(directory), AUDIT_SPOOL_SHIPPER="external", AUDIT_SPOOL_INTERVAL=0.05)
    try:
        store = create_patients(app, 3)
        time.sleep(0.5)  # the facade closes its segments but ships nothing
        assert stored_ids(store) == [] and segments(directory)
        from fhir_iop.cli import main
        status = CliRunner().invoke(main, ["audit", "status", "--database", db_url, "--spool", str(directory)])
        assert status.exit_code == 0 and f"{directory}:" in status.output and "0 refused" in status.output
        result = CliRunner().invoke(main, ["audit", "ship", "--once", "--database", db_url, "--spool", str(directory)])
        assert result.exit_code == 0, result.output
        assert len(stored_ids(store)) == 3 and segments(directory) == []
        assert "3 AuditEvent(s) stored" in result.output
    finally:
        app.extensions["fhir_iop"].store.dispose()


def test_spool_settings(tmp_path):
    assert spool_dir("auto", f"sqlite:///{tmp_path}/x.sqlite") == tmp_path / "x.sqlite.audit-spool"
    assert spool_dir("auto", "sqlite://") is None and spool_dir("off", f"sqlite:///{tmp_path}/x.sqlite") is None
    assert spool_dir(str(tmp_path / "s"), "postgresql+psycopg://u:secret@h/db") == tmp_path / "s"
    pg = spool_dir("auto", "postgresql+psycopg://u:secret@h/db")
    assert pg.parts[:2] == ("var", "audit-spool") and "secret" not in str(pg)
    assert pg != spool_dir("auto", "postgresql+psycopg://u:secret@h/other")
    with pytest.raises(ValueError, match="AUDIT_SPOOL_SHIPPER"):
        Spool(None, tmp_path, shipper="cron")


# -- exactly once ---------------------------------------------------------------------------------

CRASH = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests_path_events import events
    from fhir_iop.audit.spool import Spool
    spool = Spool(None, {directory!r}, interval=3600)
    spool.append(events)
    fd = spool._fd
    os.write(fd, b'{{"resourceType": "AuditEvent", "id": "torn')  # killed in the middle of a line
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_process_leaves_its_segment_to_the_next_shipper(store, tmp_path):
    directory = tmp_path / "spool"
    events = [an_event(n) for n in range(7)]
    (tmp_path / "tests_path_events.py").write_text(f"events = {orjson.dumps(events).decode()!r}\n"
                                                   "import json\nevents = json.loads(events)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", CRASH.format(root=root, directory=str(directory))],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == -signal.SIGKILL
    assert len(segments(directory)) == 1
    # a copy of the dead process's segment: as if a shipper stored it but died before deleting it
    copy = tmp_path / "copy"
    shutil.copy(segments(directory)[0], copy)
    assert ship_segments(store, directory) == 7
    assert sorted(stored_ids(store)) == sorted(e["id"] for e in events)
    assert segments(directory) == []
    shutil.copy(copy, directory / ("0" * 20 + "-1-again" + SUFFIX))
    assert ship_segments(store, directory) == 0  # the ids are in the store: skipped
    assert len(stored_ids(store)) == 7 and segments(directory) == []


def test_a_live_segment_is_not_shipped_by_another_shipper(store, tmp_path):
    directory = tmp_path / "spool"
    writer = Spool(store, directory, interval=3600)
    try:
        writer.append([an_event(1), an_event(2)])
        assert ship_segments(store, directory) == 0  # locked: still being written
        assert stored_ids(store) == []
        assert writer.drain() == 2  # closes it, then ships it
        assert len(stored_ids(store)) == 2
    finally:
        writer.close()


def test_an_unreachable_store_keeps_the_events_until_it_is_back(store, tmp_path):
    from sqlalchemy.exc import OperationalError
    directory = tmp_path / "spool"
    writer = Spool(store, directory, interval=3600)
    events = [an_event(n) for n in range(3)]
    writer.append(events)
    with writer._lock:
        writer._close_segment()
    nowhere = Store("postgresql+psycopg://postgres@127.0.0.1:9/test?connect_timeout=2", migrate=False)
    try:
        with pytest.raises(OperationalError):
            ship_segments(nowhere, directory)
    finally:
        nowhere.dispose()
    assert len(segments(directory)) == 1 and stored_ids(store) == []
    assert ship_segments(store, directory) == 3
    assert sorted(stored_ids(store)) == sorted(e["id"] for e in events)
    writer.close()


def test_lines_the_store_refuses_are_set_aside_and_the_rest_stored(store, tmp_path, caplog):
    directory = tmp_path / "spool"
    directory.mkdir()
    good = [an_event(1), an_event(2)]
    broken = {**an_event(3), "recorded": "not a date"}
    lines = [orjson.dumps(good[0]), b"{not json", orjson.dumps(broken), orjson.dumps(good[1])]
    (directory / ("0" * 20 + "-1-test" + SUFFIX)).write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level("ERROR", logger="fhir_iop.audit"):
        assert ship_segments(store, directory) == 2
    assert sorted(stored_ids(store)) == sorted(e["id"] for e in good)
    rejected = b"".join(p.read_bytes() for p in directory.glob("rejected-*.jsonl")).splitlines()
    assert len(rejected) == 2 and rejected[0] == b"{not json" and orjson.loads(rejected[1])["id"] == broken["id"]
    assert segments(directory) == []
    assert any("refused by the store" in r.getMessage() for r in caplog.records)
    from fhir_iop.cli import main
    status = CliRunner().invoke(main, ["audit", "status", "--database", store.url, "--spool", str(directory)])
    assert status.exit_code == 1 and "2 refused line(s)" in status.output


def test_two_shippers_at_once_store_each_event_once(db_url, tmp_path):  # noqa: F811
    directory = tmp_path / "spool"
    stores = [Store(db_url), Store(db_url, migrate=False)]
    try:
        writers = [Spool(stores[0], directory, interval=3600) for _ in range(4)]
        events = []
        for i, w in enumerate(writers):
            batch = [an_event(i * 100 + n) for n in range(50)]
            events += batch
            w.append(batch)
            with w._lock:
                w._close_segment()
        import threading
        counts = []
        ts = [threading.Thread(target=lambda s=s: counts.append(ship_segments(s, directory))) for s in stores * 2]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sum(counts) == 200
        assert sorted(stored_ids(stores[0])) == sorted(e["id"] for e in events)
        for w in writers:
            w.close()
    finally:
        for s in stores:
            s.dispose()


# -- the client registration cache --------------------------------------------------------------------

def test_a_client_disabled_by_another_process_is_refused_within_the_cache_time(db_url):  # noqa: F811
    from fhir_iop.store.models import smart_client
    app = make_app(db_url, CLIENT_CACHE_SECONDS=0.3)
    try:
        header = token_for(app, scopes="system/Patient.rs")
        cid = __import__("jwt").decode(header.split()[1], options={"verify_signature": False})["client_id"]
        c = app.test_client()
        assert c.get("/Patient", headers={"Authorization": header}).status_code == 200
        # what `fhir-iop clients disable` in another process does: the row changes, this process is not told
        with app.extensions["fhir_iop"].store.engine.begin() as conn:
            conn.execute(update(smart_client).where(smart_client.c.client_id == cid)
                         .values(disabled=__import__("datetime").datetime(2026, 1, 1)))
        time.sleep(0.4)
        r = c.get("/Patient", headers={"Authorization": header})
        assert r.status_code == 401 and "disabled" in r.get_json()["issue"][0]["diagnostics"]
    finally:
        app.extensions["fhir_iop"].store.dispose()


def test_batched_writes_store_the_rows_sqlalchemy_core_stores(store):
    """``write_many`` (SQLite: on the DBAPI cursor; PostgreSQL: one JSON statement) stores exactly what
    SQLAlchemy Core inserts store: the resource row and every index row, byte for byte as the database
    holds them (dates in SQLAlchemy's storage format), and a date search finds both."""
    from datetime import datetime

    from sqlalchemy import insert, text

    from fhir_iop.audit import AUDIT_TYPE, index_rows, write_many
    from fhir_iop.store.models import INDEX_TABLES
    fast = {**an_event(1), "recorded": "2026-12-05T10:00:00.000Z"}  # a whole second: microseconds kept as 0
    core = {**fast, "id": str(uuid.uuid4())}
    with store.transaction() as tx:
        write_many(tx.conn, [fast])
        when = datetime.strptime(core["recorded"], "%Y-%m-%dT%H:%M:%S.%fZ")
        body = {**core, "meta": {"versionId": "1", "lastUpdated": core["recorded"]}}
        pk = tx.conn.execute(insert(resource).values(type=AUDIT_TYPE, id=core["id"], version_id=1, last_updated=when,
                                                     deleted=False, body=orjson.dumps(body).decode())
                             ).inserted_primary_key[0]
        for kind, rows in index_rows(core).items():
            if rows:
                tx.conn.execute(insert(INDEX_TABLES[kind]), [{"rid": pk, "type": AUDIT_TYPE, **r} for r in rows])
    with store.reading() as tx:
        raw = {i: tx.conn.execute(text("SELECT rid, type, version_id, last_updated, deleted FROM resource "
                                       "WHERE id = :i"), {"i": i}).one() for i in (fast["id"], core["id"])}
        assert tuple(raw[fast["id"]])[1:] == tuple(raw[core["id"]])[1:]
        for table in {t.name: t for t in INDEX_TABLES.values()}.values():
            def rows_of(rid):
                return sorted((tuple(str(v) for v in r[1:]) for r in tx.conn.execute(
                    text(f"SELECT * FROM {table.name} WHERE rid = :r"), {"r": rid})))
            assert rows_of(raw[fast["id"]].rid) == rows_of(raw[core["id"]].rid), table.name
            assert rows_of(raw[fast["id"]].rid) or table.name == "search_quantity"
    from urllib.parse import parse_qsl

    from fhir_iop.audit import registry
    from fhir_iop.store import search
    for query in ("date=ge2026-12-05T09:59:59Z&date=le2026-12-05T10:00:00Z", "date=2026-12-05"):
        q = search.parse(registry(), AUDIT_TYPE, parse_qsl(query))
        with store.reading() as tx:
            found = {orjson.loads(b)["id"] for _, _, b in search.run(tx.conn, q, registry()).matches}
        assert found == {fast["id"], core["id"]}, query


def test_a_spool_directory_that_cannot_be_made_stops_the_start(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(OSError):
        make_app(f"sqlite:///{tmp_path / 'db.sqlite'}", AUDIT_SPOOL=str(tmp_path / "a-file" / "spool"))


def test_spooled_facts_build_exactly_the_auditevent_of_the_request():
    """A request spools ``facts`` (a quarter of the bytes); the shipper's ``from_facts`` gives the very
    AuditEvent ``build`` gives for the same arguments, id and time; what ``build`` would refuse is
    refused at the request, before anything is disclosed."""
    from datetime import UTC, datetime, timedelta
    cases = [(Access("app-1", recipient="RIVERSIDE-PC", purpose="HPAYMT", emergency=True),
              dict(action="search", outcome=0, entities=[Entity("Encounter/e1", "Patient/p1", "Consent/c1"),
                                                         Entity("Observation/o1", None, None, "emergency")],
                   patients=["Patient/p2"], consents=["Consent/c2"], query=b"patient=p1&code=\xff",
                   description="2 resource(s) written", network="10.0.0.7", server="https://iop.example/fhir",
                   request_id="r-1", subtypes=["history-type"], resource_type="Encounter")),
             (None, dict(action="read", outcome=4, entities=["Patient/p9"], query="a=b", description="HTTP 401")),
             (Access("staff"), dict(action="transaction", outcome=12))]
    for access, kw in cases:
        before = datetime.now(UTC)
        f = orjson.loads(orjson.dumps(facts(access, **kw)))  # (through the spool's JSON)
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=f["recorded"])
        assert before - timedelta(milliseconds=1) <= when <= datetime.now(UTC)
        assert from_facts(f) == build(access, **kw, recorded=when, event_id=f["id"])
        assert len(orjson.dumps(f)) < len(orjson.dumps(from_facts(f))) / 2
        # a line spooled by an earlier version (its time as ISO 8601 text) builds the same AuditEvent
        older = {**f, "recorded": when.replace(tzinfo=None).isoformat(timespec="microseconds")}
        assert from_facts(older) == from_facts(f)
    with pytest.raises(ValueError):
        facts(None, action="frobnicate", outcome=0)
    with pytest.raises(ValueError):
        facts(None, action="read", outcome=3)


def test_new_ids_are_random_version_4_uuids_as_text():
    """Request and AuditEvent ids (``fhir_iop.audit.new_id``): what ``str(uuid.uuid4())`` gives, and unique."""
    import uuid

    from fhir_iop.audit import new_id
    ids = [new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    for i in ids[:2000]:
        u = uuid.UUID(i)
        assert str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122
    # every hex digit turns up in every random position (nothing fixed but the version and variant bits)
    for pos in (0, 9, 15, 20, 35):
        assert {i[pos] for i in ids} == set("0123456789abcdef")
    assert {i[19] for i in ids} == set("89ab")
