"""Fuzzing the FHIR API (hypothesis, Flask test client): resource bodies mutated from the example
clinic's FHIR, random JSON and XML, random searches on every served type, random paths, methods and
headers — on SQLite and PostgreSQL, with authorization off (the functional ``app``) and on
(``secured_app``: without a token everything but the public endpoints is 401).

The properties: no 5xx, ever; every error is an OperationOutcome (JSON or XML as negotiated); every
success that has a body is FHIR. The number of cases is printed at the end of the run
(tests/conftest_fuzz.py; ``FHIR_IOP_FUZZ_EXAMPLES=N`` for longer runs).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlencode

import orjson
import pytest
from conftest_fuzz import (FHIR_KEYS, STATUSES, WEIRD, count, encode, fuzz_settings,  # noqa: F401
                           fuzz_summary, json_value, mutated, seeds)
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree
from server_kit import app, client, db_url, secured_app, token_for  # noqa: F401  (fixtures)

from fhir_iop.fhir import r4
from fhir_iop.store.params import RESOURCE_TYPES, load_registry

ROOT = Path(__file__).resolve().parents[1]
FHIR_JSON, FHIR_XML = "application/fhir+json", "application/fhir+xml"
#: endpoints that answer without a token
PUBLIC = ("/metadata", "/.well-known/smart-configuration", "/auth/token", "/auth/jwks")


def load_seeds(c, headers=None) -> None:
    """The seeds stored (PUT by id), so updates, reads and $validate on instances hit real rows."""
    bundle = {"resourceType": "Bundle", "type": "batch",
              "entry": [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                        for r in seeds()]}
    resp = c.post("/", data=orjson.dumps(bundle), content_type=FHIR_JSON, headers=headers or {})
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]


def budget(app, default: int) -> int:
    """Cases for one fuzzer: the full budget on SQLite, a third on PostgreSQL (same code paths, slower
    round trips; NUL bytes and encodings are what PostgreSQL adds)."""
    return default if app.config["DATABASE_URL"].startswith("sqlite") else max(default // 3, 20)


# -- the property --------------------------------------------------------------------------------------

#: the OAuth endpoints answer OAuth JSON (RFC 6749 errors, a JWKS, the SMART configuration), not FHIR
OAUTH = ("/.well-known/smart-configuration", "/auth/token", "/auth/jwks")


def check(resp, method: str = "GET", path: str = "") -> int:
    """No 5xx; errors are OperationOutcomes; bodies of successes are FHIR."""
    status = resp.status_code
    STATUSES[status] += 1
    if path.split("?")[0].rstrip("/") in OAUTH:
        assert status < 500, resp.get_data()[:500]
        if resp.get_data() and method != "HEAD":
            body = orjson.loads(resp.get_data())
            assert status < 400 or "error" in body or body.get("resourceType") == "OperationOutcome", body
        return status
    data = resp.get_data()
    assert status < 500, f"{status}: {data[:800]!r}"
    if method == "HEAD" or status in (204, 304) or not data:
        assert status < 400 or method == "HEAD", f"{status} without an OperationOutcome"
        return status
    ctype = resp.content_type or ""
    if "xml" in ctype:
        root = etree.fromstring(data, parser=r4.safe_parser())
        rt = etree.QName(root).localname
    else:
        assert "json" in ctype, f"{status} {ctype}: {data[:200]!r}"
        rt = orjson.loads(data).get("resourceType")
    if status >= 400:
        assert rt == "OperationOutcome", f"{status}: {data[:300]!r}"
    else:
        assert isinstance(rt, str) and rt, data[:300]
    return status


# -- strategies -----------------------------------------------------------------------------------------

PREFER = st.sampled_from([None, "return=minimal", "return=representation", "return=OperationOutcome",
                          "handling=strict", "handling=lenient", "respond-async", "return=", "x"])


# -- bodies ---------------------------------------------------------------------------------------

@st.composite
def body_request(draw):
    res = draw(mutated())
    rt = res.get("resourceType") if isinstance(res.get("resourceType"), str) else "Patient"
    rt = rt if rt in RESOURCE_TYPES else draw(st.sampled_from(RESOURCE_TYPES))
    rid = res.get("id") if isinstance(res.get("id"), str) and res.get("id") else "x"
    qid = quote(rid, safe="")
    choice = draw(st.sampled_from(["create", "update", "cond-update", "validate", "validate-instance",
                                   "transaction", "batch", "cond-create"]))
    headers = {}
    if (p := draw(PREFER)) is not None:
        headers["Prefer"] = p
    if draw(st.booleans()):
        headers["If-Match"] = draw(st.sampled_from(['W/"1"', '"2"', "3", "W/x", "*", ""]))
    if choice in ("transaction", "batch"):
        method = draw(st.sampled_from(["POST", "PUT", "DELETE", "GET", "PATCH"]))
        url = draw(st.sampled_from([rt, f"{rt}/{qid}", f"{rt}?identifier=a|b", "", "metadata", f"{rt}/{qid}/_history/1"]))
        entry = {"fullUrl": draw(st.sampled_from(["urn:uuid:0c4a1d3e-1c57-4f3e-9a34-0e7d2b9f8a11", "", "x:y",
                                                  f"http://localhost/{rt}/{qid}"])),
                 "resource": res, "request": {"method": method, "url": url}}
        body = {"resourceType": "Bundle", "type": choice, "entry": [entry, entry] if draw(st.booleans()) else [entry]}
        return "POST", "/", body, headers
    if choice == "cond-create":
        headers["If-None-Exist"] = draw(st.sampled_from(["identifier=a|b", "_id=x", "bogus=1", "", "name=%00"]))
        return "POST", f"/{rt}", res, headers
    return {"create": ("POST", f"/{rt}"), "update": ("PUT", f"/{rt}/{qid}"),
            "cond-update": ("PUT", f"/{rt}?identifier=urn:x|{quote(rid)}"), "validate": ("POST", f"/{rt}/$validate"),
            "validate-instance": ("POST", f"/{rt}/{qid}/$validate")}[choice] + (res, headers)


@pytest.fixture
def seeded(app):  # noqa: F811
    c = app.test_client()
    load_seeds(c)
    return c


def test_fuzz_mutated_clinic_resources(seeded, count):
    @fuzz_settings(budget(seeded.application, 120))
    @given(body_request(), st.sampled_from([None, "xml", "json"]))
    def run(req, fmt):
        method, url, body, headers = req
        if fmt:
            url += ("&" if "?" in url else "?") + f"_format={fmt}"
        resp = seeded.open(url, method=method, data=encode(body), content_type=FHIR_JSON, headers=headers)
        check(resp, method)
        count("api.mutated-resources")
    run()


def test_fuzz_random_json_and_bytes(seeded, count):
    target = st.sampled_from(["/Patient", "/Observation/x", "/", "/Encounter/$validate", "/Consent?identifier=a|b",
                              "/Patient/x/$validate"])
    body = st.one_of(json_value.map(encode), st.binary(max_size=300),
                     st.sampled_from([b"{" * 3000, b"[" * 50 + b"]" * 50, b'{"resourceType":"Patient","a":' * 200,
                                      b"\xef\xbb\xbf{}", b'{"resourceType":"Patient"}' * 2, b"\x00" * 10]))

    @fuzz_settings(budget(seeded.application, 80))
    @given(target, body, st.sampled_from([FHIR_JSON, "application/json", FHIR_XML, "text/plain", None,
                                          "application/fhir+json; charset=latin-1"]))
    def run(url, data, ctype):
        method = "PUT" if url.startswith("/Observation/x") or url.startswith("/Consent") else "POST"
        check(seeded.open(url, method=method, data=data, content_type=ctype), method)
        count("api.random-json-bytes")
    run()


@st.composite
def xml_body(draw):
    """FHIR XML of a clinic resource (or its mutation) with random byte-level damage and hostile inserts."""
    seed = draw(st.sampled_from(seeds()))
    try:
        xml = r4.to_xml(draw(mutated(seed)) if draw(st.booleans()) else seed)
    except Exception:
        xml = r4.to_xml(seed)
    xml = bytearray(xml)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(xml) - 1, 0)))
        if op == "flip" and xml:
            xml[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del xml[pos:pos + draw(st.integers(1, 50))]
        else:
            xml[pos:pos] = draw(st.sampled_from([b"<x/>", b"&xxe;", b"<!-- c -->", b"<![CDATA[x]]>", b"&#0;",
                                                 b'<extension url="u"><valueString value="\x01"/></extension>',
                                                 b"<?pi x?>", b"</Patient>", b"\xff\xfe", b"<div>"]))
    prefix = draw(st.sampled_from([b"", b'<?xml version="1.0" encoding="UTF-8"?>',
                                   b'<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
                                   b'<?xml version="1.1"?>', b"\xef\xbb\xbf"]))
    return seed["resourceType"], bytes(prefix + xml)


def test_fuzz_random_xml(seeded, count):
    @fuzz_settings(budget(seeded.application, 80))
    @given(xml_body(), st.sampled_from(["POST", "PUT", "VALIDATE"]))
    def run(item, how):
        rt, data = item
        method, url = {"POST": ("POST", f"/{rt}"), "PUT": ("PUT", f"/{rt}/fz1"),
                       "VALIDATE": ("POST", f"/{rt}/$validate")}[how]
        check(seeded.open(url, method=method, data=data, content_type=FHIR_XML), method)
        count("api.random-xml")
    run()


# -- searches ------------------------------------------------------------------------------------------

MODIFIERS = ["", ":exact", ":contains", ":missing", ":not", ":below", ":above", ":text", ":Patient", ":in", ":x",
             ":identifier", ":of-type"]
RESULT = ["_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_elements", "_total", "_format",
          "_id", "_lastUpdated", "_pretty", "_has:Observation:patient:code", "_contained", "_list", "_text", "_query"]
VALUES = st.one_of(
    st.sampled_from(WEIRD),
    st.text(max_size=25),
    st.builds(lambda p, d: p + d, st.sampled_from(["", "eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap", "zz"]),
              st.sampled_from(["2024", "2024-03", "2024-03-01", "2024-03-01T09:30:00Z", "2024-03-01T09:30:00+05:00",
                               "2024-3-1", "12", "-5.5e3", "x"])),
    st.builds(lambda s, c: f"{s}|{c}", st.sampled_from(["http://loinc.org", "", "urn:x"]), st.text(max_size=8)),
    st.builds(lambda t, i: f"{t}/{i}", st.sampled_from([*RESOURCE_TYPES, "X"]), st.text(max_size=8)),
    st.sampled_from(["Observation:patient", "Observation:subject:Patient", "*", "Encounter:x", "Patient:general-practitioner",
                     "-_lastUpdated", "date,-_id", "true", "false", "count", "text", "data", "accurate", "none",
                     "id,name", "xml", "0", "-1", "1000000", "3.5", "a,b,,c", "1,2", "9" * 25, "1e400",
                     "2147483648", "-9223372036854775809"]),
)


@st.composite
def search_request(draw):
    rt = draw(st.sampled_from(RESOURCE_TYPES))
    codes = sorted(load_registry().for_type(rt)) or ["_id"]
    pairs = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(codes) | st.sampled_from(RESULT) | st.text(max_size=10))
        pairs.append((name + draw(st.sampled_from(MODIFIERS)), draw(VALUES)))
    if pairs and draw(st.integers(0, 9)) == 0:  # around the search limits (tests/test_hardening.py)
        name, value = pairs[0]
        pairs += [(name, value)] * draw(st.integers(10, 25))
        pairs.append((name, ",".join([value or "x"] * draw(st.integers(50, 150)))))
    query = urlencode(pairs)
    if draw(st.booleans()):
        query += "&" + draw(st.sampled_from(["%ff", "%00", "a=%c3%28", "=", "&&", "x", "_count=", "%", "a=%2"]))
    method = draw(st.sampled_from(["GET", "GET", "POST-search", "HISTORY"]))
    return rt, method, query


def test_fuzz_searches_on_every_type(seeded, count):
    @fuzz_settings(budget(seeded.application, 150))
    @given(search_request(), st.sampled_from([None, "strict", "lenient"]))
    def run(req, handling):
        rt, how, query = req
        headers = {"Prefer": f"handling={handling}"} if handling else {}
        if how == "POST-search":
            resp = seeded.post(f"/{rt}/_search", data=query, content_type="application/x-www-form-urlencoded",
                               headers=headers)
            method = "POST"
        else:
            url = f"/{rt}/_history?{query}" if how == "HISTORY" else f"/{rt}?{query}"
            resp, method = seeded.get(url, headers=headers), "GET"
        check(resp, method)
        count("api.searches")
    run()


# -- paths, methods, headers ----------------------------------------------------------------------------

SEGMENTS = [*RESOURCE_TYPES, "AuditEvent", "Nonsense", "patient", "_history", "_search", "$validate", "$load-iop",
            "$everything", "$meta", "metadata", ".well-known", "smart-configuration", "auth", "token", "jwks", "1", "x",
            "..", ".", "%00", "%2F", "%ff", "_history", "1", "", "a" * 300, "Patient%00", "%E2%80%AE", "9" * 25]
HEADER_VALUES = st.sampled_from(["", "*/*", FHIR_JSON, FHIR_XML, "text/html", "text/plain", "application/json;q=0",
                                 "W/\"1\"", "W/\"x\"", "Bearer x", "Bearer " + "a" * 2000, "Basic Zm9vOmJhcg==",
                                 "true", "yes", "maybe", "handling=strict", "return=minimal", "identifier=a|b",
                                 "gzip", "multipart/form-data; boundary=x", "\t", "ÿ", "a" * 500]) | st.text(max_size=20)
HEADERS = ["Accept", "Content-Type", "If-Match", "If-None-Match", "If-None-Exist", "If-Modified-Since", "Prefer",
           "Authorization", "X-Fhir-Iop-Emergency", "Accept-Charset", "Content-Encoding", "X-Forwarded-For", "Origin"]


@st.composite
def raw_request(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    segs = draw(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=5))
    path = "/" + "/".join(segs).lstrip("/")  # (the test client would read "//x" as a host name)
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["_format=xml", "_format=bogus", "_pretty=true", "_count=-1", "%00",
                                            "_summary=count", "mode=delete", "profile=http://x", "_since=x",
                                            "_offset=" + "9" * 25, "_count=" + "9" * 25]))
    headers = {}
    for h in draw(st.lists(st.sampled_from(HEADERS), max_size=4, unique=True)):
        value = draw(HEADER_VALUES)
        if all(0x20 <= ord(ch) < 0x7f or ch == "\t" for ch in value):  # HTTP header values are ASCII on the wire
            headers[h] = value
    data = draw(st.one_of(st.just(b""), json_value.map(encode), st.sampled_from([orjson.dumps(s) for s in seeds()[:5]]),
                          st.binary(max_size=100)))
    return method, path, headers, data


def _safe_raw(method, path):
    """Kick-offs of work that outlives the request (bulk $export) stay out of the fuzzer."""
    return "$export" not in path


def test_fuzz_paths_methods_headers(seeded, count):
    @fuzz_settings(budget(seeded.application, 150))
    @given(raw_request())
    def run(req):
        method, path, headers, data = req
        if not _safe_raw(method, path):
            return
        check(seeded.open(path, method=method, data=data, headers=headers), method, path)
        count("api.paths-methods-headers")
    run()


# -- with authorization on ---------------------------------------------------------------------------------

def test_fuzz_unauthenticated_requests_get_401(secured_app, count):  # noqa: F811
    c = secured_app.test_client()

    @fuzz_settings(budget(secured_app, 150))
    @given(raw_request())
    def run(req):
        method, path, headers, data = req
        if not _safe_raw(method, path):
            return
        auth = headers.get("Authorization", "")
        if auth.startswith("Bearer") and len(auth) > 7:
            headers["Authorization"] = "Bearer not-a-token"
        status = check(c.open(path, method=method, data=data, headers=headers), method, path)
        public = path.split("?")[0].rstrip("/") in PUBLIC
        if not public:
            assert status == 401, (method, path, headers, status)
        count("api.unauthenticated")
    run()


def test_fuzz_with_a_narrow_token(secured_app, count):  # noqa: F811
    """A client that may only read and search Patients and Encounters fuzzes everything: 403s and 4xx,
    never a 5xx, and nothing written."""
    c = secured_app.test_client()
    admin = {"Authorization": token_for(secured_app, scopes="system/*.*", admin=True)}
    load_seeds(c, admin)
    narrow = token_for(secured_app, scopes="system/Patient.rs system/Encounter.rs")
    def stored() -> dict[str, int]:
        return {rt: c.get(f"/{rt}?_summary=count", headers=admin).json["total"] for rt in RESOURCE_TYPES}

    before = stored()

    @fuzz_settings(budget(secured_app, 100))
    @given(st.one_of(body_request(), raw_request().map(lambda r: (r[0], r[1], r[3], r[2]))))
    def run(req):
        method, url, body, headers = req
        if not _safe_raw(method, url):
            return
        headers = {**headers, "Authorization": narrow}
        data = body if isinstance(body, bytes) else encode(body)
        status = check(c.open(url, method=method, data=data, content_type=headers.pop("Content-Type", FHIR_JSON),
                              headers=headers), method, url)
        if method in ("PUT", "DELETE", "PATCH") or method == "POST" and url.split("?")[0] not in ("/", "/auth/token"):
            assert status >= 300 or "$validate" in url or "_search" in url, (method, url, status)
        count("api.narrow-token")
    run()
    assert stored() == before  # batches answered entry by entry: nothing was written
