"""FHIR Bulk Data $export on the facade, end to end with an outside client (plain ``requests``) against the
``live`` loopback server: kick-off, status, manifest, NDJSON files, ``_since``/``_type``, cancel, who may
read what, 42 CFR Part 2 (a member without a payment consent is absent from every file and count) and the
audit trail. SQLite and PostgreSQL (``db_url``).

The example clinic (examples/clinic) is loaded into the store through the mapping, as ``$load-iop`` does.
"""

from __future__ import annotations

import csv
import threading
import time
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
import requests
from sqlalchemy import select, update

from fhir_iop.bulk import groups, runner
from fhir_iop.fhir import r4
from fhir_iop.mapping.common import MappingContext
from fhir_iop.payer.claim import PROFILE as CLAIM_PROFILE
from fhir_iop.store.iop import load
from fhir_iop.store.models import bulk_export_job, resource
from fhir_iop.store.repository import now
from server_kit import LiveServer, app, client, db_url, live, secured_app, token_for  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"
ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
CTX = MappingContext()
PAYER = "AETNA"
GROUP = groups.group_id(CTX, PAYER)
#: what a payer's token needs for a Group export (SMART v2: read + search on every type)
PAYER_SCOPES = "system/*.rs"


def loaded(app) -> None:
    load(app.extensions["fhir_iop"].store, [CLINIC], CTX)


def store_of(app):
    return app.extensions["fhir_iop"].store


def clinic_rows(name: str) -> list[dict]:
    with open(CLINIC / name, newline="") as f:
        return list(csv.DictReader(f))


def kick_off(base: str, path: str, headers=None, **params) -> requests.Response:
    return requests.get(f"{base}/{path}", params=params, headers={**ASYNC, **(headers or {})}, timeout=30)


def wait(location: str, headers=None, timeout: float = 120) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = requests.get(location, headers=headers, timeout=30)
        if r.status_code != 202:
            return r
        assert r.headers["X-Progress"] and int(r.headers["Retry-After"]) >= 1
        assert time.monotonic() < deadline, "the export did not finish"
        time.sleep(0.2)


def export(base: str, path: str, headers=None, **params) -> tuple[dict, dict[str, list[dict]], dict[str, bytes]]:
    """Kick off, poll, download: (manifest, resources per type, raw file bytes per type)."""
    r = kick_off(base, path, headers, **params)
    assert r.status_code == 202, r.text
    done = wait(r.headers["Content-Location"], headers)
    assert done.status_code == 200, done.text
    manifest = done.json()
    files, raw = {}, {}
    for out in manifest["output"]:
        f = requests.get(out["url"], headers=headers, timeout=30)
        assert f.status_code == 200 and f.headers["Content-Type"].startswith("application/fhir+ndjson")
        raw[out["type"]] = f.content
        files[out["type"]] = [orjson.loads(line) for line in f.content.splitlines()]
        assert len(files[out["type"]]) == out["count"]
    return manifest, files, raw


def about(res: dict) -> str | None:
    from fhir_iop.bulk.part2 import patient_of
    return patient_of(res)


@pytest.fixture
def held(monkeypatch):
    """Jobs wait for ``held.set()`` before they start (to see a running job deterministically)."""
    gate = threading.Event()
    real = runner.run_job

    def slow(*args, **kwargs):
        gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_job", slow)
    yield gate
    gate.set()


# -- kick-off errors ----------------------------------------------------------------------------------

def test_kick_off_needs_respond_async_ndjson_known_types_and_an_existing_group(app, live):
    loaded(app)

    def oo(r, status):
        assert r.status_code == status, r.text
        assert r.json()["resourceType"] == "OperationOutcome"
        return r.json()["issue"][0]["diagnostics"]

    assert "respond-async" in oo(requests.get(f"{live}/Group/{GROUP}/$export", timeout=30), 400)
    assert "_outputFormat" in oo(kick_off(live, f"Group/{GROUP}/$export", _outputFormat="text/csv"), 400)
    assert "Observation" in oo(kick_off(live, f"Group/{GROUP}/$export", _type="Patient,Observation"), 400)
    assert "instant" in oo(kick_off(live, "$export", _since="last tuesday"), 400)
    assert "_typeFilter" in oo(kick_off(live, "$export", _typeFilter="Encounter?status=finished"), 400)
    oo(kick_off(live, "Group/no-such-group/$export"), 404)
    oo(requests.get(f"{live}/bulk-export/0123456789abcdef", timeout=30), 404)


