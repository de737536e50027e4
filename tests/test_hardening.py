"""Hardened input: hostile XML (XXE, billion laughs, quadratic blowup), oversized and deeply nested
bodies, wrong media types, bytes that are not text — refused with an OperationOutcome and the right
status by the API, and with file + reason by the command line; never a 5xx, never half-done work."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import orjson
import pytest
import requests
from click.testing import CliRunner
from conftest_fuzz import count, fuzz_summary  # noqa: F401  (fixtures)
from server_kit import LiveServer, app, client, db_url  # noqa: F401  (fixtures)

from fhir_iop.cli import main
from fhir_iop.fhir import r4

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.642.99",
                                                      "value": "H-1"}],
           "name": [{"family": "Hardy", "given": ["Lee"]}], "birthDate": "1979-05-04"}


def assert_outcome(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    oo = orjson.loads(resp.get_data())
    assert oo["resourceType"] == "OperationOutcome"
    text = " ".join(i.get("diagnostics", "") for i in oo["issue"]).lower()
    for w in words:
        assert w.lower() in text, text
    return oo


def patient_count(client) -> int:
    return client.get("/Patient?_summary=count").json["total"]


# -- hostile XML ----------------------------------------------------------------------------------

def xml_patient(doctype: str, family: str, encoding: str = "UTF-8") -> str:
    return (f'<?xml version="1.0" encoding="{encoding}"?>\n{doctype}\n'
            f'<Patient xmlns="http://hl7.org/fhir"><name><family value="{family}"/></name></Patient>')


def listener():
    """A loopback TCP listener that records whether anything connected to it (an XXE fetch would)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    sock.settimeout(0.2)
    hits = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            hits.append(conn.recv(1024))
            conn.close()

    stop = threading.Event()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return sock.getsockname()[1], hits, lambda: (stop.set(), t.join(2), sock.close())


LOL = "".join(f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1)) * 10}">' for i in range(1, 10))
HOSTILE = {
    "xxe-file": '<!DOCTYPE Patient [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
    "xxe-parameter": '<!DOCTYPE Patient [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>',
    "billion-laughs": f'<!DOCTYPE Patient [<!ENTITY lol0 "lol">{LOL}]>',
    "quadratic-blowup": f'<!DOCTYPE Patient [<!ENTITY a "{"a" * 50_000}">]>',
    "external-dtd": '<!DOCTYPE Patient SYSTEM "file:///etc/passwd">',
}
USES = {"xxe-file": "&xxe;", "xxe-parameter": "x", "billion-laughs": "&lol9;", "quadratic-blowup": "&a;" * 2000,
        "external-dtd": "x"}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_xml_is_refused_by_the_api_and_nothing_is_stored(client, kind):
    body = xml_patient(HOSTILE[kind], USES[kind])
    for method, url in (("post", "/Patient"), ("put", "/Patient/h1"), ("post", "/Patient/$validate"),
                        ("post", "/")):
        r = getattr(client, method)(url, data=body.encode(), content_type=FHIR_XML)
        oo = assert_outcome(r, 400, "DOCTYPE")
        assert "root:" not in r.get_data(as_text=True)  # /etc/passwd never echoed
        assert oo["issue"][0]["code"] == "security"
    assert patient_count(client) == 0


def test_xxe_over_http_and_utf16_are_refused_without_a_network_fetch(client):
    port, hits, close = listener()
    try:
        for doctype in (f'<!DOCTYPE Patient [<!ENTITY x SYSTEM "http://127.0.0.1:{port}/secret">]>',
                        f'<!DOCTYPE Patient SYSTEM "http://127.0.0.1:{port}/patient.dtd">',
                        f'<!DOCTYPE Patient [<!ENTITY % d SYSTEM "http://127.0.0.1:{port}/evil.dtd"> %d;]>'):
            r = client.post("/Patient", data=xml_patient(doctype, "&x;").encode(), content_type=FHIR_XML)
            assert_outcome(r, 400, "DOCTYPE")
        utf16 = xml_patient(HOSTILE["xxe-file"], "&xxe;", "UTF-16").encode("utf-16")
        assert_outcome(client.post("/Patient", data=utf16, content_type=FHIR_XML), 400, "DOCTYPE")
    finally:
        close()
    assert hits == []
    assert patient_count(client) == 0


