"""Site settings (``mappings/site.json``), validated when loaded so a bad file fails before any record."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import orjson
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fhir_iop.errors import ConfigError
from fhir_iop.terminology import MAPPINGS_DIR


class IdentifierSystems(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mrn: str
    program: str
    counselor: str
    coverage: str
    payer: str
    enrollment: str
    group_session: str
    attendance: str
    counseling_session: str
    drug_screen: str
    mat_medication: str
    mat_administration: str
    mat_dispense: str
    care_plan: str
    care_plan_goal: str
    consent: str
    recipient: str
    referral: str
    outside_medication: str


class SiteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site_name: str
    #: True for a program that falls under 42 CFR Part 2: every resource about a client is labelled.
    part2_program: bool = True
    #: IANA time zone for record datetimes written without a UTC offset
    timezone: str = "America/New_York"
    identifier_systems: IdentifierSystems
    #: Identifier systems under which another system (an EHR, an HIE) records the site's own MRN: a
    #: Patient pulled from an EHR that carries an existing client's MRN under the site's MRN system or
    #: one of these is linked to that client, not taken for a new one (fhir_iop.sync.pull).
    mrn_match_systems: list[str] = []

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


def _settings_path(extra: str | os.PathLike | None) -> Path:
    extra = extra or os.environ.get("FHIR_IOP_MAPPINGS")
    if extra and (Path(extra) / "site.json").is_file():
        return Path(extra) / "site.json"
    return MAPPINGS_DIR / "site.json"


@lru_cache(maxsize=8)
def _load(path: Path) -> SiteSettings:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    data.pop("_comment", None)
    try:
        return SiteSettings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {e}") from e


def load_settings(extra: str | os.PathLike | None = None) -> SiteSettings:
    return _load(_settings_path(extra))
