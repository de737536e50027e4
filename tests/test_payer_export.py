"""FHIR Claims (iop-claim), the Part 2 payment disclosure, and `fhir-iop payer export` on the example clinic."""

from __future__ import annotations

import csv
from datetime import date
from functools import lru_cache
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fhir_iop.cli import main
from fhir_iop.mapping.common import PART2_LABELS, MappingContext
from fhir_iop.payer.claim import PROFILE, TELEHEALTH_EXT
from fhir_iop.payer.export import export
from fhir_iop.payer.rollup import load_rules
from test_payer_rollup import MON, PERIOD, RULES, Clinic, day

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"


@lru_cache(maxsize=1)
def validator():
    from fhir_iop.validation import Options, Validator
    return Validator(options=Options(must_support=False))


def errors(resource: dict) -> list[str]:
    return [str(i) for i in validator().validate(resource, [PROFILE]) if i.severity in ("error", "fatal")]


def marked(resource: dict) -> dict:
    """What leaves carries the redisclosure mark (fhir_iop.disclosure.mark), and validates with it: the
    validator knows the DS4P extension and the THO code (fhir_iop/data/dependencies, cited codes)."""
    from fhir_iop.disclosure import notice_of
    assert notice_of(resource) is not None, resource["id"]
    return resource


def run(clinic: Clinic, payer="AETNA", period=PERIOD):
    return export(clinic.records, payer, *period, RULES, MappingContext())


# -- Claim ------------------------------------------------------------------------------------------

def test_a_claim_per_client_and_period_with_an_item_per_billable_day():
    c = Clinic().client("A").week("A", MON, (0, 4)).attend("A", day(2), modality="telehealth-video")
    c.counsel("A", day(4), 45)
    result = run(c)
    [claim] = result.claims
    assert errors(claim) == []
    assert claim["meta"]["profile"] == [PROFILE] and claim["meta"]["security"] == list(PART2_LABELS)
    assert (claim["use"], claim["status"], claim["created"]) == ("claim", "active", "2026-01-31")
    assert claim["type"]["coding"][0]["code"] == "professional"
    assert claim["priority"]["coding"][0]["code"] == "normal"
    assert claim["billablePeriod"] == {"start": "2026-01-01", "end": "2026-01-31"}
    assert claim["diagnosis"][0]["diagnosisCodeableConcept"]["coding"][0]["code"] == "F10.20"
    assert claim["insurance"][0]["preAuthRef"] == ["PA-A-AETNA"]
    items = claim["item"]
    assert [i["servicedDate"] for i in items] == ["2026-01-05", "2026-01-07", "2026-01-09"]
    assert {i["productOrService"]["coding"][0]["code"] for i in items} == {"H0015"}
    assert {i["revenue"]["coding"][0]["code"] for i in items} == {"0906"}
    assert [bool(i.get("extension")) for i in items] == [False, True, False]
    assert items[1]["extension"][0]["url"] == TELEHEALTH_EXT
    assert items[1]["extension"][0]["valueCoding"]["code"] == "telehealth-video"
    assert [len(i["encounter"]) for i in items] == [1, 1, 2]  # Friday: group + individual counselling
    # the references are the mapping's own ids: every one resolves inside the export
    ids = {f"{r['resourceType']}/{r['id']}" for r in result.resources}
    refs = {e["reference"] for i in items for e in i["encounter"]}
    refs |= {claim["patient"]["reference"], claim["provider"]["reference"],
             claim["insurance"][0]["coverage"]["reference"]}
    assert refs == ids
    assert run(c).claims == result.claims  # deterministic


def test_two_payers_two_claims_two_exports():
    c = Clinic().client("A", payer=None)
    c.coverage("A", "AETNA", end=day(8))
    c.coverage("A", "CIGNA", start=day(9))
    c.consent("A", "AETNA")
    c.consent("A", "CIGNA")
    c.week("A", MON).week("A", day(7))
    aetna, cigna = run(c, "AETNA"), run(c, "CIGNA")
    assert [len(x.claims[0]["item"]) for x in (aetna, cigna)] == [4, 2]
    assert aetna.claims[0]["id"] != cigna.claims[0]["id"]
    assert all(errors(cl) == [] for cl in aetna.claims + cigna.claims)


