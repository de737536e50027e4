"""The FHIR REST API of the facade, on SQLite and on PostgreSQL (the same tests, see server_kit.db_url)."""

from __future__ import annotations

import orjson
import pytest
from server_kit import app, client, db_url  # noqa: F401  (fixtures)

SYS = "urn:oid:2.16.840.1.113883.4.642.99"


def patient(mrn: str, family: str = "Doe", birth: str = "1980-01-01", **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYS, "value": mrn}],
            "name": [{"family": family, "given": ["Jane"]}], "gender": "female", "birthDate": birth, **extra}


def encounter(pid: str, start: str, status: str = "finished", eoc: str | None = None) -> dict:
    enc = {"resourceType": "Encounter", "status": status,
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
           "subject": {"reference": f"Patient/{pid}"}, "period": {"start": start, "end": start[:10] + "T23:00:00Z"}}
    if eoc:
        enc["episodeOfCare"] = [{"reference": f"EpisodeOfCare/{eoc}"}]
    return enc


def observation(pid: str, enc: str | None, code: str = "3426-4", when: str = "2024-03-01", **extra) -> dict:
    obs = {"resourceType": "Observation", "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "laboratory"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
           "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
           "valueCodeableConcept": {"text": "negative"}, **extra}
    if enc:
        obs["encounter"] = {"reference": f"Encounter/{enc}"}
    return obs


def post(client, res, **headers):
    return client.post(f"/{res['resourceType']}", data=orjson.dumps(res), content_type="application/fhir+json",
                       headers=headers)


def put(client, res, url=None, **headers):
    return client.put(url or f"/{res['resourceType']}/{res['id']}", data=orjson.dumps(res),
                      content_type="application/fhir+json", headers=headers)


def created_id(resp) -> str:
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.json["id"]


def ids(bundle) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", ()) if e.get("search", {}).get("mode") == "match"]


