"""Facade leftovers: packaged R4 search parameters (an installed wheel needs no node_modules), /metadata
instantiating the published CapabilityStatement, and $validate on an instance."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import orjson
import pytest
from server_kit import app, client, db_url, secured_app  # noqa: F401  (fixtures)

from fhir_iop.store import params

ROOT = Path(__file__).resolve().parents[1]
FHIR_JSON = "application/fhir+json"
PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.642.99",
                                                      "value": "V-1"}],
           "name": [{"family": "Valdez", "given": ["Ana"]}], "gender": "female", "birthDate": "1984-02-29"}


# -- packaged search parameters -------------------------------------------------------------------

@pytest.mark.skipif(not (params.NPM_R4 / "search-parameters.json").is_file(), reason="./dev installs node_modules")
def test_packaged_definitions_are_current():
    built = params.package_definitions()
    for name, data in built.items():
        assert (params.DATA / name).read_bytes() == data, \
            f"fhir_iop/data/{name} is stale: run `python -m fhir_iop.store.params` (RESOURCE_TYPES changed?)"


def test_the_registry_comes_from_package_data_and_covers_every_served_type(monkeypatch):
    monkeypatch.delenv("FHIR_IOP_SEARCH_PARAMETERS", raising=False)
    assert params.definitions_path() == params.DEFINITIONS
    assert params.DEFINITIONS.is_relative_to(ROOT / "fhir_iop" / "data")
    reg = params.load_registry(str(params.DEFINITIONS))
    for rt in params.RESOURCE_TYPES:
        assert "_tag" in reg.for_type(rt) and "_security" in reg.for_type(rt), rt
    assert reg.get("Observation", "patient").type == "reference"
    assert reg.get("Encounter", "date").type == "date"
    # only the served types (and Resource/DomainResource parameters) are packaged
    bundle = orjson.loads(params.DEFINITIONS.read_bytes())
    served = set(params.RESOURCE_TYPES) | {"Resource", "DomainResource"}
    assert all(served & set(e["resource"]["base"]) for e in bundle["entry"])
    assert not any(e["resource"]["code"] == "family" and e["resource"]["base"] == ["RelatedPerson"]
                   for e in bundle["entry"])
    required = orjson.loads(params.REQUIRED_ELEMENTS.read_bytes())
    assert set(required) == set(params.RESOURCE_TYPES) and "status" in required["Observation"]


def test_the_override_still_works(monkeypatch, tmp_path):
    small = {"resourceType": "Bundle", "entry": [
        e for e in orjson.loads(params.DEFINITIONS.read_bytes())["entry"] if e["resource"]["code"] == "_tag"]}
    f = tmp_path / "sp.json"
    f.write_bytes(orjson.dumps(small))
    monkeypatch.setenv("FHIR_IOP_SEARCH_PARAMETERS", str(f))
    assert params.definitions_path() == f
    reg = params.load_registry(str(f))
    assert set(reg.for_type("Patient")) == {"_tag"}


def test_pyproject_ships_the_data_files():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = conf["tool"]["setuptools"]["package-data"]["fhir_iop"]
    for f in (params.DEFINITIONS, params.REQUIRED_ELEMENTS):
        rel = f.relative_to(ROOT / "fhir_iop").as_posix()
        assert any(fnmatch(rel, p) for p in patterns), rel


# -- /metadata --------------------------------------------------------------------------------------

def test_metadata_instantiates_the_published_capability_statement(client):
    published = orjson.loads((ROOT / "profiles" / "CapabilityStatement-fhir-iop.json").read_bytes())
    cs = client.get("/metadata").json
    assert cs["kind"] == "instance" and cs["instantiates"] == [published["url"]]
    assert cs["software"] == {"name": "fhir-iop", "version": published["version"]}
    assert cs["implementation"]["url"] == "http://localhost"
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    for r in published["rest"][0]["resource"]:
        if r["type"] in by_type:
            assert by_type[r["type"]]["supportedProfile"] == r["supportedProfile"]
    assert "http://fhir-iop.org/fhir/StructureDefinition/iop-client" in by_type["Patient"]["supportedProfile"]
    assert "413" in cs["rest"][0]["documentation"] and "DOCTYPE" in cs["rest"][0]["documentation"]


def test_metadata_is_made_once_per_base_url_and_served_from_memory(client, monkeypatch):
    from server.routes import metadata
    made = []
    real = metadata.capability_statement

    def counting(registry, base):
        made.append(base)
        return real(registry, base)

    monkeypatch.setattr(metadata, "capability_statement", counting)
    first = client.get("/metadata")
    assert client.get("/metadata").data == first.data
    other = client.get("/metadata", headers={"Host": "fhir.example.org"})
    assert client.get("/metadata", headers={"Host": "fhir.example.org"}).data == other.data
    assert made == ["http://localhost", "http://fhir.example.org"]  # one statement per base URL
    assert other.json["implementation"]["url"] == "http://fhir.example.org"
    assert other.json["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"] == \
        "http://fhir.example.org/auth/token"
    xml = client.get("/metadata?_format=xml")  # the cached JSON still goes out as XML when asked
    assert xml.status_code == 200 and xml.data.lstrip().startswith(b"<?xml") and b"CapabilityStatement" in xml.data


# -- $validate on an instance -------------------------------------------------------------------------

def issues(resp, status=200):
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    oo = resp.json
    assert oo["resourceType"] == "OperationOutcome"
    return oo["issue"]


def errors(resp):
    return [i for i in issues(resp) if i["severity"] in ("error", "fatal")]


def test_validate_an_instance(client):
    r = client.post("/Patient", data=orjson.dumps(PATIENT), content_type=FHIR_JSON)
    pid = r.json["id"]
    assert errors(client.get(f"/Patient/{pid}/$validate")) == []
    # against a profile the stored resource does not meet (iop-client wants the program's MRN identifier…)
    prof = "http://fhir-iop.org/fhir/StructureDefinition/iop-client"
    assert errors(client.get(f"/Patient/{pid}/$validate?profile={prof}"))
    # POST: the posted resource as an update of that instance
    bad = {**PATIENT, "id": pid, "gender": "sometimes"}
    found = errors(client.post(f"/Patient/{pid}/$validate", data=orjson.dumps(bad), content_type=FHIR_JSON))
    assert any("gender" in (i.get("expression", [""])[0] + i.get("diagnostics", "")) for i in found), found
    good = {**PATIENT, "id": pid}
    assert errors(client.post(f"/Patient/{pid}/$validate", data=orjson.dumps(good), content_type=FHIR_JSON)) == []
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": good},
                                                              {"name": "mode", "valueCode": "update"}]}
    assert errors(client.post(f"/Patient/{pid}/$validate", data=orjson.dumps(parameters),
                              content_type=FHIR_JSON)) == []
    # the id must be the instance's; a type mismatch is refused
    other = {**PATIENT, "id": "someone-else"}
    assert "not the id in the URL" in issues(client.post(f"/Patient/{pid}/$validate", data=orjson.dumps(other),
                                                         content_type=FHIR_JSON), 400)[0]["diagnostics"]
    assert issues(client.post(f"/Observation/{pid}/$validate", data=orjson.dumps(good), content_type=FHIR_JSON),
                  400)
    # mode=delete: the stored one exists
    delete = {"resourceType": "Parameters", "parameter": [{"name": "mode", "valueCode": "delete"}]}
    assert "may be deleted" in issues(client.post(f"/Patient/{pid}/$validate", data=orjson.dumps(delete),
                                                  content_type=FHIR_JSON))[0]["diagnostics"]
    assert issues(client.get(f"/Patient/{pid}/$validate?mode=bogus"), 400)
    assert issues(client.get(f"/Patient/{pid}/$validate?mode=create"), 400)


def test_validate_a_missing_or_deleted_instance(client):
    assert issues(client.get("/Patient/nobody/$validate"), 404)
    pid = client.post("/Patient", data=orjson.dumps(PATIENT), content_type=FHIR_JSON).json["id"]
    assert client.delete(f"/Patient/{pid}").status_code in (200, 204)
    assert issues(client.get(f"/Patient/{pid}/$validate"), 410)
    assert issues(client.get("/Nonsense/x/$validate"), 404)
    assert issues(client.get(f"/Patient/{pid}/$validate", headers={"Accept": "text/csv"}), 406)


def test_validate_reports_a_mistyped_coding_system_instead_of_failing(client):
    """A Coding.system that is an array crashed the binding check (found by tests/test_fuzz_api.py)."""
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/x"},  # clinicalStatus: a required binding
            "clinicalStatus": {"coding": [{"system": [], "code": "active"}]}}
    found = errors(client.post("/Condition/$validate", data=orjson.dumps(cond), content_type=FHIR_JSON))
    assert found and any("system" in (i.get("diagnostics", "") + str(i.get("expression", ""))) for i in found)


# -- conditional read and conditional delete -------------------------------------------------------------

def test_conditional_read_answers_304(client):
    r = client.post("/Patient", data=orjson.dumps(PATIENT), content_type=FHIR_JSON)
    pid, etag, modified = r.json["id"], r.headers["ETag"], r.headers["Last-Modified"]
    assert etag == 'W/"1"'
    r = client.get(f"/Patient/{pid}", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.get_data() == b"" and r.headers["ETag"] == etag
    assert client.get(f"/Patient/{pid}", headers={"If-None-Match": '"1", W/"7"'}).status_code == 304
    assert client.get(f"/Patient/{pid}", headers={"If-None-Match": "*"}).status_code == 304
    assert client.get(f"/Patient/{pid}", headers={"If-Modified-Since": modified}).status_code == 304
    assert client.get(f"/Patient/{pid}/_history/1", headers={"If-None-Match": etag}).status_code == 304
    # a newer version, an older date or a date that is not one: the resource
    client.put(f"/Patient/{pid}", data=orjson.dumps({**PATIENT, "id": pid, "gender": "other"}), content_type=FHIR_JSON)
    r = client.get(f"/Patient/{pid}", headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.json["meta"]["versionId"] == "2"
    assert client.get(f"/Patient/{pid}", headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200
    assert client.get(f"/Patient/{pid}", headers={"If-Modified-Since": "yesterday"}).status_code == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2)
    assert client.get(f"/Patient/{pid}", headers={"If-None-Match": etag, "If-Modified-Since": modified}) \
        .status_code == 200
    # not a read: writes ignore If-None-Match, a missing resource is still 404
    assert client.get("/Patient/nobody", headers={"If-None-Match": "*"}).status_code == 404


def test_conditional_delete(client):
    def make(mrn):
        res = {**PATIENT, "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.642.99", "value": mrn}]}
        return client.post("/Patient", data=orjson.dumps(res), content_type=FHIR_JSON).json["id"]

    a, _, _ = make("D-1"), make("D-2"), make("D-2")
    r = client.delete("/Patient?identifier=urn:oid:2.16.840.1.113883.4.642.99|D-1")
    assert r.status_code == 204
    assert client.get(f"/Patient/{a}").status_code == 410
    r = client.delete("/Patient?identifier=urn:oid:2.16.840.1.113883.4.642.99|D-2")
    assert r.status_code == 412 and r.json["resourceType"] == "OperationOutcome"
    assert client.get("/Patient?identifier=D-2").json["total"] == 2  # nothing deleted
    assert client.delete("/Patient?identifier=nobody").status_code == 204  # no match: nothing to do
    assert client.delete("/Patient").status_code == 400
    # in Bundles: a transaction deletes the one match; a batch entry with several matches is a 412 of its own
    c = make("D-3")
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Patient?identifier=urn:oid:2.16.840.1.113883.4.642.99|D-3"}}]}
    r = client.post("/", data=orjson.dumps(tx), content_type=FHIR_JSON)
    assert r.status_code == 200 and r.json["entry"][0]["response"]["status"].startswith("204"), r.json
    assert client.get(f"/Patient/{c}").status_code == 410
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Patient?identifier=D-2"}}]}
    r = client.post("/", data=orjson.dumps(batch), content_type=FHIR_JSON)
    assert r.json["entry"][0]["response"]["status"].startswith("412")
    assert client.delete("/Patient?bogus=1").status_code == 400  # unknown parameters are errors here
    cs = client.get("/metadata").json
    served = [r for r in cs["rest"][0]["resource"] if r["type"] in params.RESOURCE_TYPES]
    assert {r["conditionalDelete"] for r in served} == {"single"}  # (AuditEvent is append-only)
    assert {r["conditionalRead"] for r in served} == {"full-support"}


def test_conditional_delete_needs_the_delete_scope(secured_app):  # noqa: F811
    from server_kit import token_for
    c = secured_app.test_client()
    admin = {"Authorization": token_for(secured_app, scopes="system/*.*", admin=True)}
    pid = c.post("/Patient", data=orjson.dumps(PATIENT), content_type=FHIR_JSON, headers=admin).json["id"]
    reader = {"Authorization": token_for(secured_app, scopes="system/Patient.rs")}
    r = c.delete("/Patient?identifier=V-1", headers=reader)
    assert r.status_code == 403 and r.json["resourceType"] == "OperationOutcome"
    deleter = {"Authorization": token_for(secured_app, scopes="system/Patient.ds")}
    assert c.delete("/Patient?identifier=V-1", headers=deleter).status_code == 204
    assert c.get(f"/Patient/{pid}", headers=admin).status_code == 410


# -- _summary ------------------------------------------------------------------------------------------

def test_summary_modes_on_search_and_read(client):
    res = {**PATIENT, "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Ana</div>'},
           "maritalStatus": {"text": "married"}, "communication": [{"language": {"text": "Spanish"}}]}
    pid = client.post("/Patient", data=orjson.dumps(res), content_type=FHIR_JSON).json["id"]
    subsetted = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}

    def got(mode):
        bundle = client.get(f"/Patient?_id={pid}&_summary={mode}").json
        read = client.get(f"/Patient/{pid}?_summary={mode}").json
        assert bundle["entry"][0]["resource"] == read
        return read

    true = got("true")  # isSummary elements: identifier, name, gender, birthDate…; not text, maritalStatus
    assert {"identifier", "name", "gender", "birthDate", "id", "meta"} <= set(true)
    assert "text" not in true and "maritalStatus" not in true and "communication" not in true
    assert subsetted in true["meta"]["tag"]
    text = got("text")
    assert set(text) == {"resourceType", "id", "meta", "text"}
    data = got("data")
    assert "text" not in data and data["maritalStatus"] == {"text": "married"} and subsetted in data["meta"]["tag"]
    full = client.get(f"/Patient/{pid}?_summary=false").json
    assert "text" in full and "tag" not in full["meta"]
    assert client.get(f"/Patient?_id={pid}&_summary=count").json["total"] == 1
    r = client.get(f"/Patient?_summary=bogus", headers={"Prefer": "handling=strict"})
    assert r.status_code == 400 and r.json["resourceType"] == "OperationOutcome"


def test_the_facade_runs_without_node_modules(tmp_path):
    """An installed wheel has fhir_iop/data but no node_modules: search parameters, _elements and _summary
    come from package data, $validate falls back to the structure check and says what it did not check."""
    import subprocess
    import sys
    empty = tmp_path / "no-definitions"
    empty.mkdir()
    script = f"""
