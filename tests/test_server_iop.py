"""IOP records into the store and back: `fhir-iop db upgrade`, `load`, `export`, and POST /$load-iop."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
from click.testing import CliRunner
from server_kit import app, client, db_url  # noqa: F401  (fixtures)

from fhir_iop.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_db_upgrade_then_load_twice_then_export(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    code, _, err = run("db", "upgrade", "--database", url)
    head = sorted(p.name[:4] for p in (ROOT / "fhir_iop" / "store" / "migrations" / "versions").glob("0*.py"))[-1]
    assert code == 0 and f"-> {head}" in err
    code, _, err = run("db", "upgrade", "--database", url)
    assert code == 0 and f"{head} -> {head}" in err
    code, _, err = run("load", CLINIC, "--database", url, "-q")
    assert code == 0, err
    assert "25 Patient" in err and "0 rejected" in err
    code, _, err = run("load", CLINIC, "--database", url, "-q")  # ids are stable: nothing changes
    assert code == 0 and "unchanged" in err and "created" not in err and "updated" not in err
    code, _, err = run("export", "--out", tmp_path / "records", "--database", url, "-q")
    assert code == 0, err
    for f in CLINIC.glob("*.csv"):
        back = (tmp_path / "records" / f.name).read_text(encoding="utf-8").splitlines()
        assert len(back) == len(f.read_text(encoding="utf-8").splitlines()), f.name


def test_load_reports_rejected_records_and_stores_the_rest(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(CLINIC, src)
    lines = (src / "clients.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    bad = lines[1].split(",")
    bad[header.index("birth_date")] = "not-a-date"
    (src / "clients.csv").write_text("\n".join([lines[0], ",".join(bad), *lines[2:]]) + "\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    problems = tmp_path / "load.outcome.json"
    code, _, err = run("load", src, "--database", url, "--problems", problems, "-q")
    assert code == 1
    assert "clients.csv:2" in orjson.loads(problems.read_bytes())["issue"][0]["diagnostics"]
    assert "24 Patient" in err


def test_export_of_fhir_written_by_an_ehr(client, tmp_path):
    """A Patient PUT through the API (as an EHR would) comes out as an IOP client record."""
    res = orjson.loads((ROOT.parent / "shared" / "fixtures" / "fhir-test-cases-r4-examples" /
                        "patient-example.json").read_bytes())
    r = client.put("/Patient/example", data=orjson.dumps(res), content_type="application/fhir+json")
    assert r.status_code == 201
    url = client.application.extensions["fhir_iop"].store.url
    code, _, err = run("export", "--out", tmp_path / "records", "--database", url, "-q")
    assert code == 0, err
    rows = (tmp_path / "records" / "clients.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 2 and rows[1].startswith("12345,Chalmers,Peter|James,1974-12-25,male")


def test_load_iop_endpoint(client):
    files = {"files": [(open(CLINIC / name, "rb"), name) for name in
                       ("programs.csv", "counselors.csv", "clients.csv", "coverages.csv")]}
    try:
        r = client.post("/$load-iop", data=files, content_type="multipart/form-data")
    finally:
        for f, _ in files["files"]:
            f.close()
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.json["resourceType"] == "OperationOutcome"
    assert "25 Patient" in r.json["issue"][0]["diagnostics"]
    assert client.get("/Patient?_summary=count").json["total"] == 25
    assert client.get("/Coverage?_summary=count").json["total"] == 23
    r = client.post("/$load-iop", data=b"x", content_type="text/csv")
    assert r.status_code == 415 and r.json["resourceType"] == "OperationOutcome"
    r = client.post("/$load-iop", data={"f": [(open(CLINIC / "clients.csv", "rb"), "people.csv")]},
                    content_type="multipart/form-data")
    assert r.status_code == 400
