"""profiles/: the conformance resources fhir-iop publishes (fhir_iop/conformance builds them).

The issue: "StructureDefinitions (differential and snapshot) for every IOP profile the mapping emits
… each on its US Core R4 parent where one exists; the CodeSystems and ValueSets fhir-iop defines and
the ValueSets it binds to, the ConceptMaps, and a CapabilityStatement; profiles/README.md: the
artifact index … the published files must be valid FHIR."
"""

from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

from fhir_iop import pipeline
from fhir_iop.conformance import build, specs
from fhir_iop.mapping.common import PART2_LABELS as PART2
from fhir_iop.conformance.definitions import R4_DIR, US_CORE_DIR, Definitions
from fhir_iop.conformance.snapshot import SnapshotError, apply, type_code
from fhir_iop.errors import ConfigError
from fhir_iop.fhir.r4 import structure_errors
from fhir_iop.mapping.common import PROFILES
from fhir_iop.terminology import CANONICAL, MAPPINGS_DIR, PROFILES_DIR

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"
SD_URL = f"{CANONICAL}/StructureDefinition/"

needs_definitions = pytest.mark.skipif(
    not (R4_DIR / "profiles-resources.json").is_file() or not US_CORE_DIR.is_dir(),
    reason=f"FHIR R4 definitions ({R4_DIR}: ./dev runs npm install) or US Core ({US_CORE_DIR}) not found")


