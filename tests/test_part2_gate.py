"""The Part 2 gate (fhir_iop.disclosure): the access index, decisions that follow ``covers``, the
redisclosure mark, writes that cannot probe for withheld data, and the index on migration."""

from __future__ import annotations

import copy
from datetime import date, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from part2_kit import ACCESS, CONSENT_FOR, Api, consent_resource, make_app
from server_kit import db_url, secured_app, token_for  # noqa: F401  (fixtures)
from sqlalchemy import func, select

from fhir_iop.disclosure import NOTICE, REDISCLOSURE_MARK, Decision, Gate, grants, labelled, mark, notice_of, today
from fhir_iop.mapping.common import PART2_LABELS, MappingContext
from fhir_iop.mapping.consent import covers
from fhir_iop.records.model import Consent
from fhir_iop.store import Store
from fhir_iop.store import repository as repo
from fhir_iop.store.engine import upgrade
from fhir_iop.store.models import part2_grant, part2_resource, resource, resource_version
from fhir_iop.store.repository import structure_issues

CTX = MappingContext()
MRN = "M100024"
PID = CTX.rid("client", MRN)
LABELS = list(PART2_LABELS)
CLASS_OF = {"Patient": "demographics", "Encounter": "encounters", "Coverage": "coverage", "CarePlan": "care-plans",
            "Observation": "drug-screens"}


def labelled_set(labels=None) -> list[dict]:
    """A small client record as the mapping labels it: Patient, Encounter, Coverage, CarePlan, Observation."""
    meta = {"security": copy.deepcopy(LABELS if labels is None else labels)}
    subject = {"reference": f"Patient/{PID}"}
    return [
        {"resourceType": "Patient", "id": PID, "meta": meta, "identifier": [
            {"system": "https://harborlight.example.org/fhir/sid/mrn", "value": MRN}], "name": [{"family": "Test"}]},
        {"resourceType": "Encounter", "id": "enc-1", "meta": meta, "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": subject},
        {"resourceType": "Coverage", "id": "cov-1", "meta": meta, "status": "active", "beneficiary": subject,
         "payor": [{"display": "Aetna"}]},
        {"resourceType": "CarePlan", "id": "plan-1", "meta": meta, "status": "active", "intent": "plan",
         "subject": subject},
        {"resourceType": "Observation", "id": "obs-1", "meta": meta, "status": "final",
         "code": {"text": "drug screen"}, "subject": subject},
    ]


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    with s.transaction() as tx:
        tx.put_many(labelled_set())
        tx.put_many([{"resourceType": "Practitioner", "id": "counselor-1", "name": [{"family": "Staff"}]}])
    yield s
    s.dispose()


def put_consent(store, **kw) -> dict:
    res = consent_resource("CNS-GATE-1", MRN, CONSENT_FOR[kw.pop("who", "ehr")], **kw)
    with store.transaction() as tx:
        tx.update("Consent", res["id"], res)
    return res


# -- labels and the notice ------------------------------------------------------------------------

