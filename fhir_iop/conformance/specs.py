"""fhir-iop's profiles, extensions and binding ValueSets, as data.

Each :class:`Profile` says what the mapping (``fhir_iop/mapping/*.py``) guarantees about one kind of
resource: ``min`` 1 and mustSupport for what it always emits, fixed and pattern values where it
fixes them, extension slices (by url) for the fhir-iop extensions it writes, bindings of fhir-iop
codings to the ValueSets published beside them, and the 42 CFR Part 2 labels. Parents come from
``common.PROFILES`` (the second URL, where there is one) so the stamp and the profile cannot drift.

Rules name elements relative to the resource (``"identifier.system"``, ``"extension:sessionKind"``,
``"code.coding:drugAnalyte"``); ``pattern=`` and ``fixed=`` leave the type suffix to the element's
type. Rules may come in any order and repeat an element (they are merged); the build sorts the
differential into snapshot order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fhir_iop.mapping.common import HCPCS, ICD10CM, PART2_LABELS, PROFILES, cited
from fhir_iop.payer.claim import NUBC_REVENUE
from fhir_iop.mapping.consent import POLICY_URI
from fhir_iop.terminology import CANONICAL, cs_url

SD = f"{CANONICAL}/StructureDefinition/"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
DAYS_OF_WEEK = "http://hl7.org/fhir/ValueSet/days-of-week"
#: CapabilityStatement.date: when this set of artifacts last changed (kept fixed so the build is repeatable)
DATE = "2026-11-23"


def vs(vs_id: str) -> str:
    return f"{CANONICAL}/ValueSet/{vs_id}"


def camel(name: str) -> str:
    head, *rest = name.split("-")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def pascal(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("-"))


# -- rules ----------------------------------------------------------------------------------------

def E(path: str, *, short: str | None = None, definition: str | None = None, slicing: dict | None = None,
      min: int | None = None, max: str | None = None, types: list | None = None, pattern=None, fixed=None,
      constraint: list | None = None, ms: bool | None = True, binding: dict | None = None,
      extension: str | None = None) -> dict:
    """One differential rule on ``path`` (relative to the resource; ``""`` is the resource itself).

    ``extension`` names a fhir-iop extension: the element becomes a slice typed with its profile,
    and its short and definition come from the extension's title and description.
    """
    rule: dict = {"path": path}
    for key, value in (("short", short), ("definition", definition), ("slicing", slicing), ("min", min),
                       ("max", max), ("type", types), ("pattern", pattern), ("fixed", fixed),
                       ("constraint", constraint), ("mustSupport", ms), ("binding", binding),
                       ("extension", extension)):
        if value is not None:
            rule[key] = value
    return rule


def required(url: str, description: str | None = None) -> dict:
    return {"strength": "required", **({"description": description} if description else {}), "valueSet": url}


def extensible(url: str, description: str | None = None) -> dict:
    return {"strength": "extensible", **({"description": description} if description else {}), "valueSet": url}


def by_pattern(path: str = "$this", description: str | None = None) -> dict:
    s = {"discriminator": [{"type": "pattern", "path": path}]}
    if description:
        s["description"] = description
    return s | {"ordered": False, "rules": "open"}


BY_URL = {"discriminator": [{"type": "value", "path": "url"}],
          "description": "Extensions are always sliced by (at least) url", "ordered": False, "rules": "open"}


def ext(name: str, *, on: str = "", min: int = 0, max: str = "1") -> list[dict]:
    """A slice of ``on.extension`` for the fhir-iop extension ``name`` (slice name: its camelCase)."""
    where = f"{on}.extension" if on else "extension"
    return [E(where, slicing=BY_URL, ms=None),
            E(f"{where}:{camel(name)}", min=min, max=max,
              types=[{"code": "Extension", "profile": [SD + name]}], extension=name)]


def coding_slice(path: str, name: str, system: str, *, min: int = 0, max: str = "1",
                 binding: dict | None = None, short: str | None = None) -> list[dict]:
    """A slice of the Coding list ``path`` holding the codings of one ``system``."""
    return [E(path, slicing=by_pattern(description="by code system"), ms=None),
            E(f"{path}:{name}", short=short, min=min, max=max, pattern={"system": system}, binding=binding)]


def concept(name: str) -> dict:
    """A CodeableConcept pattern for the cited code ``name`` (system and code: displays may vary)."""
    c = cited(name)
    return {"coding": [{"system": c["system"], "code": c["code"]}]}


def ref(path: str, *profiles: str, min: int | None = None, max: str | None = None) -> dict:
    """A Reference the mapping always points at fhir-iop resources: its targets narrowed to their profiles."""
    return E(path, min=min, max=max, types=[{"code": "Reference", "targetProfile": [SD + p for p in profiles]}])


def site_identifier() -> list[dict]:
    return [E("identifier", min=1), E("identifier.system", min=1), E("identifier.value", min=1)]


META = [E("meta", min=1), E("meta.profile", min=1, short="fhir-iop's profile first, then its US Core parent")]

PART2_CONSTRAINT = {
    "key": "iop-part2-1", "severity": "error",
    "human": "42 CFR Part 2 labels come together: with 42CFRPart2 in meta.security, R, SUD and NORDSCLCD are "
             "there too",
    "expression": "meta.security.where(system = 'http://terminology.hl7.org/CodeSystem/v3-ActCode' and "
                  "code = '42CFRPart2').exists() implies ("
                  "meta.security.where(system = 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality' "
                  "and code = 'R').exists() and "
                  "meta.security.where(system = 'http://terminology.hl7.org/CodeSystem/v3-ActCode' "
                  "and code = 'SUD').exists() and "
                  "meta.security.where(system = 'http://terminology.hl7.org/CodeSystem/v3-ActCode' "
                  "and code = 'NORDSCLCD').exists())"}
#: slice name per Part 2 label, in common.PART2_LABELS order
PART2_SLICES = ("restricted", "part2", "sud", "noRedisclosure")


def part2_slices(path: str, min: int) -> list[dict]:
    rules = [E(path, slicing=by_pattern(description="42 CFR Part 2 labels, by system and code"))]
    for name, label in zip(PART2_SLICES, PART2_LABELS):
        rules.append(E(f"{path}:{name}", short=f"{label['code']} ({label['display']})", min=min, max="1",
                       pattern={"system": label["system"], "code": label["code"]}))
    return rules


def part2() -> list[dict]:
    """The Part 2 labels on a resource about a client: all four or none (site.json ``part2_program``)."""
    return [E("", constraint=[PART2_CONSTRAINT], ms=None),
            *part2_slices("meta.security", 0)]


def medication(choice: str) -> list[dict]:
    """medication[x] as the mapping writes it: RxNorm (when mapped) beside the fhir-iop mat-drug coding."""
    return [E(choice, min=1, types=[{"code": "CodeableConcept"}]),
            *coding_slice(f"{choice}.coding", "matDrug", cs_url("mat-drug"), min=1,
                          binding=required(vs("mat-drug")), short="The fhir-iop MAT product"),
            *coding_slice(f"{choice}.coding", "rxnorm", RXNORM, binding=extensible(vs("mat-drug-rxnorm")),
                          short="RxNorm (mat-drug-to-rxnorm ConceptMap)"),
            E(f"{choice}.text", min=1)]


def dosage(path: str, *, instruction: bool) -> list[dict]:
    rules = [E(path, min=1, max="1"), E(f"{path}.text", min=1),
             E(f"{path}.route", min=1), E(f"{path}.route.coding", binding=extensible(vs("mat-route-codes"))),
             E(f"{path}.route.text", min=1)]
    if instruction:
        rules += [E(f"{path}.timing", min=1), E(f"{path}.timing.repeat", min=1),
                  E(f"{path}.doseAndRate", min=1, max="1"),
                  E(f"{path}.doseAndRate.dose[x]", min=1, types=[{"code": "Quantity"}])]
    else:
        rules += [E(f"{path}.dose", min=1)]
    return rules


# -- profiles -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    id: str
    concept: str            #: key in common.PROFILES
    type: str
    title: str
    description: str
    rules: tuple = field(default=(), repr=False)

    @property
    def url(self) -> str:
        return SD + self.id

    @property
    def parent(self) -> str:
        stamped = PROFILES.get(self.concept, [self.url])  # iop-claim is stamped by fhir_iop/payer (base R4)
        return stamped[1] if len(stamped) > 1 else f"http://hl7.org/fhir/StructureDefinition/{self.type}"


def profile(id, concept, type, title, description, *rules) -> Profile:
    flat = []
    for r in rules:
        flat.extend(r if isinstance(r, list) else [r])
    return Profile(id, concept, type, title, description, tuple(flat))


PROFILE_SPECS: tuple[Profile, ...] = (
    profile("iop-program", "program", "Organization", "IOP program",
            "An intensive outpatient program the site runs, with what it treats (program-kind); substance-use and "
            "co-occurring programs fall under 42 CFR Part 2.",
            META, ext("program-kind", min=1), site_identifier(), E("active", min=1), E("name", min=1)),
    profile("iop-counselor", "counselor", "Practitioner", "IOP counselor",
            "A staff member who facilitates groups, counsels, prescribes or sits on care teams, with the role "
            "(counselor-role) the care teams use.",
            META, ext("counselor-role", min=1), site_identifier(), E("active", min=1),
            E("name", min=1), E("name.family", min=1), E("name.given", min=1), E("qualification")),
    profile("iop-client", "client", "Patient", "IOP client",
            "A person enrolled in, or referred to, an IOP; identified by the site's medical record number.",
            META, part2(), site_identifier(),
            E("identifier", slicing=by_pattern("type", "the MRN by its identifier type"), ms=None),
            E("identifier:mrn", short="The site's medical record number", min=1, max="1"),
            E("identifier:mrn.type", min=1, pattern=concept("identifier-type-mr")),
            E("name", min=1), E("name.family", min=1), E("name.given", min=1),
            E("gender"), E("birthDate", min=1), E("contact")),
    profile("iop-coverage", "coverage", "Coverage", "IOP client coverage",
            "A client's insurance, with the payer's prior authorization for the program in an extension.",
            META, part2(), ext("prior-authorization"), site_identifier(),
            E("subscriberId", min=1), ref("beneficiary", "iop-client"), E("payor", min=1, max="1"),
            E("payor.identifier", min=1),
            E("payor.display", min=1), E("period")),
    profile("iop-enrollment", "enrollment", "EpisodeOfCare", "IOP enrollment",
            "A client's enrollment in an IOP: status and level-of-care history, referral, discharge, weekly "
            "schedule, diagnoses and care team. US Core has no EpisodeOfCare profile: the parent is base R4.",
            META, part2(),
            ext("referral-source"), ext("level-of-care", min=1, max="*"), ext("discharge-reason"),
            ext("weekly-schedule"), site_identifier(),
            E("statusHistory", min=1), ext("enrollment-status", on="statusHistory", min=1),
            E("type", min=1, slicing=by_pattern(description="the IOP level by its code system")),
            E("type:level", short="The current IOP level of care", min=1, max="1",
              pattern={"coding": [{"system": cs_url("program-level")}]}, binding=required(vs("program-level"))),
            E("type:drugAndAlcohol", short="Drug and alcohol rehabilitation (programs that treat substance use)",
              max="1", pattern=concept("episode-type-da")),
            ref("patient", "iop-client"), ref("managingOrganization", "iop-program", min=1), E("period"),
            E("diagnosis"), ref("diagnosis.condition", "iop-diagnosis"), E("diagnosis.rank", min=1),
            ref("careManager", "iop-counselor"), ref("team", "iop-care-team")),
    profile("iop-diagnosis", "diagnosis", "Condition", "IOP enrollment diagnosis",
            "A diagnosis (ICD-10-CM) recorded on a client's enrollment, as a problem-list item.",
            META, part2(), E("clinicalStatus", min=1),
            E("category:us-core", max="1", pattern=concept("condition-problem-list")),
            *coding_slice("code.coding", "icd10cm", ICD10CM, min=1, max="1",
                          binding=extensible(vs("sud-diagnoses")), short="ICD-10-CM"),
            ref("subject", "iop-client"), E("recordedDate")),
    profile("iop-care-team", "care_team", "CareTeam", "IOP enrollment care team",
            "The staff caring for a client in one enrollment, each with their fhir-iop counselor-role.",
            META, part2(), E("status", min=1), E("name", min=1), ref("subject", "iop-client"),
            ref("participant.member", "iop-counselor"),
            *coding_slice("participant.role.coding", "counselorRole", cs_url("counselor-role"), min=1,
                          binding=required(vs("counselor-role")), short="The fhir-iop staff role"),
            ref("managingOrganization", "iop-program", min=1, max="1")),
    profile("iop-group-session", "group_session", "Encounter", "IOP group session",
            "One group session of a program: kind, curriculum topic, modality, facilitators and time. It is "
            "the group's Encounter, so it has no subject (and so no US Core parent); each client's attendance "
            "is an iop-attendance Encounter partOf it.",
            META, ext("session-kind", min=1), ext("curriculum-topic", min=1), ext("session-modality", min=1),
            site_identifier(), E("status", pattern="finished"),
            E("class", binding=extensible(vs("session-encounter-class"))),
            E("type", min=1, binding=extensible(vs("group-session-type"))), E("type.text", min=1),
            E("subject", max="0", ms=None, short="None: a group session is the group's, not one client's"),
            E("participant", min=1), ref("participant.individual", "iop-counselor", min=1),
            E("period", min=1), E("period.start", min=1), E("period.end", min=1),
            E("location"), E("location.location"), ref("serviceProvider", "iop-program", min=1)),
    profile("iop-attendance", "attendance", "Encounter", "IOP group session attendance",
            "One client's attendance at one group session (partOf the session's Encounter); absences are "
            "cancelled Encounters with the attendance status in an extension.",
            META, part2(), ext("attendance-status", min=1), site_identifier(),
            E("type.coding", binding=extensible(vs("group-session-type"))), E("type.text", min=1),
            ref("subject", "iop-client"), ref("episodeOfCare", "iop-enrollment", min=1, max="1"),
            E("period", min=1), E("period.start", min=1), E("period.end", min=1), E("length"),
            ref("partOf", "iop-group-session", min=1), ref("serviceProvider", "iop-program", min=1)),
    profile("iop-counseling-session", "counseling_session", "Encounter", "IOP counselling session",
            "An individual or family counselling session, typed by CPT from the minutes spent.",
            META, part2(), ext("counseling-kind", min=1), ext("counseling-status", min=1),
            ext("session-modality", min=1), site_identifier(),
            E("type", max="1"), E("type.coding", binding=extensible(vs("counseling-session-type"))),
            E("type.text", min=1), ref("subject", "iop-client"),
            ref("episodeOfCare", "iop-enrollment", min=1, max="1"),
            E("participant", min=1), ref("participant.individual", "iop-counselor", min=1),
            E("period", min=1), E("period.start", min=1), E("period.end", min=1), E("length"),
            ref("serviceProvider", "iop-program")),
    profile("iop-drug-screen", "drug_screen", "DiagnosticReport", "IOP drug screen",
            "A drug screen: the panel (LOINC where one exists, beside the fhir-iop drug-panel coding), the "
            "method, the specimen and one iop-drug-screen-result per analyte.",
            META, part2(), ext("screen-method", min=1), ext("enrollment"),
            E("identifier", min=1), E("identifier.value", min=1),
            *coding_slice("code.coding", "drugPanel", cs_url("drug-panel"), min=1,
                          binding=required(vs("drug-panel")), short="The fhir-iop panel"),
            *coding_slice("code.coding", "loinc", LOINC, binding=extensible(vs("drug-panel-loinc")),
                          short="LOINC panel (drug-panel-to-loinc ConceptMap; none for oral fluid)"),
            E("code.text", min=1), ref("subject", "iop-client"),
            E("effective[x]", min=1, types=[{"code": "dateTime"}]),
            E("issued"), E("performer"), E("performer.display"),
            ref("specimen", "iop-drug-screen-specimen", min=1, max="1"),
            ref("result", "iop-drug-screen-result", min=1)),
    profile("iop-drug-screen-result", "drug_screen_result", "Observation", "IOP drug-screen result",
            "One analyte's result: qualitative (interpretation DET/ND, always) and measured where known, with "
            "the cutoff and the MAT-aware flag (screen-flag, interpretation N/A and a note saying why).",
            META, part2(), ext("screen-flag"),
            *coding_slice("code.coding", "drugAnalyte", cs_url("drug-analyte"), min=1,
                          binding=required(vs("drug-analyte")), short="The fhir-iop analyte"),
            *coding_slice("code.coding", "loinc", LOINC, binding=extensible(vs("drug-analyte-loinc")),
                          short="LOINC by method (drug-analyte-to-loinc ConceptMap; urine only)"),
            E("code.text", min=1), ref("subject", "iop-client"),
            E("effective[x]", min=1, types=[{"code": "dateTime"}]), E("issued"),
            E("value[x]", min=1, types=[{"code": "Quantity"}, {"code": "CodeableConcept"}],
              binding=extensible(vs("analyte-result-value"))),
            E("interpretation", min=1),
            E("interpretation.coding", binding=extensible(vs("drug-screen-interpretation"))),
            E("note"), E("referenceRange"), E("referenceRange.high"),
            E("method", min=1, binding=required(vs("screen-method"))),
            ref("specimen", "iop-drug-screen-specimen", min=1)),
    profile("iop-drug-screen-specimen", "drug_screen_specimen", "Specimen", "IOP drug-screen specimen",
            "The urine or oral-fluid specimen of a drug screen, whether its collection was observed, and the "
            "laboratory's accession number.",
            META, part2(), ext("observed-collection", min=1),
            E("type.coding", binding=extensible(vs("drug-screen-specimen-type"))), E("type.text", min=1),
            ref("subject", "iop-client", min=1), E("collection", min=1),
            E("collection.collected[x]", min=1, types=[{"code": "dateTime"}])),
    profile("iop-mat-medication", "mat_medication", "MedicationRequest", "IOP MAT order",
            "A medication for addiction treatment (MAT) order: the product in RxNorm and fhir-iop mat-drug, dose, "
            "route and schedule, the treatment period in dosageInstruction.timing.repeat.boundsPeriod.",
            META, part2(), ext("enrollment"), site_identifier(), E("intent", pattern="order"),
            medication("medication[x]"), ref("subject", "iop-client"), E("authoredOn", min=1),
            ref("requester", "iop-counselor", min=1),
            E("dosageInstruction", max="1"), dosage("dosageInstruction", instruction=True)),
    profile("iop-mat-administration", "mat_administration", "MedicationAdministration", "IOP MAT dose given",
            "A MAT dose given in the clinic, against its order. US Core has no MedicationAdministration profile: "
            "the parent is base R4.",
            META, part2(), site_identifier(), medication("medication[x]"), ref("subject", "iop-client"),
            ref("context", "iop-enrollment"), E("effective[x]", min=1, types=[{"code": "dateTime"}]),
            E("performer"), ref("performer.actor", "iop-counselor"), ref("request", "iop-mat-medication", min=1),
            dosage("dosage", instruction=False)),
    profile("iop-mat-dispense", "mat_dispense", "MedicationDispense", "IOP MAT take-home supply",
            "A MAT take-home supply handed to the client, against its order.",
            META, part2(), site_identifier(), medication("medication[x]"), ref("subject", "iop-client"),
            ref("context", "iop-enrollment"), E("performer"), ref("performer.actor", "iop-counselor"),
            ref("authorizingPrescription", "iop-mat-medication", min=1, max="1"), E("quantity", min=1),
            E("daysSupply", min=1),
            E("whenHandedOver", min=1), E("dosageInstruction", max="1"),
            dosage("dosageInstruction", instruction=True)),
    profile("iop-care-plan", "care_plan", "CarePlan", "IOP care plan",
            "A treatment, relapse-prevention or aftercare plan: the generated narrative of the whole plan, "
            "category assess-plan plus the plan kind, goals, interventions, and the plan's relapse-prevention "
            "content, aftercare steps, reviews and signatures in extensions. The enrollment is in supportingInfo "
            "(R4 CarePlan has no episodeOfCare).",
            META, part2(), E("text", min=1), E("text.status", pattern="generated"), E("text.div", min=1),
            ext("relapse-prevention"), ext("aftercare"), ext("care-plan-review", max="*"),
            ext("care-plan-signature", max="*"), site_identifier(), E("intent", pattern="plan"),
            E("category", min=2, slicing=by_pattern(description="assess-plan and the plan kind")),
            E("category:assessPlan", short="Assessment and Plan of Treatment", min=1, max="1",
              pattern=concept("careplan-assess-plan")),
            E("category:kind", short="The fhir-iop plan kind", min=1, max="1",
              pattern={"coding": [{"system": cs_url("care-plan-kind")}]}, binding=required(vs("care-plan-kind"))),
            E("title", min=1), ref("subject", "iop-client"), E("period", min=1), E("period.start", min=1),
            E("created", min=1), ref("author", "iop-counselor", min=1),
            ref("supportingInfo", "iop-enrollment", min=1),
            E("supportingInfo", short="The client's enrollment (R4 CarePlan has no episodeOfCare)"),
            ref("addresses", "iop-diagnosis"), ref("goal", "iop-care-plan-goal"), E("activity"),
            E("activity.detail", min=1),
            E("activity.detail.code", min=1, binding=required(vs("care-activity"))), E("activity.detail.status"),
            E("activity.detail.scheduled[x]", min=1, types=[{"code": "Timing"}])),
    profile("iop-care-plan-goal", "care_plan_goal", "Goal", "IOP care plan goal",
            "A goal of an IOP care plan; the goal-care-plan extension names its plan (R4 Goal cannot).",
            META, part2(), ext("goal-care-plan", min=1), ext("goal-target"), site_identifier(),
            ref("subject", "iop-client"),
            E("category", min=1, slicing=by_pattern()),
            E("category:behavioral", min=1, max="1", pattern=concept("goal-behavioral")),
            E("description.text", min=1), E("start[x]", types=[{"code": "date"}]),
            E("target", max="1"), E("target.detail[x]", max="0"),
            E("target.due[x]", types=[{"code": "date"}])),
    profile("iop-part2-consent", "consent", "Consent", "IOP 42 CFR Part 2 consent",
            "A client's written consent to disclose Part 2 information to one recipient: deny by default, one "
            "permit per purpose of use naming the recipient, the data (resource types and fhir-iop data classes) "
            "and the Part 2 labels of what it lets go. policyRule v3-ActCode#42CFRPart2 and policy.uri (the eCFR "
            "text) are a convention: no normative R4 Part 2 consent profile exists. US Core has no Consent "
            "profile: the parent is base R4.",
            META, part2(), ext("consent-revocation"), site_identifier(),
            E("scope", pattern=concept("consent-scope-privacy")),
            E("category", slicing=by_pattern()),
            E("category:consentDocument", min=1, max="1", pattern=concept("consent-category-loinc")),
            ref("patient", "iop-client", min=1), E("dateTime", min=1), ref("performer", "iop-client", min=1),
            ref("organization", "iop-program", min=1),
            E("policy", min=1, max="1"), E("policy.uri", min=1, pattern=POLICY_URI),
            E("policyRule", min=1, pattern=concept("policy-42cfrpart2")),
            E("provision", min=1), E("provision.type", min=1, pattern="deny"),
            E("provision.provision", min=1, short="One permit per purpose of use"),
            ext("consent-data-class", on="provision.provision", min=1, max="*"),
            E("provision.provision.type", min=1, pattern="permit"),
            E("provision.provision.period", min=1), E("provision.provision.period.start", min=1),
            E("provision.provision.actor", min=1, max="1"),
            ext("recipient-kind", on="provision.provision.actor", min=1),
            E("provision.provision.actor.role", pattern=concept("participation-ircp")),
            ext("recipient-id", on="provision.provision.actor.reference"),
            E("provision.provision.actor.reference.identifier", min=1),
            E("provision.provision.actor.reference.display"),
            E("provision.provision.action", min=1, max="1", pattern=concept("consent-action-disclose")),
            *part2_slices("provision.provision.securityLabel", 1),
            E("provision.provision.purpose", min=1, max="1"),
            E("provision.provision.class", min=1, binding=extensible(vs("consent-resource-type")))),
    profile("iop-referral", "referral", "ServiceRequest", "IOP referral",
            "A referral of a client to the site, typically pulled from a hospital or primary-care EHR "
            "(fhir_iop/mapping/referral.py): code SNOMED 1254709001 (referral to substance use disorder treatment "
            "program) or the referrer's SUD-treatment code, plus the fhir-iop program-level coding of the level of "
            "care requested; the referrer as a display-only requester (the practitioner, else the organization; when both the "
            "practitioner and the organization are known, the organization in the referring-organization extension); reasons as ICD-10-CM or SNOMED codes and text; the "
            "program referred to as performer. The parent is base R4.",
            META, part2(), ext("referring-organization"), site_identifier(), E("intent", pattern="order"),
            E("code", min=1),
            *coding_slice("code.coding", "level", cs_url("program-level"), binding=required(vs("program-level")),
                          short="The fhir-iop level of care requested"),
            ref("subject", "iop-client", min=1), E("authoredOn", min=1), E("requester"),
            ref("performer", "iop-program"), E("reasonCode"), E("note")),
    profile("iop-outside-medication", "outside_medication", "MedicationStatement", "IOP outside medication",
            "A medication another provider prescribed that the client takes (fhir_iop/mapping/outside_medication.py)"
            ": RxNorm when known and the medication as written, the period, the date the outside provider "
            "recorded it, the dosage as written and the prescriber as a display-only informationSource. Not a MAT "
            "order of the site: drug-screen interpretation does not read it. The parent is base R4.",
            META, part2(), site_identifier(), E("medication[x]", min=1, types=[{"code": "CodeableConcept"}]),
            E("medication[x].text", min=1), ref("subject", "iop-client"),
            E("effective[x]", types=[{"code": "Period"}]), E("dateAsserted"), E("informationSource"),
            E("dosage", max="1"), E("dosage.text", min=1)),
    profile("iop-claim", "claim", "Claim", "IOP per-diem claim",
            "A client's IOP days of one billing period for one payer and program (fhir_iop/payer): one item per "
            "billable day with the HCPCS per-diem code (H0015 substance use, S9480 psychiatric), the NUBC revenue "
            "code (0906, 0905), the date and the day's attended Encounters; the enrollment's ICD-10-CM diagnoses; "
            "the Coverage and its prior authorization; the program as billing provider (provider) and the counselors "
            "who ran the services as rendering providers (careTeam, role claimcareteamrole#primary). A telehealth "
            "day carries its session-modality "
            "(telehealth-video or telehealth-phone) in an extension on the item (no place-of-service code: CMS POS "
            "02/10 are unconfirmed). US Core has no Claim profile: "
            "the parent is base R4.",
            META, part2(), E("status", pattern="active"), E("type", pattern=concept("claim-type-professional")),
            E("use", pattern="claim"), ref("patient", "iop-client"), E("billablePeriod", min=1),
            E("billablePeriod.start", min=1), E("billablePeriod.end", min=1), E("created"),
            ref("provider", "iop-program"), E("priority", pattern=concept("process-priority-normal")),
            E("careTeam", short="Rendering providers: the counselors who ran the billed services"),
            ref("careTeam.provider", "iop-counselor"),
            E("careTeam.role", min=1, pattern=concept("claim-careteamrole-primary")),
            E("diagnosis"), E("diagnosis.diagnosis[x]", types=[{"code": "CodeableConcept"}]),
            E("insurance", max="1"), E("insurance.focal", pattern=True),
            ref("insurance.coverage", "iop-coverage"), E("insurance.preAuthRef"),
            E("item", min=1, short="One item per billable day"), ext("session-modality", on="item"),
            E("item.careTeamSequence"), E("item.diagnosisSequence"), E("item.revenue", min=1),
            *coding_slice("item.revenue.coding", "nubc", NUBC_REVENUE, min=1, max="1", short="NUBC revenue code"),
            *coding_slice("item.productOrService.coding", "hcpcs", HCPCS, min=1, max="1",
                          short="HCPCS per-diem code"),
            E("item.serviced[x]", min=1, types=[{"code": "date"}]), E("item.quantity", min=1),
            E("item.quantity.value", min=1, pattern=1),
            ref("item.encounter", "iop-attendance", "iop-counseling-session", min=1)),
)


# -- extensions -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """One sub-extension of a complex extension."""
    url: str
    type: str
    min: int
    max: str
    short: str
    binding: dict | None = None
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Extension:
    id: str
    title: str
    description: str
    context: tuple[str, ...]
    type: str | None = None          #: value[x] type of a simple extension
    binding: dict | None = None
    targets: tuple[str, ...] = ()    #: Reference target profiles
    parts: tuple[Part, ...] = ()     #: a complex extension's sub-extensions
    constraint: tuple[dict, ...] = ()

    @property
    def url(self) -> str:
        return SD + self.id


@dataclass(frozen=True)
class ExternalExtension(Extension):
    """An extension another IG defines that what fhir-iop sends uses; rebuilt from its published
    differential under its own canonical URL, for fhir-iop's validator only (not published by us)."""
    canonical: str = ""
    name: str = ""
    publisher: str = ""
    source: str = ""

    @property
    def url(self) -> str:
        return self.canonical


