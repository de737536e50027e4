"""What every concept's mapping shares: ids, references, profiles, Part 2 labels, extensions.

Mappers build plain JSON-shaped dicts (the fast path). Their output shapes are proven valid R4B by
the tests, and ``--strict`` re-validates every resource through :mod:`fhir_iop.fhir.r4`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import orjson

from fhir_iop.errors import Problem
from fhir_iop.settings import SiteSettings, load_settings
from fhir_iop.terminology import CANONICAL, Terminology, cs_url, load_terminology

US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
NPI = "http://hl7.org/fhir/sid/us-npi"
UCUM = "http://unitsofmeasure.org"

#: meta.profile per emitted profile: fhir-iop's own first, then its US Core parent where one exists
#: (US Core has no EpisodeOfCare profile, and a group's session-level Encounter has no subject).
PROFILES: dict[str, list[str]] = {
    "program": [f"{CANONICAL}/StructureDefinition/iop-program", f"{US_CORE}/us-core-organization"],
    "counselor": [f"{CANONICAL}/StructureDefinition/iop-counselor", f"{US_CORE}/us-core-practitioner"],
    "client": [f"{CANONICAL}/StructureDefinition/iop-client", f"{US_CORE}/us-core-patient"],
    "coverage": [f"{CANONICAL}/StructureDefinition/iop-coverage", f"{US_CORE}/us-core-coverage"],
    "enrollment": [f"{CANONICAL}/StructureDefinition/iop-enrollment"],
    "diagnosis": [f"{CANONICAL}/StructureDefinition/iop-diagnosis",
                  f"{US_CORE}/us-core-condition-problems-health-concerns"],
    "care_team": [f"{CANONICAL}/StructureDefinition/iop-care-team", f"{US_CORE}/us-core-careteam"],
    "group_session": [f"{CANONICAL}/StructureDefinition/iop-group-session"],
    "attendance": [f"{CANONICAL}/StructureDefinition/iop-attendance", f"{US_CORE}/us-core-encounter"],
    "counseling_session": [f"{CANONICAL}/StructureDefinition/iop-counseling-session",
                           f"{US_CORE}/us-core-encounter"],
    "drug_screen": [f"{CANONICAL}/StructureDefinition/iop-drug-screen", f"{US_CORE}/us-core-diagnosticreport-lab"],
    "drug_screen_result": [f"{CANONICAL}/StructureDefinition/iop-drug-screen-result",
                           f"{US_CORE}/us-core-observation-lab"],
    "drug_screen_specimen": [f"{CANONICAL}/StructureDefinition/iop-drug-screen-specimen", f"{US_CORE}/us-core-specimen"],
    "mat_medication": [f"{CANONICAL}/StructureDefinition/iop-mat-medication", f"{US_CORE}/us-core-medicationrequest"],
    "mat_administration": [f"{CANONICAL}/StructureDefinition/iop-mat-administration"],
    "mat_dispense": [f"{CANONICAL}/StructureDefinition/iop-mat-dispense", f"{US_CORE}/us-core-medicationdispense"],
    "care_plan": [f"{CANONICAL}/StructureDefinition/iop-care-plan", f"{US_CORE}/us-core-careplan"],
    "care_plan_goal": [f"{CANONICAL}/StructureDefinition/iop-care-plan-goal", f"{US_CORE}/us-core-goal"],
    "consent": [f"{CANONICAL}/StructureDefinition/iop-part2-consent"],
    # what comes in from other providers' EHRs (fhir_iop.sync.pull): base R4 parents
    "referral": [f"{CANONICAL}/StructureDefinition/iop-referral"],
    "outside_medication": [f"{CANONICAL}/StructureDefinition/iop-outside-medication"],
}


def ext_url(name: str) -> str:
    return f"{CANONICAL}/StructureDefinition/{name}"


@lru_cache(maxsize=1)
def cited_codes() -> dict[str, dict]:
    data = orjson.loads((Path(__file__).parent.parent / "data" / "cited-codes.json").read_bytes())
    data.pop("_comment")
    return data


def cited(name: str) -> dict:
    """A Coding for a fixed external code listed, with its source, in ``data/cited-codes.json``."""
    c = cited_codes()[name]
    return {"system": c["system"], "code": c["code"], "display": c["display"]}


#: 42 CFR Part 2 labels (reference §6a; the flat pattern of the HL7 SHIFT demo plus the refrain policy)
PART2_LABELS = tuple(cited(n) for n in ("label-restricted", "label-42cfrpart2", "label-sud", "label-nordsclcd"))


@dataclass
class SessionInfo:
    program_id: str
    kind: str
    modality: str
    start: str
    end: str


@dataclass
class MappingContext:
    """Settings, code tables and the small indexes one run keeps (never one entry per record).

    Indexes hold only the record types other records point to: programs, counselors, clients,
    enrollments and group sessions; attendance and counselling sessions stream through.
    """

    settings: SiteSettings = field(default_factory=load_settings)
    terminology: Terminology = field(default_factory=load_terminology)
    programs: dict[str, str] = field(default_factory=dict)           # program_id -> kind
    counselors: dict[str, str] = field(default_factory=dict)         # counselor_id -> role
    clients: set[str] = field(default_factory=set)
    enrollments: dict[str, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)  # id -> (mrn, program_id, diagnoses)
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    mat_orders: dict[str, object] = field(default_factory=dict)      # mat_id -> MatMedication
    mat_by_client: dict[str, list[str]] = field(default_factory=dict)  # mrn -> [mat_id]
    plans: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # plan_id -> (mrn, goal_ids)
    #: which record types were part of this run (references to others are not checked)
    seen_types: set[str] = field(default_factory=set)

    def __post_init__(self):
        self._ns = uuid.uuid5(uuid.NAMESPACE_URL, self.settings.identifier_systems.mrn)
        self.systems = self.settings.identifier_systems
        self._meta = {}
        self._refs: dict[tuple[str, str], dict] = {}
        for name, profiles in PROFILES.items():
            self._meta[name] = {"profile": profiles}
            self._meta[name + "+part2"] = {"profile": profiles, "security": list(PART2_LABELS)}

    # -- ids and references ------------------------------------------------------------------
    def rid(self, kind: str, key: str) -> str:
        """Deterministic resource id: the same source identifier always gives the same id."""
        return str(uuid.uuid5(self._ns, f"{kind}|{key}"))

    def ref(self, resource_type: str, kind: str, key: str, system: str) -> dict:
        """A literal reference that also carries the source identifier (so it reads back alone).

        References to the indexed types repeat on every attendance row, so they are built once;
        the dicts are shared between resources and never mutated.
        """
        cached = self._refs.get((kind, key))
        if cached is None:
            cached = {"reference": f"{resource_type}/{self.rid(kind, key)}",
                      "identifier": {"system": system, "value": key}}
            if len(self._refs) >= 1 << 16:  # bounded: memory stays flat however many clients
                self._refs.clear()
            self._refs[(kind, key)] = cached
        return cached

    def client_ref(self, mrn: str) -> dict:
        return self.ref("Patient", "client", mrn, self.systems.mrn)

    def program_ref(self, program_id: str) -> dict:
        return self.ref("Organization", "program", program_id, self.systems.program)

    def counselor_ref(self, counselor_id: str) -> dict:
        return self.ref("Practitioner", "counselor", counselor_id, self.systems.counselor)

    def enrollment_ref(self, enrollment_id: str) -> dict:
        return self.ref("EpisodeOfCare", "enrollment", enrollment_id, self.systems.enrollment)

    def session_ref(self, session_id: str) -> dict:
        return self.ref("Encounter", "group_session", session_id, self.systems.group_session)

    def meta(self, profile: str, about_client: bool) -> dict:
        """``meta`` with the profile stamp and, for client data in a Part 2 program, the labels."""
        if about_client and self.settings.part2_program:
            return self._meta[profile + "+part2"]
        return self._meta[profile]

    # -- codes --------------------------------------------------------------------------------
    def ext_coding(self, cs_id: str, code: str) -> dict:
        """The extension that carries an IOP code; its URL is named after the CodeSystem."""
        return {"url": ext_url(cs_id), "valueCoding": self.terminology.coding(cs_id, code)}

    def check_ref(self, where: str, field_name: str, kind: str, key: str | None,
                  problems: list[Problem]) -> None:
        index = {"programs": self.programs, "counselors": self.counselors, "clients": self.clients,
                 "enrollments": self.enrollments, "group_sessions": self.sessions,
                 "mat_medications": self.mat_orders, "care_plans": self.plans}[kind]
        if key is not None and kind in self.seen_types and key not in index:
            problems.append(Problem(where, f"{key!r} is not in this run's {kind}", field=field_name))


# -- reading FHIR back ------------------------------------------------------------------------

def ext_value(resource: dict, url: str, default=None):
    for e in resource.get("extension", ()):
        if e.get("url") == url:
            for k, v in e.items():
                if k.startswith("value"):
                    return v
    return default


def ext_code(resource: dict, cs_id: str) -> str | None:
    v = ext_value(resource, ext_url(cs_id))
    if isinstance(v, dict) and v.get("system") == cs_url(cs_id):
        return v.get("code")
    return None


def codings(concepts) -> list[dict]:
    if isinstance(concepts, dict):
        concepts = [concepts]
    return [c for cc in concepts or () for c in cc.get("coding", ())]


def identifier_value(resource: dict, system: str) -> str | None:
    for i in resource.get("identifier", ()):
        if i.get("system") == system and i.get("value"):
            return i["value"]
    return None


def date_part(value: str | None) -> str | None:
    return value[:10] if value else None


class Unmappable(Exception):
    """A FHIR resource that carries no IOP concept, or lacks something the record needs."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


