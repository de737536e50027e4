"""care_plan ⇄ CarePlan (US Core, assess-plan); care_plan_goal ⇄ Goal (US Core).

A CarePlan carries a generated XHTML narrative of the whole plan (US Core makes ``text`` must
support), the category ``assess-plan`` plus the plan kind in fhir-iop's ``care-plan-kind``
category (reference §8: no standard code exists for an aftercare plan) and, for a
relapse-prevention plan, SNOMED 720177001 from the ``care-plan-kind-to-snomed`` ConceptMap as a
category entry of its own. Interventions are activities coded ``care-activity`` with their
frequency in ``scheduledTiming``. Relapse-prevention content (with the people to call), aftercare
steps, reviews and signatures travel in complex fhir-iop extensions, so the round trip is exact.

Decisions:

* The enrollment: R4 CarePlan has no ``episodeOfCare`` element, so the plan names its
  EpisodeOfCare in ``supportingInfo`` (a reference carrying the enrollment identifier).
* A Goal's plan: R4 Goal has no reference to a CarePlan. The plan lists its goals in
  ``CarePlan.goal``; :func:`index` records from it which plan each Goal belongs to, and fhir-iop
  Goals also carry the ``goal-care-plan`` extension, so a Goal read without its plan still names it.
* FHIR written elsewhere: the kind comes from the ``care-plan-kind`` category, else from a
  category the ConceptMap reads back (SNOMED 720177001 → relapse-prevention). ``assess-plan``
  alone is not read as "treatment": every IOP plan kind carries it (an aftercare plan too), so it
  does not say which plan it is; such a plan is reported.
"""

from __future__ import annotations

from html import escape

from fhir_iop.errors import Problem
from fhir_iop.mapping.common import (client_of, ICD10CM, FhirIndex, MappingContext, Unmappable, cited, codings,
                                     date_part, ext_url, ext_value)
from fhir_iop.mapping.enrollment import condition_id
from fhir_iop.records.model import CarePlan, CarePlanGoal
from fhir_iop.terminology import cs_url

KIND_MAP = "care-plan-kind-to-snomed"
RELAPSE_EXT = ext_url("relapse-prevention")
AFTERCARE_EXT = ext_url("aftercare")
REVIEW_EXT = ext_url("care-plan-review")
SIGNATURE_EXT = ext_url("care-plan-signature")
GOAL_PLAN_EXT = ext_url("goal-care-plan")
GOAL_TARGET_EXT = ext_url("goal-target")
XHTML = "http://www.w3.org/1999/xhtml"
_ASSESS_PLAN = cited("careplan-assess-plan")
_BEHAVIORAL = cited("goal-behavioral")
#: relapse-prevention extension: record field -> sub-extension url (list fields, valueString each)
_RELAPSE_PARTS = {"triggers": "trigger", "warning_signs": "warning-sign",
                  "coping_strategies": "coping-strategy", "support_contacts": "support-contact"}
_LINKS = "care_plan:goal-links"   # ix.facts: [(goal reference, plan key, plan label, plan categories)]
_GOAL_PLANS = "care_plan:goal-plans"  # ix.facts: (links seen, goal key -> [(plan key, label, categories)])
_GOAL_STATUSES = ("proposed", "active", "on-hold", "completed", "cancelled")