# -- the whole flow, as the program itself ------------------------------------------------------------

def test_group_export_end_to_end(app, live, held):
    loaded(app)
    # the payer Group exists (built from the stored Coverages at kick-off) and is found by the payer id
    r = kick_off(live, f"Group/{GROUP}/$export")
    assert r.status_code == 202 and r.headers["Content-Location"].startswith(f"{live}/bulk-export/")
    location = r.headers["Content-Location"]
    status = requests.get(location, timeout=30)  # held: still queued
    assert status.status_code == 202 and status.headers["X-Progress"] == "queued"
    assert status.headers["Retry-After"] == "2"
    held.set()
    done = wait(location)
    assert done.status_code == 200 and done.headers["Content-Type"] == "application/json"
    assert done.headers["Expires"]
    manifest = done.json()
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["request"] == f"{live}/Group/{GROUP}/$export"
    assert manifest["transactionTime"].endswith("Z")
    assert [o["type"] for o in manifest["output"]] == list(runner.GROUP_TYPES)

    members = {c["client_mrn"] for c in clinic_rows("coverages.csv") if c["payer_id"] == PAYER}
    bundle = requests.get(f"{live}/Group", params={"identifier": f"{CTX.systems.payer}|{PAYER}"}, timeout=30).json()
    [group] = [e["resource"] for e in bundle["entry"]]
    assert group["id"] == GROUP and group["type"] == "person" and group["actual"] is True
    assert group["quantity"] == len(members) == len(group["member"])
    assert {m["entity"]["reference"] for m in group["member"]} == {f"Patient/{CTX.rid('client', m)}" for m in members}

    files = {}
    for out in manifest["output"]:
        f = requests.get(out["url"], timeout=30)
        assert f.status_code == 200 and f.headers["Content-Type"] == "application/fhir+ndjson"
        lines = f.content.splitlines()
        assert len(lines) == out["count"] > 0
        files[out["type"]] = [orjson.loads(line) for line in lines]
    member_ids = {CTX.rid("client", m) for m in members}
    for rt, resources in files.items():
        for res in resources:  # every line valid R4, of its file's type, about a member
            assert res["resourceType"] == rt
            assert r4.structure_errors(res) == [], (rt, res["id"])
            assert about(res) in member_ids
    assert {p["id"] for p in files["Patient"]} == member_ids
    assert {c["payor"][0]["identifier"]["value"] for c in files["Coverage"]} == {PAYER}
    # the Claims: valid against the published iop-claim profile, their Encounters in the export
    from fhir_iop.validation import Options, Validator
    validator = Validator(options=Options(must_support=False))
    encounters = {f"Encounter/{e['id']}" for e in files["Encounter"]}
    for claim in files["Claim"]:
        assert [i for i in validator.validate(claim, [CLAIM_PROFILE]) if i.severity in ("error", "fatal")] == []
        assert {e["reference"] for i in claim["item"] for e in i["encounter"]} <= encounters
        start, end = claim["billablePeriod"]["start"], claim["billablePeriod"]["end"]
        assert start[:7] == end[:7] and start.endswith("-01")  # one calendar month


