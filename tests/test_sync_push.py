"""Push: the outbox's messages go to the EHR once, retried, dead-lettered, replayed, Part 2 checked.

The EHR is ``responses`` behind fhir_iop.sync.client.EhrClient (tests/sync_push_kit.FakeEhr);
the data is the example clinic: M100001 consented to disclose encounters to Riverside Primary
Care (RIVERSIDE-PC) for TREAT, M100006 never did, M100005's Bayshore consent was revoked.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import orjson
import pytest
import responses
from server_kit import db_url  # noqa: F401  (fixture)
from sqlalchemy import select
from sync_push_kit import (BAYSHORE, FakeEhr, configure, connections, load, load_clinic_base, of_type, patient_ids,
                           rows)

from fhir_iop.disclosure import NOTICE, patient_of, today
from fhir_iop.mapping.consent import REVOCATION_EXT
from fhir_iop.store import Store
from fhir_iop.store.models import resource
from fhir_iop.store.repository import now
from fhir_iop.sync import push as push_mod
from fhir_iop.sync.push import push, replay

CONSENTED, UNCONSENTED = patient_ids({"M100001"}), patient_ids({"M100006"})


def encounters(pids, n=None) -> list[dict]:
    out = [e for e in of_type("Encounter") if patient_of(e) in pids]
    assert out, "the example clinic has encounters for these clients"
    return out[:n] if n else out


@pytest.fixture
def store(db_url):  # noqa: F811
    s = Store(db_url)
    conns = configure(connections(resources={"Encounter": "push", "Patient": "pull", "Consent": "pull"},
                                  push={"max_attempts": 3, "backoff": 10, "batch": 7}))
    s.conn = conns["riverside"]
    load_clinic_base(s)
    yield s
    configure(None)  # back to $FHIR_IOP_SYNC_CONFIG (unset in tests)
    s.dispose()


@pytest.fixture
def ehr():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield FakeEhr(rsps)


def _audits(store) -> list[dict]:
    with store.reading() as tx:
        return [orjson.loads(b) for b in tx.conn.execute(select(resource.c.body).where(resource.c.type == "AuditEvent")).scalars()]


def test_consented_encounters_are_sent_marked_and_audited(store, ehr):
    encs = encounters(CONSENTED, 3)
    load(store, encs)
    counts = push(store, store.conn)
    assert counts == {"sent": 3}
    assert all(r.state == "sent" and r.remote_location and r.remote_version == "1" and r.consent for r in rows(store))
    enc_system = encs[0]["identifier"][0]["system"]
    assert sorted(ehr.writes) == sorted(("Encounter", f"{enc_system}|{e['identifier'][0]['value']}") for e in encs)
    sent = next(iter(ehr.records.values()))
    assert "id" not in sent and "versionId" not in sent["meta"]  # the EHR keeps its own ids
    assert {"42CFRPart2", "NORDSCLCD"} <= {s["code"] for s in sent["meta"]["security"]}
    assert NOTICE in orjson.dumps(sent["meta"]).decode()  # the 42 CFR 2.32 redisclosure notice
    subject = sent["subject"]
    assert "reference" not in subject and subject["type"] == "Patient" and subject["identifier"]["value"] == "M100001"
    audits = [a for a in _audits(store) if any(e.get("what", {}).get("reference", "").startswith("Encounter/")
                                               for e in a.get("entity", []))]
    assert len(audits) == 3
    assert all(any(e.get("what", {}).get("reference", "").startswith("Consent/") for e in a["entity"]) for a in audits)
    # sending again changes nothing: nothing is due
    assert push(store, store.conn) == {}
    # a change goes out as an update of the same record (the identifier makes it idempotent)
    with store.transaction() as tx:
        tx.update("Encounter", encs[0]["id"], {**encs[0], "status": "cancelled"})
    assert push(store, store.conn) == {"sent": 1}
    assert len(ehr.records) == 3 and max(ehr.writes.values()) == 2


def test_no_consent_means_nothing_is_sent(store, ehr):
    load(store, encounters(UNCONSENTED, 2))
    assert push(store, store.conn) == {"withheld": 2}
    assert ehr.requests == []
    assert all(r.state == "withheld" and "RIVERSIDE-PC" in r.last_error for r in rows(store))
    assert push(store, store.conn) == {}  # withheld messages are not claimed again…


def test_a_revoked_consent_stops_what_waits_and_a_new_one_releases_it(store, ehr):
    encs = encounters(CONSENTED, 2)
    load(store, encs)
    consent = next(c for c in of_type("Consent") if c["identifier"][0]["value"] == "CNS000001")
    revoked = {**consent, "status": "inactive",
               "extension": [*consent.get("extension", []), {"url": REVOCATION_EXT, "valueDate": today().isoformat()}]}
    load(store, [revoked])
    assert push(store, store.conn) == {"withheld": 2}
    assert ehr.requests == []
    load(store, [consent])  # …until a consent changes: the gate decides again
    assert {r.state for r in rows(store)} == {"pending"}
    assert push(store, store.conn) == {"sent": 2}


def test_a_consent_that_starts_later_releases_what_waits_on_its_first_day(store, ehr, monkeypatch):
    """A consent written today with tomorrow's start date: today the gate refuses and the messages are
    withheld (and not decided again today); on the first push of tomorrow they are decided again and
    sent. Without the daily re-decision they would wait for the next Consent write or a replay."""
    from fhir_iop.disclosure import gate
    encs = encounters(CONSENTED, 2)
    load(store, encs)
    tomorrow = today() + timedelta(days=1)
    consent = next(c for c in of_type("Consent") if c["identifier"][0]["value"] == "CNS000001")
    later = orjson.loads(orjson.dumps(consent))
    for p in later["provision"]["provision"]:
        p["period"]["start"] = tomorrow.isoformat()
    load(store, [later])
    assert push(store, store.conn) == {"withheld": 2}
    assert push(store, store.conn) == {}  # the same day: not decided again
    assert ehr.requests == []
    monkeypatch.setattr(gate, "today", lambda: tomorrow)  # the site's next day…
    next_day = now() + timedelta(days=1)
    assert push(store, store.conn, at=lambda: next_day) == {"sent": 2}
    assert push(store, store.conn, at=lambda: next_day) == {}
    assert {r.state for r in rows(store)} == {"sent"}


def test_a_revoked_consent_is_withheld_for_that_recipient(store, ehr):
    conn = connections(name="bayshore", recipient=BAYSHORE, resources={"Encounter": "push"})["bayshore"]
    configure({"bayshore": conn})
    load(store, encounters(patient_ids({"M100005"}), 2))
    assert push(store, conn) == {"withheld": 2}
    assert ehr.requests == []


def test_throttled_then_retried_after_retry_after(store, ehr):
    load(store, encounters(CONSENTED, 1))
    ehr.faults, ehr.retry_after = [429], "120"
    t0 = now()
    assert push(store, store.conn, at=lambda: t0) == {"pending": 1}
    (msg,) = rows(store)
    assert msg.attempts == 1 and "HTTP 429" in msg.last_error
    assert msg.next_attempt_at >= t0 + timedelta(seconds=120)  # Retry-After beats the 5-10 s backoff
    assert push(store, store.conn, at=lambda: t0 + timedelta(seconds=60)) == {}  # not due yet
    assert push(store, store.conn, at=lambda: t0 + timedelta(seconds=121)) == {"sent": 1}
    assert len(ehr.records) == 1 and list(ehr.writes.values()) == [1]


def test_server_errors_and_timeouts_are_retried_then_dead_lettered_and_replayed(store, ehr):
    load(store, encounters(CONSENTED, 1))
    ehr.faults = [500, "timeout", 503]
    t = now()
    for expected in ("pending", "pending", "dead"):  # max_attempts: 3
        assert push(store, store.conn, at=lambda: t) == {expected: 1}
        (msg,) = rows(store)
        t = msg.next_attempt_at
    assert msg.state == "dead" and msg.attempts == 3 and "HTTP 503" in msg.last_error
    assert push(store, store.conn, at=lambda: t + timedelta(days=1)) == {}  # dead letters stay dead
    assert replay(store, "riverside") == 1
    assert push(store, store.conn) == {"sent": 1}
    assert list(ehr.writes.values()) == [1]


def test_backoff_grows_with_jitter_and_a_timeout_says_so(store, ehr):
    opts = push_mod.Options(backoff=10, backoff_max=60)
    assert [push_mod.delay(n, opts, None, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    assert push_mod.delay(2, opts, None, rand=lambda: 0.0) == 10  # jitter: half to all of the step
    assert push_mod.delay(1, opts, 300, rand=lambda: 1.0) == 300
    load(store, encounters(CONSENTED, 1))
    ehr.faults = ["timeout"]
    t0 = now()
    assert push(store, store.conn, at=lambda: t0) == {"pending": 1}
    (msg,) = rows(store)
    assert "timed out" in msg.last_error and t0 + timedelta(seconds=5) <= msg.next_attempt_at <= t0 + timedelta(seconds=10)


def test_a_refusal_is_dead_at_once_with_the_ehrs_reason(store, ehr):
    encs = encounters(CONSENTED, 2)
    load(store, encs)
    ehr.faults = [(400, {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "Encounter.class: unknown code (rule enc-7)"}]})]
    assert push(store, store.conn) == {"dead": 1, "sent": 1}
    dead = rows(store, state="dead")[0]
    assert dead.attempts == 1 and "HTTP 400" in dead.last_error and "unknown code (rule enc-7)" in dead.last_error
    assert replay(store, ids=[dead.id]) == 1
    assert push(store, store.conn) == {"sent": 1}
    assert len(ehr.records) == 2


def test_what_the_ehr_echoes_from_the_record_is_not_kept(store, ehr):
    enc = encounters(CONSENTED, 1)[0]
    load(store, [enc])
    value = enc["identifier"][0]["value"]
    ehr.faults = [(404, {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "not-found",
         "diagnostics": f"no Patient with identifier M100001 for Encounter {value}"}]})]
    assert push(store, store.conn) == {"dead": 1}
    (msg,) = rows(store)
    assert "M100001" not in msg.last_error and value not in msg.last_error
    assert "HTTP 404: error: no Patient with identifier […] for Encounter […]" in msg.last_error


@pytest.mark.parametrize("status", [409, 412])
def test_conflicts_are_retried_not_dead(store, ehr, status):
    load(store, encounters(CONSENTED, 1))
    ehr.faults = [status]
    assert push(store, store.conn) == {"pending": 1}


def test_a_deletion_is_sent_by_identifier_only_after_the_resource_was(store, ehr):
    sent, never = encounters(CONSENTED, 2)
    load(store, [sent])
    assert push(store, store.conn) == {"sent": 1}
    load(store, [never])
    with store.transaction() as tx:
        tx.delete("Encounter", sent["id"])
        tx.delete("Encounter", never["id"])  # coalesced: PUT + DELETE before any send -> nothing to send
    assert push(store, store.conn) == {"sent": 2}
    assert [(m, t) for m, t, _ in ehr.requests] == [("PUT", "Encounter"), ("DELETE", "Encounter")]
    assert ehr.requests[1][2] == ehr.requests[0][2]
    assert ehr.records == {}


def test_a_dead_worker_lease_runs_out_and_another_sends_it(store, ehr):
    load(store, encounters(CONSENTED, 2))
    t0 = now()
    claimed = push_mod.claim(store, "riverside", "dead-worker", 10, 60, t0)
    assert len(claimed) == 2
    assert push(store, store.conn, at=lambda: t0 + timedelta(seconds=30)) == {}  # leased
    assert push(store, store.conn, at=lambda: t0 + timedelta(seconds=61)) == {"sent": 2}
    assert all(r.lease_owner is None for r in rows(store))
    # the slow worker comes back: its messages are not its own any more, it sends nothing
    opts = push_mod.Options.of(store.conn)
    assert [push_mod.send_one(store, store.conn, None, m, "dead-worker", opts) for m in claimed] == ["lost", "lost"]
    assert len(ehr.requests) == 2


def test_workers_at_once_send_each_message_exactly_once(store, ehr):
    encs = encounters(CONSENTED | patient_ids({"M100003", "M100004"}))
    load(store, encs)
    n = len(rows(store))
    assert n == len(encs) > 20
    results, errors = [], []
    start = threading.Barrier(4)

    def work(i):
        try:
            start.wait()
            results.append(push(store, store.conn, worker=f"w{i}"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(r.get("sent", 0) for r in results) == n
    assert sum(1 for r in results if r.get("sent")) >= 2  # they did work side by side
    assert len(ehr.requests) == n and set(ehr.writes.values()) == {1}
    assert {r.state for r in rows(store)} == {"sent"}


def test_what_came_from_the_ehr_goes_back_under_its_own_ids(store, ehr):
    """A Patient pulled from the EHR is referenced by the EHR's id; an Encounter pulled from it and
    changed here is an update of the EHR's own record, not a new one."""
    from fhir_iop.sync.pull import localize
    conn = store.conn
    ehr_patient = {k: v for k, v in of_type("Patient")[0].items() if k not in ("meta",)}
    ehr_patient.update(id="ehr-p1", meta={"versionId": "4", "lastUpdated": "2026-11-20T10:00:00Z"})
    local_patient = localize(ehr_patient, conn)
    # the EHR's records are not Part 2 data here (no labels); what we send about that patient isn't either
    ehr_enc = {**encounters(CONSENTED, 1)[0], "id": "ehr-e9", "meta": {"versionId": "2"},
               "subject": {"reference": "Patient/ehr-p1"}}
    ehr_enc.pop("identifier")
    local_enc = localize(ehr_enc, conn)
    load(store, [local_patient, local_enc], origin="sync:riverside")  # pulled: nothing queued
    assert rows(store) == []
    ours = {**encounters(UNCONSENTED, 1)[0], "subject": {"reference": f"Patient/{local_patient['id']}"}}
    ours.pop("meta")
    load(store, [ours, {**local_enc, "status": "cancelled"}])  # written here: queued
    assert push(store, conn) == {"sent": 2}
    assert ehr.records[("Encounter", "id:ehr-e9")]["status"] == "cancelled"
    assert ehr.records[("Encounter", "id:ehr-e9")]["subject"] == {"reference": "Patient/ehr-p1"}
    (mine,) = [r for k, r in ehr.records.items() if not k[1].startswith("id:")]
    assert mine["subject"] == {"reference": "Patient/ehr-p1"}
    assert len(ehr.requests) == 2
