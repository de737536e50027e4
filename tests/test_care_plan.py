"""care_plan ⇄ CarePlan and care_plan_goal ⇄ Goal: round trips, shape, codes, fixtures, bad input."""

from __future__ import annotations

import copy
import json
from datetime import date, timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from fhir_iop import pipeline
from fhir_iop.errors import Problem
from fhir_iop.fhir import r4
from fhir_iop.mapping.care_plan import (AFTERCARE_EXT, GOAL_PLAN_EXT, RELAPSE_EXT, REVIEW_EXT, SIGNATURE_EXT,
                                        XHTML)
from fhir_iop.mapping.common import ext_url, PART2_LABELS, PROFILES, MappingContext
from fhir_iop.records.io import dump_records
from fhir_iop.records.model import (CarePlan, CarePlanGoal, Client, Counselor, Enrollment, Intervention,
                                    LevelChange, Program, Review, Signature, StatusChange)
from fhir_iop.terminology import cs_url, load_terminology
from test_codes import allowed_codes, walk_codings
from test_roundtrip import by_type, write_bundle

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared FHIR fixtures not found at {FIXTURES}")
SNOMED = "http://snomed.info/sct"
ASSESS_PLAN = ("http://hl7.org/fhir/us/core/CodeSystem/careplan-category", "assess-plan")

# -- the records ----------------------------------------------------------------------------------

PROGRAM = Program(program_id="SUD-IOP", name="Harbor Light Adult SUD IOP", kind="substance-use")
COUNSELORS = [Counselor(counselor_id="C01", family_name="Rivera", given_names=["Ana"], role="counselor"),
              Counselor(counselor_id="C02", family_name="Okafor", given_names=["James"], role="psychiatrist")]
CLIENTS = [Client(mrn="M001", family_name="Smith", given_names=["John"], birth_date=date(1985, 3, 2)),
           Client(mrn="M002", family_name="Doe", given_names=["Jane"], birth_date=date(1990, 12, 1))]
ENROLLMENTS = [
    Enrollment(enrollment_id="E1", client_mrn="M001", program_id="SUD-IOP",
               status_history=[StatusChange(status="active", since=date(2026, 1, 5))],
               level_history=[LevelChange(level="IOP-6", since=date(2026, 1, 5))], admitted_on=date(2026, 1, 5),
               diagnoses=["F11.20", "F10.20"], primary_counselor="C01"),
    Enrollment(enrollment_id="E2", client_mrn="M002", program_id="SUD-IOP",
               status_history=[StatusChange(status="active", since=date(2026, 1, 12))],
               level_history=[LevelChange(level="IOP-6", since=date(2026, 1, 12))], admitted_on=date(2026, 1, 12),
               diagnoses=["F12.20"]),
]
TREATMENT = CarePlan(
    plan_id="CP-T1", client_mrn="M001", enrollment_id="E1", kind="treatment",
    title="Individualized treatment plan", status="active", created_on=date(2026, 1, 6), start=date(2026, 1, 6),
    end=date(2026, 3, 20), author_id="C01", problems=["F11.20", "F10.20"], goal_ids=["G1", "G2"],
    interventions=[Intervention(activity="group-therapy", count=3, period=1, unit="wk"),
                   Intervention(activity="individual-counseling", count=1, period=1, unit="wk"),
                   Intervention(activity="drug-screen", count=2, period=1, unit="wk"),
                   Intervention(activity="mat", count=1, period=1, unit="d")],
    support_contacts=["Sister Carla 555-0199"],
    reviews=[Review(reviewed_on=date(2026, 2, 5), reviewer_id="C02")],
    signatures=[Signature(signer="client", signed_on=date(2026, 1, 6))])