def test_patient_and_system_export_with_type_and_since(app, live):
    loaded(app)
    manifest, files, _ = export(live, "Patient/$export", _type="Patient,Consent")
    assert sorted(files) == ["Consent", "Patient"]
    assert len(files["Patient"]) == len(clinic_rows("clients.csv"))
    assert len(files["Consent"]) == len(clinic_rows("consents.csv"))

    # _since: only what changed after it (one Encounter updated through the API)
    time.sleep(0.05)
    since = requests.get(f"{live}/Encounter", params={"_count": 1}, timeout=30).json()
    enc = since["entry"][0]["resource"]
    cutoff = now()
    time.sleep(0.05)
    enc["status"] = "cancelled" if enc["status"] != "cancelled" else "finished"
    put = requests.put(f"{live}/Encounter/{enc['id']}", json=enc,
                       headers={"Content-Type": "application/fhir+json"}, timeout=30)
    assert put.status_code == 200, put.text
    instant = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
    manifest, files, _ = export(live, "$export", _since=instant)
    assert [(o["type"], o["count"]) for o in manifest["output"]] == [("Encounter", 1)]
    assert files["Encounter"][0]["id"] == enc["id"] and files["Encounter"][0]["meta"]["versionId"] == "2"
    # a Group export with _since before everything and _type: only those types, all of them
    manifest, files, _ = export(live, f"Group/{GROUP}/$export", _type="Coverage,Group", _since="2000-01-01T00:00:00Z")
    assert sorted(files) == ["Coverage", "Group"]
    assert files["Group"][0]["quantity"] == len(files["Coverage"])


def test_a_group_export_holds_only_the_encounters_its_payer_covered(app, live):
    """Minimum necessary: a payer gets a member's Encounters of the days its Coverage was in force, as its
    Claims bill them, not those before or after it (another payer's, or nobody's)."""
    loaded(app)
    mrn = next(c["client_mrn"] for c in clinic_rows("coverages.csv") if c["payer_id"] == PAYER)
    pid = CTX.rid("client", mrn)
    bundle = requests.get(f"{live}/Encounter", params={"subject": f"Patient/{pid}", "_count": 500}, timeout=30).json()
    days = sorted(e["resource"]["period"]["start"][:10] for e in bundle["entry"])
    assert len(set(days)) >= 3, days
    first, cut = days[0], sorted(set(days))[len(set(days)) // 2]
    [cov] = [e["resource"] for e in requests.get(f"{live}/Coverage", params={"beneficiary": f"Patient/{pid}"},
                                                 timeout=30).json()["entry"]
             if e["resource"]["payor"][0]["identifier"]["value"] == PAYER]
    cov["period"] = {"start": cov["period"]["start"], "end": cut}
    cov.pop("meta", None)
    r = requests.put(f"{live}/Coverage/{cov['id']}", json=cov, headers={"Content-Type": "application/fhir+json"},
                     timeout=30)
    assert r.status_code == 200, r.text

    manifest, files, _ = export(live, f"Group/{GROUP}/$export")
    mine = sorted(e["period"]["start"][:10] for e in files["Encounter"] if about(e) == pid)
    assert mine == [d for d in days if d <= cut] and first <= cut < days[-1]
    others = [e for e in files["Encounter"] if about(e) != pid]
    assert others  # the other members' Encounters are all still there (their Coverages are open-ended)
    encounters = {f"Encounter/{e['id']}" for e in files["Encounter"]}
    for claim in files["Claim"]:  # each Claim's Encounters are in the export
        assert {e["reference"] for i in claim["item"] for e in i["encounter"]} <= encounters


def test_the_patient_parameter_narrows_a_patient_or_group_export(app, live):
    loaded(app)
    members = sorted({c["client_mrn"] for c in clinic_rows("coverages.csv") if c["payer_id"] == PAYER})
    chosen = [CTX.rid("client", m) for m in members[:2]]
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Encounter"},
        *({"name": "patient", "valueReference": {"reference": f"Patient/{pid}"}} for pid in chosen)]}
    r = requests.post(f"{live}/Patient/$export", json=body, timeout=30,
                      headers={**ASYNC, "Content-Type": "application/fhir+json"})
    assert r.status_code == 202, r.text
    manifest = wait(r.headers["Content-Location"]).json()
    files = {o["type"]: [orjson.loads(x) for x in requests.get(o["url"], timeout=30).content.splitlines()]
             for o in manifest["output"]}
    assert sorted(p["id"] for p in files["Patient"]) == sorted(chosen)
    assert files["Encounter"] and {about(e) for e in files["Encounter"]} == set(chosen)

    manifest, files, _ = export(live, f"Group/{GROUP}/$export", patient=f"Patient/{chosen[1]}")
    for rt, resources in files.items():
        assert {about(x) for x in resources} == {chosen[1]}, rt
    assert files["Claim"]  # (that member's Claims only)

    def refused(path, **params):
        r = kick_off(live, path, **params)
        assert r.status_code == 400, r.text
        return r.json()["issue"][0]["diagnostics"]
    assert "not to $export" in refused("$export", patient=f"Patient/{chosen[0]}")
    outsider = next(CTX.rid("client", c["mrn"]) for c in clinic_rows("clients.csv") if c["mrn"] not in members)
    no_one = refused(f"Group/{GROUP}/$export", patient="Patient/no-such-client")
    not_member = refused(f"Group/{GROUP}/$export", patient=f"Patient/{outsider}")
    assert not_member.replace(outsider, "no-such-client") == no_one  # the same answer
    assert refused("Patient/$export", patient="Encounter/x").startswith("patient 'Encounter/x'")


