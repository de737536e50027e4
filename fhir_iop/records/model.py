"""The IOP record format: fhir-iop's own domain model, in IOP words (no FHIR here).

Each record type is one pydantic model; ``docs/record-format.md`` documents them field by field and
a test keeps the two in step. Coded fields take codes from fhir-iop's CodeSystems in
``profiles/`` (or a site's inbound ConceptMap), checked at validation time, so a record that
validates can be mapped without further checks.

Validation context (``model_validate(data, context=...)``): ``terminology`` (a
:class:`~fhir_iop.terminology.Terminology`) and ``tz`` (a ``ZoneInfo`` for datetimes written
without a UTC offset). Both default to the shipped tables and the site time zone.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timezone
from typing import Annotated, ClassVar, Literal
from zoneinfo import ZoneInfo

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo,
                      model_validator)

from fhir_iop.terminology import load_terminology

Gender = Literal["male", "female", "other", "unknown"]  # FHIR administrative-gender (R4, required)
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]  # FHIR days-of-week (R4)

_ICD10CM = re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$")
_TOKEN = re.compile(r"^[A-Za-z0-9._\-]+$")


class FieldError(ValueError):
    """A cross-field check that failed, naming the field to fix (reported as its location)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _terminology(info: ValidationInfo):
    ctx = info.context or {}
    return ctx.get("terminology") or load_terminology()


class CodeFrom:
    """Marks a str field as coded from one of fhir-iop's CodeSystems (metadata for docs and CSV)."""

    def __init__(self, cs_id: str):
        self.cs_id = cs_id

    def __call__(self, value: str, info: ValidationInfo) -> str:
        code = _terminology(info).normalize(self.cs_id, value)
        if code is None:
            allowed = ", ".join(_terminology(info).codes(self.cs_id))
            raise ValueError(f"unknown {self.cs_id} code {value!r}; allowed: {allowed}")
        return code


def Coded(cs_id: str):  # noqa: N802 - reads as a type
    check = CodeFrom(cs_id)
    return Annotated[str, AfterValidator(check), check]


def _icd10cm(value: str) -> str:
    if not _ICD10CM.match(value):
        raise ValueError(f"{value!r} is not an ICD-10-CM code (like F11.20)")
    return value


def _npi(value: str) -> str:
    """NPI check digit: Luhn over the number prefixed with 80840 (CMS NPI standard)."""
    total = 0
    for i, ch in enumerate(reversed("80840" + value)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    if total % 10:
        raise ValueError(f"{value!r} fails the NPI check digit")
    return value


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    """An aware datetime with a fixed UTC offset (as FHIR writes it), so equal instants compare equal
    even in the repeated hour of a daylight-saving change."""
    if value.tzinfo is None:
        tz = (info.context or {}).get("tz")
        if tz is None:
            raise ValueError("datetime needs a UTC offset (or a site time zone)")
        value = value.replace(tzinfo=tz)
    if not isinstance(value.tzinfo, timezone):
        value = value.replace(tzinfo=timezone(value.utcoffset()))
    return value


Id = Annotated[str, Field(min_length=1, max_length=64, pattern=_TOKEN.pattern)]
Text = Annotated[str, Field(min_length=1, max_length=500)]
ICD10CM = Annotated[str, AfterValidator(_icd10cm)]
DateTime = Annotated[datetime, AfterValidator(_aware)]
Npi = Annotated[str, Field(pattern=r"^[0-9]{10}$"), AfterValidator(_npi)]
#: a SNOMED CT concept id (SCTID: 6 to 18 digits, no leading zero)
Snomed = Annotated[str, Field(pattern=r"^[1-9][0-9]{5,17}$")]
#: an RxNorm concept id (RXCUI: digits)
RxNorm = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]


class Record(BaseModel):
    """Base of every record type: strict about unknown fields, whitespace trimmed."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True,
                              use_attribute_docstrings=True)
    #: file stem of this record type (``clients`` -> clients.csv / clients.ndjson)
    file_stem: ClassVar[str]
    #: the field that identifies a record, used in error reports
    key_field: ClassVar[str]

    def key(self) -> str:
        return getattr(self, self.key_field)


class Part(BaseModel):
    """A structured value inside a record (a history entry). In CSV: fields joined by ``@``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True,
                              use_attribute_docstrings=True)