RELAPSE = CarePlan(
    plan_id="CP-R1", client_mrn="M001", enrollment_id="E1", kind="relapse-prevention",
    title="Relapse-prevention plan", status="active", created_on=date(2026, 2, 1), start=date(2026, 2, 1),
    author_id="C01", problems=["F11.20"], goal_ids=["G3"],
    interventions=[Intervention(activity="mutual-help", count=3, period=1, unit="wk"),
                   Intervention(activity="peer-support", count=1, period=2, unit="wk")],
    triggers=["payday", "old neighbourhood", "<b>& friends' \"parties\""],
    warning_signs=["skipping meetings", "isolating from family"],
    coping_strategies=["call my sponsor", "HALT check", "leave the situation"],
    support_contacts=["Sponsor Mike 555-0142", "Crisis line 988"],
    reviews=[Review(reviewed_on=date(2026, 2, 15), reviewer_id="C01"),
             Review(reviewed_on=date(2026, 3, 1), reviewer_id="C02")],
    signatures=[Signature(signer="client", signed_on=date(2026, 2, 1)),
                Signature(signer="counselor", signed_on=date(2026, 2, 1))])
AFTERCARE = CarePlan(
    plan_id="CP-A1", client_mrn="M002", enrollment_id="E2", kind="aftercare", title="Aftercare plan",
    status="draft", created_on=date(2026, 3, 10), start=date(2026, 3, 21), end=date(2026, 9, 21), author_id="C02",
    problems=["F12.20"], goal_ids=["G4"],
    interventions=[Intervention(activity="outpatient-therapy", count=1, period=1, unit="wk"),
                   Intervention(activity="psychiatric-follow-up", count=1, period=1, unit="mo")],
    aftercare_steps=["Weekly outpatient therapy at Riverside Clinic", "SMART Recovery Thursdays",
                     "Alumni group first Monday of the month"],
    signatures=[Signature(signer="guardian", signed_on=date(2026, 3, 12))])
GOALS = [
    CarePlanGoal(goal_id="G1", plan_id="CP-T1", client_mrn="M001", description="Stay off opioids",
                 target="negative screens for 8 weeks", start=date(2026, 1, 6), due=date(2026, 3, 3), status="active"),
    CarePlanGoal(goal_id="G2", plan_id="CP-T1", client_mrn="M001", description="Rebuild trust with my family",
                 status="proposed"),
    CarePlanGoal(goal_id="G3", plan_id="CP-R1", client_mrn="M001", description="Use a coping strategy every time",
                 due=date(2026, 4, 1), status="on-hold"),
    CarePlanGoal(goal_id="G4", plan_id="CP-A1", client_mrn="M002", description="Keep a job for 6 months",
                 target="employed on 2026-09-21", status="completed"),
]
PLANS = [TREATMENT, RELAPSE, AFTERCARE]
BASE = [PROGRAM, *COUNSELORS, *CLIENTS, *ENROLLMENTS]


def map_ok(records) -> list[dict]:
    ctx = MappingContext()
    ctx.seen_types |= {type(r).file_stem for r in records}
    out = list(pipeline.map_records(records, ctx, strict=True))
    problems = [o for o in out if not isinstance(o, dict)]
    assert problems == [], [str(p) for p in problems]
    return out


def round_trip(records, path: Path, encoding="json") -> dict[type, list]:
    write_bundle(map_ok(records), path, encoding)
    return by_type(pipeline.from_fhir([path]))


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    return map_ok(BASE + PLANS + GOALS)


def of_type(resources, rt):
    return {r["identifier"][0]["value"]: r for r in resources if r["resourceType"] == rt}


# -- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.kind)
def test_plan_and_its_goals_round_trip(tmp_path, plan):
    goals = [g for g in GOALS if g.plan_id == plan.plan_id]
    back = round_trip(BASE + [plan] + goals, tmp_path / "b.json")
    assert back[CarePlan] == [plan]
    assert back[CarePlanGoal] == goals


@pytest.mark.parametrize("encoding", ["json", "xml"])
def test_all_plans_round_trip(tmp_path, encoding):
    back = round_trip(BASE + PLANS + GOALS, tmp_path / f"b.{encoding}", encoding)
    assert back[CarePlan] == PLANS
    assert back[CarePlanGoal] == GOALS
    assert back[Enrollment] == ENROLLMENTS  # the plan's addresses do not take the Conditions away


