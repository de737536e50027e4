"""Code tables are data: ConceptMap semantics, site overrides, and bad tables failing early."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fhir_iop import pipeline
from fhir_iop.errors import ConfigError
from fhir_iop.mapping.common import CPT, HCPCS, MappingContext
from fhir_iop.settings import load_settings
from fhir_iop.terminology import MAPPINGS_DIR, PROFILES_DIR, Terminology, load_terminology

T = load_terminology()


@pytest.mark.parametrize("minutes,code", [(10, None), (15, None), (16, "90832"), (37, "90832"), (38, "90834"),
                                          (52, "90834"), (53, "90837"), (90, "90837")])
def test_individual_psychotherapy_code_follows_minutes(minutes, code):
    got = [t.code for t in T.translate("counseling-kind-to-encounter-type", "counseling-kind", "individual",
                                       minutes=str(minutes))]
    assert got == ([code] if code else [])


def test_family_codes():
    assert [t.code for t in T.translate("counseling-kind-to-encounter-type", "counseling-kind", "family-with-client")] == ["90847"]
    assert [t.code for t in T.translate("counseling-kind-to-encounter-type", "counseling-kind", "family-without-client")] == ["90846"]


def test_group_codes_depend_on_program_kind():
    sud = T.translate("session-kind-to-encounter-type", "session-kind", "process", program_kind="substance-use")
    mh = T.translate("session-kind-to-encounter-type", "session-kind", "process", program_kind="mental-health")
    assert [(t.system, t.code) for t in sud] == [(CPT, "90853"), (HCPCS, "H0005")]
    assert [(t.system, t.code) for t in mh] == [(CPT, "90853")]
    fam = T.translate("session-kind-to-encounter-type", "session-kind", "family", program_kind="mental-health")
    assert fam == [], "a multiple-family group has no CPT code in the reference"


def test_reverse_reads_exact_entries_only():
    m = "attendance-status-to-encounter-status"
    assert T.reverse(m, "http://hl7.org/fhir/encounter-status", "finished") == "present"
    assert T.reverse(m, "http://hl7.org/fhir/encounter-status", "cancelled") == "absent"
    assert T.reverse(m, "http://hl7.org/fhir/encounter-status", "in-progress") is None
    eoc = "enrollment-status-to-episodeofcare-status"
    assert T.reverse(eoc, "http://hl7.org/fhir/episode-of-care-status", "waitlist") == "referred"
    assert T.reverse(eoc, "http://hl7.org/fhir/episode-of-care-status", "finished") == "completed"


def test_site_inbound_codes_normalise():
    assert T.normalize("session-kind", "PSYED") == "psychoeducation"
    assert T.normalize("session-kind", "process") == "process"
    assert T.normalize("session-kind", "NOPE") is None


def _site_copy(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(MAPPINGS_DIR / "site.json", site / "site.json")
    return site


def test_site_override_replaces_a_concept_map(tmp_path):
    """A site whose payer bills individual therapy only from 20 minutes changes data, not code."""
    site = _site_copy(tmp_path)
    cm = json.loads((MAPPINGS_DIR / "ConceptMap-counseling-kind-to-encounter-type.json").read_text())
    cm["group"][0]["element"][0]["target"][0]["dependsOn"][0]["value"] = "20"
    (site / "ConceptMap-counseling-kind-to-encounter-type.json").write_text(json.dumps(cm))
    t = Terminology([PROFILES_DIR, MAPPINGS_DIR, site])
    assert t.translate("counseling-kind-to-encounter-type", "counseling-kind", "individual", minutes="18") == []
    assert [x.code for x in t.translate("counseling-kind-to-encounter-type", "counseling-kind", "individual",
                                        minutes="20")] == ["90832"]


def test_site_can_add_curriculum_topics(tmp_path):
    site = _site_copy(tmp_path)
    cs = json.loads((PROFILES_DIR / "CodeSystem-curriculum-topic.json").read_text())
    cs["concept"].append({"code": "seeking-safety", "display": "Seeking Safety"})
    (site / "CodeSystem-curriculum-topic.json").write_text(json.dumps(cs))
    t = Terminology([PROFILES_DIR, MAPPINGS_DIR, site])
    assert t.normalize("curriculum-topic", "seeking-safety") == "seeking-safety"
    assert T.normalize("curriculum-topic", "seeking-safety") is None


@pytest.mark.parametrize("breakage,message", [
    (lambda cm: cm["group"][0]["element"][0].update(code="not-a-status"), "source code 'not-a-status'"),
    (lambda cm: cm["group"][0].pop("target"), "source and target"),
    (lambda cm: cm["group"][0]["element"][0]["target"][0].pop("code"), "target without code"),
])
def test_a_broken_concept_map_fails_before_any_record(tmp_path, breakage, message):
    site = _site_copy(tmp_path)
    cm = json.loads((MAPPINGS_DIR / "ConceptMap-attendance-status-to-encounter-status.json").read_text())
    breakage(cm)
    (site / "ConceptMap-attendance-status-to-encounter-status.json").write_text(json.dumps(cm))
    with pytest.raises(ConfigError, match=message):
        Terminology([PROFILES_DIR, MAPPINGS_DIR, site])


def test_bad_site_settings_fail_clearly(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.json").write_text('{"site_name": "x", "identifier_systems": {"mrn": "urn:x"}}')
    with pytest.raises(ConfigError, match="program"):
        load_settings(site)


def test_site_identifier_systems_change_ids_and_identifiers(tmp_path):
    site = _site_copy(tmp_path)
    data = json.loads((site / "site.json").read_text())
    data["identifier_systems"]["mrn"] = "urn:oid:2.16.840.1.113883.19.5"
    (site / "site.json").write_text(json.dumps(data))
    ctx_a, ctx_b = MappingContext(), MappingContext(settings=load_settings(site))
    assert ctx_a.rid("client", "M1") != ctx_b.rid("client", "M1"), "sites do not share id spaces"
    assert ctx_b.client_ref("M1")["identifier"]["system"] == "urn:oid:2.16.840.1.113883.19.5"
