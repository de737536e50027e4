"""EhrClient, connections config and EHR auth: every HTTP path, with ``responses`` (and, where urllib3
itself must run — Retry-After sleeps, timeouts, resets — against the fault proxy of ehr_kit)."""

from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from ehr_kit import Fault, FaultProxy, free_port
from responses import matchers

from fhir_iop.errors import ConfigError
from fhir_iop.sync import auth as ehr_auth
from fhir_iop.sync.client import EhrClient, EhrError, outcome_text, retry_after_seconds, safe_transaction
from fhir_iop.sync.config import load, parse

BASE = "https://ehr.example.org/fhir/r4"
TOKEN_URL = "https://auth.ehr.example.org/oauth2/token"


def conn(**kw):
    raw = {"base_url": BASE, "page_size": 2, "retries": {"max_attempts": 3, "backoff": 0}, **kw}
    return parse({"connections": {"county": raw}})["county"]


def oo(text, code="processing", severity="error"):
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def patient(pid, family="Nguyen"):
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": "1", "lastUpdated": "2026-11-20T10:00:00Z"},
            "identifier": [{"system": "urn:oid:1.2.3.4.5.1", "value": f"MRN{pid}"}], "name": [{"family": family}]}


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    """The client's own backoff sleeps (broken pages, export polling) are recorded, not slept."""
    slept = []
    monkeypatch.setattr("fhir_iop.sync.client.time.sleep", lambda s: slept.append(s))
    return slept


# -- config -------------------------------------------------------------------------------------------

def test_config_yaml_env_substitution_and_secrets_from_env(tmp_path, monkeypatch):
    f = tmp_path / "ehr.yaml"
    f.write_text("""
connections:
  county:
    base_url: ${COUNTY_URL}/
    auth: {type: smart-backend, client_id: iop, private_key_env: COUNTY_KEY, alg: ES384, kid: k1,
           scopes: "system/Patient.rs system/Condition.rs"}
    resources: {Patient: pull, Condition: both, Encounter: push}
    schedule: {interval: 15m}
    timeouts: {connect: 2, read: 20s}
    retries: {max_attempts: 4, backoff: 0.25}
""")
    monkeypatch.setenv("COUNTY_URL", "https://ehr.county.example/fhir")
    c = load(f)["county"]
    assert c.base_url == "https://ehr.county.example/fhir"
    assert c.pull_types == ("Patient", "Condition") and c.push_types == ("Condition", "Encounter")
    assert c.interval == 900 and c.timeout == (2.0, 20.0) and c.max_attempts == 4
    assert c.auth.alg == "ES384" and c.auth.scopes == ("system/Patient.rs", "system/Condition.rs")
    assert c.origin == "sync:county"
    with pytest.raises(ConfigError, match="COUNTY_KEY is not set"):  # read on use, named, never printed
        c.auth.private_key()
    monkeypatch.setenv("COUNTY_KEY", "-----BEGIN PRIVATE KEY-----")
    assert c.auth.private_key().startswith("-----BEGIN")
    monkeypatch.delenv("COUNTY_URL")
    with pytest.raises(ConfigError, match=r"connections.county.base_url: the environment variable COUNTY_URL"):
        load(f)