def test_mark_adds_what_the_stored_copy_lacks_and_is_valid_r4():
    stored = labelled_set([{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"},
                           {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "42CFRPart2"}])[1]
    before = copy.deepcopy(stored)
    out = mark(stored)
    assert stored == before  # the stored copy is not changed
    codes = [(s["system"].rsplit("/", 1)[1], s["code"]) for s in out["meta"]["security"]]
    assert sorted(codes) == sorted([("v3-Confidentiality", "R"), ("v3-ActCode", "42CFRPart2"), ("v3-ActCode", "SUD"),
                                    ("v3-ActCode", "NORDSCLCD"), ("v3-ActCode", REDISCLOSURE_MARK["code"])])
    assert notice_of(out) == NOTICE and NOTICE.startswith("This record which has been disclosed to you is protected "
                                                          "by Federal confidentiality rules (42 CFR part 2).")
    assert mark(out) == out
    assert structure_issues(out) == []
    assert labelled(out) and labelled(stored) and not labelled({"resourceType": "Practitioner"})


# -- decisions follow the consent mapping's covers() ------------------------------------------------

def test_decide_names_the_consent_and_the_reason(store):
    res = put_consent(store, who="payer", classes=["encounters", "coverage"])
    with store.reading() as tx:
        enc, plan, prac = tx.read("Encounter", "enc-1"), tx.read("CarePlan", "plan-1"), tx.read("Practitioner",
                                                                                                  "counselor-1")
        payer = Gate(tx, ACCESS["payer"])
        assert payer.decide(enc) == Decision(True, f"Consent/{res['id']}", "consent")
        assert payer.decide(plan) == Decision(False, None, "withheld")
        assert payer.decide(prac) == Decision(True, None, "not labelled")
        assert Gate(tx, ACCESS["internal"]).decide(plan) == Decision(True, None, "internal")
        assert Gate(tx, ACCESS["emergency"]).decide(plan) == Decision(True, None, "emergency")
        assert [s.type for s in payer.filter([enc, plan, prac])] == ["Encounter", "Practitioner"]
        # a resource not stored yet (sync push asks before sending) is judged by its own labels
        assert payer.decide(labelled_set()[2] | {"id": "new-cov"}).allowed
        assert not payer.decide(labelled_set()[3] | {"id": "new-plan"}).allowed
        # the same answer inside SQL, over current rows and every version
        for table in (resource, resource_version):
            seen = {r.type for r in tx.conn.execute(select(table.c.type).where(payer.visible_clause(table)))}
            assert {"Encounter", "Coverage", "Practitioner"} <= seen and not seen & {"CarePlan", "Patient", "Consent"}
        # also inside a SELECT that joins the index itself (an export listing Part 2 data)
        joined = select(resource.c.type).select_from(resource.join(part2_resource, part2_resource.c.rid ==
                                                                   resource.c.rid)).where(payer.visible_clause())
        assert {r.type for r in tx.conn.execute(joined)} == {"Encounter", "Coverage"}


DAYS = st.integers(min_value=-40, max_value=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=DAYS, length=st.one_of(st.none(), st.integers(min_value=0, max_value=60)),
       revoked=st.one_of(st.none(), st.integers(min_value=0, max_value=60)), on=DAYS,
       purposes=st.lists(st.sampled_from(["TREAT", "HPAYMT", "COC"]), min_size=1, max_size=2, unique=True),
       classes=st.lists(st.sampled_from(sorted(set(CLASS_OF.values()))), min_size=1, max_size=3, unique=True),
       who=st.sampled_from(["ehr", "payer", "unknown"]))
def test_gate_agrees_with_covers(tmp_path_factory, start, length, revoked, on, purposes, classes, who):
    """For any consent and day, the SQL gate discloses exactly what ``covers`` says the record covers."""
    base = date(2026, 6, 1)
    url = f"sqlite:///{tmp_path_factory.getbasetemp() / 'covers.sqlite'}"
    s = Store(url)
    try:
        with s.transaction() as tx:
            tx.put_many(labelled_set())
        signed = base + timedelta(days=start - 1)
        rec = Consent(consent_id="CNS-COVERS", client_mrn=MRN, program_id="SUD-IOP", recipient_id="RIVERSIDE-PC",
                      recipient_name="Riverside Primary Care", recipient_kind="ehr", purposes=purposes,
                      data_classes=classes, signed_on=signed, start=base + timedelta(days=start),
                      end=None if length is None else base + timedelta(days=start + length),
                      revoked_on=None if revoked is None else signed + timedelta(days=revoked))
        from fhir_iop.mapping.consent import to_fhir
        [res] = to_fhir(rec, CTX, [])
        with s.transaction() as tx:
            tx.update("Consent", res["id"], res)
        day, access = base + timedelta(days=on), ACCESS[who]
        with s.reading() as tx:
            gate = Gate(tx, access, on=day)
            for rt, dc in CLASS_OF.items():
                want = covers(rec, access.recipient, access.purpose, dc, day)
                stored = tx.read(rt, PID if rt == "Patient" else next(
                    r.id for r in tx.iter_current((rt,))))
                assert gate.decide(stored).allowed == want, (rt, day)
                n = tx.conn.execute(select(func.count()).select_from(resource)
                                    .where(resource.c.type == rt, gate.visible_clause(resource))).scalar_one()
                assert n == int(want)
    finally:
        s.dispose()


# -- the access index -------------------------------------------------------------------------------

def test_consents_that_cannot_be_read_exactly_grant_nothing():
    res = consent_resource("CNS-X", MRN, CONSENT_FOR["ehr"])
    assert {g["resource_type"] for g in grants(res)} >= {"Encounter", "Patient", "Coverage"}
    nested_deny = copy.deepcopy(res)
    nested_deny["provision"]["type"] = "permit"
    nested_deny["provision"]["provision"].append({"type": "deny", "class": [{"code": "Encounter"}]})
    proposed = {**res, "status": "proposed"}
    npi_only = copy.deepcopy(res)
    for p in npi_only["provision"]["provision"]:
        p["actor"][0]["reference"] = {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi",
                                                     "value": "1472580368"}, "display": "Riverside"}
    limited = copy.deepcopy(res)
    limited["provision"]["provision"][0]["data"] = [{"meaning": "instance", "reference": {"reference": "Encounter/x"}}]
    for bad in (nested_deny, proposed, npi_only, limited, {**res, "patient": {"display": "someone"}}):
        assert grants(bad) == []