#: DS4P (hl7.fhir.uv.security-label-ds4p 1.0.0; canonical URL in domain-codes.md §6b): the mark that must be
#: shown with a resource, used for the 42 CFR 2.32 notice (fhir_iop.disclosure.notice). Differential as
#: published: context Resource.meta, value[x] only Annotation, 1..1 (github.com/HL7/fhir-security-label-ds4p,
#: input/resources/structuredefinition/extension-display.json).
DEPENDENCY_EXTENSIONS = (
    ExternalExtension("extension-display", "Must Display",
                      "Specifies that a marking must be displayed when the resource is rendered in print or in "
                      "electronic form.", ("Resource.meta",), type="Annotation",
                      canonical="http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-display",
                      name="ExtensionMustDisplay", publisher="HL7 International / Security",
                      source="FHIR Data Segmentation for Privacy (DS4P) 1.0.0"),
)


#: fhir-iop codes that travel in an extension named after their CodeSystem (MappingContext.ext_coding),
#: and the elements that carry them
CODING_EXTENSIONS = {
    "program-kind": ("Organization",), "counselor-role": ("Practitioner",),
    "referral-source": ("EpisodeOfCare",), "discharge-reason": ("EpisodeOfCare",),
    "enrollment-status": ("EpisodeOfCare.statusHistory",),
    "session-kind": ("Encounter",), "curriculum-topic": ("Encounter",),
    "session-modality": ("Encounter", "Claim.item"),
    "attendance-status": ("Encounter",), "counseling-kind": ("Encounter",), "counseling-status": ("Encounter",),
    "screen-method": ("DiagnosticReport",), "screen-flag": ("Observation",),
    "consent-data-class": ("Consent.provision", "Consent.provision.provision"),
    "recipient-kind": ("Consent.provision.actor", "Consent.provision.provision.actor"),
}