@pytest.mark.parametrize("raw, message", [
    ({"base_url": "ftp://x"}, "base_url"),
    ({"base_url": BASE, "password": "hunter2"}, "unknown key"),
    ({"base_url": BASE, "auth": {"type": "bearer", "token": "abc"}}, "secrets go in"),
    ({"base_url": BASE, "auth": {"type": "smart-backend", "client_id": "x", "private_key_env": "K"}}, "scopes"),
    ({"base_url": BASE, "auth": {"type": "smart-backend", "client_id": "x", "private_key_env": "K",
                                 "scopes": ["system/*.rs"], "alg": "HS256"}}, "alg"),
    ({"base_url": BASE, "resources": {"Patient": "sideways"}}, "pull, push, both"),
    ({"base_url": BASE, "schedule": {"interval": "soon"}}, "not a duration"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse({"connections": {"county": raw}})


def test_example_connections_file_loads_without_secrets(monkeypatch):
    from pathlib import Path
    monkeypatch.setenv("COUNTY_EHR_BASE_URL", "https://ehr.county.example/fhir")
    cs = load(Path(__file__).parents[1] / "examples" / "ehr-connections.yaml")
    assert set(cs) == {"county-hospital", "primary-care"}
    assert "ServiceRequest" in cs["county-hospital"].pull_types


# -- reads, errors ------------------------------------------------------------------------------------

@responses.activate
def test_read_sends_fhir_json_and_timeouts():
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"))
    client = EhrClient(conn(timeouts={"connect": 3, "read": 7}))
    seen = {}
    orig = client.session.request

    def spy(*a, **kw):
        seen.update(kw)
        return orig(*a, **kw)
    client.session.request = spy
    assert client.read("Patient", "p1")["id"] == "p1"
    assert seen["timeout"] == (3.0, 7.0)
    assert responses.calls[0].request.headers["Accept"] == "application/fhir+json"


@responses.activate
def test_operation_outcome_becomes_ehr_error_saying_what_the_ehr_said():
    responses.put(f"{BASE}/Patient/p1", status=422, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invariant", "details": {"text": "Patient.birthDate is in the future"},
         "expression": ["Patient.birthDate"]}]})
    with pytest.raises(EhrError) as e:
        EhrClient(conn()).update(patient("p1"))
    assert e.value.status == 422 and not e.value.transient
    assert "HTTP 422" in e.value.message and "Patient.birthDate is in the future (at Patient.birthDate)" in e.value.message
    assert e.value.outcome["issue"][0]["code"] == "invariant"
    assert "Nguyen" not in e.value.message  # the body sent is never echoed


@responses.activate
def test_error_without_outcome_uses_the_reason():
    responses.get(f"{BASE}/Patient/nope", status=404, body="<html>not here</html>")
    with pytest.raises(EhrError) as e:
        EhrClient(conn()).read("Patient", "nope")
    assert e.value.status == 404 and not e.value.transient and "HTTP 404" in e.value.message


@responses.activate
def test_get_retried_on_503_then_succeeds():
    responses.get(f"{BASE}/Patient/p1", status=503, json=oo("maintenance"))
    responses.get(f"{BASE}/Patient/p1", status=502, body="bad gateway")
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"))
    assert EhrClient(conn()).read("Patient", "p1")["id"] == "p1"
    assert len(responses.calls) == 3


@responses.activate
def test_retries_exhausted_give_a_transient_error_with_retry_after():
    for _ in range(3):
        responses.get(f"{BASE}/Patient/p1", status=429, json=oo("slow down", "throttled"),
                      headers={"Retry-After": "7"})
    with pytest.raises(EhrError) as e:
        EhrClient(conn()).read("Patient", "p1")
    assert len(responses.calls) == 3  # max_attempts
    assert e.value.status == 429 and e.value.transient and e.value.retry_after == 7.0
    assert "slow down" in e.value.message


@responses.activate
def test_post_is_not_retried_unless_the_transaction_is_safe():
    unsafe = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("x"), "request": {"method": "POST", "url": "Patient"}}]}
    safe = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("x"), "request": {"method": "PUT", "url": "Patient?identifier=urn:oid:1.2.3.4.5.1|MRNx"}},
        {"resource": patient("y"), "request": {"method": "POST", "url": "Patient",
                                                "ifNoneExist": "identifier=urn:oid:1.2.3.4.5.1|MRNy"}}]}
    assert not safe_transaction(unsafe) and safe_transaction(safe)
    ok = {"resourceType": "Bundle", "type": "transaction-response", "entry": [{"response": {"status": "201"}}]}
    responses.post(BASE, status=503, json=oo("busy"))
    responses.post(BASE, json=ok)
    client = EhrClient(conn())
    with pytest.raises(EhrError) as e:
        client.transaction(unsafe)
    assert e.value.status == 503 and e.value.transient and len(responses.calls) == 1
    responses.calls.reset()
    responses.replace(responses.POST, BASE, status=503, json=oo("busy"))
    responses.add(responses.POST, BASE, json=ok)
    assert client.transaction(safe)["type"] == "transaction-response"
    assert len(responses.calls) == 2


@responses.activate
def test_transaction_answer_that_is_not_a_bundle_is_an_error():
    responses.post(BASE, json=oo("fine", severity="information"))
    with pytest.raises(EhrError, match="not a Bundle"):
        EhrClient(conn()).transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})