def test_plain_fhir_xml_still_works(client):
    r = client.post("/Patient", data=xml_patient("", "Hardy").encode(), content_type=FHIR_XML)
    assert r.status_code == 201, r.get_data(as_text=True)
    assert r.json["name"][0]["family"] == "Hardy"


def test_the_safe_parser_refuses_before_expanding():
    with pytest.raises(r4.XmlRefused):
        r4.parse_xml(xml_patient(HOSTILE["billion-laughs"], "&lol9;").encode())
    with pytest.raises(r4.XmlRefused):  # an entity declared in an otherwise harmless document
        r4.fromstring(b'<!DOCTYPE div [<!ENTITY a "b">]><div xmlns="http://www.w3.org/1999/xhtml">&a;</div>')
    assert r4.parse_xml(xml_patient("", "ok").encode()).tag == "{http://hl7.org/fhir}Patient"


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["xxe-file", "billion-laughs"])
def test_the_command_line_names_the_file_and_the_reason(tmp_path, kind):
    f = tmp_path / f"{kind}.xml"
    f.write_text(xml_patient(HOSTILE[kind], USES[kind]))
    code, out = run_cli("validate", f)
    assert code == 2 and str(f) in out and "DOCTYPE" in out
    code, out = run_cli("map", "from-fhir", f, "--out", tmp_path / "records")
    assert code != 0 and "root:" not in out
    problems = (tmp_path / "records" / "outcome.json").read_text()
    assert str(f) in problems and "DOCTYPE" in problems
    # the validator's narrative check refuses an entity-carrying div in JSON as well
    res = {"resourceType": "Patient", "text": {"status": "generated", "div": '<!DOCTYPE div [<!ENTITY a "b">]>'
                                                  '<div xmlns="http://www.w3.org/1999/xhtml">&a;</div>'}}
    j = tmp_path / "div.json"
    j.write_bytes(orjson.dumps(res))
    code, out = run_cli("validate", j)
    assert code == 1 and "DOCTYPE" in out


# -- size ----------------------------------------------------------------------------------------

@pytest.fixture
def small_app(db_url):  # noqa: F811
    from server import create_app
    a = create_app({"DATABASE_URL": db_url, "TESTING": True, "INSECURE_NO_AUTH": True, "MAX_CONTENT_LENGTH": 4096})
    yield a
    a.extensions["fhir_iop"].store.dispose()