def coding_extension(cs_id: str, context: tuple[str, ...], title: str, description: str) -> Extension:
    return Extension(cs_id, title, f"{description.rstrip('.')}: a code of the fhir-iop CodeSystem {cs_id} "
                     "(the extension is named after it), so the IOP code round-trips exactly.",
                     context, "Coding", required(vs(cs_id)))


OTHER_EXTENSIONS = (
    Extension("referring-organization", "Referring organization",
              "The organization a referral comes from, beside the referring practitioner in requester (R4 "
              "ServiceRequest has one requester). A display-only Reference when the organization is known by name.",
              ("ServiceRequest",), "Reference"),
    Extension("enrollment", "IOP enrollment",
              "The client's IOP enrollment (EpisodeOfCare) a resource belongs to, where R4 has no episodeOfCare "
              "element (DiagnosticReport, MedicationRequest).",
              ("DiagnosticReport", "MedicationRequest"), "Reference", targets=(SD + "iop-enrollment",)),
    Extension("observed-collection", "Observed collection",
              "Whether the specimen's collection was directly observed.", ("Specimen",), "boolean"),
    Extension("goal-care-plan", "Goal's care plan",
              "The care plan a goal belongs to (R4 Goal has no reference to its CarePlan).", ("Goal",),
              "Reference", targets=(SD + "iop-care-plan",)),
    Extension("goal-target", "Goal target (text)",
              "What counts as reaching the goal, in words. Goal.target.detail would need a coded measure "
              "(invariant gol-1), which an IOP goal does not have.", ("Goal",), "string"),
    Extension("consent-revocation", "Consent revocation date",
              "The day the client revoked the consent; disclosure stops on that day.", ("Consent",), "date"),
    Extension("recipient-id", "Consent recipient site identifier",
              "The site's own identifier of a consent's recipient, on the recipient's Reference when that "
              "Reference's identifier is the NPI.",
              ("Consent.provision.actor.reference", "Consent.provision.provision.actor.reference"), "Identifier"),
    Extension("prior-authorization", "Prior authorization",
              "The payer's prior authorization for the program: its number and the period it covers.",
              ("Coverage",), parts=(Part("number", "string", 1, "1", "Authorization number"),
                                    Part("period", "Period", 0, "1", "Period authorized"))),
    Extension("level-of-care", "IOP level of care",
              "One period of the enrollment at one IOP level (program-level); the periods in order make the "
              "level history.", ("EpisodeOfCare",),
              parts=(Part("level", "Coding", 1, "1", "The IOP level", required(vs("program-level"))),
                     Part("period", "Period", 1, "1", "When the client was at that level"))),
    Extension("weekly-schedule", "IOP weekly schedule",
              "The client's weekly group schedule: program days, start and end time, and track.",
              ("EpisodeOfCare",),
              parts=(Part("day", "code", 0, "*", "A program day", required(DAYS_OF_WEEK)),
                     Part("start", "time", 0, "1", "Start time"), Part("end", "time", 0, "1", "End time"),
                     Part("track", "Coding", 0, "1", "Schedule track", required(vs("schedule-track")))),
              constraint=({"key": "iop-sched-1", "severity": "error",
                           "human": "A start time comes with an end time",
                           "expression": "extension('start').exists() = extension('end').exists()"},)),
    Extension("relapse-prevention", "Relapse-prevention plan content",
              "What a relapse-prevention plan lists: triggers, warning signs, coping strategies and the people to "
              "call.", ("CarePlan",),
              parts=(Part("trigger", "string", 0, "*", "A trigger"),
                     Part("warning-sign", "string", 0, "*", "A warning sign"),
                     Part("coping-strategy", "string", 0, "*", "A coping strategy"),
                     Part("support-contact", "string", 0, "*", "A person to call"))),
    Extension("aftercare", "Aftercare steps", "The steps of an aftercare plan, in order.", ("CarePlan",),
              parts=(Part("step", "string", 1, "*", "A step"),)),
    Extension("care-plan-review", "Care plan review", "A review of the plan: when, and by whom.", ("CarePlan",),
              parts=(Part("date", "date", 1, "1", "Review date"),
                     Part("reviewer", "Reference", 1, "1", "The reviewing counselor",
                          targets=(SD + "iop-counselor",)))),
    Extension("care-plan-signature", "Care plan signature",
              "A signature on the plan (client, counselor or family member): who, and when.", ("CarePlan",),
              parts=(Part("signer", "string", 1, "1", "Who signed"), Part("date", "date", 1, "1", "When"))),
)


