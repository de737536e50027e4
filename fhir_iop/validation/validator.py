"""The rule engine: a resource walked against the snapshot of its type and of each profile.

For every element instance the walk checks, in the order the HL7 validator reports them:

- structure: known properties, JSON arrays where the base cardinality repeats and objects where it
  does not, no empty arrays or nulls, primitives of their type (JSON type, the type's regex, real
  dates, time zones, resource ids, base64, XHTML), choice types allowed;
- cardinality (min/max) of every element, slice and choice;
- fixed[x] and pattern[x] values;
- bindings: required (error), extensible (warning) to ValueSets expanded offline
  (:mod:`fhir_iop.validation.codes`); codes of CodeSystems held locally; a ValueSet that cannot be
  expanded here is reported as information, "not checked";
- slicing by value, pattern, exists and type discriminators (extensions by url), closed slicing,
  slice cardinality;
- invariants (constraint[].expression, with their severity) of the element and of its type,
  evaluated in context (:mod:`fhir_iop.validation.fhirpath`);
- extensions: url present and absolute, the extension known (its StructureDefinition: value type,
  sub-extensions, context), unknown ones per :class:`Options`;
- references: the type a literal reference implies is an allowed target, local (``#id``)
  references resolve; inside a Bundle, :mod:`fhir_iop.validation.bundle` resolves the rest;
- must-support elements of fhir-iop's own profiles that are absent (information).

Each issue carries a FHIRPath location in the HL7 validator's style (``Patient.name[0].given[0]``,
``Observation.value.ofType(Quantity)``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field

from fhir_iop.errors import ConfigError
from fhir_iop.terminology import CANONICAL
from fhir_iop.validation.codes import Codes
from fhir_iop.validation.definitions import (CORE, Definitions, Element, StructureDef, TypeRef, load_definitions,
                                             strip_version)
from fhir_iop.validation.fhirpath import Env, Invariants
from fhir_iop.validation.narrative import check_div
from fhir_iop.validation.vitals import implied_profile

SEVERITIES = ("fatal", "error", "warning", "information")
_ABSOLUTE = re.compile(r"^(https?|ftp|urn|mailto|file|ldap|tel|data):", re.I)
_RESOURCE_ID = re.compile(r"[A-Za-z0-9\-\.]{1,64}")
_RESOURCE_ID_CHARS = re.compile(r"[A-Za-z0-9\-\.]+")
_LITERAL_REF = re.compile(r"^(?:(?P<base>.*?)/)?(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-\.]{1,64})"
                          r"(?:/_history/(?P<version>[A-Za-z0-9\-\.]{1,64}))?$")
_EXAMPLE_URL = re.compile(r"^[a-z]+://([a-z0-9-]+\.)*(example\.(org|com|net)|acme\.(com|org))(:\d+)?(/|$)", re.I)
_DATE_TIME_NO_TZ = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?$")
_INT32 = (-2147483648, 2147483647)
_URN_UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_URN_OID = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
_ELE1 = ("hasValue() or (children().count() > id.count())",
         "hasValue() or (children().count() > id.count()) or $this is Parameters")
#: extensions whose declared context R4 itself does not follow: not checked
_CONTEXT_EXEMPT = {
    # declared on ElementDefinition.type.code, but R4's own snapshots put it on ElementDefinition.type
    "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type",
}


@dataclass(frozen=True)
class Issue:
    """One finding: an OperationOutcome.issue."""

    severity: str            # fatal | error | warning | information
    code: str                # OperationOutcome issue type: structure, required, value, invariant, code-invalid…
    expression: str          # FHIRPath location
    message: str
    rule: str | None = None  # the invariant key or rule class (cardinality, binding, slicing…)
    source: str | None = None  # the StructureDefinition the rule comes from

    def to_fhir(self) -> dict:
        issue = {"severity": self.severity, "code": self.code,
                 "diagnostics": f"{self.rule}: {self.message}" if self.rule else self.message,
                 "expression": [self.expression]}
        if self.source:
            issue["extension"] = [{"url": "http://hl7.org/fhir/StructureDefinition/operationoutcome-issue-source",
                                   "valueString": self.source}]
        return issue

    def __str__(self) -> str:
        return f"{self.severity} {self.expression}: {self.message}"


@dataclass(frozen=True)
class Options:
    """How strict to be where the FHIR specification leaves it to the validator."""

    #: also validate against the profiles a resource names in meta.profile, when they are known
    meta_profiles: bool = True
    #: severity for an extension whose definition is not known ("error", "warning", "information", "ignore")
    unknown_extensions: str = "error"
    #: url prefixes under which unknown extensions are accepted without a finding
    extension_domains: tuple[str, ...] = ()
    #: accept example.org/example.com URLs (the HL7 validator's -allow-example-urls)
    allow_example_urls: bool = True
    #: report contained resources that nothing references (dom-3)
    check_contained: bool = True
    #: report absent must-support elements of fhir-iop's own profiles (information)
    must_support: bool = True
    #: severity of a meta.profile that is not known
    unknown_profile: str = "warning"
    #: validate Observations with vital signs codes against the core vital signs profiles (R4 rule)
    implied_profiles: bool = True
    #: severity of failed best-practice invariants such as dom-6 ("ignore", "information", "warning", "error")
    best_practice: str = "ignore"
    #: also run fhir.resources (R4B models) and report the structural errors it finds that this
    #: validator did not (R4B differs from R4 in a few resources, hence off by default)
    model_check: bool = False


@dataclass
class _Run:
    """The state of one validate() call."""

    issues: list[Issue] = field(default_factory=list)
    seen: set = field(default_factory=set)
    bundles: list = field(default_factory=list)   # BundleState stack (innermost last)

    def add(self, issue: Issue) -> None:
        key = (issue.severity, issue.code, issue.expression, issue.message)
        if key not in self.seen:
            self.seen.add(key)
            self.issues.append(issue)


class _Lookup:
    """Property names of one set of child definitions → (definition, type code)."""

    __slots__ = ("names", "choices", "children", "watch")

    def __init__(self, children: dict[str, Element]):
        self.children = children
        self.names: dict[str, tuple[Element, str | None]] = {}
        self.choices: list[tuple[str, Element]] = []
        # children whose absence can be a finding: required, must-support, or with required slices
        self.watch = [(name, el) for name, el in children.items()
                      if el.min > 0 or el.must_support or any(sl.min > 0 for sl in el.slices)]
        for name, el in children.items():
            if el.choice:
                prefix = name[:-3]
                self.choices.append((prefix, el))
                for t in el.types:
                    self.names[prefix + t.code[0].upper() + t.code[1:]] = (el, t.code)
            else:
                code = el.types[0].code if len(el.types) == 1 else None
                if code in ("BackboneElement", "Element") and el.children:
                    code = None
                self.names[name] = (el, code)


class Validator:
    """Validates resources against R4 core and the profiles it knows. Thread-compatible, reusable."""

    def __init__(self, definitions: Definitions | None = None, options: Options | None = None):
        self.defs = definitions or load_definitions()
        self.codes = Codes(self.defs)
        self.invariants = Invariants()
        self.options = options or Options()
        self._lookups: dict[int, _Lookup] = {}
        self._regex: dict[str, re.Pattern | None] = {}
        self._bind_cache: dict = {}
        from fhir_iop.validation.bundle import BundleRules
        self._bundle_rules = BundleRules(self)
        # the base types (resources, data types, Element…): their rules are checked in the base pass
        self._core_sources = {url for url, sd in self.defs.structures.items()
                              if url.startswith(CORE) and sd.derivation == "specialization"}
        self._core_sources.add(CORE + "Element")
        self._plans: dict = {}
        self._type_sds: dict = {}
        self._merged: dict = {}

    # -- public ----------------------------------------------------------------------------------
    def validate(self, resource: dict, profiles: tuple[str, ...] | list[str] = (),
                 location: str | None = None) -> list[Issue]:
        """Issues for one resource (a Bundle is validated entry by entry, references resolved)."""
        for url in profiles:
            sd = self.defs.structure(url)
            if sd is None:
                raise ConfigError(f"profile {url} is not known (not in the FHIR core definitions, US Core "
                                  "5.0.1 or profiles/)")
            if not sd.has_snapshot:
                raise ConfigError(f"profile {url} has no snapshot")
        run = _Run()
        if not isinstance(resource, dict):
            run.add(Issue("fatal", "structure", location or "$this", "not a JSON object", "structure"))
            return run.issues
        rt = resource.get("resourceType")
        loc = location or (rt if isinstance(rt, str) else "$this")
        self._resource(run, resource, loc, None, tuple(strip_version(p) for p in profiles))
        if self.options.model_check:
            self._model_check(run, resource, loc)
        return run.issues

    def _model_check(self, run: _Run, resource: dict, loc: str) -> None:
        """fhir.resources (R4B models) as a second opinion on structure: what it finds where this
        validator found no error is added."""
        from fhir_iop.fhir import r4
        have = [i.expression for i in run.issues if i.severity in ("error", "fatal")]
        for where, message in r4.structure_errors(resource):
            path = loc
            for part in where.split(".") if where and where != "resourceType" else ():
                path += f"[{part}]" if part.isdigit() else f".{part}"
            if any(h == path or h.startswith(path + ".") or h.startswith(path + "[") or path.startswith(h + ".")
                   or path.startswith(h + "[") for h in have):
                continue
            run.add(Issue("error", "structure", path, f"{message} (fhir.resources R4B)", "model"))

    # -- resources --------------------------------------------------------------------------------
    def _resource(self, run: _Run, res: dict, loc: str, container_env: Env | None,
                  profiles: tuple[str, ...] = (), bundle_entry: bool = False) -> None:
        rt = res.get("resourceType")
        if not isinstance(rt, str):
            run.add(Issue("error", "structure", loc, "The resource has no resourceType", "structure"))
            return
        sd = self.defs.type_sd(rt)
        if sd is None or sd.kind != "resource" or sd.abstract:
            run.add(Issue("error", "structure", loc, f"Unknown resource type '{rt}'", "structure"))
            return
        if container_env is not None and not bundle_entry:
            env = Env(res, container_env.root, container_env.resolver, self.codes)
        else:
            resolver = run.bundles[-1].resolver_for(res) if run.bundles else None
            env = Env(res, res, resolver, self.codes)
        contained = container_env is not None and not bundle_entry
        if rt == "Bundle":
            run.bundles.append(self._bundle_rules.state(res, loc))
        try:
            self._complex(run, res, sd.root, rt, loc, env, None, rt)
            self._constraints(run, res, sd.root, None, loc, env, None, None)
            rid = res.get("id")
            if isinstance(rid, str):
                if not _RESOURCE_ID_CHARS.fullmatch(rid):
                    run.add(Issue("error", "invalid", f"{loc}.id", f"Invalid Resource id: Invalid Characters ('{rid}')",
                                  "resource-id"))
                elif len(rid) > 64 and not contained:
                    run.add(Issue("error", "invalid", f"{loc}.id", f"Invalid Resource id: Too long ({len(rid)} chars)",
                                  "resource-id"))
            wanted = list(profiles)
            meta = res.get("meta")
            if self.options.meta_profiles and isinstance(meta, dict) and isinstance(meta.get("profile"), list):
                declared = [strip_version(p) for p in meta["profile"] if isinstance(p, str)]
                covered = self._ancestors([u for u in declared + wanted if self.defs.structure(u) is not None])
                for i, p in enumerate(meta["profile"]):
                    if not isinstance(p, str):
                        continue
                    url = strip_version(p)
                    psd = self.defs.structure(url)
                    if psd is None or not psd.has_snapshot:
                        if url in covered:  # a known profile derives from it: its rules are in that snapshot
                            run.add(Issue("information", "informational", f"{loc}.meta.profile[{i}]",
                                          f"Profile '{url}' is checked through the profile(s) derived from it",
                                          "profile"))
                        elif self.options.unknown_profile != "ignore":
                            run.add(Issue(self.options.unknown_profile, "not-supported", f"{loc}.meta.profile[{i}]",
                                          f"Profile reference '{url}' has not been checked because it is "
                                          + ("unknown" if psd is None else "not available as a snapshot"),
                                          "profile"))
                        continue
                    if url not in wanted:
                        wanted.append(url)
            if rt == "Observation" and self.options.implied_profiles:
                hit = implied_profile(res)
                if hit is not None and hit[0] not in wanted and self.defs.structure(hit[0]) is not None:
                    run.add(Issue("information", "informational", loc, f"Validate Observation against the {hit[1]} "
                                  f"profile ({hit[0]}) which is required by the FHIR specification because {hit[2]}",
                                  "vital-signs"))
                    wanted.append(hit[0])
            for url in wanted:
                psd = self.defs.structure(url)
                if psd is None or url == sd.url:
                    continue
                if psd.type != rt:
                    run.add(Issue("error", "structure", loc, f"Profile {url} is for {psd.type}, not {rt}", "profile",
                                  url))
                    continue
                self._complex(run, res, psd.root, rt, loc, env, psd, rt)
                self._constraints(run, res, psd.root, None, loc, env, psd.url, None)
            if rt == "Bundle":
                self._bundle_rules.check(run, res, loc)
        finally:
            if rt == "Bundle":
                run.bundles.pop()

    def _ancestors(self, urls: list[str]) -> set[str]:
        """The baseDefinitions (transitively) of known profiles."""
        out: set[str] = set()
        for url in urls:
            sd = self.defs.structure(url)
            while sd is not None and sd.base_definition and sd.base_definition not in out:
                out.add(sd.base_definition)
                sd = self.defs.structure(sd.base_definition)
        return out

    # -- complex content --------------------------------------------------------------------------
    def _lookup(self, children: dict[str, Element]) -> _Lookup:
        lk = self._lookups.get(id(children))
        if lk is None or lk.children is not children:
            lk = self._lookups[id(children)] = _Lookup(children)
        return lk

    def _children(self, el: Element, tcode: str | None) -> dict[str, Element] | None:
        """The child definitions of an instance of ``el``: the snapshot's own where it has them, over
        those of the type (a snapshot that expands only some children of a type still works)."""
        if el.target is not None and not el.children:
            return el.target.children
        sd = self._type_sd(el, tcode) if tcode is not None else None
        if not el.children:
            return sd.root.children if sd is not None else None
        if sd is None or sd.root is el:
            return el.children
        key = (id(el), tcode)
        hit = self._merged.get(key)
        if hit is not None and hit[0] is el:
            return hit[1]
        base = sd.root.children
        merged = el.children if all(n in el.children for n in base) else {**base, **el.children}
        self._merged[key] = (el, merged)
        return merged

    def _type_sd(self, el: Element, tcode: str) -> StructureDef | None:
        key = (id(el), tcode)
        hit = self._type_sds.get(key)
        if hit is not None and hit[0] is el:
            return hit[1]
        sd = self._find_type_sd(el, tcode)
        self._type_sds[key] = (el, sd)
        return sd

    def _find_type_sd(self, el: Element, tcode: str) -> StructureDef | None:
        t = el.type_map().get(tcode)
        if t is not None and t.profiles:
            for p in t.profiles:
                psd = self.defs.structure(p)
                if psd is not None and psd.has_snapshot:
                    return psd
        sd = self.defs.type_sd(tcode)
        return sd if sd is not None and sd.has_snapshot else None

    def _complex(self, run: _Run, obj: dict, el: Element, tcode: str | None, loc: str, env: Env,
                 profile: StructureDef | None, rpath: str, primitive_ext: bool = False, host=None) -> None:
        """Walks the properties of ``obj``, an instance of ``el`` (of type ``tcode``)."""
        if profile is not None and not el.children and el.target is None:
            t = el.type_map().get(tcode) if tcode else None
            if t is None or not t.profiles:
                return  # the profile does not constrain inside this element: the base pass walked it
        children = self._children(el, tcode)
        host = host or (el, tcode)
        if children is None:
            return
        lk = self._lookup(children)
        is_resource = "resourceType" in obj and "." not in rpath
        groups: dict[int, list] = {}
        order: list[Element] = []
        for key, value in obj.items():
            if key == "resourceType" and is_resource:
                continue
            if key == "fhir_comments":
                continue
            base = key[1:] if key.startswith("_") else key
            hit = lk.names.get(base)
            if hit is None or (primitive_ext and base == "value"):
                self._unknown_property(run, base, lk, loc, profile, key)
                continue
            cel, ctype = hit
            g = groups.get(id(cel))
            if g is None:
                g = groups[id(cel)] = []
                order.append(cel)
            if key.startswith("_"):
                if base not in obj:
                    g.append((base, ctype, None, value))
            else:
                g.append((base, ctype, value, obj.get("_" + base)))
        source = profile.url if profile is not None else None
        for cel in order:
            g = groups[id(cel)]
            if cel.choice and len(g) > 1:
                run.add(Issue("error", "structure", loc, f"{cel.path}: only one of "
                              + ", ".join(k for k, *_ in g) + " may be present", "cardinality", source))
            instances = []
            for key, ctype, value, ext in g:
                instances += self._instances(run, cel, key, ctype, value, ext, loc)
            self._check_count(run, cel, len(instances), loc, source)
            for inst in instances:
                self._instance(run, inst, cel, env, profile, rpath, host)
            if cel.slices or cel.slicing:
                self._slicing(run, cel, instances, loc, env, profile, rpath, host)
        # absent elements: min cardinality, must-support
        for name, cel in lk.watch:
            if id(cel) in groups:
                continue
            if cel.min > 0 and not (primitive_ext and name == "value"):
                self._check_count(run, cel, 0, loc, source)
            elif (cel.must_support and profile is not None and self.options.must_support
                  and profile.url.startswith(CANONICAL) and cel.max > 0):
                run.add(Issue("information", "incomplete", loc, f"must-support element {cel.path} is absent "
                              f"(profile {profile.name})", "must-support", source))
            if cel.slices:
                for s in cel.slices:
                    if s.min > 0:
                        run.add(Issue("error", "structure", loc, f"Slice '{cel.path}:{s.slice_name}': a matching "
                                      f"slice is required, but not found (from {source or cel.sd.url})",
                                      "slicing", source))

    def _unknown_property(self, run, base, lk: _Lookup, loc, profile, key) -> None:
        source = profile.url if profile is not None else None
        for prefix, cel in lk.choices:
            rest = base[len(prefix):]
            if base.startswith(prefix) and rest and rest[0].isupper():
                tname = rest[0].lower() + rest[1:] if rest[0].lower() + rest[1:] in self.defs.primitive_types else rest
                if tname in self.defs.type_names:
                    allowed = ", ".join(t.code for t in cel.types)
                    run.add(Issue("error", "structure", f"{loc}.{prefix}.ofType({tname})",
                                  f"The type '{tname}' is not allowed for {cel.path} (allowed: {allowed})"
                                  + (f" by {profile.name}" if profile else ""), "type", source))
                    return
        run.add(Issue("error", "structure", loc, f"Unrecognized property '{key}'", "structure", source))

    def _instances(self, run, cel: Element, key, ctype, value, ext, loc) -> list:
        """(value, ext, type, location) per instance; structural errors about arrays reported here."""
        shown = f"{loc}.{cel.name[:-3]}.ofType({ctype})" if cel.choice and ctype else f"{loc}.{key}"
        out = []
        if cel.array:
            vals, exts = value, ext
            if vals is not None and not isinstance(vals, list):
                run.add(Issue("error", "invalid", shown, f"The property {key} must be a JSON Array, not an "
                              + ("Object" if isinstance(vals, dict) else "primitive"), "structure"))
                vals = [vals]
            if exts is not None and not isinstance(exts, list):
                run.add(Issue("error", "invalid", shown, f"The property _{key} must be a JSON Array", "structure"))
                exts = [exts]
            if vals == [] or (vals is None and exts == []):
                run.add(Issue("error", "invalid", shown, "Array cannot be empty - the property should not be "
                              "present if it has no values", "structure"))
                return out
            if vals is not None and exts is not None and len(vals) != len(exts):
                run.add(Issue("error", "invalid", shown, f"The arrays {key} and _{key} differ in length",
                              "structure"))
            n = max(len(vals or ()), len(exts or ()))
            for i in range(n):
                v = vals[i] if vals is not None and i < len(vals) else None
                x = exts[i] if exts is not None and i < len(exts) else None
                if v is None and x is None:
                    run.add(Issue("error", "invalid", f"{shown}[{i}]", "Null values are not allowed in arrays "
                                  "unless a matching _ entry carries an id or extension", "structure"))
                    continue
                out.append((v, x, ctype, f"{shown}[{i}]"))
        else:
            if isinstance(value, list):
                run.add(Issue("error", "invalid", shown, f"The property {key} must be an Object, not an Array",
                              "structure"))
                for i, v in enumerate(value):
                    out.append((v, None, ctype, f"{shown}[{i}]"))
                return out
            if value is None and ext is None:
                run.add(Issue("error", "invalid", shown, f"The property {key} cannot be null", "structure"))
                return out
            out.append((value, ext, ctype, shown))
        return out

    def _check_count(self, run, cel: Element, n: int, loc: str, source: str | None) -> None:
        if n < cel.min:
            run.add(Issue("error", "structure", loc, f"{cel.path}: minimum required = {cel.min}, but only found {n} "
                          f"(from {source or cel.sd.url})", "cardinality", source))
        elif n > cel.max:
            run.add(Issue("error", "structure", loc, f"{cel.path}: max allowed = {cel.max}, but found {n} "
                          f"(from {source or cel.sd.url})", "cardinality", source))

    # -- one instance ------------------------------------------------------------------------------
    def _instance(self, run: _Run, inst, cel: Element, env: Env, profile, rpath: str, host=None) -> None:
        value, ext, tcode, loc = inst
        source = profile.url if profile is not None else None
        name = cel.name[:-3] if cel.choice else cel.name
        crpath = f"{rpath}.{name}"
        if tcode is None and not cel.children and cel.target is None and len(cel.types) > 1:
            return  # a multi-typed element that is not a choice: not walkable
        if tcode is not None and (tcode in self.defs.primitive_types or tcode == "xhtml"):
            self._primitive(run, value, ext, cel, tcode, loc, env, profile, crpath)
            return
        if ext is not None:
            run.add(Issue("error", "structure", loc, f"_{name} is only allowed on primitive elements", "structure",
                          source))
        if not isinstance(value, dict):
            run.add(Issue("error", "structure", loc, f"The property {name} must be an Object, not "
                          f"{'an Array' if isinstance(value, list) else 'a primitive value'}", "structure", source))
            return
        if tcode in ("Resource", "DomainResource") or (tcode and self.defs.is_resource_type(tcode)):
            self._nested_resource(run, value, cel, loc, env, profile)
            return
        type_sd = None
        if tcode == "Extension":
            type_sd = self._extension(run, value, cel, loc, env, profile, rpath, host)
            if type_sd is False:
                return
        if type_sd is not None and not cel.children:
            self._complex(run, value, type_sd.root, tcode, loc, env, profile, crpath)
        else:
            self._complex(run, value, cel, tcode, loc, env, profile, crpath)
        if cel.fixed is not None or cel.pattern is not None:
            self._fixed_pattern(run, value, cel, loc, source)
        if tcode is not None:
            if cel.binding is not None:
                self._binding(run, value, tcode, cel.binding, loc, source, cel)
                if cel.max_value_set:
                    self._binding(run, value, tcode, ("required", cel.max_value_set), loc, source, cel)
            if tcode == "Coding" and profile is None:
                self._system(run, value, loc, "Coding")
                self._coding_code(run, value, loc)
            elif tcode == "Identifier" and profile is None:
                self._system(run, value, loc, "Identifier")
            elif tcode == "Reference":
                self._reference(run, value, cel, loc, env, source)
            elif tcode == "Attachment" and profile is None:
                self._attachment(run, value, loc)
        self._constraints(run, value, cel, tcode, loc, env, source, type_sd)

    def _nested_resource(self, run, value, cel, loc, env, profile) -> None:
        """A contained resource, a Bundle entry, a Parameters resource: its type's rules, and the
        profiles its element names."""
        rt = value.get("resourceType")
        profiles: tuple[str, ...] = ()
        t = cel.type_map().get("Resource")
        if t is not None and t.profiles:
            profiles = tuple(p for p in t.profiles if self.defs.structure(p) is not None)
            if profiles and not any(self.defs.structure(p).type == rt for p in profiles):
                types = ", ".join(sorted({self.defs.structure(p).type for p in profiles}))
                run.add(Issue("error", "structure", loc, f"The resource is a {rt}, but {cel.path} allows only {types}",
                              "type", profile.url if profile else None))
                return
            profiles = tuple(p for p in profiles if self.defs.structure(p).type == rt
                             and self.defs.structure(p).url != CORE + str(rt))
        if profile is not None and not profiles:
            return  # already walked in the base pass
        # a contained resource shares its container's %rootResource; a Bundle entry, or the resource
        # of a Parameters, is a resource of its own
        self._resource(run, value, loc, env, profiles, bundle_entry=cel.name != "contained")

    # -- primitives --------------------------------------------------------------------------------
    def _primitive(self, run, value, ext, cel: Element, tcode: str, loc: str, env: Env, profile, rpath) -> None:
        source = profile.url if profile is not None else None
        if value is not None:
            if isinstance(value, (dict, list)):
                run.add(Issue("error", "structure", loc, f"The property {cel.name} must be a primitive value, not "
                              f"{'an Object' if isinstance(value, dict) else 'an Array'}", "structure", source))
                return
            if profile is None:
                problem = self._primitive_value(tcode, value, cel, rpath)
                if problem:
                    run.add(Issue("error", problem[0], loc, problem[1], "type"))
            if cel.fixed is not None and value != cel.fixed:
                run.add(Issue("error", "value", loc, f"Value is '{value}' but is fixed to '{cel.fixed}'", "fixed", source))
            if cel.pattern is not None and value != cel.pattern:
                run.add(Issue("error", "value", loc, f"Value is '{value}' but must be '{cel.pattern}'", "pattern", source))
            if cel.binding is not None and tcode in ("code", "string", "uri") and isinstance(value, str):
                self._binding(run, value, tcode, cel.binding, loc, source, cel)
                if cel.max_value_set:
                    self._binding(run, value, tcode, ("required", cel.max_value_set), loc, source, cel)
            if profile is None and isinstance(value, str) and tcode in ("uri", "url", "canonical", "oid", "uuid"):
                self._uri(run, value, loc)
            if (not self.options.allow_example_urls and tcode in ("url", "uri") and isinstance(value, str)
                    and _EXAMPLE_URL.match(value)):
                run.add(Issue("error", "invalid", loc, f"Example URLs are not allowed in this context ({value})",
                              "example-url"))
        elif cel.binding is not None and cel.binding[0] == "required" and tcode == "code":
            run.add(Issue("error", "code-invalid", loc, "No code provided, and a code is required from the value set "
                          f"{cel.binding[1]}", "binding", source))
        if ext is not None:
            if not isinstance(ext, dict):
                run.add(Issue("error", "structure", loc, f"_{cel.name} must be an Object", "structure", source))
            else:
                psd = self.defs.type_sd(tcode)
                if psd is not None and profile is None:
                    self._complex(run, ext, psd.root, tcode, loc, env, None, rpath, primitive_ext=True,
                                  host=(cel, tcode))
        node = value if value is not None else ext
        self._constraints(run, node, cel, tcode, loc, env, source, None, primitive=True)

    def _regex_for(self, tcode: str) -> re.Pattern | None:
        if tcode not in self._regex:
            rx = None
            sd = self.defs.type_sd(tcode)
            if sd is not None and sd.kind == "primitive-type":
                value_el = sd.root.children.get("value")
                if value_el is not None and value_el.regex:
                    rx = re.compile(value_el.regex)
            self._regex[tcode] = rx
        return self._regex[tcode]

    def _primitive_value(self, tcode: str, value, cel: Element, rpath: str) -> tuple[str, str] | None:
        """(issue code, message) if ``value`` is not a valid ``tcode``."""
        if tcode == "boolean":
            return None if isinstance(value, bool) else ("invalid", f"Error parsing JSON: the primitive value "
                                                                   f"must be a boolean (found {value!r})")
        if tcode in ("integer", "positiveInt", "unsignedInt"):
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return None if tcode != "integer" else None
                return "invalid", f"Error parsing JSON: the primitive value must be a number (found {value!r})"
            if not _INT32[0] <= value <= _INT32[1]:
                return "value", f"The value {value} is outside the range of an integer"
            if tcode == "positiveInt" and value < 1:
                return "value", f"The value {value} must be 1 or more (positiveInt)"
            if tcode == "unsignedInt" and value < 0:
                return "value", f"The value {value} must be 0 or more (unsignedInt)"
            return None
        if tcode == "decimal":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return "invalid", f"Error parsing JSON: the primitive value must be a number (found {value!r})"
            return None
        if not isinstance(value, str):
            return "invalid", f"Error parsing JSON: the primitive value must be a string (found {value!r})"
        if value == "":
            return "invalid", "@value cannot be empty"
        if tcode == "xhtml":
            return None  # Narrative.div: txt-1/txt-2 with the constraints
        if tcode == "base64Binary":
            try:
                base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError):
                return "invalid", f"The value '{value[:60]}' is not a valid Base64 value"
            return None
        if cel.max_length and len(value) > int(cel.max_length):
            return "too-long", f"value is longer than permitted maximum length of {cel.max_length}"
        rx = self._regex_for(tcode)
        if rx is not None and not rx.fullmatch(value):
            if tcode in ("dateTime", "instant") and _DATE_TIME_NO_TZ.match(value):
                return "invalid", "If a date has a time, it must have a timezone"
            if tcode in ("date", "dateTime", "instant", "time"):
                return "invalid", f"Not a valid {'date' if tcode == 'date' else tcode} format: '{value}'"
            if tcode in ("code", "string", "markdown") and value.strip() != value:
                return "invalid", f"The {tcode} '{value}' is not valid (leading or trailing whitespace)"
            return "invalid", f"The value '{value[:80]}' is not a valid {tcode}"
        if tcode in ("date", "dateTime", "instant") and len(value) >= 10:
            try:
                dt.date.fromisoformat(value[:10])
            except ValueError:
                return "invalid", f"Not a valid date: '{value}'"
        if tcode == "string" and len(value) > 1048576:
            return "too-long", "strings SHALL NOT exceed 1MB"
        return None

    # -- rules ------------------------------------------------------------------------------------
    def _constraint_plan(self, cel: Element, tcode, type_sd, primitive: bool, profile_pass: bool):
        """(ele-1 constraint or None, other constraints) to evaluate on instances of ``cel``."""
        key = (id(cel), tcode, id(type_sd), primitive, profile_pass)
        plan = self._plans.get(key)
        if plan is not None and plan[0] is cel:
            return plan[1], plan[2]
        extra = ()
        if tcode is not None and not primitive:
            tsd = type_sd or self._type_sd(cel, tcode)
            if tsd is not None and tsd.root is not cel:
                extra = tsd.root.constraints
        ele1, others, keys = None, [], set()
        for c in (*cel.constraints, *extra):
            if c.key in keys:
                continue
            keys.add(c.key)
            if profile_pass and c.source in self._core_sources:
                continue  # a rule of the base type: the base pass evaluates it on the same node
            if c.key in ("txt-1", "txt-2") and c.expression in (None, "htmlChecks()"):
                continue  # with the narrative div
            if c.key == "ele-1" and c.expression in _ELE1:
                ele1 = c
            else:
                others.append(c)
        self._plans[key] = (cel, ele1, tuple(others))
        return ele1, tuple(others)

    def _constraints(self, run, node, cel: Element, tcode, loc, env, source, type_sd, primitive=False) -> None:
        ele1, others = self._constraint_plan(cel, tcode, type_sd, primitive, source is not None)
        if ele1 is not None and not (any(k != "id" and k != "fhir_comments" and v is not None and v != [] and v != {}
                                         for k, v in node.items()) if isinstance(node, dict) else node is not None):
            run.add(Issue("error", "invariant", loc, f"Constraint failed: ele-1: '{ele1.human}'", "ele-1", ele1.source))
        if others:
            type_path = tcode if tcode and tcode not in ("BackboneElement", "Element") else cel.path
            for c in others:
                if c.key == "dom-3" and not self.options.check_contained:
                    continue
                if c.key == "dom-6" and env.root is not env.resource and node is env.resource:
                    continue  # contained resources need no narrative
                if c.best_practice and self.options.best_practice == "ignore":
                    continue
                ok, why = self.invariants.check(c.key, c.expression, node, type_path, env)
                if ok is False:
                    sev = c.severity if c.severity in SEVERITIES else "error"
                    if c.best_practice:
                        sev = self.options.best_practice
                    run.add(Issue(sev, "invariant", loc, f"Constraint failed: {c.key}: '{c.human}'", c.key,
                                  source or c.source))
                elif ok is None:
                    run.add(Issue("information", "informational", loc,
                                  f"Constraint {c.key} not evaluated: {why}", c.key, source or c.source))
        if tcode == "xhtml" and isinstance(node, str) and source is None:
            for rule, message in check_div(node):
                run.add(Issue("error", "invariant", loc, f"Constraint failed: {rule}: {message}", rule))

    def _fixed_pattern(self, run, value, cel: Element, loc, source) -> None:
        if cel.fixed is not None and value != cel.fixed:
            run.add(Issue("error", "value", loc, f"The value does not equal the fixed value {_short(cel.fixed)}",
                          "fixed", source))
        if cel.pattern is not None and not _matches_pattern(value, cel.pattern):
            run.add(Issue("error", "value", loc, f"The value does not match the pattern {_short(cel.pattern)}",
                          "pattern", source))

    def _binding(self, run, value, tcode: str, binding, loc, source, cel: Element) -> None:
        strength, vs_url = binding
        if strength not in ("required", "extensible") or not vs_url:
            return
        codings: list[tuple[str | None, str | None, str | None]]
        quantity = tcode in ("Quantity", "Age", "Duration", "Distance", "Count", "MoneyQuantity", "SimpleQuantity")
        if tcode in ("code", "string", "uri"):
            codings = [(None, value, None)] if isinstance(value, str) else []
        elif tcode == "Coding":
            codings = [(value.get("system"), value.get("code"), value.get("display"))]
        elif tcode == "CodeableConcept":
            codings = [(c.get("system"), c.get("code"), c.get("display")) for c in value.get("coding", ()) or ()
                       if isinstance(c, dict)]
        elif quantity:
            if value.get("code") is None:
                return
            codings = [(value.get("system"), value.get("code"), None)]
        else:
            return
        exp = self.codes.expansion(vs_url)
        vs_name = vs_url.rsplit("/", 1)[-1]
        if exp is None:
            run.add(Issue("information", "informational", loc, f"The ValueSet {vs_url} is not known: the "
                          f"{strength} binding is not checked", "binding", source))
            return
        if not codings or all(c[1] is None for c in codings):
            if tcode == "CodeableConcept" and strength == "required":
                run.add(Issue("error" if not value.get("text") else "warning", "code-invalid", loc,
                              f"No code provided, and a code is required from the value set '{vs_name}' ({vs_url})",
                              "binding", source))
            return
        results = []
        for system, code, _ in codings:
            if not isinstance(code, str):
                continue
            if not isinstance(system, str):  # a mistyped system (reported by the structure check) counts as none
                system = None
            key = (vs_url, system, code)
            r = self._bind_cache.get(key, 0)
            if r == 0:
                r = self._bind_cache[key] = exp.contains(system, code)
            results.append(r)
        if any(r is True for r in results):
            return
        shown = ", ".join(f"{s}#{c}" if s else f"'{c}'" for s, c, _ in codings if c)
        if any(r is None for r in results):
            run.add(Issue("information", "informational", loc, f"{shown}: membership of {vs_url} not checked "
                          f"({exp.why_incomplete or 'the ValueSet cannot be expanded offline'})", "binding", source))
            return
        # a required binding on a choice of several types (R4's vitalsigns binds every type of
        # component.value[x] to a units ValueSet) is applied as extensible, as the HL7 validator does
        if strength == "required" and not (cel.choice and len(cel.types) > 1):
            run.add(Issue("error", "code-invalid", loc, f"The value provided ({shown}) was not found in the value set "
                          f"'{vs_name}' ({vs_url}), and a code is required from this value set", "binding", source))
        else:
            run.add(Issue("warning", "code-invalid", loc, f"None of the codes provided ({shown}) are in the value set "
                          f"'{vs_name}' ({vs_url}), and a code should come from this value set unless it has no "
                          "suitable code", "binding", source))

    def _uri(self, run, value: str, loc: str) -> None:
        if value.startswith("urn:uuid:") and not _URN_UUID.fullmatch(value):
            run.add(Issue("error", "invalid", loc, f"UUIDs must be valid and lowercase ({value[9:]})", "uri"))
        elif value.startswith("urn:oid:") and not _URN_OID.fullmatch(value):
            run.add(Issue("error", "invalid", loc, f"OIDs must be valid ({value[8:]})", "uri"))

    def _system(self, run, value: dict, loc: str, what: str) -> None:
        """Coding.system and Identifier.system are absolute URIs; an rfc3986 identifier is a URI."""
        system = value.get("system")
        if not isinstance(system, str) or not system:
            return
        if system.startswith("#") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", system):
            run.add(Issue("error", "invalid", f"{loc}.system", f"{what}.system must be an absolute reference, not a "
                          f"local reference ('{system}')", "uri"))
        elif what == "Identifier" and system == "urn:ietf:rfc:3986":
            v = value.get("value")
            if isinstance(v, str) and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", v):
                run.add(Issue("error", "invalid", f"{loc}.value", "if identifier.system is 'urn:ietf:rfc:3986', then "
                              f"the identifier.value must be a full URI (e.g. start with a scheme), not '{v}'", "uri"))

    def _coding_code(self, run, coding: dict, loc: str) -> None:
        system, code = coding.get("system"), coding.get("code")
        if not isinstance(system, str) or not isinstance(code, str):
            return
        known, _ = self.codes.check_code(system, code)
        if known is False:
            cs = self.codes.code_system(system)
            run.add(Issue("error", "code-invalid", f"{loc}.code", f"Unknown code '{code}' in the CodeSystem '{system}'"
                          + (f" ({cs.name})" if cs is not None and cs.name != system else ""), "code"))
            return
        display = coding.get("display")
        if known and isinstance(display, str):
            valid = self.codes.displays(system, code)
            if valid and display.strip().lower() not in {v.lower() for v in valid}:
                run.add(Issue("warning", "invalid", f"{loc}.display", f"Wrong Display Name '{display}' for "
                              f"{system}#{code}. Valid display is '{sorted(valid)[0]}'", "display"))

    def _reference(self, run, value: dict, cel: Element, loc: str, env: Env, source) -> None:
        ref = value.get("reference")
        if not isinstance(ref, str):
            return
        t = cel.type_map().get("Reference")
        allowed = self._target_types(t) if t is not None else None
        if ref.startswith("#"):
            if ref == "#":
                return
            target = next((c for c in env.root.get("contained", ()) or () if isinstance(c, dict)
                           and c.get("id") == ref[1:]), None)
            if target is None:
                run.add(Issue("error", "structure", loc, f"Unable to resolve resource with reference '{ref}'",
                              "reference"))
                return
            rtype = target.get("resourceType")
            if allowed and rtype not in allowed:
                run.add(Issue("error", "structure", loc, f"The resource '{ref}' is a {rtype}, which is not a valid "
                              f"target for {cel.path} (must be one of {sorted(allowed)})", "reference", source))
            return
        m = _LITERAL_REF.match(ref)
        rtype = m.group("type") if m else None
        if rtype and self.defs.is_resource_type(rtype):
            if allowed and rtype not in allowed:
                run.add(Issue("error", "structure", loc, f"The type '{rtype}' implied by the reference URL {ref} is "
                              f"not a valid Target for this element (must be one of {sorted(allowed)})",
                              "reference", source))
            declared = value.get("type")
            if isinstance(declared, str) and declared != rtype:
                run.add(Issue("error", "structure", loc, f"The reference {ref} is a {rtype}, but Reference.type says "
                              f"'{declared}'", "reference", source))
        elif m is None and not _ABSOLUTE.match(ref) and source is None:
            run.add(Issue("warning", "structure", loc, f"The reference '{ref}' is neither a relative reference "
                          "[type]/[id] nor an absolute URL", "reference"))
        if run.bundles and source is None:
            run.bundles[-1].reference(loc, ref, allowed, env.root)

    def _target_types(self, t: TypeRef) -> set[str] | None:
        if not t.targets:
            return None
        out = set()
        for url in t.targets:
            sd = self.defs.structure(url)
            if sd is None:
                return None  # a profile not known here: its type cannot be told
            if sd.type in ("Resource", "DomainResource", "Any"):
                return None
            out.add(sd.type)
        return out

    def _attachment(self, run, value: dict, loc: str) -> None:
        data = value.get("data")
        if not isinstance(data, str) or not data:
            return
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            return  # reported on .data
        size = value.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and size != len(raw):
            run.add(Issue("error", "structure", loc, f"Stated Attachment Size {size} does not match actual attachment "
                          f"size {len(raw)}", "attachment"))
        h = value.get("hash")
        if isinstance(h, str):
            if base64.b64encode(hashlib.sha1(raw).digest()).decode() != "".join(h.split()):
                run.add(Issue("error", "structure", loc, "Stated Attachment hash does not match the SHA-1 of the data",
                              "attachment"))

    # -- extensions --------------------------------------------------------------------------------
    def _extension(self, run, value: dict, cel: Element, loc, env, profile, rpath, host=None):
        """Checks the url and context; returns the extension's StructureDefinition, None, or False (stop)."""
        url = value.get("url")
        source = profile.url if profile is not None else None
        in_extension = cel.path.endswith("Extension.extension") or (host is not None and host[1] == "Extension")
        if not isinstance(url, str):
            run.add(Issue("error", "invalid", loc, "Extension.url is required in order to identify, use and validate "
                          "the extension", "extension", source))
            return None
        t = cel.type_map().get("Extension")
        if t is not None and t.profiles:  # a slice for one extension
            for p in t.profiles:
                psd = self.defs.structure(p)
                if psd is not None and psd.has_snapshot and strip_version(url) == psd.url:
                    return psd
            return None
        if cel.children:
            return None
        if profile is not None:
            return False  # a plain .extension in a profile: the base pass walked it
        if not _ABSOLUTE.match(url):
            if not in_extension:
                run.add(Issue("error", "invalid", loc, "Extension.url must be an absolute URL", "extension"))
            return None
        sd = self.defs.structure(url)
        if sd is None or not sd.has_snapshot:
            self._unknown_extension(run, url, cel, loc)
            return None
        if sd.type != "Extension":
            run.add(Issue("error", "structure", loc, f"The url {url} is a StructureDefinition of a {sd.type}, not of "
                          "an extension", "extension"))
            return False
        if sd.root.is_modifier and cel.name != "modifierExtension":
            run.add(Issue("error", "structure", loc, f"The extension {url} is a modifier extension: it must be in "
                          "modifierExtension", "extension"))
        if not self._context_ok(sd, rpath, host):
            allowed = ", ".join(c.get("expression", "?") for c in sd.context)
            run.add(Issue("error", "structure", loc, f"The extension {url} is not allowed to be used at this point "
                          f"(allowed: {allowed})", "extension-context"))
        return sd

    def _unknown_extension(self, run, url: str, cel: Element, loc) -> None:
        if cel.name == "modifierExtension":
            run.add(Issue("error", "structure", loc, f"The modifier extension {url} could not be found, so it cannot "
                          "be understood", "extension"))
            return
        if any(url.startswith(d) for d in self.options.extension_domains):
            return
        sev = self.options.unknown_extensions
        if sev == "ignore":
            return
        run.add(Issue(sev, "structure", loc, f"The extension {url} could not be found so is not allowed here",
                      "extension"))

    def _context_ok(self, sd: StructureDef, rpath: str, host) -> bool:
        """Is an extension with these contexts allowed on the element at ``rpath`` (``host``: its definition)?"""
        if not sd.context or sd.url in _CONTEXT_EXEMPT or host is None:
            return True
        host_el, host_type = host
        candidates = {rpath, host_el.path, re.sub(r":[^.]+", "", host_el.id)}
        if "." in host_el.path:  # the same element named from its data type: HumanName.family
            candidates.add(host_el.path)
        if host_type:
            candidates.add(host_type)
            sd_t = self.defs.type_sd(host_type)
            while sd_t is not None and sd_t.base_definition:
                base = self.defs.structure(sd_t.base_definition)
                if base is None:
                    break
                candidates.add(base.type)
                sd_t = base
        host = rpath
        is_resource = "." not in host
        for c in sd.context:
            ctype, expr = c.get("type"), (c.get("expression") or "").replace("[x]", "")
            if ctype != "element":
                return True  # fhirpath and extension contexts are not evaluated
            if expr == "Element" or expr in candidates:
                return True
            if expr in ("Resource", "DomainResource") and is_resource:
                return True
            root, _, rest = host_el.path.partition(".")
            if (expr.startswith(("Resource.", "DomainResource.")) and rest and expr.partition(".")[2] == rest
                    and root in self.defs.resource_types):  # Resource.meta names every resource's meta
                return True
            if expr == "Extension" and host.endswith(".extension"):
                return True
            if expr == "BackboneElement" and "." in host:
                return True
            if any(ch in expr for ch in "()[]:"):
                return True
        return False

    # -- slicing ----------------------------------------------------------------------------------
    def _slicing(self, run, cel: Element, instances: list, loc: str, env: Env, profile, rpath, host=None) -> None:
        source = profile.url if profile is not None else None
        discriminators, rules, _ordered = cel.slicing or ([("value", "url")], "open", False)
        counts = {id(s): 0 for s in cel.slices}
        uncertain: set[int] = set()  # slices some instance may or may not match (a discriminator not decidable)
        for inst in instances:
            value, ext, tcode, iloc = inst
            matched, undecided = None, False
            for s in cel.slices:
                r = self._matches_slice(value, tcode, s, discriminators)
                if r is None:
                    undecided = True
                    uncertain.add(id(s))
                elif r:
                    matched = s
                    break
            if matched is not None:
                counts[id(matched)] += 1
                self._instance(run, inst, matched, env, profile, rpath, host)
            elif cel.path.endswith("Extension.extension") and isinstance(value, dict) and \
                    isinstance(value.get("url"), str) and not _ABSOLUTE.match(value["url"]) and cel.slices:
                run.add(Issue("error", "invalid", f"{iloc}[url='{value['url']}']", f"Sub-extension url '{value['url']}' "
                              f"is not defined by the Extension {cel.sd.url}", "slicing", source))
            elif rules == "closed" and cel.slices and not undecided:
                run.add(Issue("error", "structure", iloc, f"This element does not match any known slice defined in "
                              f"the profile {cel.sd.url} (slicing of {cel.path} is closed)", "slicing", source))
        for s in cel.slices:
            n = counts[id(s)]
            if n < s.min and id(s) not in uncertain:
                run.add(Issue("error", "structure", loc, f"Slice '{cel.path}:{s.slice_name}': a matching slice is "
                              f"required, but not found (from {source or cel.sd.url})", "slicing", source))
            elif n > s.max:
                run.add(Issue("error", "structure", loc, f"Slice '{cel.path}:{s.slice_name}': max allowed = {s.max}, "
                              f"but found {n} (from {source or cel.sd.url})", "slicing", source))

    def _matches_slice(self, value, tcode, s: Element, discriminators) -> bool | None:
        for dtype, path in discriminators:
            if dtype in ("value", "pattern"):
                target = self._slice_element(s, path, tcode)
                if target is None:
                    return None
                want = target.fixed if target.fixed is not None else target.pattern
                actual = _navigate(value, path)
                if want is None:
                    if target.binding and target.binding[0] == "required":
                        exp = self.codes.expansion(target.binding[1])
                        if exp is None:
                            return None
                        hits = [_in_expansion(exp, a) for a in actual]
                        if any(h is True for h in hits):
                            continue
                        if any(h is None for h in hits):
                            return None
                        return False
                    return None
                if not any(_matches_pattern(a, want) if target.pattern is not None else a == want for a in actual):
                    return False
            elif dtype == "exists":
                target = self._slice_element(s, path, tcode)
                if target is None:
                    return None
                present = bool(_navigate(value, path))
                if target.min >= 1 and not present or target.max == 0 and present:
                    return False
                if target.min == 0 and target.max > 0:
                    return None
            elif dtype == "type":
                if path in ("$this", ""):
                    if s.types and tcode not in {t.code for t in s.types}:
                        return False
                else:
                    target = self._slice_element(s, path, tcode)
                    if target is None:
                        return None
                    actual = _navigate(value, path)
                    if not actual:
                        return False
                    kinds = {a.get("resourceType") for a in actual if isinstance(a, dict)}
                    if kinds and not kinds & {t.code for t in target.types}:
                        return False
            elif dtype == "profile":
                if path not in ("$this", "") or not isinstance(value, dict):
                    return None
                for t in s.types:
                    for p in t.profiles:
                        psd = self.defs.structure(p)
                        if psd is None or not psd.has_snapshot:
                            return None
                        probe = _Run()
                        self._complex(probe, value, psd.root, tcode, "$", Env(value), psd, tcode or "")
                        if any(i.severity in ("error", "fatal") for i in probe.issues):
                            return False
            else:
                return None
        return True

    def _slice_element(self, s: Element, path: str, tcode) -> Element | None:
        if path in ("$this", ""):
            return s
        el = s
        current_type = s.types[0].code if len(s.types) == 1 else tcode
        for seg in path.split("."):
            m = re.fullmatch(r"extension\('([^']+)'\)", seg)
            if m:  # extension('url'): the extension slice with that url
                ext = self._children(el, current_type) or {}
                base = ext.get("extension")
                if base is None:
                    return None
                hit = None
                for sl in base.slices:
                    for t in sl.types:
                        if m.group(1) in t.profiles:
                            hit = sl
                if hit is None:
                    return None
                el, current_type = hit, "Extension"
                continue
            if seg == "resolve()" or "(" in seg:
                return None
            children = self._children(el, current_type)
            if children is None:
                t = el.types[0] if len(el.types) == 1 else None
                if t is not None and t.profiles:
                    psd = self.defs.structure(t.profiles[0])
                    children = psd.root.children if psd is not None and psd.has_snapshot else None
                if children is None:
                    return None
            if el.types and el.types[0].code == "Extension" and el.types[0].profiles and not el.children:
                psd = self.defs.structure(el.types[0].profiles[0])
                if psd is not None and psd.has_snapshot:
                    children = psd.root.children
            nxt = children.get(seg) or children.get(seg + "[x]")
            if nxt is None:
                return None
            el = nxt
            current_type = el.types[0].code if len(el.types) == 1 else None
        return el