def big_patient(n: int) -> bytes:
    return orjson.dumps({**PATIENT, "name": [{"family": "Hardy", "given": ["x" * 60] * (n // 64)}]})


def test_oversized_bodies_get_413_with_or_without_content_length(small_app):
    c = small_app.test_client()
    assert c.post("/Patient", data=big_patient(2000), content_type=FHIR_JSON).status_code == 201
    assert_outcome(c.post("/Patient", data=big_patient(10_000), content_type=FHIR_JSON), 413, "4096 bytes")
    assert_outcome(c.post("/", data=big_patient(10_000), content_type=FHIR_JSON), 413)
    # chunked: no Content-Length, the server says the input is terminated (as werkzeug and gunicorn do)
    import io
    r = c.post("/Patient", input_stream=io.BytesIO(big_patient(10_000)), content_type=FHIR_JSON,
               environ_overrides={"wsgi.input_terminated": True})
    assert_outcome(r, 413)
    assert c.get("/Patient?_summary=count").json["total"] == 1


def test_a_chunked_upload_over_the_wire_is_cut_off(small_app):
    def chunks():
        for _ in range(100):
            yield b" " * 1000
        yield big_patient(100)

    with LiveServer(small_app) as server:
        r = requests.post(f"{server.url}/Patient", data=chunks(), headers={"Content-Type": FHIR_JSON}, timeout=30)
        assert "Content-Length" not in r.request.headers and r.request.headers["Transfer-Encoding"] == "chunked"
        assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"
        ok = requests.post(f"{server.url}/Patient", data=iter([big_patient(100)]),
                           headers={"Content-Type": FHIR_JSON}, timeout=30)
        assert ok.status_code == 201, ok.text
        # IOP record files to $load-iop: the multipart parser stops at the limit too (nothing half-loaded)
        csv = (Path(__file__).resolve().parents[1] / "examples" / "clinic" / "attendance.csv").read_bytes()
        body = (b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="attendance.csv"\r\n\r\n'
                + csv + b"\r\n--xyz--\r\n")
        r = requests.post(f"{server.url}/$load-iop", data=iter([body[:3000], body[3000:]]),
                          headers={"Content-Type": "multipart/form-data; boundary=xyz"}, timeout=30)
        assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"


# -- JSON ------------------------------------------------------------------------------------------

def nested(depth: int) -> dict:
    """A Patient whose extension nests ``depth`` levels below the resource (as FHIR extensions may)."""
    ext: dict = {"url": "http://example.org/leaf", "valueString": "x"}
    levels = 1 + 2  # resource, extension array, extension object
    while levels < depth:
        ext = {"url": "http://example.org/n", "extension": [ext]}
        levels += 2
    return {**PATIENT, "extension": [ext]}


def test_deeply_nested_json_gets_400_and_reasonable_nesting_passes(client):
    assert client.post("/Patient", data=orjson.dumps(nested(30)), content_type=FHIR_JSON).status_code == 201
    assert_outcome(client.post("/Patient", data=orjson.dumps(nested(120)), content_type=FHIR_JSON), 400,
                   "nested deeper than 100")
    deep = b'{"resourceType":"Patient","extension":' + b"[" * 5000 + b"]" * 5000 + b"}"  # past orjson's own cap
    assert_outcome(client.post("/Patient", data=deep, content_type=FHIR_JSON), 400)
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": nested(150), "request": {"method": "POST", "url": "Patient"}}]}
    assert_outcome(client.post("/", data=orjson.dumps(bundle), content_type=FHIR_JSON), 400, "nested deeper")
    deep_xml = (b'<Patient xmlns="http://hl7.org/fhir">' + b'<extension url="u">' * 5000
                + b"</extension>" * 5000 + b"</Patient>")  # past libxml2's depth limit (huge_tree off)
    assert_outcome(client.post("/Patient", data=deep_xml, content_type=FHIR_XML), 400, "not FHIR XML")
    assert patient_count(client) == 1


@pytest.mark.parametrize("body, words", [
    (orjson.dumps({**PATIENT, "name": [{"family": "Ha\x00rdy"}]}), ["control character"]),
    (orjson.dumps({**PATIENT, "gender\x00": "female"}), ["control character"]),
    (orjson.dumps({**PATIENT, "name": [{"family": "Ha\x1brdy"}]}), ["control character"]),
    (b'{"resourceType":"Patient","name":[{"family":"Ha\x00rdy"}]}', ["not valid JSON"]),  # a raw NUL
    (b'{"resourceType":"Patient","name":[{"family":"Ha\xff\xferdy"}]}', ["not valid JSON"]),  # not UTF-8
    (b'{"resourceType":"Patient","name":[{"family":"\\ud800"}]}', ["not valid JSON"]),  # lone surrogate
    ('{"resourceType":"Patient","name":[{"family":"Hardy"}]}'.encode("utf-16"), ["not valid JSON"]),
    (b'{"resourceType":"Patient","meta":{"security":[{"code":"R"}]},"meta":{}}', ["twice", "meta"]),
    (b'[{"resourceType":"Patient"}]', ["not a JSON object"]),
    (b"", ["not valid JSON"]),
])
def test_bad_json_bytes_get_400(client, body, words):
    for method, url in (("post", "/Patient"), ("put", "/Patient/h2"), ("post", "/Patient/$validate")):
        assert_outcome(getattr(client, method)(url, data=body, content_type=FHIR_JSON), 400, *words)
    assert patient_count(client) == 0


def test_tab_newline_and_unicode_text_are_fine(client):
    res = {**PATIENT, "name": [{"family": "Ñúñez\tde la Peña", "text": "line 1\r\nline 2 — 患者"}]}
    r = client.post("/Patient", data=orjson.dumps(res), content_type=FHIR_JSON)
    assert r.status_code == 201, r.get_data(as_text=True)
    assert r.json["name"][0]["text"] == "line 1\r\nline 2 — 患者"


# -- media types -------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png",
                                          "application/octet-stream", None])
def test_a_body_that_is_neither_fhir_json_nor_xml_gets_415(client, content_type):
    body = orjson.dumps(PATIENT)
    for method, url in (("post", "/Patient"), ("put", "/Patient/h3"), ("put", "/Patient?identifier=H-1"),
                        ("post", "/"), ("post", "/Patient/$validate")):
        r = getattr(client, method)(url, data=body, content_type=content_type)
        assert_outcome(r, 415, "application/fhir+json")
    assert patient_count(client) == 0


@pytest.mark.parametrize("accept, fmt, status", [
    ("text/plain", None, 406), ("application/fhir+turtle", None, 406), ("image/*", None, 406),
    (None, "turtle", 406), (None, "text/plain", 406), ("application/fhir+xml", "bogus", 406),
    ("*/*", None, 200), ("application/*", None, 200), ("text/html,application/xhtml+xml,*/*;q=0.8", None, 200),
    ("text/html", None, 200), ("application/fhir+xml;q=0.9, text/plain", None, 200), (None, "xml", 200),
    (None, "application/fhir+json", 200), ("", None, 200),
])
def test_accept_and_format_we_cannot_produce_get_406(client, accept, fmt, status):
    headers = {"Accept": accept} if accept is not None else {}
    url = "/metadata" + (f"?_format={fmt}" if fmt else "")
    r = client.get(url, headers=headers)
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    if status == 406:
        assert r.content_type.startswith("application/fhir+json")
        assert_outcome(r, 406, "application/fhir+xml")


def test_406_is_decided_before_a_write(client):
    r = client.post("/Patient", data=orjson.dumps(PATIENT), content_type=FHIR_JSON, headers={"Accept": "text/csv"})
    assert_outcome(r, 406)
    assert patient_count(client) == 0


# -- paths and query strings ------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "/Patient?name=%00", "/Patient?family=Ha%00rdy", "/Patient?name=%ff%fe", "/Patient?_id=%c3%28",
    "/Patient/%00", "/Patient/abc%00def/_history", "/Patient/%ff", "/Observation?code=%1b[31m",
    "/Patient?_format=%00", "/%00/_history",
])
def test_nul_and_invalid_utf8_in_paths_and_queries_get_400(client, url):
    assert_outcome(client.get(url), 400, "UTF-8 or holds control characters")
    assert_outcome(client.delete(url), 400)


def test_a_refused_query_writes_nothing(client):
    r = client.put("/Patient?identifier=%00", data=orjson.dumps(PATIENT), content_type=FHIR_JSON)
    assert_outcome(r, 400)
    assert patient_count(client) == 0


def test_unicode_in_queries_still_searches(client):
    res = {**PATIENT, "name": [{"family": "Peña"}]}
    assert client.post("/Patient", data=orjson.dumps(res), content_type=FHIR_JSON).status_code == 201
    r = client.get("/Patient?family=pe%C3%B1a")
    assert r.status_code == 200 and r.json["total"] == 1


def test_every_module_parses_xml_through_the_safe_parser():
    """No lxml parse outside fhir_iop.fhir.r4 (a new reader would otherwise bypass the DOCTYPE refusal)."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for f in [*(root / "fhir_iop").rglob("*.py"), *(root / "server").rglob("*.py")]:
        text = f.read_text(encoding="utf-8")
        if f.name == "r4.py" and f.parent.name == "fhir":
            continue
        for needle in ("etree.fromstring(", "etree.parse(", "etree.XML(", "etree.iterparse(", "xml.etree",
                       "minidom", "xml.sax"):
            if needle in text:
                offenders.append(f"{f.relative_to(root)}: {needle}")
    assert offenders == []


def test_double_slashes_are_not_redirected_to_html(client):
    """werkzeug would answer with an HTML 308 (found by tests/test_fuzz_api.py)."""
    for url in ("/Patient//x", "/CarePlan/http%3A%2F%2F/$validate", "//Patient"):
        r = client.get(url)
        assert r.status_code in (400, 404) and r.json["resourceType"] == "OperationOutcome", (url, r.status_code)


def test_nul_in_every_other_way_a_search_arrives_gets_400(client):
    """Form-encoded POST _search, If-None-Exist, a Bundle entry's URL: parsed by one search parser, which
    refuses control characters (PostgreSQL would fail on a NUL with a 500)."""
    r = client.post("/Patient/_search", data="family=Ha%00rdy", content_type="application/x-www-form-urlencoded")
    assert_outcome(r, 400, "control character")
    r = client.post("/Patient", data=orjson.dumps(PATIENT), content_type=FHIR_JSON,
                    headers={"If-None-Exist": "identifier=H-1%00"})
    assert_outcome(r, 400, "control character")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": PATIENT, "request": {"method": "PUT", "url": "Patient?identifier=%00"}}]}
    assert_outcome(client.post("/", data=orjson.dumps(bundle), content_type=FHIR_JSON), 400, "control character")
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET",
                                                                              "url": "Patient?name=%1b"}}]}
    r = client.post("/", data=orjson.dumps(batch), content_type=FHIR_JSON)
    assert r.status_code == 200 and r.json["entry"][0]["response"]["status"].startswith("400")
    assert patient_count(client) == 0


def test_the_store_refuses_control_characters_from_any_writer(app):
    """The command line and sync write through the store, not the API's body checks."""
    from fhir_iop.store import Invalid
    store = app.extensions["fhir_iop"].store
    bad = {**PATIENT, "id": "nul1", "name": [{"family": "Ha\x00rdy"}]}
    for structure in (True, False):
        with pytest.raises(Invalid) as e, store.transaction() as tx:
            tx._validate(bad, structure=structure)
        assert "Patient.name[0].family" in str(e.value.issues) and "U+0000" in str(e.value.issues)
    with pytest.raises(Invalid), store.transaction() as tx:
        tx.update("Patient", "nul1", bad)


def test_record_files_with_control_characters_name_the_record_and_field(tmp_path):
    lines = (Path(__file__).resolve().parents[1] / "examples" / "clinic" / "clients.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("family_name")] = "Ha\x00rdy"
    (tmp_path / "clients.csv").write_text("\n".join([lines[0], ",".join(row), lines[2]]) + "\n")
    rec = {"mrn": "M1", "family_name": "Ha\x1brdy"}
    (tmp_path / "nd").mkdir()
    (tmp_path / "nd" / "clients.ndjson").write_bytes(orjson.dumps(rec) + b"\n")
    code, out = run_cli("map", "to-fhir", tmp_path / "clients.csv", "-o", tmp_path / "out.json")
    assert code == 1 and f"{tmp_path / 'clients.csv'}:2 [family_name]" in out and "U+0000" in out
    code, out = run_cli("map", "to-fhir", tmp_path / "nd" / "clients.ndjson", "-o", tmp_path / "out2.json")
    assert code == 1 and "clients.ndjson:1 [family_name]" in out and "U+001B" in out


def test_endpoints_that_answer_other_media_types_judge_accept_themselves(client):
    """A Bulk Data client asks for NDJSON files with Accept: application/fhir+ndjson, a JWKS fetcher for
    application/jwk-set+json: no 406 from the FHIR negotiation."""
    r = client.get("/auth/jwks", headers={"Accept": "application/jwk-set+json"})
    assert r.status_code == 200 and "keys" in r.json
    r = client.get("/.well-known/smart-configuration", headers={"Accept": "application/json"})
    assert r.status_code == 200
    r = client.get("/bulk-export/nope/Patient.ndjson", headers={"Accept": "application/fhir+ndjson"})
    assert r.status_code == 404 and r.json["resourceType"] == "OperationOutcome"
    assert_outcome(client.get("/Patient", headers={"Accept": "application/fhir+ndjson"}), 406)


def test_duplicate_name_detection_agrees_with_a_full_parse(count):
    """The cheap duplicate-name check (names written vs names parsed) against the stdlib's pairs, on random
    JSON with random spacing, escapes and planted duplicates."""
    import json

    from conftest_fuzz import fuzz_settings
    from hypothesis import given
    from hypothesis import strategies as st

    from server.errors import FhirHttpError
    from server.formats import parse_json

    names = st.sampled_from(["a", "b", 'q"', "\\", "é", ":", " ", "resourceType", "a:"]) | st.text(max_size=4)
    leaf = st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=6)
    value = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.lists(st.tuples(names, c), max_size=4)
                         .map(lambda pairs: ("obj", pairs)), max_leaves=12)

    def dump(v, sep, ascii_):
        if isinstance(v, tuple) and v[0] == "obj":
            return "{" + sep[0].join(json.dumps(k, ensure_ascii=ascii_) + sep[1] + dump(x, sep, ascii_)
                                     for k, x in v[1]) + "}"
        if isinstance(v, list):
            return "[" + sep[0].join(dump(x, sep, ascii_) for x in v) + "]"
        return json.dumps(v, ensure_ascii=ascii_)

    def has_dup(v):
        if isinstance(v, tuple) and v[0] == "obj":
            keys = [k for k, _ in v[1]]
            return len(keys) != len(set(keys)) or any(has_dup(x) for _, x in v[1])
        return isinstance(v, list) and any(has_dup(x) for x in v)

    @fuzz_settings(200)
    @given(st.lists(st.tuples(names, value), max_size=5), st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
           st.booleans())
    def run(pairs, sep, ascii_):
        doc = ("obj", [("resourceType", "Patient"), *pairs])
        data = dump(doc, sep, ascii_).encode()
        try:
            parse_json(data, 100)
            refused = None
        except FhirHttpError as e:
            refused = str(e)
        if has_dup(doc):
            assert refused and ("twice" in refused or "control character" in refused), data
        else:
            assert refused is None or "control character" in refused, (refused, data)
        count("hardening.duplicate-names")
    run()