def test_a_payer_cannot_probe_for_a_withheld_member_with_the_patient_parameter(secured_app):
    app = secured_app
    loaded(app)
    admin = {"Authorization": token_for(app, "system/*.cruds", admin=True)}
    payer = {"Authorization": token_for(app, PAYER_SCOPES, recipient=PAYER, purpose="HPAYMT")}
    victim = next(c for c in clinic_rows("consents.csv") if c["recipient_id"] == PAYER)
    victim_id = CTX.rid("client", victim["client_mrn"])
    with LiveServer(app) as srv:
        r = requests.delete(f"{srv.url}/Consent/{CTX.rid('consent', victim['consent_id'])}", headers=admin,
                            timeout=30)
        assert r.status_code in (200, 204), r.text
        members, allowed = _consented_members(store_of(app))
        assert victim_id in members - allowed
        answers = {}
        for pid in (victim_id, "no-such-client"):
            r = kick_off(srv.url, f"Group/{GROUP}/$export", payer, patient=f"Patient/{pid}")
            assert r.status_code == 400, r.text
            answers[pid] = r.json()["issue"][0]["diagnostics"].replace(pid, "X")
        assert answers[victim_id] == answers["no-such-client"]
        # the program itself may name the member; the payer may name one it may see
        assert kick_off(srv.url, f"Group/{GROUP}/$export", admin, patient=f"Patient/{victim_id}").status_code == 202
        ok = sorted(allowed)[0]
        manifest, files, _ = export(srv.url, f"Group/{GROUP}/$export", payer, patient=f"Patient/{ok}")
        assert {about(x) for rs in files.values() for x in rs} == {ok}