# -- people and organisations ----------------------------------------------------------------

class Client(Record):
    """A person enrolled (or referred) at the site. Maps to Patient (US Core)."""

    file_stem: ClassVar[str] = "clients"
    key_field: ClassVar[str] = "mrn"
    mrn: Id
    """Medical record number: the client's identifier at the site."""
    family_name: Text
    """Family (last) name."""
    given_names: list[Text] = Field(min_length=1)
    """Given names, first name first."""
    birth_date: date
    """Date of birth (YYYY-MM-DD)."""
    gender: Gender | None = None
    """Administrative gender (FHIR administrative-gender)."""
    phone: str | None = None
    """Home phone."""
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")
    """Email address."""
    address_line: str | None = None
    """Street address."""
    city: str | None = None
    """City."""
    state: str | None = Field(default=None, max_length=50)
    """Two-letter US state code."""
    postal_code: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 \-]{1,9}$")
    """ZIP or ZIP+4."""
    emergency_contact_name: str | None = None
    """Emergency contact's full name."""
    emergency_contact_phone: str | None = None
    """Emergency contact's phone (needs the name)."""

    @model_validator(mode="after")
    def _check(self):
        if self.birth_date > date.today():
            raise FieldError('birth_date', "birth_date is in the future")
        if self.emergency_contact_phone and not self.emergency_contact_name:
            raise FieldError('emergency_contact_name', "emergency_contact_phone needs emergency_contact_name")
        return self


class Coverage(Record):
    """A client's insurance, with the prior authorization for IOP services. Maps to Coverage (US Core)."""

    file_stem: ClassVar[str] = "coverages"
    key_field: ClassVar[str] = "coverage_id"
    coverage_id: Id
    """The site's identifier for this coverage."""
    client_mrn: Id
    """The insured client (clients.mrn)."""
    payer_id: Id
    """The site's identifier for the payer."""
    payer_name: Text
    """Payer name as billed."""
    member_id: Text
    """Member (subscriber) id on the insurance card."""
    status: Literal["active", "cancelled"] = "active"  # FHIR financial resource status (R4)
    """active or cancelled (FHIR financial resource status)."""
    subscriber_relationship: Literal["self", "spouse", "child", "parent", "other"] = "self"
    """Client's relationship to the subscriber (FHIR subscriber-relationship)."""
    start: date | None = None
    """Coverage start date."""
    end: date | None = None
    """Coverage end date."""
    prior_auth_number: str | None = None
    """Prior-authorization number for IOP services."""
    prior_auth_start: date | None = None
    """First day the prior authorization covers."""
    prior_auth_end: date | None = None
    """Last day the prior authorization covers."""

    @model_validator(mode="after")
    def _check(self):
        if self.start and self.end and self.end < self.start:
            raise FieldError('end', "end is before start")
        if (self.prior_auth_start or self.prior_auth_end) and not self.prior_auth_number:
            raise FieldError('prior_auth_number', "a prior-authorization period needs prior_auth_number")
        if self.prior_auth_start and self.prior_auth_end and self.prior_auth_end < self.prior_auth_start:
            raise FieldError('prior_auth_end', "prior_auth_end is before prior_auth_start")
        return self


class Counselor(Record):
    """A staff member who facilitates groups, counsels, or sits on care teams. Maps to Practitioner."""

    file_stem: ClassVar[str] = "counselors"
    key_field: ClassVar[str] = "counselor_id"
    counselor_id: Id
    """The site's staff identifier."""
    family_name: Text
    """Family name."""
    given_names: list[Text] = Field(min_length=1)
    """Given names."""
    role: Coded("counselor-role")
    """Role on care teams."""
    credentials: str | None = None
    """Licences and credentials as written (e.g. LCSW, LADC)."""
    npi: Npi | None = None
    """National Provider Identifier (10 digits)."""
    phone: str | None = None
    """Work phone."""
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")
    """Work email."""