def test_a_label_once_stored_keeps_protecting_the_resource_and_its_history(store):
    put_consent(store, who="payer", classes=["coverage"])
    with store.transaction() as tx:  # a later version without the Part 2 label
        enc = tx.read("Encounter", "enc-1").resource
        enc["meta"] = {}
        tx.update("Encounter", "enc-1", enc)
        tx.delete("CarePlan", "plan-1")
    with store.reading() as tx:
        tx.gate = Gate(tx, ACCESS["payer"])
        with pytest.raises(repo.NotFound):
            tx.read("Encounter", "enc-1")
        with pytest.raises(repo.NotFound):
            tx.vread("Encounter", "enc-1", "1")
        with pytest.raises(repo.NotFound):  # a deleted Part 2 resource is not even "gone"
            tx.read("CarePlan", "plan-1")
        total, versions = tx.history()
        assert {v.type for v in versions} == {"Coverage", "Practitioner"} and total == 2


def test_revoking_and_deleting_a_consent_rewrite_its_grants(store):
    res = put_consent(store)
    count = select(func.count()).select_from(part2_grant)
    with store.reading() as tx:
        assert tx.conn.execute(count).scalar_one() == 14  # TREAT x the 14 resource types of the 7 data classes
    revoked = consent_resource("CNS-GATE-1", MRN, CONSENT_FOR["ehr"], revoked_on=today())
    with store.transaction() as tx:
        tx.update("Consent", revoked["id"], revoked)
    with store.reading() as tx:
        assert {r.revoked_on for r in tx.conn.execute(select(part2_grant))} == {today()}
        assert not Gate(tx, ACCESS["ehr"]).decide(tx.read("Encounter", "enc-1")).allowed
    with store.transaction() as tx:
        tx.delete("Consent", res["id"])
    with store.reading() as tx:
        assert tx.conn.execute(count).scalar_one() == 0