def test_a_group_of_no_payer_exports_all_its_members_encounters(app, live):
    loaded(app)
    pid = CTX.rid("client", clinic_rows("clients.csv")[0]["mrn"])
    group = {"resourceType": "Group", "id": "study-cohort", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/{pid}"}}]}
    assert requests.put(f"{live}/Group/study-cohort", json=group, timeout=30,
                        headers={"Content-Type": "application/fhir+json"}).status_code in (200, 201)
    mine = requests.get(f"{live}/Encounter", params={"subject": f"Patient/{pid}", "_summary": "count"},
                        timeout=30).json()["total"]
    manifest, files, _ = export(live, "Group/study-cohort/$export", _type="Encounter")
    assert mine > 0 and len(files["Encounter"]) == mine and {about(e) for e in files["Encounter"]} == {pid}


def deleted_lines(manifest: dict, headers=None) -> dict[str, list[dict]]:
    """The manifest's ``deleted`` files, downloaded: the Bundles per file name."""
    out = {}
    for item in manifest["deleted"]:
        assert item["type"] == "Bundle"
        f = requests.get(item["url"], headers=headers, timeout=30)
        assert f.status_code == 200 and f.headers["Content-Type"].startswith("application/fhir+ndjson")
        out[item["url"].rsplit("/", 1)[1]] = [orjson.loads(line) for line in f.content.splitlines()]
        assert len(out[item["url"].rsplit("/", 1)[1]]) == item["count"]
    return out


def deleted_refs(files: dict[str, list[dict]]) -> list[str]:
    refs = []
    for bundles in files.values():
        for b in bundles:
            assert b["resourceType"] == "Bundle" and b["type"] == "transaction" and r4.structure_errors(b) == []
            assert [e["request"]["method"] for e in b["entry"]] == ["DELETE"]
            refs += [e["request"]["url"] for e in b["entry"]]
    return sorted(refs)


def test_since_lists_what_was_deleted_since_in_the_deleted_array(app, live):
    """Bulk Data v2: with ``_since`` the manifest's ``deleted`` array SHALL list the resources that would
    have been returned but were deleted since: a deletion before ``_since`` is not listed, nor one written
    again since, nor one outside the export's types."""
    loaded(app)
    encounters = [e["resource"] for e in
                  requests.get(f"{live}/Encounter", params={"_count": 4}, timeout=30).json()["entry"]]
    coverage = requests.get(f"{live}/Coverage", params={"_count": 1}, timeout=30).json()["entry"][0]["resource"]
    before, after, again = encounters[0], encounters[1], encounters[2]
    assert requests.delete(f"{live}/Encounter/{before['id']}", timeout=30).status_code in (200, 204)
    time.sleep(0.05)
    cutoff = now()
    time.sleep(0.05)
    for rt, rid in (("Encounter", after["id"]), ("Encounter", again["id"]), ("Coverage", coverage["id"])):
        assert requests.delete(f"{live}/{rt}/{rid}", timeout=30).status_code in (200, 204)
    again.pop("meta", None)
    assert requests.put(f"{live}/Encounter/{again['id']}", json=again, timeout=30,
                        headers={"Content-Type": "application/fhir+json"}).status_code in (200, 201)
    instant = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"

    manifest, files, _ = export(live, "$export", _since=instant)
    assert deleted_refs(deleted_lines(manifest)) == sorted([f"Coverage/{coverage['id']}",
                                                            f"Encounter/{after['id']}"])
    assert {o["type"] for o in manifest["output"]} == {"Encounter"}  # (the one written again)
    assert [r["id"] for r in files["Encounter"]] == [again["id"]]
    manifest, _, _ = export(live, "$export", _since=instant, _type="Encounter,Patient")
    assert deleted_refs(deleted_lines(manifest)) == [f"Encounter/{after['id']}"]
    manifest, _, _ = export(live, "$export", _since=instant, _type="Patient")
    assert manifest["deleted"] == []
    manifest, _, _ = export(live, "$export", _type="Encounter")  # without _since: no deleted array
    assert "deleted" not in manifest


def test_a_payer_learns_of_deletions_only_about_members_it_may_see(secured_app):
    """A deletion is a disclosure too: the payer's ``deleted`` array names no resource of a member whose
    consent does not cover it, and the deletions it does see are audited with its other disclosures."""
    app = secured_app
    loaded(app)
    store = store_of(app)
    admin = {"Authorization": token_for(app, "system/*.cruds", admin=True)}
    payer = {"Authorization": token_for(app, PAYER_SCOPES, recipient=PAYER, purpose="HPAYMT")}
    consents = [c for c in clinic_rows("consents.csv") if c["recipient_id"] == PAYER]
    victim = consents[0]
    victim_id = CTX.rid("client", victim["client_mrn"])
    with LiveServer(app) as srv:
        def an_encounter_of(pid):
            found = requests.get(f"{srv.url}/Encounter", params={"subject": f"Patient/{pid}", "_count": 1},
                                 headers=admin, timeout=30).json()
            return found["entry"][0]["resource"]["id"]

        cutoff = now()
        time.sleep(0.05)
        r = requests.delete(f"{srv.url}/Consent/{CTX.rid('consent', victim['consent_id'])}", headers=admin,
                            timeout=30)
        assert r.status_code in (200, 204), r.text
        members, allowed = _consented_members(store)
        assert victim_id in members - allowed and allowed
        other_id = sorted(allowed)[0]
        gone = {pid: an_encounter_of(pid) for pid in (victim_id, other_id)}
        for rid in gone.values():
            assert requests.delete(f"{srv.url}/Encounter/{rid}", headers=admin, timeout=30).status_code in (200, 204)
        instant = cutoff.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"

        manifest, _, _ = export(srv.url, f"Group/{GROUP}/$export", payer, _since=instant)
        files = deleted_lines(manifest, payer)
        assert deleted_refs(files) == [f"Encounter/{gone[other_id]}"]
        assert gone[victim_id].encode() not in orjson.dumps(files)
        # a system export holds every client's resources: there the Part 2 gate alone keeps the deletion back
        manifest, _, _ = export(srv.url, "$export", payer, _since=instant, _type="Encounter")
        assert deleted_refs(deleted_lines(manifest, payer)) == [f"Encounter/{gone[other_id]}"]
        # the program itself is told of both
        manifest, _, _ = export(srv.url, f"Group/{GROUP}/$export", admin, _since=instant)
        assert deleted_refs(deleted_lines(manifest, admin)) == sorted(f"Encounter/{rid}" for rid in gone.values())
        job = manifest["deleted"][0]["url"].split("/")[-2]
        assert requests.get(manifest["deleted"][0]["url"], headers=payer, timeout=30).status_code == 404  # not its job

    with store.reading() as tx:
        events = [orjson.loads(b) for b in tx.conn.execute(select(resource.c.body).where(
            resource.c.type == "AuditEvent")).scalars()]
    exported = {x["what"]["reference"] for e in events if e["type"].get("code") == "110106"
                for x in e.get("entity", []) if x.get("what", {}).get("reference", "").startswith("Patient/")}
    assert f"Patient/{other_id}" in exported and job


def test_post_kick_off_with_parameters(app, live):
    loaded(app)
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
        {"name": "_type", "valueString": "Patient"}, {"name": "_type", "valueString": "EpisodeOfCare"}]}
    r = requests.post(f"{live}/Patient/$export", json=body,
                      headers={**ASYNC, "Content-Type": "application/fhir+json"}, timeout=30)
    assert r.status_code == 202, r.text
    manifest = wait(r.headers["Content-Location"]).json()
    assert [o["type"] for o in manifest["output"]] == ["Patient", "EpisodeOfCare"]