def test_goal_read_without_its_plan_keeps_the_plan(tmp_path):
    """The goal-care-plan extension names the plan when the CarePlan is not in the input."""
    goals = [r for r in map_ok(BASE + PLANS + GOALS) if r["resourceType"] in ("Goal", "Patient")]
    write_bundle(goals, tmp_path / "g.json")
    assert by_type(pipeline.from_fhir([tmp_path / "g.json"]))[CarePlanGoal] == GOALS


def test_goal_without_extension_takes_its_plan_from_careplan_goal(tmp_path):
    """index() records CarePlan.goal, so a Goal written elsewhere (no plan extension) still finds its plan."""
    out = map_ok(BASE + PLANS + GOALS)
    for r in out:
        if r["resourceType"] == "Goal":
            r["extension"] = [e for e in r["extension"] if e["url"] != GOAL_PLAN_EXT]
    write_bundle(out, tmp_path / "b.json")
    assert by_type(pipeline.from_fhir([tmp_path / "b.json"]))[CarePlanGoal] == GOALS


# -- generated records --------------------------------------------------------------------------------

TERMS = load_terminology()
texts = st.text(st.characters(whitelist_categories=("L", "N", "P", "S", "Zs"), max_codepoint=0x2FFF),
                min_size=1, max_size=40).map(str.strip).filter(bool)
days = st.dates(min_value=date(2024, 1, 1), max_value=date(2027, 12, 31))


def code(cs_id):
    return st.sampled_from(sorted(TERMS.codes(cs_id)))


@st.composite
def plans_and_goals(draw):
    plans, goals = [], []
    for i in range(draw(st.integers(1, 3))):
        e = draw(st.sampled_from(ENROLLMENTS))
        kind = draw(code("care-plan-kind"))
        start = draw(days)
        rp = kind == "relapse-prevention"
        pid = f"CP{i}"
        goal_ids = [f"{pid}-G{k}" for k in range(draw(st.integers(0, 3)))]
        plans.append(CarePlan(
            plan_id=pid, client_mrn=e.client_mrn, enrollment_id=e.enrollment_id, kind=kind, title=draw(texts),
            status=draw(st.sampled_from(["draft", "active", "completed", "revoked"])),
            created_on=start - timedelta(days=draw(st.integers(0, 5))), start=start,
            end=draw(st.none() | st.just(start + timedelta(days=90))), author_id=draw(st.sampled_from(["C01", "C02"])),
            problems=draw(st.lists(st.sampled_from(e.diagnoses), unique=True)), goal_ids=goal_ids,
            interventions=draw(st.lists(st.builds(Intervention, activity=code("care-activity"),
                                                  count=st.integers(1, 7), period=st.integers(1, 4),
                                                  unit=st.sampled_from(["d", "wk", "mo"])), max_size=4)),
            triggers=draw(st.lists(texts, max_size=3)) if rp else [],
            warning_signs=draw(st.lists(texts, max_size=3)) if rp else [],
            coping_strategies=draw(st.lists(texts, max_size=3)) if rp else [],
            support_contacts=draw(st.lists(texts, max_size=2)),
            aftercare_steps=draw(st.lists(texts, max_size=3)) if kind == "aftercare" else [],
            reviews=draw(st.lists(st.builds(Review, reviewed_on=days, reviewer_id=st.sampled_from(["C01", "C02"])),
                                  max_size=2)),
            signatures=draw(st.lists(st.builds(Signature, signer=st.sampled_from(["client", "counselor", "guardian"]),
                                               signed_on=days), max_size=3))))
        for gid in goal_ids:
            goals.append(CarePlanGoal(
                goal_id=gid, plan_id=pid, client_mrn=e.client_mrn, description=draw(texts),
                target=draw(st.none() | texts), start=draw(st.none() | days), due=draw(st.none() | days),
                status=draw(st.sampled_from(["proposed", "active", "on-hold", "completed", "cancelled"]))))
    return plans, goals


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans_and_goals())
def test_generated_plans_round_trip(tmp_path_factory, generated):
    plans, goals = generated
    back = round_trip(BASE + plans + goals, tmp_path_factory.mktemp("gen") / "b.json")
    assert back[CarePlan] == plans
    assert back[CarePlanGoal] == goals


# -- shape, labels, codes -------------------------------------------------------------------------------