def _narrative(p: CarePlan, ctx: MappingContext) -> dict:
    """A human-readable XHTML summary of the whole plan; every record text is escaped."""
    t = ctx.terminology
    kind = t.codes("care-plan-kind")[p.kind]
    period = f"from {p.start.isoformat()}" + (f" to {p.end.isoformat()}" if p.end else "")
    parts = [f"<h2>{escape(p.title)}</h2>",
             f"<p>{escape(kind)}, {escape(p.status)}, {period}; written {p.created_on.isoformat()} "
             f"by {escape(p.author_id)} for client {escape(p.client_mrn)} "
             f"(enrollment {escape(p.enrollment_id)}).</p>"]

    def section(heading: str, items) -> None:
        if items:
            parts.append(f"<h3>{heading}</h3><ul>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>")

    section("Problems", [f"{c} {t.value_set_display('sud-diagnoses', ICD10CM, c) or ''}".strip()
                         for c in p.problems])
    section("Goals", p.goal_ids)
    acts = t.codes("care-activity")
    section("Interventions", [f"{acts[i.activity]}: {i.count} per {i.period} {i.unit}" for i in p.interventions])
    section("Triggers", p.triggers)
    section("Warning signs", p.warning_signs)
    section("Coping strategies", p.coping_strategies)
    section("People to call", p.support_contacts)
    section("Aftercare steps", p.aftercare_steps)
    section("Reviews", [f"{r.reviewed_on.isoformat()} by {r.reviewer_id}" for r in p.reviews])
    section("Signatures", [f"{s.signer}, {s.signed_on.isoformat()}" for s in p.signatures])
    return {"status": "generated", "div": f'<div xmlns="{XHTML}">' + "".join(parts) + "</div>"}


def _activity_status(ctx: MappingContext, plan_status: str) -> str:
    (target,) = ctx.terminology.concept_map("care-plan-status-to-activity-status").translate(
        "http://hl7.org/fhir/request-status", plan_status)
    return target.code


