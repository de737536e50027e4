"""42 CFR Part 2 at every exit of the facade: recipients × consents × exits.

The example clinic is loaded by the pipeline; client M100024 (42 encounters, a coverage, a care
plan, no consent in the clinic) is the one whose consent each row changes. For each recipient (an
EHR acting for treatment, a payer for payment, an unknown organization) and each consent (none,
covering, wrong purpose, wrong data class, expired, not yet started, revoked today), every exit is
exercised and the responses are scanned: nothing of M100024's leaves without a covering consent —
not in bodies, totals, counts, paging links or error text — and whatever does leave to an outside
recipient carries the Part 2 labels incl. NORDSCLCD and the §2.32 notice.
"""

from __future__ import annotations

import re
from datetime import date
from urllib.parse import urlsplit

import orjson
import pytest
from part2_kit import CONSENT_FOR, SCENARIOS, Api, clinic_url, part2_app, scenario_consent, store_of  # noqa: F401
from sqlalchemy import select

from fhir_iop.disclosure import NOTICE, notice_of
from fhir_iop.store.models import resource

MRN = "M100024"
MRN_SYSTEM = "https://harborlight.example.org/fhir/sid/mrn"
TEST_CONSENT = "CNS-MATRIX-1"


@pytest.fixture(scope="module")
def target(part2_app):
    """M100024's resources as the program itself sees them."""
    api = Api(part2_app, "internal")
    [entry] = api.get(f"/Patient?identifier={MRN_SYSTEM}|{MRN}").json["entry"]
    pid = entry["resource"]["id"]
    encounters = [e["resource"] for e in api.get(f"/Encounter?subject=Patient/{pid}&_count=200").json["entry"]]
    practitioner = next(p["individual"]["reference"].split("/")[1] for e in encounters
                        for p in e.get("participant", ()) if "individual" in p)
    with store_of(part2_app).reading() as tx:
        own = {(r.type, r.id) for r in tx.conn.execute(select(resource.c.type, resource.c.id, resource.c.body))
               if pid in (r.body or "")}
    assert len(encounters) == 42 and ("Coverage" in {t for t, _ in own})
    return {"pid": pid, "encounters": sorted(e["id"] for e in encounters), "practitioner": practitioner,
            "ids": {i for _, i in own} | {pid}, "care_plans": {i for t, i in own if t in ("CarePlan", "Goal")}}


def resources_in(body) -> list[dict]:
    """Every resource in a response: the body itself, Bundle entries, nested Bundles of a batch."""
    out = []
    if isinstance(body, dict):
        if body.get("resourceType") and body.get("resourceType") != "Bundle":
            out.append(body)
        for e in body.get("entry") or ():
            out += resources_in(e.get("resource"))
            out += resources_in((e.get("response") or {}).get("outcome"))
    return out


def set_consent(app, scenario: str, who: str) -> None:
    res = scenario_consent(scenario, TEST_CONSENT, MRN, CONSENT_FOR[who])
    store = store_of(app)
    with store.transaction() as tx:
        if res is None:
            from fhir_iop.mapping.common import MappingContext
            rid = MappingContext().rid("consent", TEST_CONSENT)
            with store.reading() as r:
                exists = r.conn.execute(select(resource.c.rid).where(resource.c.type == "Consent",
                                                                     resource.c.id == rid)).first()
            if exists:
                tx.delete("Consent", rid)
        else:
            tx.update("Consent", res["id"], res)