def test_every_resource_is_valid_profiled_and_part2_labelled(resources):
    mine = [r for r in resources if r["resourceType"] in ("CarePlan", "Goal")]
    assert len(mine) == len(PLANS) + len(GOALS)
    for r in mine:
        assert r4.structure_errors(r) == [], r["id"]
        name = "care_plan" if r["resourceType"] == "CarePlan" else "care_plan_goal"
        assert r["meta"]["profile"] == PROFILES[name]
        assert r["meta"]["security"] == list(PART2_LABELS)


def test_every_emitted_coding_is_allowed(resources):
    allowed = allowed_codes()
    for r in resources:
        if r["resourceType"] in ("CarePlan", "Goal"):
            for c in walk_codings(r):
                assert (c["system"], c["code"]) in allowed, (r["resourceType"], c)
                if c["system"].startswith("http://fhir-iop.org/"):
                    assert TERMS.code_systems[c["system"]][c["code"]] == c["display"]


def test_careplan_structure(resources):
    plans, ctx = of_type(resources, "CarePlan"), MappingContext()
    t, r, a = plans["CP-T1"], plans["CP-R1"], plans["CP-A1"]
    for plan, rec in ((t, TREATMENT), (r, RELAPSE), (a, AFTERCARE)):
        assert plan["intent"] == "plan" and plan["status"] == rec.status and plan["title"] == rec.title
        cats = [[(c["system"], c["code"]) for c in cc["coding"]] for cc in plan["category"]]
        assert cats[0] == [ASSESS_PLAN]
        assert cats[1] == [(cs_url("care-plan-kind"), rec.kind)]
        assert plan["subject"]["identifier"]["value"] == rec.client_mrn
        assert plan["author"]["identifier"]["value"] == rec.author_id
        assert plan["supportingInfo"] == [ctx.enrollment_ref(rec.enrollment_id)]
        assert plan["created"] == rec.created_on.isoformat()
        assert plan["period"]["start"] == rec.start.isoformat()
        assert [g["identifier"]["value"] for g in plan["goal"]] == rec.goal_ids
        assert [g["reference"] for g in plan["goal"]] == [f"Goal/{ctx.rid('care_plan_goal', g)}" for g in rec.goal_ids]
        assert [x["reference"] for x in plan["addresses"]] == [
            f"Condition/{ctx.rid('diagnosis', f'{rec.enrollment_id}|{c}')}" for c in rec.problems]
    # SNOMED 720177001 only on the relapse-prevention plan, as a category entry of its own
    assert [cc["coding"] for cc in r["category"][2:]] == [[{
        "system": SNOMED, "code": "720177001", "display": "Drug relapse prevention program (regime/therapy)"}]]
    assert len(t["category"]) == len(a["category"]) == 2
    # interventions: care-activity code, frequency, status from the plan's status
    acts = t["activity"]
    assert [x["detail"]["code"]["coding"][0]["code"] for x in acts] == [i.activity for i in TREATMENT.interventions]
    assert acts[0]["detail"]["scheduledTiming"] == {"repeat": {"frequency": 3, "period": 1, "periodUnit": "wk"}}
    assert {x["detail"]["status"] for x in acts} == {"in-progress"}
    assert {x["detail"]["status"] for x in a["activity"]} == {"scheduled"}  # a draft plan
    assert "period" in t and t["period"]["end"] == "2026-03-20"


def test_careplan_extensions(resources):
    r = of_type(resources, "CarePlan")["CP-R1"]
    ext = {}
    for e in r["extension"]:
        ext.setdefault(e["url"], []).append([(s["url"], next(v for k, v in s.items() if k.startswith("value")))
                                             for s in e["extension"]])
    (relapse,) = ext[RELAPSE_EXT]
    assert [v for u, v in relapse if u == "trigger"] == RELAPSE.triggers
    assert [v for u, v in relapse if u == "warning-sign"] == RELAPSE.warning_signs
    assert [v for u, v in relapse if u == "coping-strategy"] == RELAPSE.coping_strategies
    assert [v for u, v in relapse if u == "support-contact"] == ["Sponsor Mike 555-0142", "Crisis line 988"]
    assert [dict(x)["date"] for x in ext[REVIEW_EXT]] == ["2026-02-15", "2026-03-01"]
    assert [dict(x)["reviewer"]["identifier"]["value"] for x in ext[REVIEW_EXT]] == ["C01", "C02"]
    assert [dict(x) for x in ext[SIGNATURE_EXT]] == [{"signer": "client", "date": "2026-02-01"},
                                                     {"signer": "counselor", "date": "2026-02-01"}]
    assert AFTERCARE_EXT not in ext
    a = of_type(resources, "CarePlan")["CP-A1"]
    (steps,) = [e for e in a["extension"] if e["url"] == AFTERCARE_EXT]
    assert [s["valueString"] for s in steps["extension"]] == AFTERCARE.aftercare_steps
    assert RELAPSE_EXT not in {e["url"] for e in a["extension"]}