KEY_SYSTEMS = {  # resource type -> the site identifier attribute that names its record
    "Patient": "mrn", "Practitioner": "counselor", "Organization": "program",
    "Coverage": "coverage", "EpisodeOfCare": "enrollment", "MedicationRequest": "mat_medication",
    "CarePlan": "care_plan", "Goal": "care_plan_goal", "DiagnosticReport": "drug_screen",
    "ServiceRequest": "referral", "MedicationStatement": "outside_medication",
}


@dataclass
class FhirIndex:
    """First pass over FHIR input: what each referenced resource is called on the IOP side.

    Holds one small entry per Patient, Practitioner, Organization, EpisodeOfCare, Condition,
    CareTeam and session-level Encounter; the per-client Encounters stream past.
    """

    keys: dict[str, str] = field(default_factory=dict)           # "Type/id" or fullUrl -> key
    names: dict[str, str] = field(default_factory=dict)          # Organization ref -> name
    conditions: dict[str, str | None] = field(default_factory=dict)  # Condition ref -> ICD-10-CM
    care_teams: dict[str, list[dict]] = field(default_factory=dict)  # CareTeam ref -> members
    consumed: set[str] = field(default_factory=set)               # refs mapped inside another record
    #: per-concept first-pass facts, keyed by reference ("Observation/x" -> parsed result, ...)
    facts: dict[str, object] = field(default_factory=dict)
    enrollment_programs: dict[str, str] = field(default_factory=dict)
    #: Patient ref -> the ref of the Patient it links to (Patient.link seealso: an EHR's record of our client)
    patient_links: dict[str, str] = field(default_factory=dict)

    def key_of(self, resource: dict, system: str | None) -> str:
        if system and (v := identifier_value(resource, system)):
            return v
        for i in resource.get("identifier", ()):
            if i.get("value"):
                return i["value"]
        return resource.get("id") or ""

    def resolve(self, ref: dict | None, system: str | None = None) -> str | None:
        """The IOP key a Reference points to: its identifier, or the indexed resource's key."""
        if not ref:
            return None
        ident = ref.get("identifier")
        if ident and ident.get("value") and (system is None or ident.get("system") == system):
            return ident["value"]
        r = ref.get("reference")
        if r is None:
            return None
        if r in self.keys:
            return self.keys[r]
        # absolute URL of a resource in the same input: match on the last two segments
        tail = "/".join(r.rstrip("/").split("/")[-2:])
        return self.keys.get(tail)

    @staticmethod
    def ref_key(ref: dict | None) -> str | None:
        if not ref or not ref.get("reference"):
            return None
        r = ref["reference"]
        return r if r.startswith("urn:") else "/".join(r.rstrip("/").split("/")[-2:])


def client_of(res: dict, element: str, ix: FhirIndex, ctx: MappingContext) -> str:
    """The MRN of the Patient that ``res[element]`` points to, or Unmappable naming the element."""
    mrn = ix.resolve(res.get(element), ctx.systems.mrn)
    if mrn is None:
        raise Unmappable(f"{element} does not resolve to a Patient in this input",
                         f"{res.get('resourceType')}.{element}")
    return mrn