def exercise(app, who: str, t: dict) -> dict:
    """Every exit once; what M100024 resources each disclosed (ids) and facts about counts."""
    api = Api(app, who)
    pid, enc = t["pid"], t["encounters"][0]
    seen: dict[str, set] = {}
    facts: dict[str, object] = {}

    def note(exit_name, r):
        body = r.get_json(silent=True)
        seen[exit_name] = seen.get(exit_name, set()) | {x.get("id") for x in resources_in(body)} & t["ids"]
        return body

    r = api.get(f"/Patient/{pid}")
    facts["read patient"] = r.status_code
    note("read", r)
    r = api.get(f"/Encounter/{enc}")
    facts["read encounter"] = r.status_code
    note("read", r)
    r = api.get(f"/Encounter/{enc}/_history/1")
    facts["vread"] = r.status_code
    note("vread", r)
    b = note("search", api.get(f"/Encounter?subject=Patient/{pid}&_count=100"))
    facts["search total"] = b.get("total")
    b = note("count", api.get(f"/Encounter?subject=Patient/{pid}&_summary=count"))
    facts["summary count"] = b.get("total")
    b = note("count", api.get(f"/Encounter?subject=Patient/{pid}&_total=accurate&_count=0"))
    facts["count=0 total"] = b.get("total")
    # paging: follow next links with small pages
    url, pages, rows = f"/Encounter?subject=Patient/{pid}&_count=10", 0, 0
    while url:
        b = note("paging", api.get(url))
        pages += 1
        rows += len([e for e in b.get("entry") or () if e.get("search", {}).get("mode") == "match"])
        nxt = [lk["url"] for lk in b.get("link", ()) if lk["relation"] == "next"]
        url = (lambda u: f"{u.path}?{u.query}")(urlsplit(nxt[0])) if nxt else None
        assert pages < 20
    facts["paging"] = (pages, rows)
    note("_include", api.get(f"/Encounter?subject=Patient/{pid}&_include=Encounter:subject&_count=5"))
    note("_include", api.get(f"/Encounter?_id={enc}&_include=Encounter:subject"))
    note("_revinclude", api.get(f"/Patient?_id={pid}&_revinclude=Encounter:subject&_revinclude=Coverage:beneficiary"))
    note("_revinclude", api.get(f"/Practitioner?_id={t['practitioner']}&_revinclude=Encounter:participant"))
    r = api.get(f"/Encounter/{enc}/_history")
    facts["history instance"] = r.status_code
    note("history instance", r)
    note("history type", api.get("/Patient/_history?_count=100"))
    note("history type", api.get("/Coverage/_history?_count=100"))
    note("history system", api.get("/_history?_count=50"))
    b = note("batch GET", api.post("/", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "GET", "url": f"Encounter/{enc}"}},
        {"request": {"method": "GET", "url": f"Encounter/{enc}/_history/1"}},
        {"request": {"method": "GET", "url": f"Encounter?subject=Patient/{pid}"}}]}))
    facts["batch"] = [e["response"]["status"] for e in b["entry"]]
    # conditional create probing: does If-None-Exist on the client's MRN tell that it exists?
    probe = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": MRN}], "active": True}
    r = api.post("/Patient", probe, headers={"If-None-Exist": f"identifier={MRN_SYSTEM}|{MRN}"})
    facts["conditional create"] = r.status_code
    note("conditional create", r)
    created = r.headers.get("Location") if r.status_code == 201 else None
    ghost = api.post("/Patient", {**probe, "identifier": [{"system": MRN_SYSTEM, "value": "M999999"}]},
                     headers={"If-None-Exist": f"identifier={MRN_SYSTEM}|M999999"})
    facts["conditional create (nobody)"] = ghost.status_code
    with store_of(app).transaction() as tx:  # the probes' own Patients go again
        for loc in filter(None, [created, ghost.headers.get("Location")]):
            tx.delete("Patient", loc.split("/Patient/")[1].split("/")[0])
    facts["bodies"] = api.bodies
    return {"seen": seen, "facts": facts}


def disclosed(result) -> set:
    return set().union(*result["seen"].values())


def assert_marked(bodies: list[bytes]) -> int:
    """Every Part 2 resource in the responses carries NORDSCLCD and the notice; returns how many."""
    n = 0
    for raw in bodies:
        for res in resources_in(orjson.loads(raw) if raw else None):
            codes = {s.get("code") for s in (res.get("meta") or {}).get("security", ())}
            if "42CFRPart2" in codes:
                n += 1
                assert "NORDSCLCD" in codes and "R" in codes, res["resourceType"]
                assert notice_of(res) == NOTICE, res["resourceType"]
    return n


WITHHELD = {"read patient": 404, "read encounter": 404, "vread": 404, "search total": 0, "summary count": 0,
            "count=0 total": 0, "paging": (1, 0), "history instance": 404,
            "batch": ["404 Not Found", "404 Not Found", "404 Not Found", "200 OK"]}