def test_narrative_is_generated_xhtml_with_record_text_escaped(resources):
    for plan in of_type(resources, "CarePlan").values():
        assert plan["text"]["status"] == "generated"
        div = etree.fromstring(plan["text"]["div"])  # well-formed
        assert div.tag == f"{{{XHTML}}}div"
    r = of_type(resources, "CarePlan")["CP-R1"]
    raw = r["text"]["div"]
    assert "&lt;b&gt;&amp; friends&#x27; &quot;parties&quot;" in raw and "<b>" not in raw
    text = "".join(etree.fromstring(raw).itertext())
    for item in [RELAPSE.title, *RELAPSE.triggers, *RELAPSE.warning_signs, *RELAPSE.coping_strategies,
                 *RELAPSE.support_contacts, *RELAPSE.goal_ids, "Peer recovery support: 1 per 2 wk",
                 "2026-03-01 by C02", "counselor, 2026-02-01", "People to call", "F11.20"]:
        assert item in text, item
    a_text = "".join(etree.fromstring(of_type(resources, "CarePlan")["CP-A1"]["text"]["div"]).itertext())
    assert all(step in a_text for step in AFTERCARE.aftercare_steps) and "guardian, 2026-03-12" in a_text


def test_goal_structure(resources):
    goals, ctx = of_type(resources, "Goal"), MappingContext()
    g1 = goals["G1"]
    assert g1["lifecycleStatus"] == "active"
    assert g1["category"] == [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/goal-category",
                                           "code": "behavioral", "display": "Behavioral"}]}]
    assert g1["description"] == {"text": "Stay off opioids"}
    assert g1["startDate"] == "2026-01-06"
    assert g1["target"] == [{"dueDate": "2026-03-03"}], "no target.detail: it would need a coded measure (gol-1)"
    assert g1["subject"] == ctx.client_ref("M001")
    assert g1["extension"] == [{"url": GOAL_PLAN_EXT,
                                "valueReference": ctx.ref("CarePlan", "care_plan", "CP-T1", ctx.systems.care_plan)},
                               {"url": ext_url("goal-target"), "valueString": "negative screens for 8 weeks"}]
    assert "target" not in goals["G2"] and "startDate" not in goals["G2"]
    assert goals["G3"]["target"] == [{"dueDate": "2026-04-01"}]


def test_mapping_twice_gives_the_same_resources():
    assert orjson.dumps(map_ok(BASE + PLANS + GOALS)) == orjson.dumps(map_ok(BASE + PLANS + GOALS))


# -- FHIR written elsewhere --------------------------------------------------------------------------

def from_fhir(tmp_path: Path, *resources: dict, name="in.json") -> list:
    path = tmp_path / name
    if len(resources) == 1:
        path.write_bytes(orjson.dumps(resources[0]))
    else:
        write_bundle(resources, path)
    return list(pipeline.from_fhir([path]))


def reported(items, rt: str) -> dict[str, Problem]:
    return {p.where.split(": ", 1)[1]: p for p in items if isinstance(p, Problem) and f": {rt}/" in p.where}


def assert_clean_report(p: Problem):
    assert p.severity == "warning" and p.code == "not-supported"
    for sign in ("Traceback", "KeyError", "TypeError", "NoneType", "AttributeError"):
        assert sign not in p.message


def fixture(rel: str) -> dict:
    return json.loads((FIXTURES / rel).read_text(encoding="utf-8"))


