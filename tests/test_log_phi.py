"""Application logs hold no PHI: a realistic workload that exercises the logging paths (the example
clinic loaded through the API, searches by name, birth date and identifier over a real HTTP server,
bad bodies quoting a client's name, server errors whose message quotes PHI, a failed audit, the CLI
mapping bad records), then a scan of EVERYTHING logged during the test run so far (tests/conftest.py
captures every logger) for the example clinic's names, birth dates and MRNs. The scan runs again
at the end of the session (conftest ``pytest_sessionfinish``), so tests after this one are covered.
"""

from __future__ import annotations

import csv
import logging
import shutil
import socket
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from conftest import CAPTURED, CLINIC, phi_hits
from server_kit import LiveServer

from fhir_iop.audit.logs import WITHHELD, install, scrub, strip_query

with (CLINIC / "clients.csv").open(newline="", encoding="utf-8") as f:
    CLIENTS = list(csv.DictReader(f))
FIRST = CLIENTS[0]  # M100001


@pytest.fixture(scope="module")
def live_clinic(tmp_path_factory):
    from server import create_app
    db = tmp_path_factory.mktemp("logphi") / "clinic.sqlite"
    app = create_app({"DATABASE_URL": f"sqlite:///{db}", "TESTING": True, "INSECURE_NO_AUTH": True})
    with LiveServer(app) as server:
        yield app, server.url
    app.extensions["fhir_iop"].store.dispose()


def test_the_scanner_finds_what_it_looks_for():
    line = f"werkzeug:INFO: 127.0.0.1 - - \"GET /Patient?family={FIRST['family_name']} HTTP/1.1\" 200 -"
    assert phi_hits([line]) and phi_hits([f"born {FIRST['birth_date']}"]) and phi_hits([f"mrn={FIRST['mrn']}"])
    assert not phi_hits([f"Patient/{FIRST['mrn']}x loaded", "2 resource(s)"])


def test_scrubbing_keeps_paths_and_frames_but_not_queries_or_messages():
    assert strip_query('"GET /Patient?name=Shah&birthdate=1993-04-29 HTTP/1.1"') == \
        f'"GET /Patient?{WITHHELD} HTTP/1.1"'
    try:
        raise ValueError(f"cannot read {FIRST['given_names']} {FIRST['family_name']}")
    except ValueError:
        import sys
        rec = logging.LogRecord("fhir_iop.x", logging.ERROR, __file__, 1, "failed %s", ("Patient/1",), sys.exc_info())
    access = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, '%(h)s "%(r)s" %(s)s q=%(q)s',
                               ({"h": "10.0.0.1", "r": f"GET /Patient?family={FIRST['family_name']} HTTP/1.1",
                                 "s": "200", "q": f"family={FIRST['family_name']}"},), None)
    line = scrub(access).getMessage()
    assert line == f'10.0.0.1 "GET /Patient?{WITHHELD} HTTP/1.1" 200 q={WITHHELD}' and not phi_hits([line])
    text = logging.Formatter().format(scrub(rec))
    assert "failed Patient/1" in text and "test_log_phi.py" in text and "builtins.ValueError" in text
    assert FIRST["family_name"] not in text