def test_cancel_removes_the_job_and_its_files(app, live, held, tmp_path):
    app.config["EXPORT_DIR"] = str(tmp_path / "exports")
    loaded(app)
    r = kick_off(live, "$export", _type="Patient")
    location = r.headers["Content-Location"]
    job_id = location.rsplit("/", 1)[1]
    cancel = requests.delete(location, timeout=30)
    assert cancel.status_code == 202 and cancel.json()["resourceType"] == "OperationOutcome"
    held.set()
    assert requests.get(location, timeout=30).status_code == 404
    time.sleep(0.5)  # the worker, released, finds its job gone and writes nothing
    assert not (tmp_path / "exports" / job_id).exists()

    # a finished export: DELETE deletes its files, the links stop working
    manifest, _, _ = export(live, "$export", _type="Patient")
    job_id = manifest["output"][0]["url"].split("/")[-2]
    assert (tmp_path / "exports" / job_id / "Patient.ndjson").is_file()
    assert requests.delete(f"{live}/bulk-export/{job_id}", timeout=30).status_code == 202
    assert requests.get(manifest["output"][0]["url"], timeout=30).status_code == 404
    assert not (tmp_path / "exports" / job_id).exists()


def test_an_interrupted_job_fails_and_an_expired_one_is_gone(app, live, tmp_path):
    app.config["EXPORT_DIR"] = str(tmp_path / "exports")
    loaded(app)
    store = store_of(app)
    manifest, _, _ = export(live, "$export", _type="Organization")
    finished = manifest["output"][0]["url"].split("/")[-2]
    from fhir_iop.bulk import jobs
    from fhir_iop.security.access import DEVELOPMENT
    stale = jobs.create(store, DEVELOPMENT.client_id, {}, f"{live}/$export", {"kind": "system", "types": ["Patient"]})
    with store.transaction() as tx:  # a worker that died (server restart) 10 minutes ago
        tx.conn.execute(update(bulk_export_job).where(bulk_export_job.c.id == stale.id)
                        .values(state="running", heartbeat=now() - timedelta(minutes=10)))
        tx.conn.execute(update(bulk_export_job).where(bulk_export_job.c.id == finished)
                        .values(expires=now() - timedelta(seconds=1)))
    r = requests.get(f"{live}/bulk-export/{stale.id}", timeout=30)
    assert r.status_code == 500 and "interrupted" in r.json()["issue"][0]["diagnostics"]
    assert requests.get(f"{live}/bulk-export/{finished}", timeout=30).status_code == 404
    assert not (tmp_path / "exports" / finished).exists()