# -- Part 2 -----------------------------------------------------------------------------------------

def _clinic(with_b_consent: bool, **b_consent) -> Clinic:
    c = Clinic().client("A").client("WITHHELD", consent=False)
    if with_b_consent:
        c.consent("WITHHELD", "AETNA", **b_consent)
    c.week("A", MON).week("WITHHELD", MON).week("WITHHELD", day(7), (0, 2))
    c.attend("A", day(1), 100)
    return c


def test_a_client_without_payment_consent_is_absent_and_the_counts_do_not_show_it():
    with_consent, without = run(_clinic(True)), run(_clinic(False))
    assert with_consent.counts() == {"claims": 2, "billable days": 6, "short days": 3, "clients": 2}
    assert without.counts() == {"claims": 1, "billable days": 3, "short days": 1, "clients": 1}
    assert without.counts() == run(Clinic().client("A").week("A", MON).attend("A", day(1), 100)).counts()
    text = orjson.dumps([without.all(), without.counts(), [str(s) for s in without.rollup.short]])
    assert b"WITHHELD" not in text
    ctx = MappingContext()
    for kind, key in (("client", "WITHHELD"), ("coverage", "COV-WITHHELD-AETNA"),
                      ("attendance", f"GS-SUD-IOP-{MON:%Y%m%d}-in-person/WITHHELD")):
        assert ctx.rid(kind, key).encode() not in text
    assert b"WITHHELD" in orjson.dumps(with_consent.all())


@pytest.mark.parametrize("consent", [
    {"classes": ("encounters",)},                       # no coverage data class
    {"classes": ("coverage", "demographics")},           # no encounters
    {"classes": ("encounters", "coverage")},             # not the Patient and diagnoses a claim carries
    {"start": date(2026, 2, 1)},                         # not yet in force on the service days
])
def test_a_consent_that_does_not_cover_the_payment_disclosure_withholds(consent):
    assert b"WITHHELD" not in orjson.dumps(run(_clinic(True, **consent)).all())


def test_a_consent_to_another_payer_withholds():
    c = _clinic(False)
    c.consent("WITHHELD", "CIGNA")
    assert run(c).counts() == run(_clinic(False)).counts()


# -- the command, on the example clinic ----------------------------------------------------------------

def payers() -> list[str]:
    with open(CLINIC / "coverages.csv", newline="") as f:
        return sorted({row["payer_id"] for row in csv.DictReader(f)})


@pytest.mark.parametrize("payer", payers())
def test_payer_export_of_the_example_clinic(tmp_path, payer):
    out = tmp_path / "claims.json"
    res = CliRunner().invoke(main, ["payer", "export", "--payer", payer, "--from", "2026-01-01", "--to",
                                    "2026-03-31", str(CLINIC), "--out", str(out)])
    assert res.exit_code == 0, res.output
    bundle = orjson.loads(out.read_bytes())
    assert bundle["type"] == "collection"
    resources = [e["resource"] for e in bundle["entry"]]
    claims = [r for r in resources if r["resourceType"] == "Claim"]
    for claim in claims:
        assert errors(marked(claim)) == [], claim["id"]
    items = [i for c in claims for i in c["item"]]
    summary = res.output.strip().splitlines()[-1]
    assert f"{len(claims)} claims, {len(items)} billable days" in summary
    ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
    assert {e["reference"] for i in items for e in i["encounter"]} <= ids
    for i in items:  # per diem: one line a day, each day with at least 180 minutes attended
        assert i["quantity"] == {"value": 1}
        minutes = sum(next(r for r in resources if f"Encounter/{r['id']}" == e["reference"])["length"]["value"]
                      for e in i["encounter"])
        assert minutes >= 180
    per_client = {c["patient"]["reference"] for c in claims}
    assert len(per_client) == len({r["id"] for r in resources if r["resourceType"] == "Patient"})