@responses.activate
def test_broken_json_page_is_fetched_again(_no_sleep):
    responses.get(f"{BASE}/Patient/p1", body=b'{"resourceType": "Pat', content_type="application/fhir+json")
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"))
    assert EhrClient(conn()).read("Patient", "p1")["id"] == "p1"
    assert len(responses.calls) == 2 and len(_no_sleep) == 1


@responses.activate
def test_broken_json_every_time_is_a_transient_error():
    for _ in range(3):
        responses.get(f"{BASE}/Patient/p1", body=b"[1, 2", content_type="application/fhir+json")
    with pytest.raises(EhrError) as e:
        EhrClient(conn()).read("Patient", "p1")
    assert e.value.transient and "not valid JSON" in e.value.message


@responses.activate
def test_connection_errors_are_transient():
    responses.get(f"{BASE}/Patient/p1", body=requests.exceptions.ConnectionError("Connection refused"))
    with pytest.raises(EhrError) as e:
        EhrClient(conn()).read("Patient", "p1")
    assert e.value.status is None and e.value.transient and "cannot connect" in e.value.message
    responses.replace(responses.GET, f"{BASE}/Patient/p1", body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(EhrError, match="timed out") as e:
        EhrClient(conn()).read("Patient", "p1")
    assert e.value.transient


# -- search and paging -------------------------------------------------------------------------------

def bundle(ids, next_url=None, self_url=None):
    b = {"resourceType": "Bundle", "type": "searchset",
         "entry": [{"resource": patient(i), "search": {"mode": "match"}} for i in ids]
         + [{"resource": oo("unknown parameter ignored", severity="warning"), "search": {"mode": "outcome"}}],
         "link": []}
    if self_url:
        b["link"].append({"relation": "self", "url": self_url})
    if next_url:
        b["link"].append({"relation": "next", "url": next_url})
    return b


@responses.activate
def test_search_follows_next_links_and_reports_ignored_parameters():
    responses.get(f"{BASE}/Patient", match=[matchers.query_param_matcher({"name": "x", "_count": "2"}),
                                           matchers.header_matcher({"Prefer": "handling=strict"})],
                  json=bundle(["a", "b"], f"{BASE}/Patient?_count=2&_offset=2", f"{BASE}/Patient?_count=2"))
    responses.get(f"{BASE}/Patient", match=[matchers.query_param_matcher({"_count": "2", "_offset": "2"})],
                  json=bundle(["c"], None, f"{BASE}/Patient?_count=2&_offset=2"))
    pages = list(EhrClient(conn()).search("Patient", {"name": "x"}))
    assert [[r["id"] for r in p.resources] for p in pages] == [["a", "b"], ["c"]]
    assert pages[0].ignored == frozenset({"name"})  # the EHR's self link dropped it
    assert pages[0].number == 1 and pages[1].number == 2


@responses.activate
def test_search_relative_next_link_and_no_self_link():
    responses.get(f"{BASE}/Condition", match=[matchers.query_param_matcher({"_count": "5"})],
                  json=bundle(["a"], "Condition?page=2"))
    responses.get(f"{BASE}/Condition", match=[matchers.query_param_matcher({"page": "2"})], json=bundle([]))
    pages = list(EhrClient(conn(strict=False)).search("Condition", {"_count": "5"}))
    assert len(pages) == 2 and pages[0].ignored is None
    assert "Prefer" not in responses.calls[0].request.headers


@responses.activate
def test_next_link_leading_away_is_refused():
    responses.get(f"{BASE}/Patient", json=bundle(["a"], "https://evil.example/fhir/Patient?page=2"))
    with pytest.raises(EhrError, match="leads away"):
        list(EhrClient(conn()).search("Patient"))


@responses.activate
def test_search_answer_not_a_bundle():
    responses.get(f"{BASE}/Patient", json=patient("a"))
    with pytest.raises(EhrError, match="not a Bundle"):
        list(EhrClient(conn()).search("Patient"))


# -- writes -------------------------------------------------------------------------------------------

@responses.activate
def test_conditional_update_by_identifier():
    responses.put(f"{BASE}/Patient", status=201, headers={"Location": f"{BASE}/Patient/77/_history/1", "ETag": 'W/"1"'},
                  match=[matchers.query_param_matcher({"identifier": "urn:oid:1.2.3.4.5.1|MRN9"})])
    status, location, version = EhrClient(conn()).conditional_update(
        patient("ours-9"), {"system": "urn:oid:1.2.3.4.5.1", "value": "MRN9"})
    assert (status, location, version) == (201, f"{BASE}/Patient/77/_history/1", "1")
    sent = orjson.loads(responses.calls[0].request.body)
    assert "id" not in sent and sent["identifier"] == [{"system": "urn:oid:1.2.3.4.5.1", "value": "MRNours-9"}]
    assert responses.calls[0].request.headers["Prefer"] == "return=minimal"


@responses.activate
def test_conditional_update_several_matches_is_412():
    responses.put(f"{BASE}/Patient", status=412, json=oo("2 resources match identifier"))
    with pytest.raises(EhrError, match="2 resources match") as e:
        EhrClient(conn()).conditional_update(patient("x"), "urn:oid:1.2.3.4.5.1|MRNx", if_match="3")
    assert e.value.status == 412 and not e.value.transient
    assert responses.calls[0].request.headers["If-Match"] == 'W/"3"'


@responses.activate
def test_update_version_from_body_when_no_etag():
    responses.put(f"{BASE}/Patient/p1", json={**patient("p1"), "meta": {"versionId": "4"}})
    assert EhrClient(conn()).update(patient("p1")) == (200, None, "4")


@responses.activate
def test_delete_is_idempotent():
    responses.delete(f"{BASE}/Encounter/e1", status=204)
    responses.delete(f"{BASE}/Encounter/e2", status=410, json=oo("gone"))
    responses.delete(f"{BASE}/Encounter", status=200, match=[matchers.query_param_matcher({"identifier": "s|v"})])
    responses.delete(f"{BASE}/Encounter/e3", status=409, json=oo("referenced by Claim/1"))
    c = EhrClient(conn())
    assert c.delete("Encounter", "e1") == 204
    assert c.delete("Encounter", "e2") == 410
    assert c.delete("Encounter", params={"identifier": "s|v"}) == 200
    with pytest.raises(EhrError, match="referenced by Claim/1"):
        c.delete("Encounter", "e3")


@responses.activate
def test_capabilities_and_smart_configuration():
    responses.get(f"{BASE}/metadata", json={"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"})
    responses.get(f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": TOKEN_URL})
    c = EhrClient(conn())
    assert c.capabilities()["fhirVersion"] == "4.0.1"
    assert c.smart_configuration()["token_endpoint"] == TOKEN_URL
    c.smart_configuration()
    assert len(responses.calls) == 2  # cached


# -- auth ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_key():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, key.public_key()


@pytest.fixture(scope="module")
def ec_key():
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, key.public_key()


def smart_conn(alg="RS384", token_endpoint=None):
    a = {"type": "smart-backend", "client_id": "fhir-iop", "private_key_env": "EHR_KEY", "alg": alg, "kid": "k-2026",
         "scopes": ["system/Patient.rs", "system/Condition.rs"]}
    if token_endpoint:
        a["token_endpoint"] = token_endpoint
    return conn(auth=a)


class TokenEndpoint:
    """A token endpoint that verifies the client assertion with the registered public key."""

    def __init__(self, public_key, alg, lifetime=300):
        self.public_key, self.alg, self.lifetime = public_key, alg, lifetime
        self.jtis, self.issued = [], 0

    def __call__(self, request):
        form = {k: v[0] for k, v in parse_qs(request.body.decode() if isinstance(request.body, bytes)
                                             else request.body).items()}
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        assert form["scope"] == "system/Patient.rs system/Condition.rs"
        header = jwt.get_unverified_header(form["client_assertion"])
        assert header["alg"] == self.alg and header["kid"] == "k-2026" and header["typ"] == "JWT"
        claims = jwt.decode(form["client_assertion"], self.public_key, algorithms=[self.alg], audience=TOKEN_URL,
                            options={"require": ["iss", "sub", "aud", "exp", "jti"]})
        assert claims["iss"] == claims["sub"] == "fhir-iop"
        assert 0 < claims["exp"] - time.time() <= 300
        assert claims["jti"] not in self.jtis
        self.jtis.append(claims["jti"])
        self.issued += 1
        return 200, {}, orjson.dumps({"access_token": f"tok-{self.issued}", "token_type": "bearer",
                                      "expires_in": self.lifetime})


@pytest.mark.parametrize("alg, key", [("RS384", "rsa_key"), ("ES384", "ec_key")])
@responses.activate
def test_smart_backend_discovery_signed_assertion_and_caching(alg, key, request, monkeypatch):
    pem, public = request.getfixturevalue(key)
    monkeypatch.setenv("EHR_KEY", pem)
    endpoint = TokenEndpoint(public, alg)
    responses.get(f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": TOKEN_URL})
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"), match=[matchers.header_matcher(
        {"Authorization": "Bearer tok-1"})])
    client = EhrClient(smart_conn(alg))
    client.read("Patient", "p1")
    client.read("Patient", "p1")
    assert endpoint.issued == 1  # cached
    token_call = [c for c in responses.calls if c.request.url == TOKEN_URL][0]
    assert token_call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "Authorization" not in token_call.request.headers


