"""The facade over real HTTP on loopback: fhirpy as the outside client, concurrent writers, gunicorn."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import requests
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, OperationOutcome, ResourceNotFound
from server_kit import app, db_url, free_port, live  # noqa: F401  (fixtures)

SYS = "urn:oid:2.16.840.1.113883.4.642.99"
ROOT = Path(__file__).resolve().parents[1]


def test_fhirpy_drives_the_server(live):
    fhir = SyncFHIRClient(live, requests_config={"timeout": 30})
    # create and read
    p = fhir.resource("Patient", identifier=[{"system": SYS, "value": "fp-1"}], name=[{"family": "Lopez"}],
                      gender="female")
    p.save()
    assert p.id and p.meta.versionId == "1"
    again = fhir.reference("Patient", p.id).to_resource()
    assert again.name[0].family == "Lopez"
    # update
    again["gender"] = "male"
    again.save()
    assert fhir.reference("Patient", p.id).to_resource().meta.versionId == "2"
    # conditional create (fhirpy sends the criteria in the query string)
    dup = fhir.resource("Patient", identifier=[{"system": SYS, "value": "fp-1"}], name=[{"family": "Other"}])
    found, created = fhir.resources("Patient").search(identifier=f"{SYS}|fp-1").get_or_create(dup)
    assert not created and found.id == p.id and found.name[0].family == "Lopez"
    new, created = fhir.resources("Patient").search(identifier=f"{SYS}|fp-2").get_or_create(
        fhir.resource("Patient", identifier=[{"system": SYS, "value": "fp-2"}]))
    assert created and new.id != p.id
    # search with paging: fhirpy follows link[relation=next]
    for i in range(25):
        fhir.resource("Observation", status="final",
                      code={"coding": [{"system": "http://loinc.org", "code": "3426-4"}]},
                      subject={"reference": f"Patient/{p.id}"}, effectiveDateTime=f"2024-01-{i + 1:02d}").save()
    obs = fhir.resources("Observation").search(patient=p.id).sort("date").limit(7).fetch_all()
    assert len(obs) == 25 and len({o.id for o in obs}) == 25
    assert [o.effectiveDateTime for o in obs] == sorted(o.effectiveDateTime for o in obs)
    assert fhir.resources("Observation").search(patient=p.id, date="ge2024-01-20").count() == 6
    assert fhir.resources("Patient").search(identifier=f"{SYS}|fp-1").get().id == p.id
    # a transaction
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:5b1c0a7e-1111-4222-8333-444455556666",
         "resource": {"resourceType": "Patient", "identifier": [{"system": SYS, "value": "fp-3"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Encounter", "status": "planned",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "subject": {"reference": "urn:uuid:5b1c0a7e-1111-4222-8333-444455556666"}},
         "request": {"method": "POST", "url": "Encounter"}}]}
    resp = fhir.execute("/", method="post", data=bundle)
    assert resp["type"] == "transaction-response"
    pid = resp["entry"][0]["resource"]["id"]
    encs = fhir.resources("Encounter").search(subject=f"Patient/{pid}").fetch()
    assert len(encs) == 1
    # errors come back as fhirpy's exceptions
    with pytest.raises(ResourceNotFound):
        fhir.reference("Patient", "no-such-id").to_resource()
    fhir.resource("Patient", identifier=[{"system": SYS, "value": "fp-1"}]).save()
    with pytest.raises(MultipleResourcesFound):  # 412: the criteria match two
        fhir.resources("Patient").search(identifier=f"{SYS}|fp-1").get_or_create(dup)
    with pytest.raises(OperationOutcome):
        fhir.resource("Patient", gender=12).save()


def test_two_writers_with_the_same_if_match_one_wins(live):
    s = requests.Session()
    r = s.put(f"{live}/Patient/race", json={"resourceType": "Patient", "id": "race", "gender": "female"})
    assert r.status_code == 201
    for round_ in range(8):
        version = s.get(f"{live}/Patient/race").headers["ETag"]
        barrier = threading.Barrier(2)
        statuses = []

        def write(n, round_=round_, barrier=barrier, version=version, statuses=statuses):
            body = {"resourceType": "Patient", "id": "race", "gender": "male",
                    "name": [{"family": f"Writer{n}-{round_}"}]}
            barrier.wait()
            resp = requests.put(f"{live}/Patient/race", json=body, headers={"If-Match": version}, timeout=30)
            statuses.append(resp.status_code)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200, 412], statuses
        h = s.get(f"{live}/Patient/race/_history").json()
        assert h["total"] == round_ + 2  # exactly one new version per round
    s.close()


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 60) -> requests.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"server exited with {proc.returncode}: {out[-3000:]}")
        try:
            return requests.get(url, timeout=10)
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.2)
    pytest.fail(f"no answer from {url} within {seconds}s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None,
                    reason="gunicorn is not installed in this environment")
def test_gunicorn_serves_the_documented_command(tmp_path):
    port = free_port()
    from fhir_iop.security import clients, keys, tokens
    from fhir_iop.store import Store
    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    store = Store(url)  # a client registered in the store; both workers verify the token with the store's key
    clients.register(store, "ops", scopes="system/Patient.cruds", jwks=keys.jwks_of(keys.generate("ES384")))
    auth = {"Authorization": "Bearer " + tokens.issue("ops", "system/Patient.cruds", store=store)}
    store.dispose()
    env = {**os.environ, "FHIR_IOP_DATABASE_URL": url}
    cmd = [str(Path(sys.executable).parent / "gunicorn"), "--workers", "2", "--bind", f"127.0.0.1:{port}",
           "server:create_app()"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        r = _wait_for(f"http://127.0.0.1:{port}/metadata", proc)
        assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement"
        patient = {"resourceType": "Patient", "gender": "other"}
        assert requests.post(f"http://127.0.0.1:{port}/Patient", json=patient, timeout=10).status_code == 401
        r = requests.post(f"http://127.0.0.1:{port}/Patient", json=patient, headers=auth, timeout=10)
        assert r.status_code == 201
        for _ in range(4):  # whichever worker answers
            assert requests.get(r.headers["Location"], headers=auth, timeout=10).json()["gender"] == "other"
    finally:
        _stop(proc)


def test_serve_demo_loads_the_clinic_and_serves_it(tmp_path):
    port = free_port()
    exe = Path(sys.executable).parent / "fhir-iop"
    cmd = [str(exe), "serve", "--demo", "--port", str(port), "--database", f"sqlite:///{tmp_path / 'demo.sqlite'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        r = _wait_for(f"http://127.0.0.1:{port}/Patient?_summary=count", proc, 120)
        assert r.status_code == 401  # authorization is on in the demo too
        # the demo registered a client and wrote its key under var/: get a token as the output says
        token = subprocess.run([str(exe), "clients", "token", "demo", "--key", "var/demo-client.pem", "--server",
                                f"http://127.0.0.1:{port}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert token.returncode == 0, token.stderr
        auth = {"Authorization": f"Bearer {token.stdout.strip()}"}
        r = requests.get(f"http://127.0.0.1:{port}/Patient?_summary=count", headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["total"] == 25
        enc = requests.get(f"http://127.0.0.1:{port}/Encounter?_count=1&_include=Encounter:patient", headers=auth,
                           timeout=10).json()
        assert enc["total"] > 100
    finally:
        _stop(proc)
    out = proc.stdout.read().decode()
    assert f"http://127.0.0.1:{port}/" in out and "curl" in out
    assert "clients token demo --key var/demo-client.pem" in out and 'Authorization: Bearer $TOKEN' in out


@pytest.mark.skipif(shutil.which("gunicorn", path=str(Path(sys.executable).parent)) is None,
                    reason="gunicorn is not installed in this environment")
def test_every_answered_request_is_audited_once_across_workers_a_kill_and_an_external_shipper(tmp_path):
    """The production layout of docs/security.md: gunicorn workers spool, ``fhir-iop audit ship --loop``
    ships. A worker is SIGKILLed mid-run (gunicorn starts another); the shipper is stopped and started
    again. Every request that got an answer has exactly one AuditEvent (by its X-Request-Id)."""
    import signal
    import time

    from sqlalchemy import select

    from fhir_iop.security import clients, keys, tokens
    from fhir_iop.store import Store
    from fhir_iop.store.models import resource
    port = free_port()
    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    store = Store(url)
    clients.register(store, "ops", scopes="system/Patient.cruds", jwks=keys.jwks_of(keys.generate("ES384")))
    auth = {"Authorization": "Bearer " + tokens.issue("ops", "system/Patient.cruds", store=store)}
    spool = tmp_path / "spool"
    env = {**os.environ, "FHIR_IOP_DATABASE_URL": url, "FHIR_IOP_AUDIT_SPOOL": str(spool),
           "FHIR_IOP_AUDIT_SPOOL_SHIPPER": "external", "FHIR_IOP_AUDIT_SPOOL_INTERVAL": "0.1"}
    exe = Path(sys.executable).parent
    ship_cmd = [str(exe / "fhir-iop"), "audit", "ship", "--loop", "--interval", "0.1"]
    proc = subprocess.Popen([str(exe / "gunicorn"), "--workers", "2", "--bind", f"127.0.0.1:{port}",
                             "server:create_app()"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    shipper = subprocess.Popen(ship_cmd, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    answered: list[str] = []
    try:
        _wait_for(f"http://127.0.0.1:{port}/metadata", proc)
        base = f"http://127.0.0.1:{port}"
        pid = requests.post(f"{base}/Patient", json={"resourceType": "Patient", "gender": "other"}, headers=auth,
                            timeout=10)
        answered.append(pid.headers["X-Request-Id"])
        loc = pid.headers["Location"]
        for i in range(240):
            if i == 80:  # kill a worker (its spool segment is open, with lines in it)
                workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                os.kill(int(workers[0]), signal.SIGKILL)
            if i == 160:  # the shipper goes away and comes back
                shipper.terminate()
                shipper.wait(timeout=30)
                shipper = subprocess.Popen(ship_cmd, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
            try:
                r = requests.get(loc, headers={**auth, "X-Request-Id": f"req-{i}"}, timeout=10)
            except requests.ConnectionError:
                continue  # the killed worker's connection: no answer, nothing disclosed
            if r.status_code == 200:
                answered.append(r.headers["X-Request-Id"])
        assert len(answered) > 200
        deadline = time.monotonic() + 60
        while True:
            with store.reading() as tx:
                bodies = [orjson.loads(b) for b in tx.conn.execute(
                    select(resource.c.body).where(resource.c.type == "AuditEvent")).scalars()]
            ids = [[e["what"]["identifier"]["value"] for e in ev["entity"]
                    if e["type"].get("code") == "XrequestId"][0] for ev in bodies]
            if set(answered) <= set(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = set(answered) - set(ids)
        assert not missing, sorted(missing)[:5]
        doubled = {i for i in ids if ids.count(i) > 1}
        assert not doubled, sorted(doubled)[:5]
    finally:
        shipper.terminate()
        shipper.wait(timeout=30)
        _stop(proc)
        store.dispose()

