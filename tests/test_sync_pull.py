"""Pull from an outside EHR (sekmet-fhir on loopback, through the fault proxy of ehr_kit): paged and
bulk, with throttling, errors, timeouts, broken and duplicated pages, resets, updates during paging
and a pull process killed mid-run — then counted by identifier: nothing lost, nothing doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jwt
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from ehr_kit import Fault, FaultProxy, Sekmet, http_request
from server_kit import db_url, secured_app  # noqa: F401  (fixtures: SQLite and PostgreSQL)

from fhir_iop.store import Store
from fhir_iop.sync.bulk import bulk_pull
from fhir_iop.sync.client import EhrClient, EhrError
from fhir_iop.sync.config import parse
from fhir_iop.sync.pull import local_id, pull, read_state

MRN = "urn:oid:2.16.840.1.113883.3.9999.1"  # the seeded EHR's record-number system (test data)
BUSINESS = "urn:oid:2.16.840.1.113883.3.9999.2"  # identifiers of everything else seeded
PULLED = ("Patient", "Condition", "ServiceRequest", "MedicationStatement", "Observation")


def seed_records(n: int) -> list[dict]:
    """n patients, each with a diagnosis, a referral, an outside prescription and a lab result."""
    out = []
    for i in range(n):
        pid = f"pt{i}"
        out.append({"resourceType": "Patient", "id": pid, "identifier": [{"system": MRN, "value": f"MRN{i:05d}"}],
                    "name": [{"family": f"Family{i}", "given": ["Test"]}], "gender": "unknown"})
        subject = {"reference": f"Patient/{pid}"}
        out.append({"resourceType": "Condition", "id": f"cond{i}", "identifier": [{"system": BUSINESS,
                                                                                   "value": f"COND{i}"}],
                    "subject": subject, "code": {"text": "opioid use disorder, moderate"}})
        out.append({"resourceType": "ServiceRequest", "id": f"ref{i}", "identifier": [{"system": BUSINESS,
                                                                                      "value": f"REF{i}"}],
                    "status": "active", "intent": "order", "subject": subject,
                    "code": {"text": "referral to intensive outpatient program"},
                    "reasonReference": [{"reference": f"Condition/cond{i}"}]})
        out.append({"resourceType": "MedicationStatement", "id": f"med{i}",
                    "identifier": [{"system": BUSINESS, "value": f"MED{i}"}], "status": "active", "subject": subject,
                    "medicationCodeableConcept": {"text": "buprenorphine 8 mg sublingual tablet"}})
        out.append({"resourceType": "Observation", "id": f"lab{i}", "identifier": [{"system": BUSINESS,
                                                                                   "value": f"LAB{i}"}],
                    "status": "final", "subject": subject, "code": {"text": "hepatitis C antibody"},
                    "valueString": "negative"})
    return out


def seed(ehr: Sekmet, n: int, chunk: int = 100) -> list[dict]:
    records = seed_records(n)
    for i in range(0, len(records), chunk):
        ehr.transaction([dict(r) for r in records[i:i + chunk]], method="PUT")
    return records


def connection(base_url: str, **kw) -> object:
    raw = {"base_url": base_url, "resources": {t: "pull" for t in PULLED}, "page_size": 7,
           "timeouts": {"connect": 2, "read": 1.5}, "retries": {"max_attempts": 4, "backoff": 0.05}, **kw}
    return parse({"connections": {"county": raw}})["county"]


def identifiers(store: Store, types=PULLED) -> Counter:
    """How many stored resources carry each seeded identifier (system|value)."""
    c = Counter()
    with store.reading(snapshot=True) as tx:  # iter_current streams (a server-side cursor on PostgreSQL)
        for s in tx.iter_current(types):
            for ident in s.resource.get("identifier", ()):
                if ident.get("system") in (MRN, BUSINESS):
                    c[f"{s.type}:{ident['value']}"] += 1
    return c


def expected(records) -> Counter:
    return Counter(f"{r['resourceType']}:{r['identifier'][0]['value']}" for r in records)


@pytest.fixture
def ehr(tmp_path):
    with Sekmet(tmp_path / "sekmet") as e:
        yield e


@pytest.fixture
def proxy(ehr):
    with FaultProxy(ehr.base_url) as p:
        yield p


@pytest.fixture
def store(db_url):  # noqa: F811
    s = Store(db_url)
    yield s
    s.dispose()


def test_pull_through_faults_loses_nothing_and_doubles_nothing(ehr, proxy, store, monkeypatch):
    slept = []
    monkeypatch.setattr("urllib3.util.retry.time.sleep", lambda s: slept.append(s))
    records = seed(ehr, 12)
    proxy.plan(Fault("status", status=429, retry_after=1), match="GET /fhir/Patient")
    proxy.plan(Fault("duplicate"), match="GET /fhir/Patient", times=2)
    proxy.plan(Fault("status", status=500), Fault("status", status=503, retry_after=2), match="GET /fhir/Condition")
    proxy.plan(Fault("broken"), match="GET /fhir/ServiceRequest", times=2)
    proxy.plan(Fault("hang", seconds=4), match="GET /fhir/MedicationStatement")
    proxy.plan(Fault("reset"), match="GET /fhir/Observation")
    proxy.plan(Fault("duplicate"), match="GET /fhir/Observation")
    result = pull(store, connection(proxy.base_url))
    assert result.ok, result.errors
    assert not proxy.pending, proxy.pending  # every fault fired
    assert {1, 2} <= set(slept)  # Retry-After honoured
    assert identifiers(store) == expected(records)
    assert result.total("created") == len(records)

    # pulled ids are ours, the EHR's id is kept, references resolve here
    with store.reading() as tx:
        cond = tx.read("Condition", local_id("county", "Condition", "cond3")).resource
        assert cond["subject"]["reference"] == f"Patient/{local_id('county', 'Patient', 'pt3')}"
        tx.read("Patient", cond["subject"]["reference"].split("/")[1])
        assert {"use": "secondary", "system": f"{proxy.base_url}/Condition", "value": "cond3"} in cond["identifier"]
        assert cond["meta"]["source"] == f"{proxy.base_url}/Condition/cond3/_history/1"
        ref = tx.read("ServiceRequest", local_id("county", "ServiceRequest", "ref3")).resource
        assert ref["reasonReference"][0]["reference"] == f"Condition/{local_id('county', 'Condition', 'cond3')}"
        assert tx.count("Patient") == 12

    # a second pull finds nothing new: what it sees again (the cursor instant) is unchanged
    again = pull(store, connection(proxy.base_url))
    assert again.ok and again.total("created") == again.total("updated") == 0
    assert identifiers(store) == expected(records)


def test_incremental_pull_takes_new_and_changed_only(ehr, proxy, store):
    records = seed(ehr, 6)
    conn = connection(proxy.base_url, resources={"Patient": "pull", "Condition": "pull"})
    first = pull(store, conn)
    assert first.total("created") == 12
    with store.reading() as tx:
        cursor = read_state(tx, "county", "Patient").cursor
    assert cursor
    changed = {**records[0], "name": [{"family": "Renamed", "given": ["Test"]}]}
    added = seed_records(8)[-5:]  # patient 7's five resources
    ehr.transaction([changed, *[dict(r) for r in added]], method="PUT")
    second = pull(store, conn)
    assert second.counts["Patient"].get("updated") == 1 and second.counts["Patient"].get("created") == 1
    assert second.counts["Condition"].get("created") == 1
    assert second.total("created") + second.total("updated") == 3
    with store.reading() as tx:
        p0 = tx.read("Patient", local_id("county", "Patient", "pt0"))
        assert p0.resource["name"][0]["family"] == "Renamed" and p0.version_id == 2
        assert read_state(tx, "county", "Patient").cursor > cursor
    # every write is audited, pulls too: one AuditEvent per stored page, naming what it wrote
    audited = pulled_audit(store)
    assert sum(len([e for e in ev["entity"] if e.get("role", {}).get("code") == "4"]) for ev in audited) == 12 + 3
    assert all(any(a.get("who", {}).get("identifier", {}).get("value") == "sync:county" for a in ev["agent"])
               for ev in audited)


def pulled_audit(store: Store) -> list[dict]:
    from sqlalchemy import select

    from fhir_iop.store.models import resource
    with store.reading() as tx:
        bodies = tx.conn.execute(select(resource.c.body).where(resource.c.type == "AuditEvent")).scalars()
        return [e for e in map(orjson.loads, bodies) if "pulled from EHR" in (e.get("outcomeDesc") or "")]


def test_updates_during_offset_paging_do_not_hide_anything(ehr, proxy, store):
    """sekmet pages by offset: updating an early resource while paging shifts every later one a
    place down, and a client that follows next links skips one. Keyset paging by the cursor does not."""
    records = seed(ehr, 30)
    patients = [r for r in records if r["resourceType"] == "Patient"]
    state = {"gets": 0}

    def update_during_paging(method, path):
        if method == "GET" and path.startswith("/fhir/Patient?"):
            state["gets"] += 1
            if state["gets"] == 2:  # after the first page: touch three resources of that page
                for p in patients[:3]:
                    status, _, _ = http_request("PUT", f"{ehr.base_url}/Patient/{p['id']}",
                                                {**p, "active": True})
                    assert status == 200
        return False
    proxy.plan(Fault("status", match=update_during_paging, times=10**9))  # never fires, only watches

    # the naive way (follow next links) really does miss a patient here …
    client = EhrClient(connection(proxy.base_url, page_size=10))
    naive = [r["id"] for page in client.search("Patient", {"_sort": "_lastUpdated"}) for r in page.resources]
    assert len(set(naive)) < len(patients)

    # … the pull does not
    state["gets"] = 0
    ehr.transaction([{**p} for p in patients], method="PUT")  # a fresh round of versions to page through
    result = pull(store, connection(proxy.base_url, page_size=10, resources={"Patient": "pull"}))
    assert result.ok
    assert identifiers(store, ("Patient",)) == Counter({f"Patient:{p['identifier'][0]['value']}": 1 for p in patients})
    with store.reading() as tx:
        for p in patients[:3]:
            assert tx.read("Patient", local_id("county", "Patient", p["id"])).resource.get("active") is True


def test_pull_stops_when_the_ehr_ignores_the_cursor(ehr, proxy, store):
    seed(ehr, 2)
    conn = connection(proxy.base_url, strict=False, resources={"Patient": "pull"}, since="2020-01-01T00:00:00Z")
    first = http_request("GET", f"{ehr.base_url}/Patient?_count=7")  # a page without _lastUpdated in its self link
    assert first[0] == 200
    with FaultProxy(ehr.base_url) as ignoring:
        def strip(method, path):
            return method == "GET" and "_lastUpdated" in path
        ignoring.plan(Fault("status", status=200, body=orjson.loads(first[2]), match=strip, times=10))
        result = pull(store, connection(ignoring.base_url, strict=False, resources={"Patient": "pull"},
                                        since="2020-01-01T00:00:00Z"))
    assert "ignored _lastUpdated" in result.errors["Patient"]
    with store.reading() as tx:
        assert read_state(tx, "county", "Patient") is None  # the cursor did not move
    assert pull(store, conn).ok  # the real EHR, which honours it


def test_invalid_resource_is_counted_not_stored_and_does_not_block(ehr, proxy, store):
    seed(ehr, 3)
    status, _, body = http_request("GET", f"{ehr.base_url}/Patient?_sort=_lastUpdated&_count=7")
    page = orjson.loads(body)
    page["entry"][1]["resource"]["birthDate"] = "last spring"  # not a date
    page["link"] = [link for link in page["link"] if link["relation"] != "next"]
    proxy.plan(Fault("status", status=200, body=page, match="GET /fhir/Patient"))
    result = pull(store, connection(proxy.base_url, resources={"Patient": "pull"}))
    assert result.counts["Patient"]["invalid"] == 1 and result.counts["Patient"]["created"] >= 2
    bad_id = page["entry"][1]["resource"]["id"]
    assert f"Patient/{bad_id}" in result.errors["Patient"] and "last spring" not in result.errors["Patient"]


# -- killed mid-run -------------------------------------------------------------------------------------

def test_pull_process_killed_mid_run_and_restarted(ehr, tmp_path, db_url):  # noqa: F811
    records = seed(ehr, 16)
    with FaultProxy(ehr.base_url) as slow:
        slow.plan(Fault("delay", seconds=0.15, match="GET /fhir/", times=10_000))
        cfg = tmp_path / "ehr.yaml"
        cfg.write_text(yaml.safe_dump({"connections": {"county": {
            "base_url": slow.base_url, "resources": {t: "pull" for t in PULLED}, "page_size": 4,
            "retries": {"max_attempts": 3, "backoff": 0.05}}}}))
        store = Store(db_url)
        try:
            cmd = [str(Path(sys.executable).parent / "fhir-iop"), "sync", "pull", "--config", str(cfg),
                   "--database", db_url]
            env = {**os.environ, "FHIR_IOP_SYNC_CONFIG": ""}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                with store.reading() as tx:
                    got = tx.count("Condition")
                if got >= 4:  # pages committed, more to come
                    break
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            partial = identifiers(store)
            assert 0 < sum(partial.values()) < len(records)
            assert max(partial.values()) == 1

            slow.clear()
            done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            assert b"sync pull county:" in done.stderr
            assert identifiers(store) == expected(records)
            with store.reading() as tx:
                for t in PULLED:
                    assert tx.count(t) == 16
        finally:
            store.dispose()


# -- bulk ---------------------------------------------------------------------------------------------

def test_bulk_pull_resumes_after_an_interruption(ehr, proxy, store, monkeypatch):
    records = seed(ehr, 10)
    conn = connection(proxy.base_url, bulk={"batch": 6})
    proxy.plan(Fault("status", status=429, retry_after=1), match="GET /fhir/bulk-status/")
    proxy.plan(Fault("broken"), match="GET /fhir/bulk-status/")  # a broken manifest is fetched again
    first = bulk_pull(store, conn, stop_after_batches=3)  # as if killed after three committed batches
    assert 0 < first.total("created") < len(records)
    with store.reading() as tx:
        job = read_state(tx, "county", "*")
    assert job.bulk_status_url and job.bulk_state == "downloading"
    kickoffs = sum(1 for m, p, *_ in proxy.log if "$export" in p)
    second = bulk_pull(store, conn)
    assert second.ok, second.errors
    assert sum(1 for m, p, *_ in proxy.log if "$export" in p) == kickoffs  # the same job, not a new one
    assert identifiers(store) == expected(records)
    with store.reading() as tx:
        done = read_state(tx, "county", "*")
        assert done.bulk_status_url is None and done.cursor  # the next export starts at transactionTime
    # an incremental bulk export afterwards brings only what changed
    ehr.transaction([{**records[0], "active": False}], method="PUT")
    third = bulk_pull(store, conn)
    assert third.total("updated") == 1 and third.total("created") == 0
    assert identifiers(store) == expected(records)


# -- SMART Backend Services against an EHR that checks the signature ---------------------------------------

def _keypair(alg):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg == "RS384" \
        else ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    algo = jwt.algorithms.RSAAlgorithm if alg == "RS384" else jwt.algorithms.ECAlgorithm
    jwk = {**orjson.loads(algo.to_jwk(key.public_key())), "kid": "iop-1", "alg": alg}
    return pem, jwk


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_smart_backend_services_token_exchange_end_to_end(alg, tmp_path, monkeypatch):
    pem, jwk = _keypair(alg)
    _, other_jwk = _keypair(alg)
    clients = [{"client_id": "fhir-iop", "jwks": {"keys": [jwk]}, "scopes": "system/*.rs"},
               {"client_id": "impostor", "jwks": {"keys": [other_jwk]}, "scopes": "system/*.rs"}]
    with Sekmet(tmp_path / "sekmet", smart_clients=clients, auth_types=["smart"]) as ehr:
        status, _, _ = http_request("GET", f"{ehr.base_url}/Patient")
        assert status == 401  # the EHR wants a token
        monkeypatch.setenv("EHR_KEY", pem)
        auth = {"type": "smart-backend", "client_id": "fhir-iop", "private_key_env": "EHR_KEY", "alg": alg,
                "kid": "iop-1", "scopes": ["system/Patient.rs", "system/Condition.rs"]}
        conn = connection(ehr.base_url, auth=auth, resources={"Patient": "pull"})
        client = EhrClient(conn)
        pages = list(client.search("Patient", {"_count": "5"}))
        assert pages[0]["resourceType"] == "Bundle"
        assert client.auth.fetched == 1
        assert client.smart_configuration()["token_endpoint"] == f"{ehr.root_url}/auth/token"  # discovered
        client.capabilities()
        list(client.search("Patient"))
        assert client.auth.fetched == 1  # cached

        # a token the EHR no longer takes is renewed once, then the request goes through
        client.auth._token = "expired-or-revoked"
        list(client.search("Patient"))
        assert client.auth.fetched == 2

        # signed with a key the EHR does not have for this client: refused, saying why
        monkeypatch.setenv("EHR_KEY", _keypair(alg)[0])
        with pytest.raises(EhrError) as e:
            list(EhrClient(conn).search("Patient"))
        assert e.value.status == 401 and "verification failed" in e.value.message


def test_smart_backend_services_against_fhir_iops_own_token_endpoint(secured_app, tmp_path, monkeypatch):
    """fhir-iop pulling from another fhir-iop: its token endpoint verifies the assertion's signature
    against the JWKS registered for the client, and its API takes only the token it issued."""
    from server_kit import LiveServer

    from fhir_iop.security import clients
    remote = secured_app.extensions["fhir_iop"].store
    pem, jwk = _keypair("ES384")
    clients.register(remote, "iop-puller", scopes="system/Patient.rs", jwks={"keys": [jwk]})
    with remote.transaction() as tx:
        for r in seed_records(3):
            if r["resourceType"] == "Patient":
                tx.update("Patient", r["id"], r)
    monkeypatch.setenv("EHR_KEY", pem)
    auth = {"type": "smart-backend", "client_id": "iop-puller", "private_key_env": "EHR_KEY", "alg": "ES384",
            "kid": "iop-1", "scopes": ["system/Patient.rs"]}
    local = Store(f"sqlite:///{tmp_path / 'local.sqlite'}")
    try:
        with LiveServer(secured_app) as live:
            status, _, _ = http_request("GET", f"{live.url}/Patient")
            assert status == 401
            conn = connection(live.url, auth=auth, resources={"Patient": "pull"})
            client = EhrClient(conn)
            result = pull(local, conn, client=client)
            assert result.ok, result.errors
            assert result.counts["Patient"] == {"created": 3} and client.auth.fetched == 1
            monkeypatch.setenv("EHR_KEY", _keypair("ES384")[0])  # a key the server does not know for this client
            with pytest.raises(EhrError) as e:
                EhrClient(conn).read("Patient", "pt0")
            assert e.value.status in (400, 401)
    finally:
        local.dispose()
    assert identifiers(local, ("Patient",)) == Counter({f"Patient:MRN{i:05d}": 1 for i in range(3)})


def test_two_pulls_of_one_connection_at_once(ehr, proxy, store):
    """Two workers pulling the same EHR into one store (threads here; processes behave alike):
    each resource once, the cursor never goes back."""
    import threading
    records = seed(ehr, 8)
    proxy.plan(Fault("delay", seconds=0.05, match="GET /fhir/", times=10_000))  # interleave them
    results, errors = [], []

    def run():
        try:
            results.append(pull(store, connection(proxy.base_url, page_size=5)))
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and all(r.ok for r in results), (errors, [r.errors for r in results])
    assert identifiers(store) == expected(records)
    assert sum(r.total("created") for r in results) == len(records)  # each created by exactly one of them
