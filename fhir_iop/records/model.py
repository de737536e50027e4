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
from datetime import date, datetime, time
from typing import Annotated, ClassVar, Literal
from zoneinfo import ZoneInfo

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo,
                      model_validator)

from fhir_iop.terminology import load_terminology

Gender = Literal["male", "female", "other", "unknown"]  # FHIR administrative-gender (R4, required)
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]  # FHIR days-of-week (R4)

_ICD10CM = re.compile(r"^[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$")
_TOKEN = re.compile(r"^[A-Za-z0-9._\-]+$")


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


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    if value.tzinfo is None:
        tz = (info.context or {}).get("tz")
        if tz is None:
            raise ValueError("datetime needs a UTC offset (or a site time zone)")
        value = value.replace(tzinfo=tz)
    return value


Id = Annotated[str, Field(min_length=1, max_length=64, pattern=_TOKEN.pattern)]
Text = Annotated[str, Field(min_length=1, max_length=500)]
ICD10CM = Annotated[str, AfterValidator(_icd10cm)]
DateTime = Annotated[datetime, AfterValidator(_aware)]
Npi = Annotated[str, Field(pattern=r"^[0-9]{10}$")]


class Record(BaseModel):
    """Base of every record type: strict about unknown fields, whitespace trimmed."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)
    #: file stem of this record type (``clients`` -> clients.csv / clients.ndjson)
    file_stem: ClassVar[str]
    #: the field that identifies a record, used in error reports
    key_field: ClassVar[str]

    def key(self) -> str:
        return getattr(self, self.key_field)


class Part(BaseModel):
    """A structured value inside a record (a history entry). In CSV: fields joined by ``@``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True)


# -- people and organisations ----------------------------------------------------------------

class Client(Record):
    file_stem: ClassVar[str] = "clients"
    key_field: ClassVar[str] = "mrn"
    mrn: Id
    family_name: Text
    given_names: list[Text] = Field(min_length=1)
    birth_date: date
    gender: Gender
    phone: str | None = None
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")
    address_line: str | None = None
    city: str | None = None
    state: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    postal_code: str | None = Field(default=None, pattern=r"^[0-9]{5}(-[0-9]{4})?$")
    emergency_contact_name: str | None = None
    emergency_contact_phone: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.birth_date > date.today():
            raise ValueError("birth_date is in the future")
        if self.emergency_contact_phone and not self.emergency_contact_name:
            raise ValueError("emergency_contact_phone needs emergency_contact_name")
        return self


class Coverage(Record):
    file_stem: ClassVar[str] = "coverages"
    key_field: ClassVar[str] = "coverage_id"
    coverage_id: Id
    client_mrn: Id
    payer_id: Id
    payer_name: Text
    member_id: Text
    status: Literal["active", "cancelled"] = "active"  # FHIR financial resource status (R4)
    subscriber_relationship: Literal["self", "spouse", "child", "parent", "other"] = "self"
    start: date | None = None
    end: date | None = None
    prior_auth_number: str | None = None
    prior_auth_start: date | None = None
    prior_auth_end: date | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.start and self.end and self.end < self.start:
            raise ValueError("end is before start")
        if (self.prior_auth_start or self.prior_auth_end) and not self.prior_auth_number:
            raise ValueError("a prior-authorization period needs prior_auth_number")
        if self.prior_auth_start and self.prior_auth_end and self.prior_auth_end < self.prior_auth_start:
            raise ValueError("prior_auth_end is before prior_auth_start")
        return self


class Counselor(Record):
    file_stem: ClassVar[str] = "counselors"
    key_field: ClassVar[str] = "counselor_id"
    counselor_id: Id
    family_name: Text
    given_names: list[Text] = Field(min_length=1)
    role: Coded("counselor-role")
    credentials: str | None = None
    npi: Npi | None = None
    phone: str | None = None
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")


class Program(Record):
    file_stem: ClassVar[str] = "programs"
    key_field: ClassVar[str] = "program_id"
    program_id: Id
    name: Text
    kind: Coded("program-kind")
    npi: Npi | None = None
    phone: str | None = None
    address_line: str | None = None
    city: str | None = None
    state: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    postal_code: str | None = Field(default=None, pattern=r"^[0-9]{5}(-[0-9]{4})?$")


# -- enrollment ------------------------------------------------------------------------------

class StatusChange(Part):
    status: Coded("enrollment-status")
    since: date


class LevelChange(Part):
    level: Coded("program-level")
    since: date


TERMINAL_STATUSES = frozenset({"completed", "left-against-advice", "transferred", "stepped-down"})