def published() -> list[Path]:
    return sorted(PROFILES_DIR.glob("*.json")) + sorted(MAPPINGS_DIR.glob("ConceptMap-*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def structure_definitions() -> dict[str, dict]:
    return {sd["url"]: sd for sd in (load(p) for p in sorted(PROFILES_DIR.glob("StructureDefinition-*.json")))}


@lru_cache(maxsize=1)
def clinic() -> tuple[dict, ...]:
    out = []
    for item in pipeline.to_fhir([CLINIC]):
        assert isinstance(item, dict), str(item)
        out.append(item)
    return tuple(out)


@lru_cache(maxsize=1)
def defs() -> Definitions:
    return Definitions()


# -- the files ------------------------------------------------------------------------------------

@needs_definitions
def test_building_again_gives_exactly_the_committed_files():
    outputs = build.build(Definitions())
    assert build.differences(outputs) == [], "run: python -m fhir_iop.conformance.build"
    assert build.build(Definitions()) == outputs, "two builds differ"
    assert build.differences(build.dependencies(Definitions()), build.DEPENDENCIES_DIR) == [], \
        "run: python -m fhir_iop.conformance.build"


@needs_definitions
def test_what_leaves_with_the_redisclosure_mark_still_validates():
    """The §2.32 notice rides in DS4P's extension-display and the THO code RedisclosureProhibitionMark, both
    newer than the R4 packages: the validator knows them (fhir_iop/data/dependencies, cited codes)."""
    from fhir_iop.disclosure import mark
    from fhir_iop.validation import default_validator
    patient = {"resourceType": "Patient", "id": "p1", "meta": {"security": [dict(c) for c in PART2]},
               "identifier": [{"system": "https://example.org/mrn", "value": "M1"}], "gender": "female"}
    issues = default_validator().validate(mark(patient), [])
    assert [str(i) for i in issues if i.severity in ("error", "fatal")] == []
    bad = mark(patient)
    bad["meta"]["extension"][0] = {"url": bad["meta"]["extension"][0]["url"], "valueString": "no annotation"}
    assert any(i.severity == "error" for i in default_validator().validate(bad, [])), "the extension's type is checked"


@needs_definitions
def test_check_mode_reports_a_changed_file(tmp_path, capsys):
    for name in ("StructureDefinition-iop-client.json", "ValueSet-program-level.json"):
        (tmp_path / name).write_text((PROFILES_DIR / name).read_text(encoding="utf-8"), encoding="utf-8")
    assert build.main(["--check", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "differs: README.md" in out and "StructureDefinition-iop-client.json" not in out


def test_missing_definitions_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FHIR_IOP_DEFINITIONS", str(tmp_path))
    with pytest.raises(ConfigError, match="npm install"):
        Definitions()


def test_every_published_resource_is_valid_r4():
    fhirkit = pytest.importorskip("fhirkit")
    for path in published():
        res = load(path)
        assert structure_errors(res) == [], path.name
        assert [str(i) for i in fhirkit.validate(res)] == [], path.name


def test_every_profile_is_published_with_its_parent():
    sds = structure_definitions()
    for concept, urls in PROFILES.items():
        sd = sds.get(urls[0])
        assert sd is not None, f"{concept}: no StructureDefinition for {urls[0]}"
        assert (PROFILES_DIR / f"StructureDefinition-{sd['id']}.json").is_file()
        assert sd["baseDefinition"] == (urls[1] if len(urls) > 1 else
                                        f"http://hl7.org/fhir/StructureDefinition/{sd['type']}"), concept
        assert sd["derivation"] == "constraint" and sd["kind"] == "resource"
        assert "Parent:" in sd["description"]  # names the parent and the version it came from


def emitted_extension_urls(node, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for e in node.get("extension", ()):
            if e.get("url", "").startswith(CANONICAL):
                out.add(e["url"])
        for v in node.values():
            emitted_extension_urls(v, out)
    elif isinstance(node, list):
        for v in node:
            emitted_extension_urls(v, out)
    return out


def test_every_extension_the_mapping_emits_is_published():
    sds = structure_definitions()
    emitted = set()
    for res in clinic():
        emitted_extension_urls(res, emitted)
    assert emitted
    named = set()
    for source in (ROOT / "fhir_iop" / "mapping").glob("*.py"):
        named |= {SD_URL + n for n in re.findall(r"ext_(?:url|coding)\(\"([a-z0-9-]+)\"", source.read_text())}
    for url in sorted(emitted | named):
        sd = sds.get(url)
        assert sd is not None, f"no StructureDefinition for the extension {url}"
        assert sd["type"] == "Extension" and sd["context"], url
    extension_sds = {u for u, sd in sds.items() if sd["type"] == "Extension"}
    assert extension_sds == emitted | named, "a published extension the mapping never writes"


def test_every_extension_slice_is_typed_with_a_published_extension():
    sds = structure_definitions()
    for sd in sds.values():
        for e in sd["snapshot"]["element"]:
            if e["path"].endswith(".extension") and "sliceName" in e and sd["type"] != "Extension":
                (t,) = e["type"]
                url = t["profile"][0]
                assert t["code"] == "Extension" and (url in sds or not url.startswith(CANONICAL)), (sd["id"], e["id"])


@needs_definitions
def test_snapshots_hold_every_differential_element_and_follow_the_rules():
    sds = structure_definitions()
    known = set(sds) | {load(p)["url"] for p in PROFILES_DIR.glob("ValueSet-*.json")}
    for sd in sds.values():
        snapshot_ids = {e["id"] for e in sd["snapshot"]["element"]}
        assert {d["id"] for d in sd["differential"]["element"]} <= snapshot_ids, sd["id"]
        assert build.check_sd(sd, known) == []
        assert sd["fhirVersion"] == "4.0.1"
    for sd in sds.values():  # the US Core parents' rules are in the snapshot (here: Patient.name 1..*)
        if sd["baseDefinition"].endswith("us-core-patient"):
            name = next(e for e in sd["snapshot"]["element"] if e["id"] == "Patient.name")
            assert name["min"] == 1


def test_capability_statement_lists_every_profile():
    cap = load(PROFILES_DIR / "CapabilityStatement-fhir-iop.json")
    assert cap["kind"] == "capability" and cap["fhirVersion"] == "4.0.1"
    assert cap["software"]["name"] == "fhir-iop" and set(cap["format"]) == {"json", "xml"}
    listed = {(r["type"], p) for rest in cap["rest"] for r in rest["resource"] for p in r.get("supportedProfile", ())}
    for concept, urls in PROFILES.items():
        rt = structure_definitions()[urls[0]]["type"]
        for url in urls:
            assert (rt, url) in listed, f"{concept}: {rt} {url}"
    assert all("interaction" not in r for rest in cap["rest"] for r in rest["resource"]), "no REST API yet"


def test_value_sets_cover_every_code_system_and_every_binding():
    value_sets = {load(p)["url"]: load(p) for p in PROFILES_DIR.glob("ValueSet-*.json")}
    assert f"{CANONICAL}/ValueSet/sud-diagnoses" in value_sets  # hand-written, kept
    for path in PROFILES_DIR.glob("CodeSystem-*.json"):
        cs = load(path)
        vs = value_sets.get(f"{CANONICAL}/ValueSet/{cs['id']}")
        assert vs is not None and vs["compose"]["include"] == [{"system": cs["url"]}], cs["id"]
    for sd in structure_definitions().values():
        for e in sd["snapshot"]["element"]:
            url = e.get("binding", {}).get("valueSet", "")
            if url.startswith(CANONICAL):
                assert url in value_sets, (sd["id"], e["id"], url)


def test_binding_value_sets_hold_exactly_the_concept_map_targets():
    maps = {load(p)["id"]: load(p) for p in MAPPINGS_DIR.glob("ConceptMap-*.json")}
    for spec in specs.MAP_VALUE_SETS:
        vs = load(PROFILES_DIR / f"ValueSet-{spec.id}.json")
        codes = {(inc["system"], c["code"]) for inc in vs["compose"]["include"] for c in inc["concept"]}
        targets = {(g["target"], t["code"]) for m in spec.maps for g in maps[m]["group"]
                   for el in g["element"] for t in el["target"] if t.get("equivalence") != "unmatched"}
        assert codes == targets, spec.id


def test_readme_indexes_every_artifact():
    text = (PROFILES_DIR / "README.md").read_text(encoding="utf-8")
    for path in published():
        res = load(path)
        assert f"`{res['url']}`" in text, path.name
        assert res.get("title", "") in text, path.name
    assert "US Core 9.0.0" in text and "4.0.1" in text


# -- the snapshot engine ----------------------------------------------------------------------------

@pytest.mark.skipif(not (R4_DIR / "profiles-others.json").is_file(), reason=f"no R4 definitions at {R4_DIR}")
@pytest.mark.parametrize("name", ["vitalsigns", "bodyweight", "heartrate", "cholesterol", "lipidprofile"])
def test_engine_makes_the_snapshots_hl7_published(name):
    """HL7's core profiles come with differential and snapshot: the engine must get the same elements."""
    others = load(R4_DIR / "profiles-others.json")
    sds = {e["resource"]["id"]: e["resource"] for e in others["entry"]}
    d = Definitions()
    d.add(sds["vitalsigns"], "R4 core profile")
    sd = sds[name]
    mine, _ = apply(d.snapshot(sd["baseDefinition"]), sd["differential"]["element"], d)
    theirs = sd["snapshot"]["element"]
    assert [e["id"] for e in mine] == [e["id"] for e in theirs]

    def key(e):
        b = e.get("binding", {})
        return (e["min"], e["max"], e.get("sliceName"), e.get("slicing"), e.get("mustSupport"),
                [type_code(t) for t in e.get("type", ())], (b.get("strength"), b.get("valueSet")),
                {k: v for k, v in e.items() if k.startswith(("fixed", "pattern"))})
    for a, b in zip(mine, theirs):
        assert key(a) == key(b), a["id"]


@needs_definitions
@pytest.mark.parametrize("element, message", [
    ({"id": "Encounter.status", "path": "Encounter.status", "min": 1}, None),
    ({"id": "Encounter.class", "path": "Encounter.class", "min": 0}, "below the parent"),
    ({"id": "Encounter.status", "path": "Encounter.status", "max": "*"}, "above the parent"),
    ({"id": "Encounter.nothing", "path": "Encounter.nothing"}, "no such element"),
    ({"id": "Encounter.subject", "path": "Encounter.subject", "type": [{"code": "string"}]}, "not among"),
    ({"id": "Encounter.status", "path": "Encounter.status",
      "binding": {"strength": "extensible", "valueSet": "http://x"}}, "cannot be loosened"),
    ({"id": "Encounter.type:a", "path": "Encounter.type", "sliceName": "a"}, "not sliced"),
    ({"id": "Encounter.length.value", "path": "Encounter.length.value", "min": 1}, None),
    ({"id": "Encounter.period.start", "path": "Encounter.period.end"}, "disagree"),
])
def test_engine_only_narrows(element, message):
    base = defs().snapshot("http://hl7.org/fhir/StructureDefinition/Encounter")
    if message is None:
        snap, _ = apply(base, [element], defs())
        assert any(e["id"] == element["id"] for e in snap)
    else:
        with pytest.raises(SnapshotError, match=message):
            apply(base, [element], defs())


@needs_definitions
def test_engine_expands_types_slices_and_content_references():
    diff = [{"id": "Consent.provision.provision.actor.reference.identifier",
             "path": "Consent.provision.provision.actor.reference.identifier", "min": 1},
            {"id": "Consent.category", "path": "Consent.category", "slicing": specs.by_pattern()},
            {"id": "Consent.category:doc", "path": "Consent.category", "sliceName": "doc", "pattern": {"text": "x"}},
            {"id": "Consent.category:doc.text", "path": "Consent.category.text", "min": 1}]
    snap, resolved = apply(defs().snapshot("http://hl7.org/fhir/StructureDefinition/Consent"), diff, defs())
    ids = [e["id"] for e in snap]
    nested = ids.index("Consent.provision.provision")
    assert ids.index("Consent.provision.provision.actor.reference.identifier") > nested
    doc = ids.index("Consent.category:doc")
    assert ids[doc - 1] == "Consent.category" and ids[doc + 1:doc + 4] == [
        "Consent.category:doc.id", "Consent.category:doc.extension", "Consent.category:doc.coding"]
    assert resolved[2]["patternCodeableConcept"] == {"text": "x"} and "pattern" not in resolved[2]
    assert next(e for e in snap if e["id"] == "Consent.category:doc")["min"] == 0


@pytest.mark.skipif(not (R4_DIR / "profiles-types.json").is_file(), reason=f"no R4 definitions at {R4_DIR}")
def test_medplum_additions_to_the_r4_definitions_are_left_out():
    meta = [e["id"] for e in Definitions().snapshot("http://hl7.org/fhir/StructureDefinition/Meta")]
    assert meta == ["Meta", "Meta.id", "Meta.extension", "Meta.versionId", "Meta.lastUpdated", "Meta.source",
                    "Meta.profile", "Meta.security", "Meta.tag"]


# -- the mapping's output against the profiles ---------------------------------------------------------

def _matches(value, pattern) -> bool:
    """FHIR pattern semantics: every element of the pattern is in the value (lists: some item each)."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(_matches(value.get(k), v) for k, v in pattern.items())
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else []
        return all(any(_matches(i, p) for i in items) for p in pattern)
    return value == pattern


class Profile:
    """A tiny reading of a snapshot: cardinality, fixed/pattern, slices by url or pattern, choice types."""

    def __init__(self, sd: dict):
        self.elements = {e["id"]: e for e in sd["snapshot"]["element"]}
        self.children: dict[str, list[str]] = {}
        self.slices: dict[str, list[str]] = {}
        for eid in self.elements:
            if "." not in eid:
                continue
            parent, last = eid.rsplit(".", 1)
            if ":" in last:
                self.slices.setdefault(f"{parent}.{last.split(':')[0]}", []).append(eid)
            else:
                self.children.setdefault(parent, []).append(eid)
        self.root = sd["type"]

    def problems(self, resource: dict) -> list[str]:
        out: list[str] = []
        self._check(self.root, [resource], out)
        return out

    def _in_slice(self, value, slice_id: str, slicing: dict) -> bool:
        el = self.elements[slice_id]
        for d in slicing["discriminator"]:
            if d["path"] == "url" and el.get("type", [{}])[0].get("profile"):
                if not isinstance(value, dict) or value.get("url") != el["type"][0]["profile"][0]:
                    return False
                continue
            target = el if d["path"] == "$this" else self.elements.get(f"{slice_id}.{d['path']}", {})
            got = value if d["path"] == "$this" else (value or {}).get(d["path"])
            for k, v in target.items():
                if k.startswith("pattern") and not _matches(got, v):
                    return False
                if k.startswith("fixed") and got != v:
                    return False
        return True

    def _check(self, eid: str, values: list, out: list[str]) -> None:
        el = self.elements[eid]
        n, hi = len(values), float("inf") if el["max"] == "*" else int(el["max"])
        if not el["min"] <= n <= hi:
            out.append(f"{eid}: {n} value(s), cardinality {el['min']}..{el['max']}")
        for k, v in el.items():
            for value in values:
                if k.startswith("pattern") and not _matches(value, v):
                    out.append(f"{eid}: {value!r} does not match {k} {v!r}")
                elif k.startswith("fixed") and value != v:
                    out.append(f"{eid}: {value!r} is not {k} {v!r}")
        for child in self.children.get(eid, ()):
            name = child.rsplit(".", 1)[1]
            for value in values:
                if not isinstance(value, dict):
                    continue
                if name.endswith("[x]"):
                    allowed = {type_code(t) for t in self.elements[child].get("type", ())}
                    keys = [k for k in value if k.startswith(name[:-3]) and k[len(name) - 3:][:1].isupper()]
                    for k in keys:
                        if not any(k[len(name) - 3:] == c[0].upper() + c[1:] for c in allowed):
                            out.append(f"{child}: {k} is not one of the types {sorted(allowed)}")
                    got = [value[k] for k in keys]
                else:
                    got = value.get(name, [])
                got = got if isinstance(got, list) else [got]
                self._check(child, got, out)
                slicing = self.elements[child].get("slicing")
                for s in self.slices.get(child, ()):
                    self._check(s, [g for g in got if self._in_slice(g, s, slicing)], out)


@needs_definitions
def test_every_resource_the_mapping_emits_conforms_to_its_profile():
    """Cardinality, fixed and pattern values, and slices (a reading of the snapshots, not the validator)."""
    sds = structure_definitions()
    profiles = {url: Profile(sd) for url, sd in sds.items()}
    seen = set()
    for res in clinic():
        url = res["meta"]["profile"][0]
        seen.add(url)
        problems = profiles[url].problems(res)
        assert problems == [], f"{res['resourceType']}/{res['id']} against {url}: {problems[:5]}"
    assert seen == {urls[0] for urls in PROFILES.values()}, "examples/clinic does not cover every profile"


def test_extension_instances_conform_to_their_definitions():
    profiles = {url: Profile(sd) for url, sd in structure_definitions().items() if sd["type"] == "Extension"}
    count = 0

    def walk(node):
        nonlocal count
        if isinstance(node, dict):
            for e in node.get("extension", ()):
                if e.get("url") in profiles:
                    count += 1
                    assert profiles[e["url"]].problems(e) == [], e
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for res in clinic():
        walk(res)
    assert count


def test_the_profiles_invariants_hold_on_what_the_mapping_emits():
    """Every error-level invariant on a profile's root (US Core's, R4's, fhir-iop's) and each extension's,
    on up to 40 resources per profile (FHIRPath is slow; the mapping's shapes repeat)."""
    fhirpath = pytest.importorskip("fhirpathpy")
    r4 = pytest.importorskip("fhirpathpy.models").models["r4"]
    sds = structure_definitions()

    def holds(node, constraint) -> bool:
        return fhirpath.evaluate(copy.deepcopy(node), constraint["expression"], model=r4) == [True]
    checked, per_profile = set(), {}
    for res in clinic():
        sd = sds[res["meta"]["profile"][0]]
        per_profile[sd["id"]] = per_profile.get(sd["id"], 0) + 1
        if per_profile[sd["id"]] > 40:
            continue
        for c in sd["snapshot"]["element"][0].get("constraint", ()):
            if c["severity"] == "error" and c.get("expression"):
                assert holds(res, c), (sd["id"], c["key"], c["human"], res["id"])
                checked.add(c["key"])
        for e in res.get("extension", ()):
            for c in sds[e["url"]]["snapshot"]["element"][0].get("constraint", ()):
                if c["key"].startswith("iop-"):
                    assert holds(e, c), (c["key"], e)
                    checked.add(c["key"])
    assert {"iop-part2-1", "iop-sched-1", "us-core-2", "us-core-8"} <= checked
    unlabelled = copy.deepcopy(next(r for r in clinic() if r["resourceType"] == "Patient"))
    unlabelled["meta"]["security"] = [s for s in unlabelled["meta"]["security"] if s["code"] != "SUD"]
    part2 = next(c for c in sds[unlabelled["meta"]["profile"][0]]["snapshot"]["element"][0]["constraint"]
                 if c["key"] == "iop-part2-1")
    assert not holds(unlabelled, part2)


#: what the mapping writes and no profile can allow: R4's own invariants (reported to the lead)
MAPPING_DEFECTS: dict[str, str] = {}  # invariant key -> known mapping defect (none open)


def validator_or_skip(**options):
    try:
        from fhir_iop.validation import Options, Validator
    except ImportError as e:
        pytest.skip(f"fhir_iop.validation cannot be imported ({e})")
    return Validator(options=Options(**options))


def errors_of(issues, known=()) -> list[str]:
    return [str(i) for i in issues if i.severity in ("error", "fatal") and not any(k in str(i) for k in known)]


@lru_cache(maxsize=1)
def own_profile_issues() -> tuple:
    v = validator_or_skip(meta_profiles=False)
    return tuple((res, tuple(v.validate(res, res["meta"]["profile"][:1]))) for res in clinic())


@needs_definitions
def test_every_resource_validates_against_its_fhir_iop_profile():
    """fhir_iop.validation with the published profiles (whose snapshots carry the US Core parents' rules)."""
    for res, issues in own_profile_issues():
        errors = errors_of(issues, MAPPING_DEFECTS)
        assert errors == [], f"{res['resourceType']}/{res['id']} ({res['meta']['profile'][0]}): {errors[:3]}"


@needs_definitions
def test_the_mapping_breaks_no_r4_invariant():
    found = {k for _, issues in own_profile_issues() for i in issues if i.severity == "error"
             for k in MAPPING_DEFECTS if k in str(i)}
    assert found == set()


@needs_definitions
def test_every_resource_validates_against_every_profile_in_its_meta_profile():
    v = validator_or_skip()
    for res in clinic():
        errors = errors_of(v.validate(res), MAPPING_DEFECTS)
        assert errors == [], f"{res['resourceType']}/{res['id']} ({res['meta']['profile']}): {errors[:3]}"