@needs_fixtures
@pytest.mark.parametrize("rel,field,words", [
    ("us-core/examples/careplan-ulcer-example.json", "CarePlan.category", "734163000"),
    ("us-core/examples/goal-1.json", "Goal", "no CarePlan"),
    ("us-core/examples/goal-sdoh-2.json", "Goal", "no CarePlan"),
    ("fhir-test-cases-r4-examples/goal-example.json", "Goal", "no CarePlan"),
])
def test_named_fixtures_are_reported_by_name_with_the_reason(rel, field, words):
    res = fixture(rel)
    items = list(pipeline.from_fhir([FIXTURES / rel]))
    (p,) = [i for i in items if isinstance(i, Problem)]
    assert not [i for i in items if not isinstance(i, Problem)]
    assert p.where.endswith(f"{res['resourceType']}/{res['id']}") and rel.rsplit("/", 1)[-1] in p.where
    assert p.field == field and words in p.message
    assert_clean_report(p)


@needs_fixtures
@pytest.mark.parametrize("bundle", sorted(p.name for p in (FIXTURES / "synthea-r4").glob("*.json"))
                         if FIXTURES.is_dir() else [])
def test_synthea_careplans_and_goals_are_reported_by_name(bundle):
    data = fixture(f"synthea-r4/{bundle}")
    items = list(pipeline.from_fhir([FIXTURES / "synthea-r4" / bundle]))
    assert not [i for i in items if isinstance(i, (CarePlan, CarePlanGoal))]
    for rt in ("CarePlan", "Goal"):
        ids = {e["resource"]["id"] for e in data["entry"] if e["resource"]["resourceType"] == rt}
        got = reported(items, rt)
        assert set(got) == {f"{rt}/{i}" for i in ids}
        for p in got.values():
            assert_clean_report(p)
            if rt == "CarePlan":  # Synthea's plans carry SNOMED plan types, no IOP plan kind
                assert p.field == "CarePlan.category" and "no plan kind" in p.message
            else:  # Lupe_Little's goals belong to a diabetes plan
                assert p.field == "Goal" and "the Goal's plan CarePlan/" in p.message


def iop_input(**changes) -> list[dict]:
    """fhir-iop output for the treatment plan, its client, enrollment, counselors and goals."""
    out = map_ok(BASE + [TREATMENT] + GOALS[:2])
    for r in out:
        if r["resourceType"] == "CarePlan":
            r.update(changes)
    return out


@needs_fixtures
@pytest.mark.parametrize("rel,goal_id,target,start", [
    ("us-core/examples/goal-1.json", "goal-1", None, None),
    ("fhir-test-cases-r4-examples/goal-example.json", "123", "Weight Measured: 160 lbs to 180 lbs", date(2015, 4, 5)),
])
def test_foreign_goal_listed_by_an_iop_plan_maps(tmp_path, rel, goal_id, target, start):
    """A Goal written elsewhere (no site identifier, no extension) maps once an IOP CarePlan lists it."""
    goal = fixture(rel)
    out = iop_input()
    plan = next(r for r in out if r["resourceType"] == "CarePlan")
    plan["goal"] = [{"reference": f"Goal/{goal['id']}"}]
    patient = next(r for r in out if r["resourceType"] == "Patient" and r["identifier"][0]["value"] == "M001")
    goal["subject"] = {"reference": f"Patient/{patient['id']}"}
    items = from_fhir(tmp_path, *[r for r in out if r["resourceType"] != "Goal"], goal)
    assert [i for i in items if isinstance(i, CarePlan)] == [TREATMENT.model_copy(update={"goal_ids": [goal_id]})]
    (g,) = [i for i in items if isinstance(i, CarePlanGoal)]
    assert g == CarePlanGoal(goal_id=goal_id, plan_id="CP-T1", client_mrn="M001",
                             description=goal["description"]["text"], target=target, start=start,
                             due=date.fromisoformat(goal["target"][0]["dueDate"]), status=goal["lifecycleStatus"])