class Enrollment(Record):
    file_stem: ClassVar[str] = "enrollments"
    key_field: ClassVar[str] = "enrollment_id"
    enrollment_id: Id
    client_mrn: Id
    program_id: Id
    referral_source: Coded("referral-source") | None = None
    status_history: list[StatusChange] = Field(min_length=1)
    level_history: list[LevelChange] = Field(min_length=1)
    admitted_on: date | None = None
    discharged_on: date | None = None
    discharge_reason: Coded("discharge-reason") | None = None
    diagnoses: list[ICD10CM] = Field(default_factory=list)
    primary_counselor: Id | None = None
    care_team: list[Id] = Field(default_factory=list)
    schedule_days: list[Day] = Field(default_factory=list)
    schedule_start: time | None = None
    schedule_end: time | None = None
    track: Coded("schedule-track") | None = None

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
                    raise ValueError(f"{name} is not in date order ({b.since} after {a.since})")
        if self.discharged_on:
            if not self.admitted_on:
                raise ValueError("discharged_on without admitted_on")
            if self.discharged_on < self.admitted_on:
                raise ValueError("discharged_on is before admitted_on")
            if self.status not in TERMINAL_STATUSES:
                raise ValueError(f"discharged_on is set but the last status is {self.status!r}")
        elif self.status in TERMINAL_STATUSES:
            raise ValueError(f"status {self.status!r} needs discharged_on")
        if self.discharge_reason and not self.discharged_on:
            raise ValueError("discharge_reason without discharged_on")
        if self.status != "referred" and not self.admitted_on:
            raise ValueError(f"status {self.status!r} needs admitted_on")
        if self.admitted_on and self.level_history[0].since < self.admitted_on:
            raise ValueError("level_history starts before admitted_on")
        if (self.schedule_start is None) != (self.schedule_end is None):
            raise ValueError("schedule_start and schedule_end go together")
        if self.schedule_start and self.schedule_end <= self.schedule_start:
            raise ValueError("schedule_end is not after schedule_start")
        if len(set(self.diagnoses)) != len(self.diagnoses):
            raise ValueError("diagnoses lists a code twice")
        if len(set(self.care_team)) != len(self.care_team):
            raise ValueError("care_team lists a counselor twice")
        return self


# -- sessions --------------------------------------------------------------------------------

class GroupSession(Record):
    file_stem: ClassVar[str] = "group_sessions"
    key_field: ClassVar[str] = "session_id"
    session_id: Id
    program_id: Id
    topic: Coded("curriculum-topic")
    kind: Coded("session-kind")
    facilitators: list[Id] = Field(min_length=1)
    start: DateTime
    end: DateTime
    modality: Coded("session-modality")
    location: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.end <= self.start:
            raise ValueError("end is not after start")
        if (self.end - self.start).total_seconds() > 12 * 3600:
            raise ValueError("a group session longer than 12 hours")
        return self


class Attendance(Record):
    file_stem: ClassVar[str] = "attendance"
    key_field: ClassVar[str] = "session_id"
    session_id: Id
    client_mrn: Id
    enrollment_id: Id
    status: Coded("attendance-status")
    minutes_attended: int = Field(ge=0, le=720)

    def key(self) -> str:
        return f"{self.session_id}/{self.client_mrn}"

    @model_validator(mode="after")
    def _check(self):
        if self.status in ("absent", "excused") and self.minutes_attended:
            raise ValueError(f"an {self.status} client cannot have minutes_attended")
        if self.status not in ("absent", "excused") and not self.minutes_attended:
            raise ValueError(f"status {self.status!r} needs minutes_attended > 0")
        return self


class CounselingSession(Record):
    file_stem: ClassVar[str] = "counseling_sessions"
    key_field: ClassVar[str] = "counseling_session_id"
    counseling_session_id: Id
    client_mrn: Id
    enrollment_id: Id
    kind: Coded("counseling-kind")
    status: Coded("counseling-status")
    counselor_id: Id
    start: DateTime
    end: DateTime
    modality: Coded("session-modality")
    location: str | None = None

    @property
    def minutes(self) -> int:
        return int((self.end - self.start).total_seconds() // 60)

    @model_validator(mode="after")
    def _check(self):
        if self.end <= self.start:
            raise ValueError("end is not after start")
        return self


#: Record types in dependency order: a type's references point only to types before it.
RECORD_TYPES: tuple[type[Record], ...] = (
    Program, Counselor, Client, Coverage, Enrollment, GroupSession, Attendance, CounselingSession)
BY_STEM: dict[str, type[Record]] = {t.file_stem: t for t in RECORD_TYPES}


def default_context(tz: str | None = None, terminology=None) -> dict:
    from fhir_iop.settings import load_settings
    return {"terminology": terminology or load_terminology(),
            "tz": ZoneInfo(tz or load_settings().timezone)}