@responses.activate
def test_token_renewed_once_on_401_then_request_retried(rsa_key, monkeypatch):
    pem, public = rsa_key
    monkeypatch.setenv("EHR_KEY", pem)
    endpoint = TokenEndpoint(public, "RS384")
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    responses.get(f"{BASE}/Patient/p1", status=401, json=oo("token revoked", "login"),
                  match=[matchers.header_matcher({"Authorization": "Bearer tok-1"})])
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"), match=[matchers.header_matcher(
        {"Authorization": "Bearer tok-2"})])
    client = EhrClient(smart_conn(token_endpoint=TOKEN_URL))
    assert client.read("Patient", "p1")["id"] == "p1"
    assert endpoint.issued == 2 and len(set(endpoint.jtis)) == 2


@responses.activate
def test_second_401_is_an_error(rsa_key, monkeypatch):
    pem, public = rsa_key
    monkeypatch.setenv("EHR_KEY", pem)
    endpoint = TokenEndpoint(public, "RS384")
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    responses.get(f"{BASE}/Patient/p1", status=401, json=oo("client disabled", "login"))
    with pytest.raises(EhrError, match="client disabled") as e:
        EhrClient(smart_conn(token_endpoint=TOKEN_URL)).read("Patient", "p1")
    assert e.value.status == 401 and endpoint.issued == 2