import orjson
from server import create_app
a = create_app({{"DATABASE_URL": "sqlite:///{tmp_path / 'db.sqlite'}", "INSECURE_NO_AUTH": True}})
c = a.test_client()
J = "application/fhir+json"
assert c.get("/metadata").status_code == 200
assert c.post("/Patient", data=orjson.dumps({{"resourceType": "Patient", "gender": "female"}}), content_type=J).status_code == 201
assert c.get("/Patient?gender=female&_elements=gender").json["total"] == 1
assert c.get("/Patient?_summary=true").status_code == 200
r = c.post("/Patient/$validate", data=orjson.dumps({{"resourceType": "Patient"}}), content_type=J)
assert r.status_code == 200 and "were not checked" in r.json["issue"][0]["diagnostics"], r.json
r = c.post("/Patient/$validate", data=orjson.dumps({{"resourceType": "Patient", "gender": 1}}), content_type=J)
assert r.status_code == 200 and r.json["issue"][0]["severity"] == "error", r.json
r = c.post("/Patient/$validate?profile=http://fhir-iop.org/fhir/StructureDefinition/iop-client",
           data=orjson.dumps({{"resourceType": "Patient"}}), content_type=J)
assert r.status_code == 422, r.json
print("ok")
"""
    env = {**__import__("os").environ, "FHIR_IOP_DEFINITIONS": str(empty)}
    env.pop("FHIR_IOP_SEARCH_PARAMETERS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# -- an unavailable store: 503 with Retry-After, not a 500 ---------------------------------------------

def test_which_database_errors_mean_unavailable():
    import sqlite3

    import psycopg
    from sqlalchemy import exc

    from server.errors import error_outcome

    def wrapped(cls, orig, **kw):
        return cls("SELECT 1", {}, orig, **kw)

    assert error_outcome(wrapped(exc.OperationalError, sqlite3.OperationalError("database is locked")))[0] == 503
    assert error_outcome(wrapped(exc.OperationalError, psycopg.OperationalError("connection refused")))[0] == 503
    assert error_outcome(wrapped(exc.InterfaceError, psycopg.InterfaceError("the connection is closed")))[0] == 503
    assert error_outcome(wrapped(exc.OperationalError, sqlite3.OperationalError("x"),
                                 connection_invalidated=True))[0] == 503
    assert error_outcome(exc.TimeoutError("QueuePool limit reached"))[0] == 503
    status, oo = error_outcome(wrapped(exc.OperationalError, psycopg.OperationalError("terminating connection")))
    assert oo["issue"][0]["code"] == "transient"
    # faults in a statement or the schema are the server's own errors
    assert error_outcome(wrapped(exc.OperationalError, sqlite3.OperationalError("no such table: resource")))[0] == 500
    assert error_outcome(wrapped(exc.IntegrityError, sqlite3.IntegrityError("UNIQUE constraint failed")))[0] == 500
    assert error_outcome(wrapped(exc.ProgrammingError, psycopg.ProgrammingError("syntax error")))[0] == 500


def test_a_lost_database_connection_is_a_503_and_the_next_request_is_served(app, client):
    """PostgreSQL terminates the connection a worker reads on: that request gets 503 with Retry-After
    and an OperationOutcome (the audit trail still records it); the next one is served on a new
    connection."""
    from sqlalchemy import text
    store = app.extensions["fhir_iop"].store
    if store.engine.dialect.name != "postgresql":
        pytest.skip("a server that drops connections: PostgreSQL")
    created = client.post("/Patient", json=PATIENT, headers={"Content-Type": FHIR_JSON})
    assert created.status_code == 201
    rid = created.json["id"]
    with store.reading() as tx:  # (the test client serves requests on this thread: the same held connection)
        backend = tx.conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with store.engine.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": backend})
        c.commit()
    lost = client.get(f"/Patient/{rid}", headers={"Cache-Control": "no-cache"})  # (past the read cache)
    assert lost.status_code == 503, lost.get_data(as_text=True)[:300]
    assert lost.headers["Retry-After"] == "5"
    assert lost.json["resourceType"] == "OperationOutcome" and lost.json["issue"][0]["code"] == "transient"
    again = client.get(f"/Patient/{rid}", headers={"Cache-Control": "no-cache"})
    assert again.status_code == 200 and again.json["id"] == rid