def to_fhir(p: CarePlan, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"care plan {p.plan_id}"
    ctx.check_ref(where, "client_mrn", "clients", p.client_mrn, problems)
    ctx.check_ref(where, "enrollment_id", "enrollments", p.enrollment_id, problems)
    ctx.check_ref(where, "author_id", "counselors", p.author_id, problems)
    for r in p.reviews:
        ctx.check_ref(where, "reviews", "counselors", r.reviewer_id, problems)
    enrolled = ctx.enrollments.get(p.enrollment_id)
    if enrolled:
        if enrolled[0] != p.client_mrn:
            problems.append(Problem(where, f"enrollment {p.enrollment_id!r} belongs to another client",
                                    field="enrollment_id"))
        for code in p.problems:
            if code not in enrolled[2]:
                problems.append(Problem(where, f"problem {code} is not one of enrollment {p.enrollment_id!r}'s "
                                        f"diagnoses ({', '.join(enrolled[2]) or 'none'})", field="problems"))
    t = ctx.terminology
    category = [{"coding": [_ASSESS_PLAN]}, {"coding": [t.coding("care-plan-kind", p.kind)]}]
    category += [{"coding": [x.coding()]} for x in t.translate(KIND_MAP, "care-plan-kind", p.kind)]
    ext = []
    relapse = [{"url": sub, "valueString": v} for f, sub in _RELAPSE_PARTS.items() for v in getattr(p, f)]
    if relapse:
        ext.append({"url": RELAPSE_EXT, "extension": relapse})
    if p.aftercare_steps:
        ext.append({"url": AFTERCARE_EXT, "extension": [{"url": "step", "valueString": s} for s in p.aftercare_steps]})
    ext += [{"url": REVIEW_EXT, "extension": [{"url": "date", "valueDate": r.reviewed_on.isoformat()},
                                              {"url": "reviewer", "valueReference": ctx.counselor_ref(r.reviewer_id)}]}
            for r in p.reviews]
    ext += [{"url": SIGNATURE_EXT, "extension": [{"url": "signer", "valueString": s.signer},
                                                 {"url": "date", "valueDate": s.signed_on.isoformat()}]}
            for s in p.signatures]
    res = {"resourceType": "CarePlan", "id": ctx.rid("care_plan", p.plan_id), "meta": ctx.meta("care_plan", True),
           "text": _narrative(p, ctx)}
    if ext:
        res["extension"] = ext
    res |= {"identifier": [{"system": ctx.systems.care_plan, "value": p.plan_id}],
            "status": p.status, "intent": "plan", "category": category, "title": p.title,
            "subject": ctx.client_ref(p.client_mrn),
            "period": {"start": p.start.isoformat()} | ({"end": p.end.isoformat()} if p.end else {}),
            "created": p.created_on.isoformat(), "author": ctx.counselor_ref(p.author_id),
            "supportingInfo": [ctx.enrollment_ref(p.enrollment_id)]}
    if p.problems:
        res["addresses"] = [{"reference": f"Condition/{condition_id(ctx, p, c)}"} for c in p.problems]
    if p.goal_ids:
        res["goal"] = [ctx.ref("Goal", "care_plan_goal", g, ctx.systems.care_plan_goal) for g in p.goal_ids]
    if p.interventions:
        res["activity"] = [{"detail": {
            "code": {"coding": [t.coding("care-activity", i.activity)]}, "status": _activity_status(ctx, p.status),
            "scheduledTiming": {"repeat": {"frequency": i.count, "period": i.period, "periodUnit": i.unit}}}}
            for i in p.interventions]
    return [res]


def goal_to_fhir(g: CarePlanGoal, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"care plan goal {g.goal_id}"
    ctx.check_ref(where, "client_mrn", "clients", g.client_mrn, problems)
    ctx.check_ref(where, "plan_id", "care_plans", g.plan_id, problems)
    plan = ctx.plans.get(g.plan_id)
    if plan:
        if plan[0] != g.client_mrn:
            problems.append(Problem(where, f"care plan {g.plan_id!r} belongs to another client", field="client_mrn"))
        if g.goal_id not in plan[1]:
            problems.append(Problem(where, f"care plan {g.plan_id!r} does not list goal {g.goal_id!r} in its "
                                    "goal_ids", field="plan_id"))
    res = {"resourceType": "Goal", "id": ctx.rid("care_plan_goal", g.goal_id),
           "meta": ctx.meta("care_plan_goal", True),
           "extension": [{"url": GOAL_PLAN_EXT,
                          "valueReference": ctx.ref("CarePlan", "care_plan", g.plan_id, ctx.systems.care_plan)}],
           "identifier": [{"system": ctx.systems.care_plan_goal, "value": g.goal_id}],
           "lifecycleStatus": g.status, "category": [{"coding": [_BEHAVIORAL]}],
           "description": {"text": g.description}, "subject": ctx.client_ref(g.client_mrn)}
    if g.start:
        res["startDate"] = g.start.isoformat()
    if g.target:
        # Goal.target.detail needs a coded target.measure (R4 invariant gol-1), and an IOP goal's
        # target is free text, so the text travels in the goal-target extension.
        res["extension"].append({"url": GOAL_TARGET_EXT, "valueString": g.target})
    if g.due:
        res["target"] = [{"dueDate": g.due.isoformat()}]
    return [res]


# -- from FHIR ------------------------------------------------------------------------------------

def _kind(categories: list[dict], ctx: MappingContext) -> str | None:
    cs = cs_url("care-plan-kind")
    for c in codings(categories):
        if c.get("system") == cs and c.get("code") in ctx.terminology.codes("care-plan-kind"):
            return c["code"]
    for c in codings(categories):
        if kind := ctx.terminology.reverse(KIND_MAP, c.get("system"), c.get("code")):
            return kind
    return None


def _no_kind(label: str, categories: list[dict], field: str = "CarePlan.category") -> Unmappable:
    cats = ", ".join(f"{c.get('system', '?')}|{c.get('code')}" for c in codings(categories)) or "none"
    return Unmappable(f"{label} is not an IOP care plan: its category ({cats}) names no plan kind (fhir-iop "
                      "care-plan-kind, or SNOMED 720177001 for relapse prevention); assess-plan alone does "
                      "not tell a treatment plan from an aftercare plan", field)


def _subs(ext: dict) -> list[tuple[str, object]]:
    return [(s.get("url"), next((v for k, v in s.items() if k.startswith("value")), None))
            for s in ext.get("extension", ())]


def from_fhir(res: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    categories = res.get("category", [])
    kind = _kind(categories, ctx)
    if kind is None:
        raise _no_kind("this CarePlan", categories)
    mrn = client_of(res, "subject", ix, ctx)
    episodes = [r for r in res.get("supportingInfo", ())
                if (r.get("identifier") or {}).get("system") == ctx.systems.enrollment
                or (FhirIndex.ref_key(r) or "").startswith("EpisodeOfCare/")]
    enrollment_id = ix.resolve(episodes[0], ctx.systems.enrollment) if episodes else None
    if enrollment_id is None:
        raise Unmappable("no supportingInfo reference to the client's EpisodeOfCare: an IOP care plan belongs "
                         "to an enrollment", "CarePlan.supportingInfo")
    author_id = ix.resolve(res.get("author"), ctx.systems.counselor)
    if author_id is None:
        raise Unmappable("author does not resolve to a Practitioner in this input", "CarePlan.author")
    if res.get("status") not in ("draft", "active", "completed", "revoked"):
        raise Unmappable(f"status {res.get('status')!r} has no IOP plan status (draft, active, completed, "
                         "revoked)", "CarePlan.status")
    title = res.get("title") or res.get("description")
    if not title:
        raise Unmappable("no title (or description): an IOP care plan has a title", "CarePlan.title")
    period = res.get("period") or {}
    if not res.get("created") or not period.get("start"):
        raise Unmappable("an IOP care plan needs the date it was written (created) and its first day "
                         "(period.start)", "CarePlan.created" if not res.get("created") else "CarePlan.period.start")
    problems = []
    for a in res.get("addresses", ()):
        key = FhirIndex.ref_key(a)
        if ix.conditions.get(key) is None:
            raise Unmappable(f"addresses {a.get('reference')!r} is not a Condition with an ICD-10-CM code in "
                             "this input", "CarePlan.addresses")
        ix.consumed.add(key)
        problems.append(ix.conditions[key])
    goal_ids = []
    for g in res.get("goal", ()):
        gid = ix.resolve(g, ctx.systems.care_plan_goal)
        if gid is None:
            raise Unmappable(f"goal {g.get('reference')!r} is not a Goal in this input", "CarePlan.goal")
        goal_ids.append(gid)
    interventions = []
    for a in res.get("activity", ()):
        detail = a.get("detail") or {}
        activity = next((c.get("code") for c in codings(detail.get("code"))
                         if c.get("system") == cs_url("care-activity")), None)
        if activity is None:
            found = ", ".join(f"{c.get('system', '?')}|{c.get('code')}" for c in codings(detail.get("code")))
            raise Unmappable(f"an activity ({found or 'no detail.code'}) is not an IOP intervention "
                             "(care-activity code)", "CarePlan.activity.detail.code")
        rep = (detail.get("scheduledTiming") or {}).get("repeat") or {}
        if not rep.get("frequency") or not rep.get("period") or float(rep["period"]) != int(float(rep["period"])):
            raise Unmappable(f"activity {activity!r} has no whole-number frequency per period",
                             "CarePlan.activity.detail.scheduledTiming.repeat")
        interventions.append({"activity": activity, "count": rep["frequency"],
                              "period": int(float(rep["period"])), "unit": rep.get("periodUnit")})
    data = {f: [] for f in _RELAPSE_PARTS}
    data |= {"aftercare_steps": [], "reviews": [], "signatures": []}
    by_sub = {sub: f for f, sub in _RELAPSE_PARTS.items()}
    for e in res.get("extension", ()):
        url, subs = e.get("url"), _subs(e)
        if url == RELAPSE_EXT:
            for sub, v in subs:
                if sub in by_sub:
                    data[by_sub[sub]].append(v)
        elif url == AFTERCARE_EXT:
            data["aftercare_steps"] += [v for sub, v in subs if sub == "step"]
        elif url == REVIEW_EXT:
            one = dict(subs)
            data["reviews"].append({"reviewed_on": one.get("date"),
                                    "reviewer_id": ix.resolve(one.get("reviewer"), ctx.systems.counselor)})
        elif url == SIGNATURE_EXT:
            one = dict(subs)
            data["signatures"].append({"signer": one.get("signer"), "signed_on": one.get("date")})
    return data | {"plan_id": ix.key_of(res, ctx.systems.care_plan), "client_mrn": mrn,
                   "enrollment_id": enrollment_id, "kind": kind, "title": title,
                   "status": res["status"], "created_on": date_part(res.get("created")),
                   "start": date_part(period.get("start")), "end": date_part(period.get("end")),
                   "author_id": author_id, "problems": problems, "goal_ids": goal_ids,
                   "interventions": interventions}


def _plans_of(goal_key: str, ix: FhirIndex) -> list[tuple[str, str, list]]:
    """The plans whose CarePlan.goal points to a Goal (built once pass 1 has seen every CarePlan)."""
    links = ix.facts.get(_LINKS, [])
    seen, table = ix.facts.get(_GOAL_PLANS, (-1, {}))
    if seen != len(links):
        table = {}
        for ref, plan_key, label, cats in links:
            if (k := ix.resolve(ref)) is not None:
                table.setdefault(k, []).append((plan_key, label, cats))
        ix.facts[_GOAL_PLANS] = (len(links), table)
    return table.get(goal_key, [])


def goal_from_fhir(res: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    goal_id = ix.key_of(res, ctx.systems.care_plan_goal)
    ext = next((e for e in res.get("extension", ()) if e.get("url") == GOAL_PLAN_EXT), None)
    if ext is not None:
        plan_id = ix.resolve(ext.get("valueReference"), ctx.systems.care_plan)
        if plan_id is None:
            raise Unmappable("the goal-care-plan extension does not name a care plan", "Goal.extension")
    else:
        plans = {p[0]: p for p in _plans_of(goal_id, ix)}
        if not plans:
            raise Unmappable("no CarePlan in this input lists this Goal (CarePlan.goal): an IOP goal belongs to "
                             "a care plan", "Goal")
        if len(plans) > 1:
            raise Unmappable(f"several CarePlans list this Goal ({', '.join(sorted(plans))}); an IOP goal "
                             "belongs to one plan", "Goal")
        plan_id, label, cats = next(iter(plans.values()))
        if _kind(cats, ctx) is None:
            raise _no_kind(f"the Goal's plan {label}", cats, "Goal")
    mrn = client_of(res, "subject", ix, ctx)
    status = res.get("lifecycleStatus")
    if status not in _GOAL_STATUSES:
        raise Unmappable(f"lifecycleStatus {status!r} has no IOP goal status ({', '.join(_GOAL_STATUSES)})",
                         "Goal.lifecycleStatus")
    desc = res.get("description") or {}
    text = desc.get("text") or next((c.get("display") for c in codings(desc) if c.get("display")), None)
    if not text:
        raise Unmappable("the goal has no description text", "Goal.description")
    targets = res.get("target", [])
    if len(targets) > 1:
        raise Unmappable(f"{len(targets)} targets: an IOP goal has one target and due date", "Goal.target")
    target = targets[0] if targets else {}
    return {"goal_id": goal_id, "plan_id": plan_id, "client_mrn": mrn, "description": text,
            "target": ext_value(res, GOAL_TARGET_EXT) or target.get("detailString") or _detail_text(target),
            "start": res.get("startDate"),
            "due": target.get("dueDate"), "status": status}


def _detail_text(target: dict) -> str | None:
    """A foreign quantity or range target, written out (the IOP target is text)."""
    def qty(q):
        return f"{q.get('value')} {q.get('unit') or q.get('code') or ''}".strip() if q else "…"
    rng = target.get("detailRange")
    value = qty(target["detailQuantity"]) if "detailQuantity" in target else \
        f"{qty(rng.get('low'))} to {qty(rng.get('high'))}" if rng else None
    measure = next((c.get("display") or c.get("code") for c in codings(target.get("measure"))), None)
    return f"{measure}: {value}" if measure and value else value


def index(res: dict, ix: FhirIndex, refs: list[str]) -> None:
    """First-pass facts: which CarePlan each Goal belongs to (from CarePlan.goal)."""
    plan_key = ix.keys.get(refs[0]) or res.get("id")
    links = ix.facts.setdefault(_LINKS, [])
    for g in res.get("goal", ()):
        links.append((g, plan_key, refs[0], res.get("category", [])))