@responses.activate
def test_token_renewed_before_expiry(rsa_key, monkeypatch):
    pem, public = rsa_key
    monkeypatch.setenv("EHR_KEY", pem)
    endpoint = TokenEndpoint(public, "RS384", lifetime=100)
    responses.add_callback(responses.POST, TOKEN_URL, callback=endpoint)
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"))
    client = EhrClient(smart_conn(token_endpoint=TOKEN_URL))
    clock = [time.time() - 200]  # the clock moves ahead 95 s below: still before the real now
    monkeypatch.setattr(ehr_auth.time, "time", lambda: clock[0])
    client.read("Patient", "p1")
    clock[0] += 85  # 100 s token, renewed 10 s (a tenth) before it expires
    client.read("Patient", "p1")
    assert endpoint.issued == 1
    clock[0] += 10
    client.read("Patient", "p1")
    assert endpoint.issued == 2


@responses.activate
def test_token_endpoint_errors(rsa_key, monkeypatch):
    pem, _ = rsa_key
    monkeypatch.setenv("EHR_KEY", pem)
    responses.post(TOKEN_URL, status=401, json={"error": "invalid_client", "error_description": "unknown kid"})
    with pytest.raises(EhrError, match="unknown kid") as e:
        EhrClient(smart_conn(token_endpoint=TOKEN_URL)).read("Patient", "p1")
    assert e.value.status == 401
    responses.get(f"{BASE}/.well-known/smart-configuration", json={"issuer": "x"})
    with pytest.raises(EhrError, match="no token_endpoint"):
        EhrClient(smart_conn()).read("Patient", "p1")
    with pytest.raises(EhrError, match="must use https"):
        EhrClient(smart_conn(token_endpoint="http://auth.example.org/token")).read("Patient", "p1")


def test_bad_private_key_is_a_config_error(monkeypatch):
    monkeypatch.setenv("EHR_KEY", "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a usable PEM key"):
        ehr_auth.SmartBackendAuth(smart_conn()).assertion(TOKEN_URL)