def test_upgrading_a_store_with_data_indexes_it(db_url, monkeypatch):
    s = Store(db_url, migrate=False)
    upgrade(s.engine, "0001")
    monkeypatch.setattr(repo, "WRITE_HOOKS", [])  # as written before migration 0002 existed
    with s.transaction() as tx:
        tx.put_many(labelled_set())
        c = consent_resource("CNS-OLD", MRN, CONSENT_FOR["payer"], classes=["coverage"])
        tx.update("Consent", c["id"], c)
    monkeypatch.undo()
    upgrade(s.engine)
    with s.reading() as tx:
        assert tx.conn.execute(select(func.count()).select_from(part2_resource)).scalar_one() == 6
        gate = Gate(tx, ACCESS["payer"])
        assert gate.decide(tx.read("Coverage", "cov-1")).consent == f"Consent/{c['id']}"
        assert not gate.decide(tx.read("CarePlan", "plan-1")).allowed
    s.dispose()


# -- the HTTP exits a unit view does not reach ----------------------------------------------------------

@pytest.fixture
def app(db_url):
    s = Store(db_url)
    with s.transaction() as tx:
        tx.put_many(labelled_set())
    s.dispose()
    app = make_app(db_url)
    yield app
    app.extensions["fhir_iop"].store.dispose()


def test_writes_by_an_outside_client_cannot_probe_for_withheld_resources(app):
    api = Api(app, "unknown")
    body = {"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}
    withheld, missing = api.put("/Encounter/enc-1", {**body, "id": "enc-1"}), \
        api.put("/Encounter/enc-9", {**body, "id": "enc-9"})
    assert withheld.status_code == missing.status_code == 405
    assert withheld.json["issue"][0]["diagnostics"].replace("enc-1", "X") == \
        missing.json["issue"][0]["diagnostics"].replace("enc-9", "X")
    assert api.client.delete("/Encounter/enc-1", headers={"X-Test-Access": "unknown"}).status_code == 404
    cond = api.put("/Encounter?_id=enc-1", {**body, "id": "enc-1"})
    assert cond.status_code == 405
    # a transaction's ifNoneExist matching a withheld Patient creates, as for an unknown MRN
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b6f5d0e-8e0b-4f43-9d0c-1a1b1c1d1e1f",
         "resource": {"resourceType": "Patient", "identifier": [
             {"system": "https://harborlight.example.org/fhir/sid/mrn", "value": MRN}]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier=https://harborlight.example.org/fhir/sid/mrn|{MRN}"}}]}
    r = api.post("/", bundle)
    assert r.status_code == 200 and r.json["entry"][0]["response"]["status"].startswith("201")
    assert PID.encode() not in b"".join(api.bodies)
    # a conditional update whose criteria match only a withheld resource creates, as for no match
    for rid in (PID, "no-such-patient"):
        r = api.put(f"/Patient?_id={rid}", {"resourceType": "Patient", "active": True})
        assert r.status_code == 201 and r.json["id"] not in (PID, "no-such-patient")
    internal = Api(app, "internal")  # the program itself sees the real one and the probe's
    assert internal.get(f"/Patient?identifier={MRN}&_summary=count").json["total"] == 2
    assert internal.get("/Encounter/enc-1").json["meta"]["versionId"] == "1"  # nothing was written


def test_what_leaves_for_an_outside_recipient_is_marked_even_subsetted(app):
    with app.extensions["fhir_iop"].store.transaction() as tx:
        stored = labelled_set([LABELS[1]])  # only 42CFRPart2: the mark adds the rest
        tx.put_many(stored)
        c = consent_resource("CNS-M", MRN, CONSENT_FOR["ehr"])
        tx.update("Consent", c["id"], c)
    api = Api(app, "ehr")
    for url in ("/Encounter/enc-1", f"/Encounter?subject=Patient/{PID}&_elements=status",
                f"/Encounter?_id=enc-1&_include=Encounter:subject", "/Encounter/enc-1/_history",
                "/Encounter/enc-1/_history/2"):
        assert api.get(url).status_code == 200, url
    # the stored copy is as it was written; the program's own reads are not marked
    own = Api(app, "internal").get("/Encounter/enc-1").json
    assert [s["code"] for s in own["meta"]["security"]] == ["42CFRPart2"] and notice_of(own) is None
    # what a write hands back leaves too: an update's body, a transaction's ifNoneExist match
    enc = api.get("/Encounter/enc-1").json
    assert api.put("/Encounter/enc-1", {**enc, "status": "cancelled"}).status_code == 200
    r = api.post("/", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {
            "method": "POST", "url": "Patient",
            "ifNoneExist": f"identifier=https://harborlight.example.org/fhir/sid/mrn|{MRN}"}}]})
    assert r.json["entry"][0]["response"]["status"] == "200 OK" and r.json["entry"][0]["resource"]["id"] == PID
    marked = 0
    for raw in api.bodies:
        body = orjson.loads(raw)
        for res in [body] if body["resourceType"] != "Bundle" else [e["resource"] for e in body.get("entry", ())]:
            codes = {s["code"] for s in res["meta"]["security"]}
            assert {"R", "42CFRPart2", "SUD", "NORDSCLCD"} <= codes and notice_of(res) == NOTICE
            marked += 1
    assert marked == 10  # read, search, include (2), history (2 versions), vread, read, update, transaction