class Program(Record):
    """An IOP the site runs. Maps to Organization."""

    file_stem: ClassVar[str] = "programs"
    key_field: ClassVar[str] = "program_id"
    program_id: Id
    """The site's identifier for the program."""
    name: Text
    """Program name."""
    kind: Coded("program-kind")
    """What the program treats; substance-use and co-occurring programs fall under 42 CFR Part 2."""
    npi: Npi | None = None
    """Organisation NPI."""
    phone: str | None = None
    """Phone."""
    address_line: str | None = None
    """Street address."""
    city: str | None = None
    """City."""
    state: str | None = Field(default=None, max_length=50)
    """Two-letter US state code."""
    postal_code: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9 \-]{1,9}$")
    """ZIP or ZIP+4."""


# -- what comes in from other providers (EHR sync) ----------------------------------------------

#: SNOMED "Referral to substance use disorder treatment program" (reference §4): a referral's default service
REFERRAL_SNOMED = "1254709001"


class Referral(Record):
    """A referral of a client to the site, e.g. from a hospital or primary-care EHR. Maps to ServiceRequest."""

    file_stem: ClassVar[str] = "referrals"
    key_field: ClassVar[str] = "referral_id"
    referral_id: Id
    """The site's identifier for the referral (or the referrer's, for one pulled from an EHR)."""
    client_mrn: Id
    """The client referred (clients.mrn)."""
    status: Literal["draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"]
    """Referral status (FHIR request-status)."""
    requested_on: date
    """Date the referral was written."""
    program_id: Id | None = None
    """The program referred to (programs.program_id), if the referral names one."""
    level: Coded("program-level") | None = None
    """The level of care requested."""
    service_snomed: Annotated[Snomed, AfterValidator(lambda v: None if v == REFERRAL_SNOMED else v)] | None = None
    """SNOMED CT code of the service requested as the referrer coded it; empty means referral to a
    substance use disorder treatment program (SNOMED 1254709001)."""
    referring_practitioner: str | None = Field(default=None, max_length=200)
    """Name of the referring practitioner, as the referrer wrote it."""
    referring_organization: str | None = Field(default=None, max_length=200)
    """Name of the referring organization."""
    reason_icd10cm: list[ICD10CM] = Field(default_factory=list)
    """Reasons for the referral: ICD-10-CM diagnosis codes."""
    reason_snomed: list[Snomed] = Field(default_factory=list)
    """Reasons for the referral: SNOMED CT condition codes."""
    reason_text: str | None = Field(default=None, max_length=500)
    """The reason in words, as the referrer wrote it."""
    note: str | None = Field(default=None, max_length=2000)
    """The referrer's note."""

    @model_validator(mode="after")
    def _check(self):
        for name in ("reason_icd10cm", "reason_snomed"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise FieldError(name, f"{name} lists a code twice")
        return self


# -- enrollment ------------------------------------------------------------------------------

class StatusChange(Part):
    """An enrollment status and the date it took effect."""

    status: Coded("enrollment-status")
    """Enrollment status from this date."""
    since: date
    """Date the status took effect."""


class LevelChange(Part):
    """A level of care and the date it took effect."""

    level: Coded("program-level")
    """Level of care from this date."""
    since: date
    """Date the level took effect (a step-down is a new entry)."""


TERMINAL_STATUSES = frozenset({"completed", "left-against-advice", "transferred", "stepped-down"})


class Enrollment(Record):
    """A client's episode in one program, across level changes. Maps to EpisodeOfCare, a Condition per diagnosis and a CareTeam."""

    file_stem: ClassVar[str] = "enrollments"
    key_field: ClassVar[str] = "enrollment_id"
    enrollment_id: Id
    """The site's identifier for this enrollment."""
    client_mrn: Id
    """The enrolled client (clients.mrn)."""
    program_id: Id
    """The program (programs.program_id)."""
    referral_source: Coded("referral-source") | None = None
    """Who referred the client, including step-down from residential or PHP."""
    status_history: list[StatusChange] = Field(min_length=1)
    """Statuses in date order; the last is the current status."""
    level_history: list[LevelChange] = Field(min_length=1)
    """Levels of care in date order, e.g. IOP-6 then IOP-3; the last is the current level."""
    admitted_on: date | None = None
    """Admission date (required once the client is past referred)."""
    discharged_on: date | None = None
    """Discharge date (required with a final status)."""
    discharge_reason: Coded("discharge-reason") | None = None
    """Why the enrollment ended."""
    diagnoses: list[ICD10CM] = Field(default_factory=list)
    """ICD-10-CM diagnosis codes, principal first."""
    primary_counselor: Id | None = None
    """Primary counselor (counselors.counselor_id)."""
    care_team: list[Id] = Field(default_factory=list)
    """Care team members (counselors.counselor_id)."""
    schedule_days: list[Day] = Field(default_factory=list)
    """Scheduled program days (mon..sun)."""
    schedule_start: time | None = None
    """Daily start time (HH:MM)."""
    schedule_end: time | None = None
    """Daily end time (HH:MM)."""
    track: Coded("schedule-track") | None = None
    """Morning, afternoon or evening track."""

    @property
    def status(self) -> str:
        return self.status_history[-1].status

    @property
    def level(self) -> str:
        return self.level_history[-1].level

    @model_validator(mode="after")
    def _check(self):
        for name in ("status_history", "level_history"):
            hist = getattr(self, name)
            for a, b in zip(hist, hist[1:]):
                if b.since < a.since:
                    raise FieldError(name, f"{name} is not in date order ({b.since} after {a.since})")
        if self.discharged_on:
            if not self.admitted_on:
                raise FieldError('admitted_on', "discharged_on without admitted_on")
            if self.discharged_on < self.admitted_on:
                raise FieldError('discharged_on', "discharged_on is before admitted_on")
            if self.status not in TERMINAL_STATUSES:
                raise FieldError('status_history', f"discharged_on is set but the last status is {self.status!r}")
        elif self.status in TERMINAL_STATUSES:
            raise FieldError('discharged_on', f"status {self.status!r} needs discharged_on")
        if self.discharge_reason and not self.discharged_on:
            raise FieldError('discharge_reason', "discharge_reason without discharged_on")
        if self.status != "referred" and not self.admitted_on:
            raise FieldError('admitted_on', f"status {self.status!r} needs admitted_on")
        admitted = next((s.since for s in self.status_history if s.status != "referred"), None)
        if admitted and self.admitted_on and admitted != self.admitted_on:
            raise FieldError("admitted_on", f"admitted_on {self.admitted_on} is not the date the client "
                             f"left referred ({admitted})")
        if self.discharged_on and self.status_history[-1].since != self.discharged_on:
            raise FieldError("discharged_on", f"discharged_on {self.discharged_on} is not the date of "
                             f"the final status ({self.status_history[-1].since})")
        if self.admitted_on and self.level_history[0].since < self.admitted_on:
            raise FieldError('level_history', "level_history starts before admitted_on")
        if (self.schedule_start is None) != (self.schedule_end is None):
            raise FieldError('schedule_end', "schedule_start and schedule_end go together")
        if self.schedule_start and self.schedule_end <= self.schedule_start:
            raise FieldError('schedule_end', "schedule_end is not after schedule_start")
        if len(set(self.diagnoses)) != len(self.diagnoses):
            raise FieldError('diagnoses', "diagnoses lists a code twice")
        if len(set(self.care_team)) != len(self.care_team):
            raise FieldError('care_team', "care_team lists a counselor twice")
        return self


# -- sessions --------------------------------------------------------------------------------

class GroupSession(Record):
    """One meeting of a group. Maps to a session-level Encounter."""

    file_stem: ClassVar[str] = "group_sessions"
    key_field: ClassVar[str] = "session_id"
    session_id: Id
    """The site's identifier for the group session."""
    program_id: Id
    """The program that ran it."""
    topic: Coded("curriculum-topic")
    """Curriculum topic."""
    kind: Coded("session-kind")
    """Kind of group."""
    facilitators: list[Id] = Field(min_length=1)
    """Facilitating staff (counselors.counselor_id)."""
    start: DateTime
    """Start, ISO 8601; without a UTC offset the site time zone applies."""
    end: DateTime
    """End, after start."""
    modality: Coded("session-modality")
    """In person or telehealth."""
    location: str | None = None
    """Room or site name."""

    @model_validator(mode="after")
    def _check(self):
        if self.end <= self.start:
            raise FieldError('end', "end is not after start")
        if (self.end - self.start).total_seconds() > 12 * 3600:
            raise FieldError('end', "a group session longer than 12 hours")
        return self


class Attendance(Record):
    """One client at one group session. Maps to the client's Encounter, partOf the session's."""

    file_stem: ClassVar[str] = "attendance"
    key_field: ClassVar[str] = "session_id"
    session_id: Id
    """The group session (group_sessions.session_id)."""
    client_mrn: Id
    """The client (clients.mrn)."""
    enrollment_id: Id
    """The enrollment the session counts toward."""
    status: Coded("attendance-status")
    """Attendance; absences are kept, not dropped."""
    minutes_attended: int = Field(ge=0, le=720)
    """Minutes actually attended; 0 for absent or excused, above 0 otherwise."""

    def key(self) -> str:
        return f"{self.session_id}/{self.client_mrn}"

    @model_validator(mode="after")
    def _check(self):
        if self.status in ("absent", "excused") and self.minutes_attended:
            raise FieldError('minutes_attended', f"an {self.status} client cannot have minutes_attended")
        if self.status not in ("absent", "excused") and not self.minutes_attended:
            raise FieldError('minutes_attended', f"status {self.status!r} needs minutes_attended > 0")
        return self


class CounselingSession(Record):
    """An individual or family counselling session. Maps to an Encounter typed by CPT."""

    file_stem: ClassVar[str] = "counseling_sessions"
    key_field: ClassVar[str] = "counseling_session_id"
    counseling_session_id: Id
    """The site's identifier for the session."""
    client_mrn: Id
    """The client (clients.mrn)."""
    enrollment_id: Id
    """The enrollment the session belongs to."""
    kind: Coded("counseling-kind")
    """Individual or family, with or without the client."""
    status: Coded("counseling-status")
    """Whether it took place."""
    counselor_id: Id
    """The counselor (counselors.counselor_id)."""
    start: DateTime
    """Start, ISO 8601; without a UTC offset the site time zone applies."""
    end: DateTime
    """End; the minutes between start and end select the CPT code."""
    modality: Coded("session-modality")
    """In person or telehealth."""
    location: str | None = None
    """Room or site name."""

    @property
    def minutes(self) -> int:
        return int((self.end - self.start).total_seconds() // 60)

    @model_validator(mode="after")
    def _check(self):
        if self.end <= self.start:
            raise FieldError('end', "end is not after start")
        return self


# -- drug screens ----------------------------------------------------------------------------

ReasonCode = Literal["TREAT", "ETREAT", "HPAYMT", "HOPERAT", "COC", "CAREMGT", "PUBHLTH", "HRESCH", "PATRQT"]
"""Purpose of use: v3-ActReason codes (reference §6a)."""
TimeUnit = Literal["d", "wk", "mo"]  # FHIR units-of-time (R4, required binding of Timing.repeat.periodUnit)


class AnalyteResult(Part):
    """One analyte of a drug screen. Concentrations are in ng/mL."""

    analyte: Coded("drug-analyte")
    """The substance tested."""
    result: Coded("analyte-result")
    """Detected or not detected."""
    cutoff: float | None = Field(default=None, ge=0)
    """Cutoff concentration (ng/mL) at or above which the analyte counts as detected."""
    measured: float | None = Field(default=None, ge=0)
    """Measured concentration (ng/mL), for quantitative results."""
    flag: Coded("screen-flag") | None = None
    """The MAT-aware reading (expected, expected-not-detected, unexpected); filled in by fhir-iop."""

    @model_validator(mode="after")
    def _check(self):
        fits = {"expected": "detected", "unexpected": "detected", "expected-not-detected": "not-detected"}
        if self.flag and fits[self.flag] != self.result:
            raise FieldError("flag", f"flag {self.flag!r} contradicts result {self.result!r}")
        return self


class DrugScreen(Record):
    """One specimen tested for drugs, with a result per analyte. Maps to DiagnosticReport (LAB), an
    Observation per analyte and a Specimen."""

    file_stem: ClassVar[str] = "drug_screens"
    key_field: ClassVar[str] = "screen_id"
    screen_id: Id
    """The site's identifier for the screen."""
    client_mrn: Id
    """The client tested (clients.mrn)."""
    enrollment_id: Id | None = None
    """The enrollment the screen belongs to."""
    specimen: Coded("specimen-kind")
    """Urine or oral fluid."""
    collected_at: DateTime
    """When the specimen was collected."""
    observed: bool = False
    """Whether collection was directly observed."""
    method: Coded("screen-method")
    """Point-of-care screen, lab immunoassay, or confirmation."""
    panel: Coded("drug-panel")
    """The panel tested."""
    results: list[AnalyteResult] = Field(min_length=1)
    """Per-analyte results."""
    status: Literal["final", "preliminary", "corrected"] = "final"
    """Report status (FHIR diagnostic-report-status subset)."""
    resulted_at: DateTime | None = None
    """When results were issued."""
    performing_lab: str | None = None
    """Name of the performing laboratory (empty for point-of-care)."""
    accession_number: str | None = None
    """The laboratory's accession number."""

    @model_validator(mode="after")
    def _check(self):
        seen = [r.analyte for r in self.results]
        if len(set(seen)) != len(seen):
            raise FieldError("results", "an analyte is listed twice")
        if self.resulted_at and self.resulted_at < self.collected_at:
            raise FieldError("resulted_at", "resulted_at is before collected_at")
        if self.method == "point-of-care" and self.performing_lab:
            raise FieldError("performing_lab", "a point-of-care screen has no performing lab")
        return self


# -- medication-assisted treatment --------------------------------------------------------------

class MatMedication(Record):
    """A MAT prescription or order. Maps to MedicationRequest (US Core)."""

    file_stem: ClassVar[str] = "mat_medications"
    key_field: ClassVar[str] = "mat_id"
    mat_id: Id
    """The site's identifier for the order."""
    client_mrn: Id
    """The client (clients.mrn)."""
    enrollment_id: Id | None = None
    """The enrollment the MAT supports."""
    drug: Coded("mat-drug")
    """The product; RxNorm through the mat-drug-to-rxnorm ConceptMap."""
    dose: float = Field(gt=0)
    """Dose per administration."""
    dose_unit: Literal["mg", "mL"]
    """Unit of dose (UCUM)."""
    route: Coded("mat-route")
    """Route of administration."""
    frequency_count: int = Field(ge=1)
    """Doses per period (1 for daily, weekly or monthly)."""
    frequency_period: int = Field(default=1, ge=1)
    """Length of the period, in frequency_unit."""
    frequency_unit: TimeUnit
    """d (day), wk (week) or mo (month)."""
    prescriber_id: Id
    """The prescriber (counselors.counselor_id)."""
    start: date
    """First day of treatment."""
    end: date | None = None
    """Last day of treatment."""
    status: Literal["active", "on-hold", "completed", "stopped"]
    """Order status (FHIR medicationrequest-status subset)."""

    @model_validator(mode="after")
    def _check(self):
        if self.end and self.end < self.start:
            raise FieldError("end", "end is before start")
        if self.status in ("completed", "stopped") and not self.end:
            raise FieldError("end", f"a {self.status} order needs end")
        return self


class MatAdministration(Record):
    """A dose given in clinic (daily methadone, a monthly injection). Maps to MedicationAdministration."""

    file_stem: ClassVar[str] = "mat_administrations"
    key_field: ClassVar[str] = "administration_id"
    administration_id: Id
    """The site's identifier for the administration."""
    mat_id: Id
    """The order (mat_medications.mat_id)."""
    client_mrn: Id
    """The client (clients.mrn)."""
    administered_at: DateTime
    """When the dose was given (or due, if not done)."""
    dose: float = Field(gt=0)
    """Dose given."""
    dose_unit: Literal["mg", "mL"]
    """Unit of dose (UCUM)."""
    route: Coded("mat-route")
    """Route."""
    status: Literal["completed", "not-done"] = "completed"
    """Whether the dose was given."""
    performer_id: Id | None = None
    """Who gave it (counselors.counselor_id)."""


class MatDispense(Record):
    """Take-home doses handed to the client. Maps to MedicationDispense (US Core)."""

    file_stem: ClassVar[str] = "mat_dispenses"
    key_field: ClassVar[str] = "dispense_id"
    dispense_id: Id
    """The site's identifier for the dispense."""
    mat_id: Id
    """The order (mat_medications.mat_id)."""
    client_mrn: Id
    """The client (clients.mrn)."""
    dispensed_at: DateTime
    """When the supply was handed over."""
    quantity: float = Field(gt=0)
    """Amount handed over."""
    quantity_unit: Literal["mL", "tablet", "film"]
    """Unit of quantity."""
    days_supply: int = Field(ge=1, le=90)
    """Days the supply lasts."""
    status: Literal["completed", "cancelled"] = "completed"
    """Dispense status."""
    performer_id: Id | None = None
    """Who dispensed it (counselors.counselor_id)."""


class OutsideMedication(Record):
    """A medication the client takes that another provider prescribed (from an EHR's MedicationStatement
    or MedicationRequest). Maps to MedicationStatement.

    Not a MAT order of the site: an outside buprenorphine, methadone or naltrexone is listed here (its
    RxNorm code shows what it is) but drug-screen flags read only the site's own mat_medications; a
    clinician reconciles it first (and records a mat_medication if the site takes it over)."""

    file_stem: ClassVar[str] = "outside_medications"
    key_field: ClassVar[str] = "outside_medication_id"
    outside_medication_id: Id
    """The site's identifier for this entry (or the EHR's, for one pulled from an EHR)."""
    client_mrn: Id
    """The client (clients.mrn)."""
    medication: Text
    """The medication as written (product, strength, form)."""
    rxnorm: RxNorm | None = None
    """RxNorm code of the medication."""
    status: Literal["active", "completed", "entered-in-error", "intended", "stopped", "on-hold", "unknown",
                    "not-taken"]
    """Status (FHIR medication-statement-status)."""
    start: date | None = None
    """First day taken (or prescribed)."""
    end: date | None = None
    """Last day taken."""
    dosage: str | None = Field(default=None, max_length=500)
    """Dosage as written, e.g. "8 mg sublingual once a day"."""
    prescriber: str | None = Field(default=None, max_length=200)
    """Prescriber's name (and practice), as written."""
    recorded_on: date | None = None
    """Date the outside provider recorded it."""

    @model_validator(mode="after")
    def _check(self):
        if self.start and self.end and self.end < self.start:
            raise FieldError("end", "end is before start")
        return self


# -- care plans ---------------------------------------------------------------------------------

class Intervention(Part):
    """A planned intervention and how often, e.g. group therapy 3 per 1 wk."""

    activity: Coded("care-activity")
    """The intervention."""
    count: int = Field(ge=1)
    """Times per period."""
    period: int = Field(ge=1)
    """Length of the period."""
    unit: TimeUnit
    """d, wk or mo."""


class Review(Part):
    """A review of the plan."""

    reviewed_on: date
    """Date of the review."""
    reviewer_id: Id
    """Reviewer (counselors.counselor_id)."""


class Signature(Part):
    """Who signed the plan, and when."""

    signer: Literal["client", "counselor", "guardian"]
    """Who signed."""
    signed_on: date
    """Date signed."""


class CarePlan(Record):
    """A treatment, relapse-prevention or aftercare plan. Maps to CarePlan (US Core, assess-plan)."""

    file_stem: ClassVar[str] = "care_plans"
    key_field: ClassVar[str] = "plan_id"
    plan_id: Id
    """The site's identifier for the plan."""
    client_mrn: Id
    """The client (clients.mrn)."""
    enrollment_id: Id
    """The enrollment the plan belongs to."""
    kind: Coded("care-plan-kind")
    """Treatment, relapse-prevention or aftercare plan."""
    title: Text
    """Plan title."""
    status: Literal["draft", "active", "completed", "revoked"]
    """Plan status (FHIR request-status subset)."""
    created_on: date
    """Date written."""
    start: date
    """First day the plan applies."""
    end: date | None = None
    """Last day the plan applies."""
    author_id: Id
    """Author (counselors.counselor_id)."""
    problems: list[ICD10CM] = Field(default_factory=list)
    """Diagnoses the plan addresses (from the enrollment's diagnoses)."""
    goal_ids: list[Id] = Field(default_factory=list)
    """The plan's goals (care_plan_goals.goal_id)."""
    interventions: list[Intervention] = Field(default_factory=list)
    """Planned interventions and their frequency."""
    triggers: list[Text] = Field(default_factory=list)
    """Relapse triggers the client identified."""
    warning_signs: list[Text] = Field(default_factory=list)
    """Early warning signs of relapse."""
    coping_strategies: list[Text] = Field(default_factory=list)
    """Coping strategies to use."""
    support_contacts: list[Text] = Field(default_factory=list)
    """People to call, e.g. "Sponsor Mike 555-0142"."""
    aftercare_steps: list[Text] = Field(default_factory=list)
    """Aftercare arrangements after discharge (aftercare plans)."""
    reviews: list[Review] = Field(default_factory=list)
    """Reviews, oldest first."""
    signatures: list[Signature] = Field(default_factory=list)
    """Signatures."""

    @model_validator(mode="after")
    def _check(self):
        if self.end and self.end < self.start:
            raise FieldError("end", "end is before start")
        if self.kind != "relapse-prevention":
            for name in ("triggers", "warning_signs", "coping_strategies"):
                if getattr(self, name):
                    raise FieldError(name, f"{name} belong to a relapse-prevention plan")
        if self.kind != "aftercare" and self.aftercare_steps:
            raise FieldError("aftercare_steps", "aftercare_steps belong to an aftercare plan")
        return self


class CarePlanGoal(Record):
    """A goal of a care plan. Maps to Goal (US Core)."""

    file_stem: ClassVar[str] = "care_plan_goals"
    key_field: ClassVar[str] = "goal_id"
    goal_id: Id
    """The site's identifier for the goal."""
    plan_id: Id
    """The plan (care_plans.plan_id)."""
    client_mrn: Id
    """The client (clients.mrn)."""
    description: Text
    """The goal, in the client's words where possible."""
    target: str | None = None
    """What counts as reaching it, e.g. "negative screens for 8 weeks"."""
    start: date | None = None
    """When work on the goal starts."""
    due: date | None = None
    """Target date."""
    status: Literal["proposed", "active", "on-hold", "completed", "cancelled"]
    """Goal lifecycle status (FHIR goal-status subset)."""


# -- consent ------------------------------------------------------------------------------------

class Consent(Record):
    """A client's written consent under 42 CFR Part 2 to disclose to one recipient. Maps to Consent."""

    file_stem: ClassVar[str] = "consents"
    key_field: ClassVar[str] = "consent_id"
    consent_id: Id
    """The site's identifier for the consent."""
    client_mrn: Id
    """The client (clients.mrn)."""
    program_id: Id
    """The disclosing program (programs.program_id)."""
    recipient_id: Id
    """The site's identifier for the recipient."""
    recipient_name: Text
    """Recipient name as on the form."""
    recipient_kind: Coded("recipient-kind")
    """What kind of recipient."""
    recipient_npi: Npi | None = None
    """Recipient NPI, if a provider or organisation has one."""
    purposes: list[ReasonCode] = Field(min_length=1)
    """Purposes of use the client agreed to (v3-ActReason)."""
    data_classes: list[Coded("consent-data-class")] = Field(min_length=1)
    """What may be shared."""
    signed_on: date
    """Date the client signed."""
    start: date
    """First day disclosure is permitted."""
    end: date | None = None
    """Expiry date (Part 2 requires an expiration date, event or condition)."""
    revoked_on: date | None = None
    """Date the client revoked the consent; disclosure stops from this day."""

    @property
    def status(self) -> str:
        return "inactive" if self.revoked_on else "active"

    @model_validator(mode="after")
    def _check(self):
        if self.end and self.end < self.start:
            raise FieldError("end", "end is before start")
        if self.start < self.signed_on:
            raise FieldError("start", "start is before signed_on")
        if self.revoked_on and self.revoked_on < self.signed_on:
            raise FieldError("revoked_on", "revoked_on is before signed_on")
        for name in ("purposes", "data_classes"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise FieldError(name, f"{name} lists a value twice")
        return self


#: Record types in dependency order: a type's references point only to types before it.
RECORD_TYPES: tuple[type[Record], ...] = (
    Program, Counselor, Client, Coverage, Referral, Enrollment, GroupSession, Attendance, CounselingSession,
    MatMedication, MatAdministration, MatDispense, OutsideMedication, DrugScreen, CarePlan, CarePlanGoal, Consent)
BY_STEM: dict[str, type[Record]] = {t.file_stem: t for t in RECORD_TYPES}


def default_context(tz: str | None = None, terminology=None) -> dict:
    from fhir_iop.settings import load_settings
    return {"terminology": terminology or load_terminology(),
            "tz": ZoneInfo(tz or load_settings().timezone)}
