"""The ``fhir-iop`` command as integration engineers run it: real files in, files out, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fhir_iop.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_to_fhir_transaction_bundle_and_back(tmp_path):
    code, _, err = run("map", "to-fhir", CLINIC, "--out", tmp_path / "b.json", "-q")
    assert code == 0, err
    bundle = orjson.loads((tmp_path / "b.json").read_bytes())
    assert bundle["type"] == "transaction"
    assert all(e["request"]["method"] == "PUT" for e in bundle["entry"])
    assert "0 rejected" in err
    code, _, err = run("map", "from-fhir", tmp_path / "b.json", "--out", tmp_path / "recs", "-q")
    assert code == 0, err
    for f in CLINIC.glob("*.csv"):
        back = (tmp_path / "recs" / f.name).read_text(encoding="utf-8").splitlines()
        orig = f.read_text(encoding="utf-8").splitlines()
        assert len(back) == len(orig), f.name


@pytest.mark.parametrize("fmt,encoding", [("collection", "json"), ("transaction", "xml"), ("ndjson", "json")])
def test_every_output_form_reads_back(tmp_path, fmt, encoding):
    out = tmp_path / ("nd" if fmt == "ndjson" else f"b.{encoding}")
    code, _, err = run("map", "to-fhir", CLINIC, "--out", out, "--format", fmt, "--encoding", encoding, "-q")
    assert code == 0, err
    inputs = sorted(out.glob("*.ndjson")) if fmt == "ndjson" else [out]
    code, _, err = run("map", "from-fhir", *inputs, "--out", tmp_path / "recs", "--format", "ndjson", "-q")
    assert code == 0, err
    assert (tmp_path / "recs" / "attendance.ndjson").stat().st_size > 0


def test_ndjson_with_xml_is_a_usage_error(tmp_path):
    code, _, err = run("map", "to-fhir", CLINIC, "--out", tmp_path / "nd", "--format", "ndjson", "--encoding", "xml")
    assert code == 2
    assert "NDJSON is JSON only" in err


def test_rejected_records_are_reported_and_the_rest_map(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(CLINIC, src)
    lines = (src / "clients.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    bad = lines[1].split(",")
    bad[header.index("birth_date")] = "1990-02-30"
    lines[1] = ",".join(bad)
    (src / "clients.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run("map", "to-fhir", src, "--out", tmp_path / "b.json")
    assert code == 1
    assert f"{src / 'clients.csv'}:2" in err and "[birth_date]" in err
    outcome = json.loads((tmp_path / "b.outcome.json").read_text())
    assert outcome["resourceType"] == "OperationOutcome"
    first = outcome["issue"][0]
    assert first["severity"] == "error" and first["expression"] == ["birth_date"]
    assert "clients.csv:2" in first["diagnostics"]
    bundle = orjson.loads((tmp_path / "b.json").read_bytes())
    patients = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert len(patients) == len(lines) - 2, "every other client still maps"


def test_unreadable_site_mappings_exit_2_and_write_nothing(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "ConceptMap-broken.json").write_text("{not json")
    code, _, err = run("map", "to-fhir", CLINIC, "--out", tmp_path / "b.json", "--mappings", site)
    assert code == 2
    assert "not valid JSON" in err
    assert not (tmp_path / "b.json").exists()


def test_console_script_and_demo(tmp_path):
    exe = Path(sys.executable).with_name("fhir-iop")
    if not exe.exists():
        pytest.skip("fhir-iop is not installed as a console script")
    proc = subprocess.run([exe, "demo", "--out", tmp_path], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "clinic-bundle.json").is_file()
    assert (tmp_path / "clinic-records" / "enrollments.csv").is_file()
    assert "0 rejected, 0 not mapped" in proc.stderr