# -- Part 2, who may read, the audit trail (authorization on) ----------------------------------------------

def _consented_members(store) -> tuple[set[str], set[str]]:
    """(members of PAYER's Group, those whose consent lets their payment data go to PAYER today)."""
    from fhir_iop.disclosure import today
    from fhir_iop.payer.export import consented
    from fhir_iop.payer.store import read_store_records
    records, _ = read_store_records(store, CTX)
    members = {c.client_mrn for c in records.coverages if c.payer_id == PAYER and c.status == "active"}
    by_client = {}
    for c in records.consents:
        by_client.setdefault(c.client_mrn, []).append(c)
    ok = {m for m in members if consented(by_client.get(m, []), PAYER, today())}
    return {CTX.rid("client", m) for m in members}, {CTX.rid("client", m) for m in ok}


def test_a_member_without_payment_consent_is_absent_from_every_file_and_count(secured_app):
    app = secured_app
    loaded(app)
    store = store_of(app)
    # withdraw one consenting member's payment consent to the payer (the Consent is deleted)
    consents = [c for c in clinic_rows("consents.csv") if c["recipient_id"] == PAYER]
    victim = consents[0]
    admin = {"Authorization": token_for(app, "system/*.cruds", admin=True)}
    payer = {"Authorization": token_for(app, PAYER_SCOPES, recipient=PAYER, purpose="HPAYMT")}
    with LiveServer(app) as srv:
        internal_manifest, internal, _ = export(srv.url, f"Group/{GROUP}/$export", admin, _type=",".join(
            runner.GROUP_ALLOWED))
        r = requests.delete(f"{srv.url}/Consent/{CTX.rid('consent', victim['consent_id'])}", headers=admin,
                            timeout=30)
        assert r.status_code in (200, 204), r.text
        members, allowed = _consented_members(store)
        withheld = members - allowed
        victim_id = CTX.rid("client", victim["client_mrn"])
        assert victim_id in withheld and allowed  # someone is disclosed, the victim (at least) is not

        manifest, files, raw = export(srv.url, f"Group/{GROUP}/$export", payer,
                                      _type=",".join(runner.GROUP_ALLOWED))
        # absent from every file...
        blob = b"".join(raw.values())
        for pid in withheld:
            assert pid.encode() not in blob
        mrns = {c["mrn"] for c in clinic_rows("clients.csv") if CTX.rid("client", c["mrn"]) in withheld}
        for mrn in mrns:
            assert mrn.encode() not in blob
        assert {about(r) for rs in files.values() for r in rs if r["resourceType"] != "Group"} == allowed
        # ...and from every count: each is the program's own count less what is about the withheld members
        counts = {o["type"]: o["count"] for o in manifest["output"]}
        for rt, resources in internal.items():
            if rt == "Group":
                continue
            expected = sum(1 for r in resources if about(r) not in withheld)
            assert counts.get(rt, 0) == expected, rt
        [group] = files["Group"]
        assert group["quantity"] == len(allowed) == len(group["member"])
        assert internal["Group"][0]["quantity"] == len(members)
        # what leaves carries the redisclosure prohibition
        from fhir_iop.disclosure import notice_of
        for rs in files.values():
            for res in rs:
                assert r4.structure_errors(res) == [], res["id"]  # valid R4, marked
                assert notice_of(res) is not None
                assert "NORDSCLCD" in {s["code"] for s in res["meta"]["security"]}

        # through REST the stored Group (every member) is Part 2 data about no single client: withheld from the
        # payer, so neither its members nor its quantity leak; the payer's view of it is the export's Group.ndjson
        found = requests.get(f"{srv.url}/Group", params={"identifier": f"{CTX.systems.payer}|{PAYER}"},
                             headers=payer, timeout=30)
        assert found.status_code == 200 and not found.json().get("entry"), found.text
        assert requests.get(f"{srv.url}/Group/{GROUP}", headers=payer, timeout=30).status_code in (403, 404)
        found = requests.get(f"{srv.url}/Group", params={"identifier": f"{CTX.systems.payer}|{PAYER}"},
                             headers=admin, timeout=30).json()
        assert found["entry"][0]["resource"]["quantity"] == len(members)  # the program sees every member

        # another client cannot read the payer's export: not its status, not its files
        job = manifest["output"][0]["url"].split("/")[-2]
        other = {"Authorization": token_for(app, PAYER_SCOPES, recipient=PAYER, purpose="HPAYMT")}
        assert requests.get(f"{srv.url}/bulk-export/{job}", headers=other, timeout=30).status_code == 404
        assert requests.get(manifest["output"][0]["url"], headers=other, timeout=30).status_code == 404
        assert requests.delete(f"{srv.url}/bulk-export/{job}", headers=other, timeout=30).status_code == 404
        assert requests.get(manifest["output"][0]["url"], timeout=30).status_code == 401  # requiresAccessToken
        # a client acting for another payer may not export this payer's Group
        cigna = {"Authorization": token_for(app, PAYER_SCOPES, recipient="CIGNA", purpose="HPAYMT")}
        assert kick_off(srv.url, f"Group/{GROUP}/$export", cigna).status_code == 403

    # each disclosed client is audited once for this export, with the Consent that allowed it
    with store.reading() as tx:
        events = [orjson.loads(b) for b in tx.conn.execute(select(resource.c.body).where(
            resource.c.type == "AuditEvent")).scalars()]
    exports = [e for e in events if any(c.get("code") == "110106" for c in [e["type"]])
               and job in e.get("outcomeDesc", "") + orjson.dumps(e).decode()]
    audited = {}
    for e in exports:
        refs = [x.get("what", {}).get("reference", "") for x in e.get("entity", [])]
        patients = [r.split("/", 1)[1] for r in refs if r.startswith("Patient/")]
        assert len(patients) == 1
        audited[patients[0]] = [r for r in refs if r.startswith("Consent/")]
    assert set(audited) == allowed
    assert all(len(c) >= 1 for c in audited.values())


def test_a_long_step_without_rows_keeps_the_job_alive(app, live, monkeypatch):
    """The heartbeat runs beside the work: a payer rollup slower than the stale limit is not 'interrupted'."""
    from fhir_iop.bulk import jobs
    from fhir_iop.payer import store as payer_store
    loaded(app)
    app.config["EXPORT_STALE_SECONDS"] = 1
    monkeypatch.setattr(jobs, "HEARTBEAT_SECONDS", 0.2)
    real = payer_store.read_store_records

    def slow(*args, **kwargs):
        time.sleep(2.5)  # longer than the stale limit, no row written meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(payer_store, "read_store_records", slow)
    manifest, files, _ = export(live, f"Group/{GROUP}/$export", _type="Claim")
    assert [o["type"] for o in manifest["output"]] == ["Claim"] and files["Claim"]