def test_end_to_end_with_real_tokens(secured_app):
    """Through the authorization layer: the client's registered recipient and purpose decide."""
    store = secured_app.extensions["fhir_iop"].store
    with store.transaction() as tx:
        tx.put_many(labelled_set())
        c = consent_resource("CNS-E2E", MRN, CONSENT_FOR["payer"], classes=["encounters"])
        tx.update("Consent", c["id"], c)
    http = secured_app.test_client()
    payer = {"Authorization": token_for(secured_app, "system/*.rs", recipient="AETNA", purpose="HPAYMT")}
    ehr = {"Authorization": token_for(secured_app, "system/*.rs", recipient="RIVERSIDE-PC", purpose="TREAT")}
    er = {"Authorization": token_for(secured_app, "system/*.rs", recipient="NOBODY-ORG", purpose="TREAT",
                                     emergency_allowed=True)}
    r = http.get("/Encounter/enc-1", headers=payer)
    assert r.status_code == 200 and notice_of(r.json) == NOTICE
    assert http.get("/CarePlan/plan-1", headers=payer).status_code == 404
    assert http.get("/Encounter/enc-1", headers=ehr).status_code == 404
    assert http.get(f"/Encounter?subject=Patient/{PID}&_summary=count", headers=ehr).json["total"] == 0
    assert http.get("/CarePlan/plan-1", headers=er).status_code == 404  # no emergency asked for
    r = http.get("/CarePlan/plan-1", headers={**er, "X-Fhir-Iop-Emergency": "true"})
    assert r.status_code == 200 and notice_of(r.json) == NOTICE


def test_a_consent_written_by_an_outside_client_or_pulled_from_an_ehr_grants_nothing(app):
    api = Api(app, "unknown")
    forged = consent_resource("CNS-FORGED", MRN, ("NOBODY-ORG", "Nobody", "ehr", ["TREAT"]))
    forged.pop("id")
    assert api.post("/Consent", forged).status_code == 201
    assert api.get("/Encounter/enc-1").status_code == 404
    with app.extensions["fhir_iop"].store.transaction(origin="sync:ehr") as tx:
        pulled = consent_resource("CNS-PULLED", MRN, ("NOBODY-ORG", "Nobody", "ehr", ["TREAT"]))
        tx.update("Consent", pulled["id"], pulled)
    assert api.get("/Encounter/enc-1").status_code == 404
    with app.extensions["fhir_iop"].store.transaction() as tx:  # the program records it itself
        tx.update("Consent", pulled["id"], {**pulled, "dateTime": pulled["dateTime"]} | {"language": "en"})
    assert api.get("/Encounter/enc-1").status_code == 200