@pytest.mark.parametrize("query, words", [
    ("&".join(f"identifier=a|{i}" for i in range(21)), "21 search criteria"),
    ("name=" + ",".join(f"n{i}" for i in range(101)), "101 values"),
    ("&".join("name=" + ",".join(f"n{i}" for i in range(90)) for _ in range(3)), "270 search values"),
    ("_sort=" + ",".join(["_id"] * 9), "_sort has 9 keys"),
    ("&".join(["_revinclude=Observation:patient"] * 33), "33 _include"),
])
def test_searches_past_the_limits_are_too_costly(client, query, words):
    """Each of these was a 500 (SQLite: expression tree too large) or took seconds to plan (PostgreSQL)."""
    oo = assert_outcome(client.get(f"/Patient?{query}"), 400, words)
    assert oo["issue"][0]["code"] == "too-costly"
    r = client.post("/Patient/_search", data=query, content_type="application/x-www-form-urlencoded")
    assert_outcome(r, 400, words)


def test_searches_at_the_limits_are_answered(client):
    at = ["&".join(f"identifier=a|{i},b|{i}" for i in range(20)), "name=" + ",".join(f"n{i}" for i in range(100)),
          "_sort=" + ",".join(["_id", "-_lastUpdated", "birthdate", "name", "family", "-given", "gender", "identifier"])]
    for q in at:
        r = client.get(f"/Patient?{q}")
        assert r.status_code == 200 and r.json["total"] == 0, r.get_data(as_text=True)[:300]


BIG = "9" * 25


@pytest.mark.parametrize("url, status", [
    (f"/Patient?_offset={BIG}", 400), (f"/Patient/_history?_offset={BIG}", 400), (f"/_history?_offset={BIG}", 400),
    (f"/Patient/x/_history/{BIG}", 404), (f"/Patient?_count={BIG}", 200), (f"/_history?_count={BIG}", 200),
    (f"/Observation?value-quantity={BIG}", 200), ("/Observation?value-quantity=1e400", 200),
    (f"/Patient?birthdate=ge{BIG}", 400),
])
def test_numbers_past_every_integer_column_are_answered(client, url, status):
    """A 25-digit _offset or version id overflowed SQLite's and PostgreSQL's integers (500s)."""
    r = client.get(url)
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    if status >= 400:
        assert r.json["resourceType"] == "OperationOutcome"
