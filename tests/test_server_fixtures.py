"""Material written by others (../shared/fixtures): the HL7 R4 and US Core examples of every type the
facade serves are accepted and read back equal apart from meta; the invalid ones get 422; a Synthea
transaction Bundle (urn:uuid references) is stored atomically with its references resolved."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from server_kit import app, client, db_url  # noqa: F401  (fixtures)

from fhir_iop.fhir import r4
from fhir_iop.store.params import RESOURCE_TYPES

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
HL7 = FIXTURES / "fhir-test-cases-r4-examples"
US_CORE = FIXTURES / "us-core" / "examples"
SYNTHEA = FIXTURES / "synthea-r4"

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures is not beside the checkout")


def _without_meta(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "meta"}


def _examples() -> list[tuple[Path, dict]]:
    out = []
    for f in sorted(HL7.glob("*.json")) + sorted(US_CORE.glob("*.json")):
        res = orjson.loads(f.read_bytes())
        if res.get("resourceType") in RESOURCE_TYPES:
            out.append((f, res))
    return out


def test_examples_of_every_served_type_round_trip(client):
    examples = _examples()
    accepted, rejected, failures = set(), [], []
    for n, (f, res) in enumerate(examples):
        rt = res["resourceType"]
        # the same id may appear in both sets of examples: give each file its own
        rid = re.sub(r"[^A-Za-z0-9.-]", "-", f"{n:03d}-{f.stem}")[:64]
        body = {**res, "id": rid}
        r = client.put(f"/{rt}/{rid}", data=orjson.dumps(body), content_type="application/fhir+json")
        if r4.structure_errors(res):
            if r.status_code != 422:
                failures.append(f"{f.name}: invalid R4 but got {r.status_code}")
            rejected.append(f.name)
            continue
        if r.status_code != 201:
            failures.append(f"{f.name}: {r.status_code} {r.get_data(as_text=True)[:300]}")
            continue
        back = client.get(f"/{rt}/{rid}").json
        if _without_meta(back) != _without_meta(body):
            failures.append(f"{f.name}: read back differs")
        elif {k: v for k, v in (res.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")} != \
                {k: v for k, v in back["meta"].items() if k not in ("versionId", "lastUpdated")}:
            failures.append(f"{f.name}: meta.profile/tag/security not kept")
        accepted.add(rt)
    assert not failures, "\n".join(failures)
    assert accepted == set(RESOURCE_TYPES)
    assert rejected == ["diagnosticreport-cbc.json"]  # text without div: invalid R4 (see fixtures README)


@pytest.mark.parametrize("name", ["condition-example.xml", "observation-example.xml", "observation-decimal.xml",
                                  "organization-1.xml", "patient-example.xml", "medicationdispenseexample8.xml"])
def test_xml_examples_are_accepted(client, name):
    data = (HL7 / name).read_bytes()
    expected = r4.from_xml_element(r4.parse_xml(data))
    rt = expected["resourceType"]
    r = client.post(f"/{rt}", data=data, content_type="application/fhir+xml")
    assert r.status_code == 201, r.get_data(as_text=True)
    back = client.get(r.headers["Location"].split("/_history")[0].split("localhost", 1)[1]).json
    assert _without_meta({**back, "id": None}) == _without_meta({**expected, "id": None})


def test_synthea_transaction_resolves_urn_uuid(client):
    path = sorted(SYNTHEA.glob("*.json"))[0]
    bundle = orjson.loads(path.read_bytes())
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] in RESOURCE_TYPES]
    kept = {e["fullUrl"] for e in bundle["entry"]}
    r = client.post("/", data=orjson.dumps(bundle), content_type="application/fhir+json")
    assert r.status_code == 200, r.get_data(as_text=True)[:2000]
    entries = r.json["entry"]
    assert len(entries) == len(bundle["entry"]) and all(e["response"]["status"] == "201 Created" for e in entries)
    pid = next(e["resource"]["id"] for e in entries if e["resource"]["resourceType"] == "Patient")
    enc = client.get(f"/Encounter?patient={pid}&_summary=count").json
    n_enc = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Encounter")
    assert enc["total"] == n_enc > 0
    for e in entries:  # no reference to an entry of the Bundle is left as urn:uuid
        text = orjson.dumps(e["resource"]).decode()
        assert not any(f'"reference":"{u}"' in text for u in kept)