def test_logs_of_a_realistic_workload_and_of_the_whole_run_hold_no_phi(live_clinic, tmp_path, monkeypatch):
    app, url = live_clinic
    install()
    before = len(CAPTURED)
    s = requests.Session()
    # 1. the example clinic, loaded through $load-iop
    files = [("files", (p.name, p.read_bytes(), "text/csv")) for p in sorted(CLINIC.glob("*.csv"))]
    r = s.post(f"{url}/$load-iop", files=files)
    assert r.status_code == 200, r.text
    # 2. searches by name, birth date and identifier, over HTTP (werkzeug logs each request line)
    for c in CLIENTS[:5]:
        b = s.get(f"{url}/Patient", params={"family": c["family_name"], "birthdate": c["birth_date"]}).json()
        assert b["total"] == 1
        assert s.get(f"{url}/Patient", params={"identifier": c["mrn"]}).json()["total"] == 1
        assert s.get(f"{url}/Patient", params={"name": c["given_names"].split("|")[0]}).status_code == 200
    # 3. bad bodies that quote a client (4xx): structure errors, bad JSON, bad XML, wrong type
    bad = {"resourceType": "Patient", "name": [{"family": FIRST["family_name"], "given": FIRST["given_names"]}],
           "birthDate": FIRST["birth_date"] + "T99", "identifier": [{"value": FIRST["mrn"]}], "bogus": True}
    assert s.post(f"{url}/Patient", json=bad).status_code in (400, 422)
    assert s.post(f"{url}/Patient", data=f'{{"resourceType": "Patient", "name": "{FIRST["family_name"]}"',
                  headers={"Content-Type": "application/fhir+json"}).status_code == 400
    xml = f'<Patient xmlns="http://hl7.org/fhir"><name><family value="{FIRST["family_name"]}"/></nam></Patient>'
    assert s.post(f"{url}/Patient", data=xml, headers={"Content-Type": "application/fhir+xml"}).status_code == 400
    assert s.put(f"{url}/Patient/not-a-client", json={**bad, "resourceType": "Encounter"}).status_code >= 400
    assert s.get(f"{url}/Patient/not-a-client").status_code == 404
    # 4. a server error whose exception message quotes PHI (the 500 handler logs it)
    from server import interactions

    def exploding(*a, **k):
        raise RuntimeError(f"cannot render {FIRST['given_names']} {FIRST['family_name']} born {FIRST['birth_date']}"
                           f" ({FIRST['mrn']})")
    monkeypatch.setattr(interactions, "read", exploding)
    pid = s.get(f"{url}/Patient", params={"identifier": FIRST["mrn"]}).json()["entry"][0]["resource"]["id"]
    r = s.get(f"{url}/Patient/{pid}")
    assert r.status_code == 500 and FIRST["family_name"] not in r.text
    monkeypatch.undo()
    # 5. an audit that cannot be written (the hook logs the failure)
    monkeypatch.setattr("server.audit_hook.facts", exploding)  # (what the request spools for its AuditEvent)
    assert s.get(f"{url}/Patient", params={"family": FIRST["family_name"]}).status_code == 500
    monkeypatch.undo()
    # 6. a malformed request line carrying a query (werkzeug's error log)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(f"GET /Patient?family={FIRST['family_name']}&birthdate={FIRST['birth_date']} HTTP/7.0\r\n\r\n"
                    .encode())
        raw.recv(1024)
    # 7. the CLI mapping bad records (a broken birth date and an unknown gender for a client)
    src = tmp_path / "in"
    shutil.copytree(CLINIC, src)
    rows = (src / "clients.csv").read_text(encoding="utf-8").splitlines()
    rows[1] = rows[1].replace(FIRST["birth_date"], FIRST["birth_date"][:4] + "-13-45").replace(",male,", ",mail,")
    (src / "clients.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    from fhir_iop.cli import main
    res = CliRunner().invoke(main, ["map", "to-fhir", str(src), "--out", str(tmp_path / "out.json")])
    assert res.exit_code != 0

    workload = CAPTURED[before:]
    # the workload went through the logging paths it was meant to exercise
    assert any(WITHHELD in line and line.startswith("werkzeug") for line in workload), workload[-20:]
    assert any("withheld" in line and "Traceback" in line for line in workload)
    assert any(line.startswith("fhir_iop.audit:ERROR") for line in workload)
    hits = phi_hits(CAPTURED)
    print(f"log PHI scan: {len(CAPTURED)} record(s) captured during the run so far "
          f"({len(workload)} from this workload); {len(hits)} holding a client's name, birth date or MRN")
    assert hits == [], hits[:10]


def test_phi_in_a_dev_server_log_line_would_be_found(tmp_path):
    """The capture is live: a record logged now is in CAPTURED (so the session-end scan would see it)."""
    logging.getLogger("fhir_iop.test").debug("capture probe %s", "Patient/123")
    assert CAPTURED[-1].endswith("capture probe Patient/123")
    assert Path(__file__).name  # keeps the module importable on its own
