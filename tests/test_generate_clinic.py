"""examples/generate_clinic.py: the generated clinic holds every record type, referrals and outside
medications included, and maps to FHIR with nothing rejected (the benchmarks run on it)."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import orjson
from click.testing import CliRunner

from fhir_iop.cli import main

ROOT = Path(__file__).resolve().parents[1]
#: the outside medications' RxNorm codes, as ../shared/reference/domain-codes.md lists them
VERIFIED_RXNORM = {"1483744": "naltrexone hydrochloride 50 MG Oral Tablet",
                   "351267": "buprenorphine 8 MG / naloxone 2 MG Sublingual Tablet"}
NO_REFERRER = {"self", "family"}


def generator():
    spec = importlib.util.spec_from_file_location("generate_clinic", ROOT / "examples" / "generate_clinic.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up while it loads)
    spec.loader.exec_module(mod)
    return mod


def rows(d: Path, stem: str) -> list[dict]:
    with open(d / f"{stem}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_referrals_and_outside_medications_are_generated_and_map(tmp_path):
    gen = generator()
    counts = gen.generate(tmp_path / "a", clients=80, weeks=6)
    assert counts["referrals"] > 0 and counts["outside_medications"] > 0
    assert all(n > 0 for stem, n in counts.items()), counts  # every record type
    gen.generate(tmp_path / "b", clients=80, weeks=6)  # deterministic
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name

    d = tmp_path / "a"
    first = {}  # client → the first enrollment (a transfer's second one has no referral of its own)
    for e in rows(d, "enrollments"):
        first.setdefault(e["client_mrn"], e)
    referrals = {r["client_mrn"]: r for r in rows(d, "referrals")}
    assert len(referrals) == len(rows(d, "referrals"))  # one per client at most
    for mrn, e in first.items():
        assert (mrn in referrals) == (e["referral_source"] not in NO_REFERRER), (mrn, e["referral_source"])
        if mrn in referrals:
            r = referrals[mrn]
            assert r["program_id"] == e["program_id"]
            assert r["status"] == ("completed" if e["admitted_on"] else "active")
            assert r["reason_icd10cm"] == e["diagnoses"].split("|")[0]
            assert r["level"] == e["level_history"].split("@")[0]
    for m in rows(d, "outside_medications"):
        assert VERIFIED_RXNORM[m["rxnorm"]] == m["medication"]
        assert "Court" not in m["prescriber"] and "Probation" not in m["prescriber"]
        assert m["start"] < m["recorded_on"] and (not m["end"] or m["start"] < m["end"] < m["recorded_on"])

    out = tmp_path / "clinic.json"
    result = CliRunner().invoke(main, ["map", "to-fhir", str(d), "--out", str(out), "--strict"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output[-2000:]
    assert "0 rejected, 0 not mapped" in result.output
    types = [e["resource"]["resourceType"] for e in orjson.loads(out.read_bytes())["entry"]]
    assert types.count("ServiceRequest") == counts["referrals"]
    assert types.count("MedicationStatement") == counts["outside_medications"]