@pytest.mark.parametrize("who", ["ehr", "payer", "unknown"])
def test_matrix_recipients_consents_exits(part2_app, target, who):
    counts = {}
    for scenario in SCENARIOS:
        set_consent(part2_app, scenario, who)
        result = exercise(part2_app, who, target)
        facts, bodies = result["facts"], result["facts"].pop("bodies")
        counts[scenario] = assert_marked(bodies)
        if scenario == "covering" and who != "unknown":
            # everything of the client leaves, through every exit, and every piece is marked
            assert facts["read patient"] == facts["read encounter"] == facts["vread"] == 200
            assert facts["search total"] == facts["summary count"] == facts["count=0 total"] == 42
            assert facts["paging"] == (5, 42)
            assert facts["history instance"] == 200 and facts["batch"] == ["200 OK"] * 4
            assert facts["conditional create"] == 200  # it may see the match, so it is told
            for exit_name in ("read", "vread", "search", "paging", "_include", "_revinclude", "history instance",
                              "history type", "batch GET", "conditional create"):
                assert result["seen"].get(exit_name), (who, exit_name)
            assert counts[scenario] > 42
            continue
        # zero disclosures: no exit shows any resource of the client (but the care plans a
        # care-plans-only consent lets go) ...
        allowed = target["care_plans"] if scenario == "wrong data class" and who != "unknown" else set()
        assert disclosed(result) <= allowed, (who, scenario, result["seen"])
        # ... nor tells that it exists: counts, pages, statuses are those of a client with nothing
        for k, v in WITHHELD.items():
            assert facts[k] == v, (who, scenario, k, facts[k])
        assert facts["conditional create"] == facts["conditional create (nobody)"] == 201
        # no id of the client's anywhere: not in links, references or error text
        asked = {target["pid"], target["encounters"][0]}  # ids in the request URLs (echoed by a 404)
        for raw in bodies if not allowed else ():  # (a disclosed care plan names its own references)
            for rid in target["ids"] - asked:
                assert rid.encode() not in raw, (who, scenario, raw[:300])
    set_consent(part2_app, "none", who)


def test_withheld_read_answers_exactly_like_a_missing_one(part2_app, target):
    api = Api(part2_app, "unknown")
    enc = target["encounters"][0]
    missing = "00000000-0000-5000-8000-000000000000"
    for path in ("/Encounter/{}", "/Encounter/{}/_history/1", "/Encounter/{}/_history"):
        a, b = api.get(path.format(enc)), api.get(path.format(missing))
        assert a.status_code == b.status_code == 404
        assert re.sub(enc, "X", a.get_data(as_text=True)) == re.sub(missing, "X", b.get_data(as_text=True))
        same = {"Content-Length", "X-Request-Id"}  # the id's length; a fresh id per request
        assert {k: v for k, v in a.headers.items() if k not in same} == \
            {k: v for k, v in b.headers.items() if k not in same}


@pytest.mark.parametrize("who", ["ehr", "payer"])
def test_revocation_takes_effect_on_the_next_request(part2_app, target, who):
    api = Api(part2_app, who)
    enc, pid = target["encounters"][0], target["pid"]
    set_consent(part2_app, "covering", who)
    assert api.get(f"/Encounter/{enc}").status_code == 200
    assert api.get(f"/Encounter?subject=Patient/{pid}&_summary=count").json["total"] == 42
    set_consent(part2_app, "revoked", who)  # the client revokes today
    assert api.get(f"/Encounter/{enc}").status_code == 404
    assert api.get(f"/Encounter?subject=Patient/{pid}&_summary=count").json["total"] == 0
    set_consent(part2_app, "covering", who)
    assert api.get(f"/Encounter/{enc}").status_code == 200
    set_consent(part2_app, "none", who)  # deleting the consent withdraws it too
    assert api.get(f"/Encounter/{enc}").status_code == 404


def test_emergency_access_discloses_marked(part2_app, target):
    set_consent(part2_app, "none", "unknown")
    enc = target["encounters"][0]
    assert Api(part2_app, "unknown").get(f"/Encounter/{enc}").status_code == 404
    api = Api(part2_app, "emergency")
    r = api.get(f"/Encounter/{enc}")
    assert r.status_code == 200
    assert notice_of(r.json) == NOTICE
    b = api.get(f"/Encounter?subject=Patient/{target['pid']}&_summary=count").json
    assert b["total"] == 42
    assert assert_marked(api.bodies) == 1