# -- ValueSets built from the ConceptMaps' targets -------------------------------------------------

@dataclass(frozen=True)
class MapValueSet:
    id: str
    title: str
    description: str
    maps: tuple[str, ...]   #: ConceptMap ids in mappings/ whose targets make the ValueSet


MAP_VALUE_SETS = (
    MapValueSet("drug-analyte-loinc", "Drug-screen analyte LOINC codes",
                "The LOINC codes of drug-screen results, per analyte and method (urine).", ("drug-analyte-to-loinc",)),
    MapValueSet("drug-panel-loinc", "Drug-screen panel LOINC codes", "The LOINC codes of drug-screen panels.",
                ("drug-panel-to-loinc",)),
    MapValueSet("mat-drug-rxnorm", "MAT products (RxNorm)", "The RxNorm codes of the MAT products fhir-iop knows.",
                ("mat-drug-to-rxnorm",)),
    MapValueSet("mat-route-codes", "MAT routes (SNOMED CT and v3)",
                "Routes of MAT doses: SNOMED CT where the reference confirms one, and v3 RouteOfAdministration.",
                ("mat-route-to-route",)),
    MapValueSet("drug-screen-specimen-type", "Drug-screen specimen types",
                "Urine and oral fluid, in SNOMED CT and v2 table 0487.", ("specimen-kind-to-specimen-type",)),
    MapValueSet("group-session-type", "Group session types (CPT, HCPCS)",
                "Group psychotherapy (CPT 90853) and, in substance-use programs, HCPCS H0005.",
                ("session-kind-to-encounter-type",)),
    MapValueSet("counseling-session-type", "Counselling session types (CPT)",
                "Individual psychotherapy by time (90832, 90834, 90837) and family psychotherapy (90846, 90847).",
                ("counseling-kind-to-encounter-type",)),
    MapValueSet("session-encounter-class", "IOP session encounter classes",
                "In person (ambulatory) and telehealth (virtual).", ("session-modality-to-encounter-class",)),
    MapValueSet("analyte-result-value", "Drug-screen qualitative values (SNOMED CT)",
                "Detected and Not detected, for a result without a measured concentration.",
                ("analyte-result-to-snomed",)),
    MapValueSet("drug-screen-interpretation", "Drug-screen interpretations",
                "Detected / Not detected, and Normal / Abnormal for the MAT-aware flag (v3 ObservationInterpretation).",
                ("analyte-result-to-interpretation", "screen-flag-to-interpretation")),
    MapValueSet("consent-resource-type", "Resource types a Part 2 consent covers",
                "The FHIR resource types that hold each kind of IOP information a consent can cover.",
                ("consent-data-class-to-resource-type",)),
)
