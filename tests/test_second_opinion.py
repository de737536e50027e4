"""Validators nobody here wrote agree that what the mapping emits is valid R4: FHIR.js and fhirkit-rs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from fhir_iop import pipeline

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"


@pytest.fixture(scope="module")
def clinic_resources() -> list[dict]:
    out = list(pipeline.to_fhir([CLINIC]))
    assert all(isinstance(r, dict) for r in out)
    return out


def test_fhirjs_finds_no_errors(clinic_resources):
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "fhir").is_dir():
        pytest.skip("node or the npm package fhir is missing (./dev installs it)")
    proc = subprocess.run([node, str(ROOT / "tests" / "js" / "fhirjs_validate.js")],
                          input=b"\n".join(orjson.dumps(r) for r in clinic_resources),
                          capture_output=True, cwd=ROOT, env={"NODE_PATH": str(ROOT / "node_modules")},
                          check=True, timeout=600)
    results = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(clinic_resources)
    failed = [r for r in results if r["errors"]]
    assert failed == [], failed[:5]


def test_fhirkit_rs_finds_no_errors(clinic_resources):
    fhirkit = pytest.importorskip("fhirkit")
    failed = []
    for res in clinic_resources:
        issues = fhirkit.validate(orjson.dumps(res).decode())
        errors = [i for i in issues if i.severity == "error"]
        if errors:
            failed.append((res["resourceType"], res["id"], [str(e) for e in errors[:3]]))
    assert failed == [], failed[:5]


def test_fhirjs_catches_a_bad_status():
    """The second opinion can fail: a status outside the required binding is an error to it."""
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "fhir").is_dir():
        pytest.skip("node or the npm package fhir is missing (./dev installs it)")
    bad = {"resourceType": "Encounter", "id": "x", "status": "done", "class": {"code": "AMB"}}
    proc = subprocess.run([node, str(ROOT / "tests" / "js" / "fhirjs_validate.js")], input=orjson.dumps(bad),
                          capture_output=True, cwd=ROOT, env={"NODE_PATH": str(ROOT / "node_modules")},
                          check=True, timeout=60)
    assert any("done" in e for e in orjson.loads(proc.stdout)["errors"])


def test_fhirkit_rs_catches_a_structural_error():
    fhirkit = pytest.importorskip("fhirkit")
    issues = fhirkit.validate('{"resourceType":"Encounter","status":"finished","class":"AMB","bogus":1}')
    assert {str(i) for i in issues} >= {"error at Encounter.bogus: unknown element"}
