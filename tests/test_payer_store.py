"""`fhir-iop payer export --database`: the payer export read from the FHIR store (reverse mapping), the same
Claims as from the record files, each disclosure audited; `fhir-iop payer groups`."""

from __future__ import annotations

import orjson
from click.testing import CliRunner
from sqlalchemy import select

from fhir_iop.cli import main
from fhir_iop.mapping.common import MappingContext
from fhir_iop.store import Store
from fhir_iop.store.iop import load
from fhir_iop.store.models import resource
from test_payer_export import CLINIC

ARGS = ["payer", "export", "--payer", "AETNA", "--from", "2026-01-01", "--to", "2026-03-31"]


def test_payer_export_from_the_store_equals_the_record_files_and_is_audited(tmp_path):
    url = f"sqlite:///{tmp_path / 'fhir.sqlite'}"
    store = Store(url)
    load(store, [CLINIC], MappingContext())
    from_files, from_store = tmp_path / "files.json", tmp_path / "store.json"
    r1 = CliRunner().invoke(main, [*ARGS, str(CLINIC), "--out", str(from_files)])
    r2 = CliRunner().invoke(main, [*ARGS, "--database", url, "--out", str(from_store)])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert "not audited" in r1.output and "not audited" not in r2.output
    a, b = (orjson.loads(p.read_bytes())["entry"] for p in (from_files, from_store))
    assert [e["resource"] for e in a] == [e["resource"] for e in b]
    claims = [e["resource"] for e in b if e["resource"]["resourceType"] == "Claim"]
    assert len(claims) == 7  # test_payer_export.test_the_example_clinic_totals
    from fhir_iop.disclosure import notice_of
    marked = {e["resource"]["resourceType"] for e in b if notice_of(e["resource"])}
    assert marked == {"Claim", "Coverage", "Encounter", "Patient"}  # all about a client carry the prohibition
    assert all(notice_of(e["resource"]) for e in b if e["resource"]["resourceType"] != "Organization")

    with store.reading() as tx:
        events = [orjson.loads(x) for x in tx.conn.execute(
            select(resource.c.body).where(resource.c.type == "AuditEvent")).scalars()]
    store.dispose()
    disclosures = [e for e in events if "payer export AETNA" in orjson.dumps(e).decode()]
    patients = sorted(x["what"]["reference"] for e in disclosures for x in e.get("entity", [])
                      if x.get("what", {}).get("reference", "").startswith("Patient/"))
    assert patients == sorted({c["patient"]["reference"] for c in claims})  # one per disclosed client
    for e in disclosures:
        refs = [x.get("what", {}).get("reference", "") for x in e["entity"]]
        assert any(r.startswith("Consent/") for r in refs) and any(r.startswith("Claim/") for r in refs)
        assert e["agent"][0]["who"]["identifier"]["value"] == "fhir-iop payer export (command line)"


def test_payer_export_needs_files_or_a_database_not_both(tmp_path):
    r = CliRunner().invoke(main, [*ARGS, "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "either" in r.output
    r = CliRunner().invoke(main, [*ARGS, str(CLINIC), "--database", "sqlite://", "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "either" in r.output


def test_payer_groups_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'fhir.sqlite'}"
    store = Store(url)
    load(store, [CLINIC], MappingContext())
    r = CliRunner().invoke(main, ["payer", "groups", "--database", url])
    assert r.exit_code == 0, r.output
    with store.reading() as tx:
        groups = [s.resource for s in tx.iter_current(("Group",))]
    store.dispose()
    import csv
    with open(CLINIC / "coverages.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["status"] == "active"]
    expected = {}
    for row in rows:
        expected.setdefault(row["payer_id"], set()).add(row["client_mrn"])
    assert {g["identifier"][0]["value"]: g["quantity"] for g in groups} == {p: len(m) for p, m in expected.items()}
    assert f"{len(groups)} payer Group(s)" in r.output