def test_the_example_clinic_totals():
    rules = load_rules()
    from fhir_iop.payer.export import read_iop_records
    ctx = MappingContext()
    records, problems = read_iop_records([CLINIC], ctx)
    assert problems == []
    totals = {p: export(records, p, date(2026, 1, 1), date(2026, 3, 31), rules.for_payer(p), ctx).counts()
              for p in payers()}
    # consenting clients only: 15 clients have an HPAYMT consent to their payer (consents.csv); CIGNA's one
    # member has none, so CIGNA gets nothing
    assert totals == {
        "AETNA": {"claims": 7, "billable days": 88, "short days": 53, "clients": 6},
        "AMERIHEALTH": {"claims": 2, "billable days": 48, "short days": 32, "clients": 2},
        "CIGNA": {"claims": 0, "billable days": 0, "short days": 0, "clients": 0},
        "HZNBCBS": {"claims": 2, "billable days": 25, "short days": 4, "clients": 2},
        "NJMCD": {"claims": 4, "billable days": 51, "short days": 39, "clients": 4},
        "UHC": {"claims": 1, "billable days": 18, "short days": 20, "clients": 1}}
    assert sum(t["clients"] for t in totals.values()) == 15


def test_ndjson_format(tmp_path):
    res = CliRunner().invoke(main, ["payer", "export", "--payer", "AETNA", "--from", "2026-01-01", "--to",
                                    "2026-03-31", str(CLINIC), "--out", str(tmp_path), "--format", "ndjson"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Claim.ndjson", "Coverage.ndjson", "Encounter.ndjson",
                                                          "Organization.ndjson", "Patient.ndjson"]
    for line in (tmp_path / "Claim.ndjson").read_bytes().splitlines():
        assert errors(marked(orjson.loads(line))) == []


def test_bad_dates_are_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["payer", "export", "--payer", "AETNA", "--from", "2026-03-01", "--to",
                                    "2026-01-01", str(CLINIC), "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "--to is before --from" in res.output


def test_billing_and_rendering_providers_and_telehealth_told_by_the_encounter_class():
    from fhir_iop.records.model import CounselingSession
    c = Clinic().client("A").week("A", MON, (0, 4)).attend("A", day(2), modality="telehealth-video")
    c._add(CounselingSession, counseling_session_id="CS-A-FRI", client_mrn="A", enrollment_id="E-A", kind="individual",
           status="completed", counselor_id="C002", start=f"{day(4)}T13:00:00-05:00", end=f"{day(4)}T13:50:00-05:00",
           modality="in-person")
    result = run(c)
    [claim] = result.claims
    assert errors(claim) == []
    ctx = MappingContext()
    assert claim["provider"]["reference"] == f"Organization/{ctx.rid('program', 'SUD-IOP')}"  # billing
    assert [(t["sequence"], t["provider"]["reference"], t["role"]["coding"][0]["code"]) for t in claim["careTeam"]] == [
        (1, f"Practitioner/{ctx.rid('counselor', 'C001')}", "primary"),
        (2, f"Practitioner/{ctx.rid('counselor', 'C002')}", "primary")]
    assert {t["role"]["coding"][0]["system"] for t in claim["careTeam"]} == {
        "http://terminology.hl7.org/CodeSystem/claimcareteamrole"}
    assert [i["careTeamSequence"] for i in claim["item"]] == [[1], [1], [1, 2]]  # Friday: group + C002's session
    # no place-of-service code anywhere; telehealth shows in the supporting Encounters' class
    assert b"place-of-service" not in orjson.dumps(result.all()).lower() and "locationCodeableConcept" not in str(claim)
    encounters = {f"Encounter/{r['id']}": r for r in result.resources if r["resourceType"] == "Encounter"}
    classes = [{encounters[e["reference"]]["class"]["code"] for e in i["encounter"]} for i in claim["item"]]
    assert classes == [{"AMB"}, {"VR"}, {"AMB"}]