@responses.activate
def test_bearer_and_client_secret(monkeypatch):
    monkeypatch.setenv("EHR_TOKEN", "static-abc")
    monkeypatch.setenv("EHR_SECRET", "s3cret")
    responses.get(f"{BASE}/Patient/p1", json=patient("p1"),
                  match=[matchers.header_matcher({"Authorization": "Bearer static-abc"})])
    EhrClient(conn(auth={"type": "bearer", "token_env": "EHR_TOKEN"})).read("Patient", "p1")
    responses.post(TOKEN_URL, json={"access_token": "cs-1", "expires_in": 3600})
    responses.get(f"{BASE}/Patient/p2", json=patient("p2"),
                  match=[matchers.header_matcher({"Authorization": "Bearer cs-1"})])
    EhrClient(conn(auth={"type": "client-secret", "client_id": "iop", "secret_env": "EHR_SECRET",
                         "scopes": "system/*.rs", "token_endpoint": TOKEN_URL})).read("Patient", "p2")
    token_call = responses.calls[1].request
    assert token_call.headers["Authorization"] == "Basic " + base64.b64encode(b"iop:s3cret").decode()
    assert parse_qs(token_call.body.decode()) == {"grant_type": ["client_credentials"], "scope": ["system/*.rs"]}


# -- Bulk Data ----------------------------------------------------------------------------------------

@responses.activate
def test_bulk_kickoff_poll_and_streamed_download(_no_sleep):
    status_url = f"{BASE}/bulk-status/j1"
    responses.get(f"{BASE}/$export", status=202, headers={"Content-Location": status_url},
                  match=[matchers.header_matcher({"Prefer": "respond-async"}),
                         matchers.query_param_matcher({"_type": "Patient,Condition", "_since": "2026-01-01T00:00:00Z",
                                                       "_outputFormat": "application/fhir+ndjson"})])
    responses.get(status_url, status=202, headers={"Retry-After": "3", "X-Progress": "collecting"})
    responses.get(status_url, status=202, headers={"X-Progress": "writing"})
    manifest = {"transactionTime": "2026-11-23T12:00:00Z", "requiresAccessToken": True,
                "output": [{"type": "Patient", "url": f"{BASE}/bulk-files/j1/Patient.ndjson"}], "error": []}
    responses.get(status_url, json=manifest)
    ndjson = b"\n".join(orjson.dumps(patient(f"p{i}")) for i in range(5)) + b"\n\n"
    responses.get(f"{BASE}/bulk-files/j1/Patient.ndjson", body=ndjson, content_type="application/fhir+ndjson")
    c = EhrClient(conn())
    url = c.export_kickoff(types=["Patient", "Condition"], since="2026-01-01T00:00:00Z")
    assert url == status_url
    st = c.export_status(url)
    assert not st.done and st.retry_after == 3 and st.progress == "collecting"
    assert c.export_wait(url) == manifest
    assert _no_sleep[0] == 1.0  # no Retry-After on the second 202: the poll interval
    assert [r["id"] for r in c.download(manifest["output"][0]["url"])] == ["p0", "p1", "p2", "p3", "p4"]
    assert [n for n, _ in c.download_lines(manifest["output"][0]["url"], skip=3)] == [4, 5]


@responses.activate
def test_bulk_kickoff_without_202_and_failed_job():
    responses.get(f"{BASE}/Patient/$export", status=200, json=bundle([]))
    c = EhrClient(conn())
    with pytest.raises(EhrError, match="expected 202"):
        c.export_kickoff(level="Patient")
    responses.get(f"{BASE}/bulk-status/j2", status=500, json=oo("export failed: disk full", "exception"))
    with pytest.raises(EhrError, match="disk full"):
        c.export_status(f"{BASE}/bulk-status/j2")


@responses.activate
def test_bulk_file_without_token_may_live_elsewhere(rsa_key, monkeypatch):
    pem, public = rsa_key
    monkeypatch.setenv("EHR_KEY", pem)
    responses.get("https://storage.example.net/j1/Patient.ndjson?sig=abc", body=orjson.dumps(patient("p1")) + b"\n")
    c = EhrClient(smart_conn(token_endpoint=TOKEN_URL))
    assert [r["id"] for r in c.download("https://storage.example.net/j1/Patient.ndjson?sig=abc",
                                        requires_token=False)] == ["p1"]
    assert "Authorization" not in responses.calls[0].request.headers
    with pytest.raises(EhrError, match="leads away"):
        list(c.download("https://storage.example.net/j1/Patient.ndjson?sig=abc", requires_token=True))


@responses.activate
def test_bulk_line_that_is_not_json():
    responses.get(f"{BASE}/bulk-files/j1/Patient.ndjson", body=b'{"resourceType":"Patient","id":"a"}\n{broken\n')
    with pytest.raises(EhrError, match="line 2 is not JSON"):
        list(EhrClient(conn()).download(f"{BASE}/bulk-files/j1/Patient.ndjson"))