def test_internal_access_sees_everything_unmarked(part2_app, target):
    api = Api(part2_app, "internal")
    r = api.get(f"/Encounter/{target['encounters'][0]}")
    assert r.status_code == 200 and notice_of(r.json) is None
    assert "42CFRPart2" in {s["code"] for s in r.json["meta"]["security"]}
    assert api.get(f"/Encounter?subject=Patient/{target['pid']}&_summary=count").json["total"] == 42


def test_the_clinics_own_consents_as_signed(part2_app, monkeypatch):
    """The example clinic's consents (consents.csv) on a day they are all in force: each recipient
    gets exactly the data classes its client signed for, and a revoked consent gives nothing."""
    import fhir_iop.disclosure.gate as gate_module
    monkeypatch.setattr(gate_module, "today", lambda: date(2026, 6, 1))
    internal = Api(part2_app, "internal")

    def patient(mrn):
        return internal.get(f"/Patient?identifier={MRN_SYSTEM}|{mrn}").json["entry"][0]["resource"]["id"]

    def count(api, query):
        return api.get(f"{query}&_summary=count").json["total"]

    p1, p5 = patient("M100001"), patient("M100005")
    ehr, payer, bayshore = Api(part2_app, "ehr"), Api(part2_app, "payer"), Api(part2_app, "bayshore")
    everything = {rt: count(internal, f"/{rt}?subject=Patient/{p1}") for rt in ("Encounter", "Observation",
                                                                                 "DiagnosticReport")}
    assert all(everything.values())
    # Riverside (TREAT): enrollment, encounters, drug screens, medications, care plans; no demographics
    assert ehr.get(f"/Patient/{p1}").status_code == 404
    assert {rt: count(ehr, f"/{rt}?subject=Patient/{p1}") for rt in everything} == everything
    assert count(ehr, f"/Coverage?beneficiary=Patient/{p1}") == 0
    b = ehr.get(f"/Encounter?subject=Patient/{p1}&_include=Encounter:subject&_count=3").json
    assert {e["resource"]["resourceType"] for e in b["entry"]} == {"Encounter"}
    # Aetna (HPAYMT): demographics, enrollment, encounters, coverage; no drug screens
    assert payer.get(f"/Patient/{p1}").status_code == 200
    assert count(payer, f"/Coverage?beneficiary=Patient/{p1}") == 1
    assert count(payer, f"/Observation?subject=Patient/{p1}") == count(payer, f"/DiagnosticReport?subject=Patient/{p1}") == 0
    b = payer.get(f"/Encounter?subject=Patient/{p1}&_include=Encounter:subject&_count=3").json
    assert {e["resource"]["resourceType"] for e in b["entry"]} == {"Encounter", "Patient"}
    # Bayshore: M100005 revoked on 2026-03-03 (nothing now), but its other clients' consents stand
    assert count(internal, f"/Encounter?subject=Patient/{p5}") > 0
    assert count(bayshore, f"/Encounter?subject=Patient/{p5}") == 0
    assert count(bayshore, f"/Encounter?subject=Patient/{patient('M100014')}") > 0
    monkeypatch.setattr(gate_module, "today", lambda: date(2026, 3, 2))  # the day before the revocation
    assert count(bayshore, f"/Encounter?subject=Patient/{p5}") > 0
    assert assert_marked(ehr.bodies + payer.bodies + bayshore.bodies) > 0


def test_an_unknown_organization_counts_only_what_is_not_part2(part2_app):
    """Type-wide totals for a recipient without consents are exactly the unlabelled resources."""
    internal, stranger = Api(part2_app, "internal"), Api(part2_app, "unknown")
    label = "http://terminology.hl7.org/CodeSystem/v3-ActCode|42CFRPart2"
    for rt in ("Encounter", "Patient", "Observation", "Practitioner", "Consent"):
        everything = internal.get(f"/{rt}?_summary=count").json["total"]
        unlabelled = internal.get(f"/{rt}?_security:not={label}&_summary=count").json["total"]
        assert stranger.get(f"/{rt}?_summary=count").json["total"] == unlabelled <= everything
        page = stranger.get(f"/{rt}?_count=1000").json
        assert page.get("total", len(page.get("entry", ()))) == unlabelled == len(page.get("entry", ()))
        assert not any("42CFRPart2" in orjson.dumps(e["resource"]).decode() for e in page.get("entry", ()))