@needs_fixtures
def test_foreign_goal_with_a_status_outside_the_record_is_reported(tmp_path):
    data = fixture("synthea-r4/" + next(p.name for p in (FIXTURES / "synthea-r4").glob("Lupe_Little*")))
    goal = next(e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Goal")
    out = iop_input()
    plan = next(r for r in out if r["resourceType"] == "CarePlan")
    plan["goal"] = [{"reference": f"Goal/{goal['id']}"}]
    goal = copy.deepcopy(goal) | {"subject": plan["subject"]}
    items = from_fhir(tmp_path, *[r for r in out if r["resourceType"] != "Goal"], goal)
    p = reported(items, "Goal")[f"Goal/{goal['id']}"]
    assert p.field == "Goal.lifecycleStatus" and "'accepted'" in p.message and "proposed, active" in p.message
    assert_clean_report(p)


def test_foreign_plan_with_snomed_relapse_prevention_category_maps(tmp_path):
    """Without the fhir-iop kind, SNOMED 720177001 reads back through the ConceptMap."""
    out = map_ok(BASE + [RELAPSE])
    plan = next(r for r in out if r["resourceType"] == "CarePlan")
    plan["category"] = [c for c in plan["category"] if c["coding"][0]["system"] == SNOMED]
    plan.pop("text")
    items = from_fhir(tmp_path, *out)
    assert [i for i in items if isinstance(i, CarePlan)] == [RELAPSE]


def test_foreign_plan_with_only_assess_plan_is_reported(tmp_path):
    out = map_ok(BASE + [TREATMENT])
    plan = next(r for r in out if r["resourceType"] == "CarePlan")
    plan["category"] = plan["category"][:1]
    items = from_fhir(tmp_path, *out)
    p = reported(items, "CarePlan")[f"CarePlan/{plan['id']}"]
    assert p.field == "CarePlan.category" and "assess-plan alone" in p.message
    assert_clean_report(p)


@pytest.mark.parametrize("change,field,words", [
    ({"supportingInfo": []}, "CarePlan.supportingInfo", "EpisodeOfCare"),
    ({"status": "on-hold"}, "CarePlan.status", "'on-hold'"),
    ({"title": None}, "CarePlan.title", "title"),
    ({"author": {"reference": "Practitioner/nowhere"}}, "CarePlan.author", "Practitioner"),
    ({"addresses": [{"reference": "Condition/nowhere"}]}, "CarePlan.addresses", "Condition/nowhere"),
    ({"goal": [{"reference": "Goal/nowhere"}]}, "CarePlan.goal", "Goal/nowhere"),
    ({"activity": [{"detail": {"code": {"coding": [{"system": SNOMED, "code": "229065009"}]},
                               "status": "in-progress"}}]}, "CarePlan.activity.detail.code", "229065009"),
    ({"activity": [{"detail": {"code": {"coding": [{"system": cs_url("care-activity"), "code": "mat"}]},
                               "status": "in-progress"}}]}, "CarePlan.activity.detail.scheduledTiming.repeat", "mat"),
])
def test_careplan_lacking_what_the_record_needs_is_reported(tmp_path, change, field, words):
    out = iop_input(**change)
    plan = next(r for r in out if r["resourceType"] == "CarePlan")
    for k in [k for k, v in plan.items() if v is None]:
        del plan[k]
    items = from_fhir(tmp_path, *out)
    p = reported(items, "CarePlan")[f"CarePlan/{plan['id']}"]
    assert p.field == field and words in p.message, str(p)
    assert_clean_report(p)


# -- bad input records ---------------------------------------------------------------------------------

def clinic(directory: Path, plans: list[dict], goals: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for model, records in ((Program, [PROGRAM]), (Counselor, COUNSELORS), (Client, CLIENTS),
                           (Enrollment, ENROLLMENTS)):
        (directory / f"{model.file_stem}.ndjson").write_bytes(dump_records(records, model, "ndjson"))
    for stem, rows in (("care_plans", plans), ("care_plan_goals", goals)):
        (directory / f"{stem}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return directory


def dumped(records) -> list[dict]:
    return [r.model_dump(mode="json", exclude_none=True) for r in records]


def run(directory: Path) -> tuple[list[dict], list[Problem]]:
    out = list(pipeline.to_fhir([directory]))
    return [o for o in out if isinstance(o, dict)], [o for o in out if isinstance(o, Problem)]


def assert_at(p: Problem, file: str, line: int, field: str):
    assert p.field == field, str(p)
    assert p.severity == "error"
    assert p.where.split(" (", 1)[0].endswith(f"{file}:{line}"), p.where


BAD_PLANS = [
    ("relapse field on a treatment plan", {**dumped([TREATMENT])[0], "plan_id": "BAD", "goal_ids": [],
                                           "triggers": ["payday"]}, "triggers", "relapse-prevention plan"),
    ("problem not among the enrollment's diagnoses", {**dumped([TREATMENT])[0], "plan_id": "BAD", "goal_ids": [],
                                                       "problems": ["F11.20", "F12.20"]},
     "problems", "F12.20 is not one of enrollment 'E1'"),
    ("unknown author", {**dumped([TREATMENT])[0], "plan_id": "BAD", "goal_ids": [], "author_id": "C99"},
     "author_id", "'C99' is not in this run's counselors"),
    ("enrollment of another client", {**dumped([AFTERCARE])[0], "plan_id": "BAD", "goal_ids": [],
                                       "client_mrn": "M001"}, "enrollment_id", "belongs to another client"),
]


@pytest.mark.parametrize("what,row,field,words", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_bad_plan_is_rejected_and_the_rest_still_map(tmp_path, what, row, field, words):
    good, _ = run(clinic(tmp_path / "good", dumped(PLANS), dumped(GOALS)))
    rows = dumped(PLANS)
    rows.insert(1, row)
    resources, problems = run(clinic(tmp_path / "bad", rows, dumped(GOALS)))
    (p,) = problems
    assert_at(p, "care_plans.ndjson", 2, field)
    assert words in p.message, p.message
    assert resources == good


BAD_GOALS = [
    ("unknown plan", {**dumped(GOALS[:1])[0], "goal_id": "BAD", "plan_id": "CP-NOPE"},
     "plan_id", "'CP-NOPE' is not in this run's care_plans"),
    ("not listed by its plan", {**dumped(GOALS[:1])[0], "goal_id": "BAD"},
     "plan_id", "does not list goal 'BAD'"),
    ("plan of another client", {**dumped(GOALS[:1])[0], "goal_id": "G4", "plan_id": "CP-A1"},
     "client_mrn", "belongs to another client"),
    ("goal status outside the record", {**dumped(GOALS[:1])[0], "goal_id": "BAD", "status": "accepted"},
     "status", "Input should be"),
]


@pytest.mark.parametrize("what,row,field,words", BAD_GOALS, ids=[b[0] for b in BAD_GOALS])
def test_bad_goal_is_rejected_and_the_rest_still_map(tmp_path, what, row, field, words):
    good, _ = run(clinic(tmp_path / "good", dumped(PLANS), dumped(GOALS)))
    rows = [g for g in dumped(GOALS) if g["goal_id"] != row["goal_id"]]
    rows.insert(2, row)
    resources, problems = run(clinic(tmp_path / "bad", dumped(PLANS), rows))
    (p,) = problems
    assert_at(p, "care_plan_goals.ndjson", 3, field)
    assert words in p.message, p.message
    expected = [r for r in good if not (r["resourceType"] == "Goal" and r["identifier"][0]["value"] == row["goal_id"])]
    assert resources == expected


def test_goal_of_a_rejected_plan_is_rejected_too(tmp_path):
    rows = dumped(PLANS)
    rows[0]["author_id"] = "C99"
    resources, problems = run(clinic(tmp_path, rows, dumped(GOALS)))
    assert {(p.field, p.where.rsplit(":", 1)[0].rsplit("/", 1)[-1]) for p in problems} == {
        ("author_id", "care_plans.ndjson"), ("plan_id", "care_plan_goals.ndjson")}
    assert len([p for p in problems if p.field == "plan_id"]) == 2  # G1 and G2 of CP-T1
    assert {r["identifier"][0]["value"] for r in resources if r["resourceType"] in ("CarePlan", "Goal")} == {
        "CP-R1", "CP-A1", "G3", "G4"}