# -- helpers ------------------------------------------------------------------------------------------

def test_retry_after_and_outcome_text():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    soon = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 55 <= retry_after_seconds(soon) <= 61
    assert outcome_text({"issue": [{"severity": "error", "code": "required",
                                    "details": {"coding": [{"code": "MSG_NO_MATCH", "display": "No match"}]}}]}) \
        == "error: No match"


# -- through urllib3 for real: Retry-After sleeps, timeouts, resets (the fault proxy, no upstream) -----

@pytest.fixture
def dead_end_proxy():
    """The fault proxy in front of a port nothing listens on: faults answer, anything else is 502."""
    with FaultProxy(f"http://127.0.0.1:{free_port()}/fhir") as proxy:
        yield proxy


def proxied(proxy, **kw):
    raw = {"base_url": proxy.base_url, "retries": {"max_attempts": 3, "backoff": 0.01}, **kw}
    return parse({"connections": {"p": raw}})["p"]


def test_retry_after_is_slept_by_urllib3(dead_end_proxy, monkeypatch):
    slept = []
    monkeypatch.setattr("urllib3.util.retry.time.sleep", lambda s: slept.append(s))
    dead_end_proxy.plan(Fault("status", status=429, retry_after=2), Fault("status", status=503, retry_after=1),
                        Fault("status", status=200, body=patient("p1")))
    assert EhrClient(proxied(dead_end_proxy)).read("Patient", "p1")["id"] == "p1"
    assert slept[:2] == [2, 1]
    assert [s for _, _, s, _ in dead_end_proxy.log] == [429, 503, 200]


def test_long_retry_after_is_capped(dead_end_proxy, monkeypatch):
    slept = []
    monkeypatch.setattr("urllib3.util.retry.time.sleep", lambda s: slept.append(s))
    dead_end_proxy.plan(Fault("status", status=429, retry_after=3600), Fault("status", status=200, body=patient("p1")))
    EhrClient(proxied(dead_end_proxy, retries={"max_attempts": 2, "max_retry_after": 5})).read("Patient", "p1")
    assert slept == [5]


def test_read_timeout_then_success(dead_end_proxy):
    dead_end_proxy.plan(Fault("hang", seconds=3), Fault("status", status=200, body=patient("p1")))
    c = EhrClient(proxied(dead_end_proxy, timeouts={"connect": 1, "read": 0.3}))
    assert c.read("Patient", "p1")["id"] == "p1"
    assert [k for *_, k in dead_end_proxy.log] == ["hang", "status"]


def test_timeouts_every_time_give_a_transient_error(dead_end_proxy):
    dead_end_proxy.plan(Fault("hang", seconds=3, times=2))
    c = EhrClient(proxied(dead_end_proxy, timeouts={"read": 0.2}, retries={"max_attempts": 2, "backoff": 0}))
    with pytest.raises(EhrError) as e:
        c.read("Patient", "p1")
    assert e.value.transient and e.value.status is None


def test_connection_reset_is_retried_for_get_not_for_unsafe_post(dead_end_proxy):
    dead_end_proxy.plan(Fault("reset"), Fault("status", status=200, body=patient("p1")))
    c = EhrClient(proxied(dead_end_proxy))
    assert c.read("Patient", "p1")["id"] == "p1"
    dead_end_proxy.clear()
    dead_end_proxy.plan(Fault("reset"), Fault("status", status=200, body={"resourceType": "Bundle",
                                                                          "type": "transaction-response"}))
    with pytest.raises(EhrError) as e:
        c.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": patient("x"), "request": {"method": "POST", "url": "Patient"}}]})
    assert e.value.transient and e.value.status is None
    assert sum(1 for m, *_ in dead_end_proxy.log if m == "POST") == 1


def test_unreachable_ehr():
    port = free_port()
    c = EhrClient(parse({"connections": {"x": {"base_url": f"http://127.0.0.1:{port}/fhir",
                                               "retries": {"max_attempts": 2, "backoff": 0}}}})["x"])
    with pytest.raises(EhrError) as e:
        c.read("Patient", "p1")
    assert e.value.transient and e.value.status is None and "127.0.0.1" not in urlsplit(e.value.message).path
