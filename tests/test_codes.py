"""Every code the mapping emits comes from the reference, a cited source, or our own tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_iop import pipeline
from fhir_iop.mapping.common import cited_codes
from fhir_iop.terminology import CANONICAL, load_terminology

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "domain-codes.md"
CLINIC = ROOT / "examples" / "clinic"


def walk_codings(node):
    if isinstance(node, dict):
        if "system" in node and "code" in node and isinstance(node.get("code"), str) and "value" not in node:
            yield node
        for v in node.values():
            yield from walk_codings(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_codings(v)


def allowed_codes() -> dict[tuple[str, str], str]:
    """(system, code) -> where it is allowed from."""
    t = load_terminology()
    allowed = {}
    for url, concepts in t.code_systems.items():
        for code in concepts:
            allowed[(url, code)] = f"CodeSystem {url}"
    for url, concepts in t.value_sets.items():
        for key in concepts:
            allowed[key] = f"ValueSet {url}"
    for table in t.concept_maps.values():
        for targets in table.forward.values():
            for tg in targets:
                if tg.equivalence != "unmatched":
                    allowed[(tg.system, tg.code)] = f"ConceptMap {table.url}"
    for name, c in cited_codes().items():
        allowed[(c["system"], c["code"])] = f"cited-codes {name}: {c['source']}"
    return allowed


def test_every_emitted_code_is_allowed():
    allowed = allowed_codes()
    emitted = set()
    for res in pipeline.to_fhir([CLINIC]):
        assert isinstance(res, dict), str(res)
        for c in walk_codings(res):
            emitted.add((c["system"], c["code"], c.get("display")))
    assert emitted
    for system, code, display in emitted:
        assert (system, code) in allowed, f"{system}|{code} is emitted but comes from no table or citation"


def test_emitted_displays_match_their_tables():
    t = load_terminology()
    for res in pipeline.to_fhir([CLINIC]):
        for c in walk_codings(res):
            if c["system"].startswith(CANONICAL) and "display" in c:
                assert t.code_systems[c["system"]][c["code"]] == c["display"]


@pytest.mark.skipif(not REFERENCE.is_file(), reason="../shared/reference/domain-codes.md is not beside the repo")
def test_external_codes_appear_in_the_reference():
    """Codes cited to domain-codes.md, and every external ConceptMap/ValueSet code, are written there."""
    text = REFERENCE.read_text(encoding="utf-8")
    for (system, code), source in allowed_codes().items():
        if system.startswith((CANONICAL, "https://harborlight.example.org", "http://hl7.org/fhir/")) \
                and system != "http://hl7.org/fhir/sid/icd-10-cm":
            continue  # ours, the site's, or an R4 core status code system (required bindings)
        if source.startswith("cited-codes") and "domain-codes.md" not in source:
            continue  # cited to a fixture or an HL7 page, checked below
        assert in_reference(text, code), f"{system}|{code} ({source}) is not in domain-codes.md"


def in_reference(text: str, code: str) -> bool:
    """The code, or an ICD-10-CM row abbreviation such as ``F13.10 / .11 / .20``."""
    if code in text:
        return True
    head, _, tail = code.partition(".")
    return bool(tail) and any(f"{head}." in line and f" .{tail}" in line for line in text.splitlines())


def test_codes_cited_to_fixtures_are_in_those_fixtures():
    fixtures = ROOT.parent / "shared" / "fixtures"
    if not fixtures.is_dir():
        pytest.skip("../shared/fixtures is not beside the repo")
    for name, c in cited_codes().items():
        src = c["source"]
        if src.startswith("fixtures "):
            rel = src.split()[1].rstrip(";")
            text = (fixtures / rel).read_text(encoding="utf-8")
            assert c["system"] in text and f'"{c["code"]}"' in text.replace(" ", ""), (name, rel)


def test_no_unconfirmed_or_deprecated_codes():
    """Reference §10: the deprecated ActUSPrivacyLaw copy, retired NORDSLCD, https HCPCS are never emitted."""
    for res in pipeline.to_fhir([CLINIC]):
        for c in walk_codings(res):
            assert "v3-ActUSPrivacyLaw" not in c["system"]
            assert c["code"] != "NORDSLCD"
            assert not c["system"].startswith("https://www.cms.gov")
            assert c["system"] != "http://terminology.hl7.org/CodeSystem/icd10CM"