def _navigate(value, path: str) -> list:
    if path in ("$this", ""):
        return [value]
    current = [value]
    for seg in path.split("."):
        nxt = []
        m = re.fullmatch(r"extension\('([^']+)'\)", seg)
        for v in current:
            if not isinstance(v, dict):
                continue
            if m:
                nxt += [e for e in v.get("extension", ()) or () if isinstance(e, dict) and e.get("url") == m.group(1)]
                continue
            if seg in v:
                x = v[seg]
                nxt += x if isinstance(x, list) else [x]
            else:
                for k, x in v.items():
                    if k.startswith(seg) and len(k) > len(seg) and k[len(seg)].isupper():
                        nxt += x if isinstance(x, list) else [x]
        current = nxt
    return current


def _matches_pattern(value, pattern) -> bool:
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        return all(_matches_pattern(value.get(k), v) for k, v in pattern.items())
    if isinstance(pattern, list):
        if not isinstance(value, list):
            value = [value] if value is not None else []
        return all(any(_matches_pattern(v, p) for v in value) for p in pattern)
    return value == pattern


def _in_expansion(exp, value) -> bool | None:
    if isinstance(value, str):
        return exp.contains(None, value)
    if isinstance(value, dict):
        if "coding" in value:
            rs = [exp.contains(c.get("system"), c.get("code")) for c in value["coding"] if isinstance(c, dict)
                  and c.get("code")]
            return True if any(r is True for r in rs) else None if any(r is None for r in rs) else False
        if "code" in value:
            return exp.contains(value.get("system"), value["code"])
    return False


def _short(value) -> str:
    import json
    s = json.dumps(value, separators=(",", ":"))
    return s if len(s) <= 160 else s[:157] + "..."