def assert_outcome(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.json["resourceType"] == "OperationOutcome"
    assert resp.json["issue"][0]["severity"] in ("error", "fatal", "warning", "information")


# -- capability -----------------------------------------------------------------------------------

def test_metadata_lists_what_is_implemented(client, app):
    r = client.get("/metadata")
    assert r.status_code == 200
    cs = r.json
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    rest = cs["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    by_type = {r["type"]: r for r in rest["resource"]}
    # every served type, and AuditEvent (admins only, read/search: tests/test_audit*.py)
    assert set(by_type) - {"AuditEvent"} == set(app.extensions["fhir_iop"].store.registry.params)
    obs = by_type["Observation"]
    names = {p["name"] for p in obs["searchParam"]}
    assert {"_id", "_lastUpdated", "patient", "subject", "code", "category", "date", "encounter", "based-on",
            "status", "identifier"} <= names
    assert "Observation:patient" in obs["searchInclude"]
    assert "Observation:patient" in by_type["Patient"]["searchRevInclude"]
    assert obs["conditionalCreate"] and obs["conditionalUpdate"] and obs["conditionalDelete"] == "single"
    assert "patch" not in {i["code"] for i in obs["interaction"]}
    assert client.get("/metadata?_format=xml").content_type.startswith("application/fhir+xml")


# -- create, read, vread, update, delete ---------------------------------------------------------

def test_create_read_vread_headers(client):
    r = post(client, patient("1001"))
    pid = created_id(r)
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Location"].endswith(f"/Patient/{pid}/_history/1")
    assert r.headers["Last-Modified"].endswith("GMT")
    r = client.get(f"/Patient/{pid}")
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "1"
    assert r.content_type.startswith("application/fhir+json")
    assert r.headers["ETag"] == 'W/"1"'
    r2 = put(client, {**r.json, "gender": "male"})
    assert r2.status_code == 200 and r2.headers["ETag"] == 'W/"2"'
    assert client.get(f"/Patient/{pid}/_history/1").json["gender"] == "female"
    assert client.get(f"/Patient/{pid}/_history/2").json["gender"] == "male"
    assert_outcome(client.get(f"/Patient/{pid}/_history/9"), 404)


def test_server_assigns_ids_on_post(client):
    a = created_id(post(client, {**patient("1"), "id": "client-chosen"}))
    b = created_id(post(client, patient("2")))
    assert a != "client-chosen" and a != b and len(a) == 36


def test_update_creates_with_client_id_and_if_match(client):
    r = put(client, {**patient("7"), "id": "p7"})
    assert r.status_code == 201 and r.headers["Location"].endswith("/Patient/p7/_history/1")
    r = put(client, {**patient("7", family="Roe"), "id": "p7"}, **{"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "2"
    r = put(client, {**patient("7", family="Poe"), "id": "p7"}, **{"If-Match": 'W/"1"'})
    assert_outcome(r, 412)
    assert client.get("/Patient/p7").json["name"][0]["family"] == "Roe"
    # the same content again is no new version
    r = put(client, {**patient("7", family="Roe"), "id": "p7"})
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "2"


def test_prefer_return(client):
    r = post(client, patient("9"), Prefer="return=minimal")
    assert r.status_code == 201 and r.data == b"" and r.headers["Location"]
    r = post(client, patient("10"), Prefer="return=OperationOutcome")
    assert r.status_code == 201 and r.json["resourceType"] == "OperationOutcome"
    r = post(client, patient("11"), Prefer="return=representation")
    assert r.status_code == 201 and r.json["resourceType"] == "Patient"


def test_delete_then_gone_and_history(client):
    pid = created_id(post(client, patient("20")))
    r = client.delete(f"/Patient/{pid}")
    assert r.status_code == 204
    assert_outcome(client.get(f"/Patient/{pid}"), 410)
    assert client.delete(f"/Patient/{pid}").status_code == 204  # idempotent
    assert_outcome(client.delete("/Patient/never-was"), 404)
    h = client.get(f"/Patient/{pid}/_history").json
    assert h["type"] == "history" and h["total"] == 2
    assert h["entry"][0]["request"]["method"] == "DELETE" and "resource" not in h["entry"][0]
    assert h["entry"][1]["resource"]["meta"]["versionId"] == "1"
    assert client.get(f"/Patient?_id={pid}").json["total"] == 0
    # a deleted resource comes back with a PUT
    r = put(client, {**patient("20"), "id": pid})
    assert r.status_code == 201 and r.json["meta"]["versionId"] == "3"


def test_conditional_create(client):
    crit = f"identifier={SYS}|c1"
    first = post(client, patient("c1"), **{"If-None-Exist": crit})
    pid = created_id(first)
    again = post(client, patient("c1", family="Other"), **{"If-None-Exist": crit})
    assert again.status_code == 200 and again.json["id"] == pid and again.json["name"][0]["family"] == "Doe"
    created_id(post(client, patient("c1")))  # unconditional: a second one
    assert_outcome(post(client, patient("c1"), **{"If-None-Exist": crit}), 412)
    assert_outcome(post(client, patient("c2"), **{"If-None-Exist": "no-such-param=1"}), 400)


def test_conditional_update_by_identifier(client):
    url = f"/Patient?identifier={SYS}|u1"
    r = put(client, patient("u1"), url=url)
    assert r.status_code == 201
    pid = r.json["id"]
    r = put(client, patient("u1", family="Changed"), url=url)
    assert r.status_code == 200 and r.json["id"] == pid and r.json["meta"]["versionId"] == "2"
    created_id(post(client, patient("u1")))
    assert_outcome(put(client, patient("u1"), url=url), 412)
    assert_outcome(put(client, {**patient("zz"), "id": pid}, url=f"/Patient?identifier={SYS}|zz"), 409)


# -- errors ------------------------------------------------------------------------------------------

def test_errors_are_operation_outcomes(client):
    assert_outcome(client.get("/Patient/nope"), 404)
    assert_outcome(client.get("/Immunization/x"), 404)
    assert_outcome(client.get("/no/such/path/here/at/all"), 404)
    r = client.patch("/Patient/x", data=b"{}", content_type="application/json-patch+json")
    assert_outcome(r, 405)
    assert "PUT" in r.headers["Allow"]
    assert_outcome(client.post("/Patient", data=b"name=x", content_type="text/plain"), 415)
    assert_outcome(client.post("/Patient", data=b"{not json", content_type="application/fhir+json"), 400)
    r = post(client, {"resourceType": "Patient", "gender": 5, "birthDate": "yesterday"})
    assert_outcome(r, 422)
    assert {"Patient.gender", "Patient.birthDate"} <= {e for i in r.json["issue"] for e in i.get("expression", ())}
    assert_outcome(put(client, {**patient("1"), "id": "b"}, url="/Patient/a"), 400)
    assert_outcome(client.post("/Observation", data=orjson.dumps(patient("1")), content_type="application/fhir+json"),
                   400)
    assert_outcome(client.get("/Patient?_count=lots"), 400)
    assert_outcome(client.get("/Patient?birthdate=notadate"), 400)
    assert_outcome(put(client, {**patient("1"), "id": "x"}, url="/Patient/x", **{"If-Match": "banana"}), 400)


# -- search -----------------------------------------------------------------------------------------

@pytest.fixture
def clinic(client):
    """Two patients, an episode of care, encounters and observations that reference them."""
    p1 = created_id(post(client, patient("s1", family="Álvarez", birth="1970-05-05")))
    p2 = created_id(post(client, patient("s2", family="Brown", birth="1990-06-06")))
    eoc = created_id(post(client, {"resourceType": "EpisodeOfCare", "status": "active",
                                   "patient": {"reference": f"Patient/{p1}"}, "period": {"start": "2024-01-01"}}))
    e1 = created_id(post(client, encounter(p1, "2024-02-01T10:00:00Z", eoc=eoc)))
    e2 = created_id(post(client, encounter(p1, "2024-03-01T10:00:00Z", status="cancelled", eoc=eoc)))
    e3 = created_id(post(client, encounter(p2, "2024-04-01T10:00:00Z")))
    plan = created_id(post(client, {"resourceType": "CarePlan", "status": "active", "intent": "plan",
                                    "subject": {"reference": f"Patient/{p1}"}}))
    o1 = created_id(post(client, observation(p1, e1, when="2024-02-01", basedOn=[{"reference": f"CarePlan/{plan}"}])))
    o2 = created_id(post(client, observation(p1, e2, code="3349-9", when="2024-03-01")))
    o3 = created_id(post(client, observation(p2, e3, when="2024-04-01T09:30:00-05:00")))
    return {"p1": p1, "p2": p2, "eoc": eoc, "e1": e1, "e2": e2, "e3": e3, "o1": o1, "o2": o2, "o3": o3,
            "plan": plan}


def test_search_by_standard_parameters(client, clinic):
    c = clinic

    def found(url):
        r = client.get(url)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.json["type"] == "searchset"
        return set(ids(r.json))

    assert found(f"/Patient?_id={c['p1']},{c['p2']}") == {c["p1"], c["p2"]}
    assert found(f"/Patient?identifier={SYS}|s2") == {c["p2"]}
    assert found("/Patient?identifier=s2") == {c["p2"]}
    assert found("/Patient?family=alvarez") == {c["p1"]}  # accents and case ignored
    assert found("/Patient?name:exact=brown") == {c["p2"]}
    assert found("/Patient?birthdate=lt1980") == {c["p1"]}
    assert found("/Patient?birthdate=ge1990-06-06") == {c["p2"]}
    assert found(f"/Encounter?patient={c['p1']}") == {c["e1"], c["e2"]}
    assert found(f"/Encounter?subject=Patient/{c['p2']}") == {c["e3"]}
    assert found("/Encounter?status=finished") == {c["e1"], c["e3"]}
    assert found(f"/Encounter?episode-of-care={c['eoc']}") == {c["e1"], c["e2"]}
    assert found("/Encounter?date=ge2024-03-01&date=lt2024-04-01") == {c["e2"]}
    assert found("/Encounter?date=eq2024-02") == {c["e1"]}
    assert found("/Encounter?date=gt2024-03-15") == {c["e3"]}
    assert found("/Encounter?date=le2024-02-01") == {c["e1"]}
    assert found("/Observation?code=http://loinc.org|3426-4") == {c["o1"], c["o3"]}
    assert found("/Observation?code=3349-9") == {c["o2"]}
    assert found("/Observation?code:not=3349-9") == {c["o1"], c["o3"]}
    assert found("/Observation?category=laboratory") == {c["o1"], c["o2"], c["o3"]}
    assert found(f"/Observation?encounter=Encounter/{c['e2']}") == {c["o2"]}
    assert found(f"/Observation?based-on=CarePlan/{c['plan']}") == {c["o1"]}
    assert found("/Observation?date=2024-04-01") == {c["o3"]}  # 09:30-05:00 is 14:30Z on the 1st
    assert found("/Observation?based-on:missing=true") == {c["o2"], c["o3"]}
    assert found("/Observation?_lastUpdated=gt2000-01-01") == {c["o1"], c["o2"], c["o3"]}
    assert found("/Observation?_lastUpdated=lt2000-01-01") == set()
    assert found(f"/Observation?patient={c['p1']}&code=3426-4") == {c["o1"]}
    r = client.post("/Observation/_search", data={"code": "3349-9"})
    assert set(ids(r.json)) == {c["o2"]}


def test_search_paging_is_stable(client):
    made = {created_id(post(client, patient(f"pg{i:02d}", family=f"Page{i % 3}"))) for i in range(23)}
    url, seen, pages = "/Patient?_count=5&_sort=family", [], 0
    while url:
        b = client.get(url).json
        assert b["total"] == 23
        seen += ids(b)
        pages += 1
        nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
        url = nxt[0].split("localhost", 1)[1] if nxt else None
    assert pages == 5 and len(seen) == 23 and set(seen) == made
    b = client.get("/Patient?_count=5&_sort=family&_offset=10").json
    prev = [link["url"] for link in b["link"] if link["relation"] == "previous"][0]
    assert ids(client.get(prev.split("localhost", 1)[1]).json) == seen[5:10]
    assert ids(b) == seen[10:15]


def test_one_criterion_pages_come_from_its_index_rows_and_agree_with_the_general_path(client):
    """A single criterion without _sort is paged straight from its index rows (store/search.py
    ``_only_driver``); its pages must be what the general path gives (here forced by a second,
    always-true criterion), deleted and updated resources included, and an empty value matches nothing."""
    made = [created_id(post(client, patient(f"ix{i:02d}", family="Indexed" if i % 2 else "Other"))) for i in range(26)]
    gone = made[3]
    assert client.delete(f"/Patient/{gone}").status_code in (200, 204)
    client.put(f"/Patient/{made[5]}", json={**patient("ix05", family="Other"), "id": made[5]})  # no longer Indexed

    def paged(query):
        url, seen, totals = f"/Patient?{query}&_count=4", [], set()
        while url:
            b = client.get(url).json
            totals.add(b.get("total"))
            seen += ids(b)
            nxt = [link["url"] for link in b["link"] if link["relation"] == "next"]
            url = nxt[0].split("localhost", 1)[1] if nxt else None
        return seen, totals

    fast, fast_totals = paged("family=Indexed")
    general, general_totals = paged("family=Indexed&gender:not=unknown")
    expected = [m for i, m in enumerate(made) if i % 2 and m not in (gone, made[5])]
    assert fast == general == expected and fast_totals == general_totals == {len(expected)}
    assert ids(client.get("/Patient?family=Indexed&_count=4&_offset=8").json) == expected[8:12]
    assert client.get("/Patient?family=").json["total"] == 0 and not client.get("/Patient?family=").json.get("entry")


def test_search_sort(client, clinic):
    b = client.get("/Encounter?_sort=-date").json
    assert ids(b) == [clinic["e3"], clinic["e2"], clinic["e1"]]
    b = client.get("/Encounter?_sort=date").json
    assert ids(b) == [clinic["e1"], clinic["e2"], clinic["e3"]]
    b = client.get("/Patient?_sort=-birthdate").json
    assert ids(b) == [clinic["p2"], clinic["p1"]]
    b = client.get("/Patient?_sort=_lastUpdated").json
    assert ids(b) == [clinic["p1"], clinic["p2"]]


def test_include_revinclude_summary_elements(client, clinic):
    b = client.get(f"/Observation?_id={clinic['o1']}&_include=Observation:patient&_include=Observation:encounter").json
    modes = {(e["resource"]["resourceType"], e["search"]["mode"]) for e in b["entry"]}
    assert modes == {("Observation", "match"), ("Patient", "include"), ("Encounter", "include")}
    assert b["total"] == 1
    b = client.get(f"/Patient?_id={clinic['p1']}&_revinclude=Encounter:subject").json
    inc = {e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "include"}
    assert inc == {clinic["e1"], clinic["e2"]}
    b = client.get("/EpisodeOfCare?_revinclude=Encounter:episode-of-care&_include=EpisodeOfCare:patient").json
    assert {e["resource"]["resourceType"] for e in b["entry"]} == {"EpisodeOfCare", "Encounter", "Patient"}
    b = client.get("/Observation?_summary=count").json
    assert b["total"] == 3 and "entry" not in b
    b = client.get(f"/Observation?_id={clinic['o1']}&_elements=subject").json
    res = b["entry"][0]["resource"]
    assert set(res) == {"resourceType", "id", "meta", "subject", "status", "code"}  # status, code: mandatory
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])


def test_unknown_parameters_strict_and_lenient(client, clinic):
    b = client.get("/Patient?nonsense=1&family=brown").json
    assert ids(b) == [clinic["p2"]]
    outcome = [e for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome and "nonsense" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert "nonsense" not in b["link"][0]["url"]
    r = client.get("/Patient?nonsense=1", headers={"Prefer": "handling=strict"})
    assert_outcome(r, 400)
    assert_outcome(client.get("/Patient?family:fuzzy=x"), 400)
    r = client.get("/Patient?general-practitioner.name=x", headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200


# -- history ------------------------------------------------------------------------------------------

def test_type_and_system_history_since(client):
    a = created_id(post(client, patient("h1")))
    mid = client.get(f"/Patient/{a}").json["meta"]["lastUpdated"]
    b = created_id(post(client, patient("h2")))
    put(client, {**client.get(f"/Patient/{a}").json, "gender": "other"})
    h = client.get("/Patient/_history").json
    assert h["total"] == 3
    assert [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in h["entry"]] == \
        [(a, "2"), (b, "1"), (a, "1")]
    h = client.get(f"/Patient/_history?_since={mid}").json
    assert h["total"] == 3
    later = client.get(f"/Patient/{b}").json["meta"]["lastUpdated"]
    h = client.get(f"/Patient/_history?_since={later}").json
    assert {(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in h["entry"]} == {(a, "2"), (b, "1")}
    assert client.get("/_history?_count=1").json["total"] == 3
    assert_outcome(client.get("/Patient/_history?_since=whenever"), 400)


# -- XML ------------------------------------------------------------------------------------------------

def test_xml_in_and_out(client):
    xml = (b'<Patient xmlns="http://hl7.org/fhir"><identifier><system value="' + SYS.encode()
           + b'"/><value value="x1"/></identifier><gender value="female"/></Patient>')
    r = client.post("/Patient", data=xml, content_type="application/fhir+xml",
                    headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 201 and r.content_type.startswith("application/fhir+xml")
    assert b"<Patient" in r.data and b'<versionId value="1"/>' in r.data
    pid = r.headers["Location"].split("/Patient/")[1].split("/")[0]
    assert client.get(f"/Patient/{pid}").json["gender"] == "female"
    r = client.get(f"/Patient/{pid}?_format=xml")
    assert r.content_type.startswith("application/fhir+xml") and b'<gender value="female"/>' in r.data
    r = client.get("/Patient?_format=application/fhir+xml")
    assert r.data.lstrip().startswith(b"<?xml") and b"<Bundle" in r.data
    assert_outcome(client.post("/Patient", data=b"<Patient", content_type="application/fhir+xml"), 400)
    r = client.get("/Patient/none", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 404 and b"<OperationOutcome" in r.data


# -- batch and transaction ----------------------------------------------------------------------------

def _bundle(kind, entries):
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def test_transaction_rewrites_urn_uuid_references(client):
    pat, enc = "urn:uuid:7d3e6f0a-0000-4000-8000-000000000001", "urn:uuid:7d3e6f0a-0000-4000-8000-000000000002"
    bundle = _bundle("transaction", [
        {"fullUrl": enc, "resource": {**encounter("x", "2024-05-01T10:00:00Z"), "subject": {"reference": pat}},
         "request": {"method": "POST", "url": "Encounter"}},
        {"fullUrl": pat, "resource": patient("t1"), "request": {"method": "POST", "url": "Patient",
                                                                "ifNoneExist": f"identifier={SYS}|t1"}},
        {"resource": {**patient("t2"), "id": "fixed"}, "request": {"method": "PUT", "url": "Patient/fixed"}},
        {"request": {"method": "GET", "url": f"Patient?identifier={SYS}|t1"}},
    ])
    r = client.post("/", data=orjson.dumps(bundle), content_type="application/fhir+json")
    assert r.status_code == 200, r.get_data(as_text=True)
    resp = r.json
    assert resp["type"] == "transaction-response"
    assert [e["response"]["status"] for e in resp["entry"]] == ["201 Created", "201 Created", "201 Created", "200 OK"]
    pid = resp["entry"][1]["resource"]["id"]
    assert resp["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{pid}"
    assert resp["entry"][3]["resource"]["total"] == 1  # the GET sees the writes of the same transaction
    # again: the conditional POST matches, the PUT changes nothing
    resp = client.post("/", data=orjson.dumps(bundle), content_type="application/fhir+json").json
    assert resp["entry"][1]["response"]["status"] == "200 OK" and resp["entry"][1]["resource"]["id"] == pid
    assert resp["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{pid}"
    assert resp["entry"][2]["response"]["etag"] == 'W/"1"'


def test_failed_transaction_leaves_nothing(client):
    before = client.get("/Patient?_summary=count").json["total"]
    bundle = _bundle("transaction", [
        {"resource": patient("f1"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**patient("f2"), "id": "f2"}, "request": {"method": "PUT", "url": "Patient/f2"}},
        {"resource": {"resourceType": "Patient", "gender": 12}, "request": {"method": "POST", "url": "Patient"}},
    ])
    r = client.post("/", data=orjson.dumps(bundle), content_type="application/fhir+json")
    assert_outcome(r, 422)
    assert "entry 2" in r.json["issue"][0]["diagnostics"]
    assert client.get("/Patient?_summary=count").json["total"] == before
    assert_outcome(client.get("/Patient/f2"), 404)
    assert client.get("/_history").json["total"] == 0


def test_batch_entries_succeed_or_fail_alone(client):
    bundle = _bundle("batch", [
        {"resource": patient("b1"), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/missing"}},
        {"resource": {"resourceType": "Patient", "gender": 12}, "request": {"method": "POST", "url": "Patient"}},
    ])
    r = client.post("/", data=orjson.dumps(bundle), content_type="application/fhir+json")
    assert r.status_code == 200
    statuses = [e["response"]["status"] for e in r.json["entry"]]
    assert statuses == ["201 Created", "404 Not Found", "422 Unprocessable Entity"]
    assert r.json["entry"][2]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert client.get("/Patient?_summary=count").json["total"] == 1
    assert_outcome(client.post("/", data=orjson.dumps(_bundle("collection", [])),
                               content_type="application/fhir+json"), 400)


# -- $validate --------------------------------------------------------------------------------------------

def test_validate_operation(client):
    r = client.post("/Patient/$validate", data=orjson.dumps(patient("v1")), content_type="application/fhir+json")
    assert r.status_code == 200 and r.json["resourceType"] == "OperationOutcome"
    assert not [i for i in r.json["issue"] if i["severity"] in ("error", "fatal")]
    bad = {"resourceType": "Patient", "gender": 12}
    params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": bad}]}
    r = client.post("/Patient/$validate", data=orjson.dumps(params), content_type="application/fhir+json")
    assert r.status_code == 200 and [i for i in r.json["issue"] if i["severity"] == "error"]
    assert_outcome(client.post("/Encounter/$validate", data=orjson.dumps(patient("v1")),
                               content_type="application/fhir+json"), 400)


def test_total_is_exact_when_cheap_or_asked_for(client, monkeypatch):
    from fhir_iop.store import search
    monkeypatch.setattr(search, "TOTAL_CAP", 3)
    for i in range(5):
        created_id(post(client, patient(f"t{i}")))
    b = client.get("/Patient?_count=2").json
    assert "total" not in b and len(ids(b)) == 2 and "last" not in {link["relation"] for link in b["link"]}
    assert client.get("/Patient?_count=2&_total=accurate").json["total"] == 5
    assert client.get("/Patient?_count=0").json["total"] == 5
    assert client.get("/Patient?_summary=count").json["total"] == 5
    assert client.get("/Patient?_count=2&identifier=t1").json["total"] == 1
    assert "total" not in client.get("/Patient?_total=none").json
