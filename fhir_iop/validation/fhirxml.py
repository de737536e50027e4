"""FHIR XML → the JSON form, driven by the StructureDefinitions, for validation.

Unlike the fhir.resources XML reader (:mod:`fhir_iop.fhir.r4`), this one carries invalid content
through so the validator can report it where it is: an element with no value
(``<implicitRules/>``), a value that is not of its type, an element R4 does not define (reported
here, with its XML path). Arrays follow the element's base cardinality; primitives become
``name`` / ``_name`` pairs; ``Narrative.div`` stays XHTML text. Parsing is the safe parser of
:mod:`fhir_iop.fhir.r4` (no entities, DTDs or network).
"""

from __future__ import annotations

import re

from lxml import etree

from fhir_iop.fhir import r4
from fhir_iop.validation.definitions import Definitions, Element

NS = "{" + r4.XML_NS + "}"
XHTML = "{http://www.w3.org/1999/xhtml}"
_INT = re.compile(r"-?[0-9]+")
_DEC = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


class XmlProblem:
    __slots__ = ("location", "message")

    def __init__(self, location: str, message: str):
        self.location, self.message = location, message


def parse(data: bytes, defs: Definitions) -> tuple[dict, list[XmlProblem]]:
    """One FHIR XML document → (resource as JSON, problems). Raises ValueError if it is not FHIR XML."""
    try:
        root = r4.fromstring(data)  # XmlRefused (a ValueError) for a DOCTYPE
    except etree.XMLSyntaxError as e:
        raise ValueError(f"not well-formed XML: {e}") from None
    if etree.QName(root).namespace != r4.XML_NS:
        raise ValueError(f"the root element is not in the FHIR namespace {r4.XML_NS}")
    reader = _Reader(defs)
    res = reader.resource(root, etree.QName(root).localname)
    return res, reader.problems


class _Reader:
    def __init__(self, defs: Definitions):
        self.defs = defs
        self.problems: list[XmlProblem] = []

    def resource(self, el, loc: str) -> dict:
        rt = etree.QName(el).localname
        out: dict = {"resourceType": rt}
        sd = self.defs.type_sd(rt)
        if sd is None or sd.kind != "resource":
            self.problems.append(XmlProblem(loc, f"Unknown resource type '{rt}'"))
            return out
        self._attributes(el, out, loc, allowed=())
        self.children(el, sd.root, rt, out, loc)
        return out

    def _attributes(self, el, out: dict, loc: str, allowed=("id",)) -> None:
        for name, value in el.attrib.items():
            q = etree.QName(name)
            if q.namespace:
                continue
            if q.localname in allowed:
                out[q.localname] = value
            else:
                self.problems.append(XmlProblem(loc, f"Undefined attribute '@{q.localname}' on {etree.QName(el).localname}"))

    def _children_of(self, elem: Element, tcode: str | None) -> dict[str, Element] | None:
        if elem.children:
            return elem.children
        if elem.target is not None:
            return elem.target.children
        if tcode:
            sd = self.defs.type_sd(tcode)
            if sd is not None and sd.has_snapshot:
                return sd.root.children
        return None

    def children(self, el, elem: Element, tcode: str | None, out: dict, loc: str) -> None:
        defs = self._children_of(elem, tcode)
        if defs is None:
            return
        lookup = _lookup(defs)
        last = -1
        for child in el:
            if not isinstance(child.tag, str):
                continue
            q = etree.QName(child)
            name = q.localname
            hit = lookup.get(name)
            if q.namespace != r4.XML_NS and not (hit is not None and hit[1] == "xhtml"
                                                 and q.namespace == XHTML[1:-1]):
                self.problems.append(XmlProblem(loc, f"Undefined element '{name}' in namespace {q.namespace}"))
                continue
            if hit is None:
                self.problems.append(XmlProblem(loc, f"Undefined element '{name}' at {loc}"))
                continue
            cel, ctype = hit
            cloc = f"{loc}.{name}"
            if cel.order < last:
                self.problems.append(XmlProblem(cloc, f"Element '{name}' is out of order (FHIR XML follows the order "
                                                      "of the definition)"))
            last = max(last, cel.order)
            if ctype == "xhtml":
                value, ext = self._xhtml(child), None
            elif ctype is not None and self.defs.is_primitive(ctype):
                value, ext = self._primitive(child, ctype, cel, cloc)
            elif ctype in ("Resource", "DomainResource") or (ctype and self.defs.is_resource_type(ctype)):
                inner = [c for c in child if isinstance(c.tag, str)]
                if len(inner) != 1:
                    self.problems.append(XmlProblem(cloc, "a resource element must contain exactly one resource"))
                    continue
                value, ext = self.resource(inner[0], cloc), None
            else:
                value = {}
                self._attributes(child, value, cloc, allowed=("id", "url") if ctype == "Extension" else ("id",))
                self.children(child, cel, ctype, value, cloc)
                ext = None
            key = name
            if cel.array:
                vals = out.setdefault(key, [])
                if ext is not None or (f"_{key}" in out):
                    exts = out.setdefault(f"_{key}", [])
                    exts.extend([None] * (len(vals) - len(exts)))
                    exts.append(ext)
                vals.append(value)
                if value is None and ext is None:
                    vals[-1] = None
            else:
                if key in out or f"_{key}" in out:
                    self.problems.append(XmlProblem(cloc, f"Element '{name}' occurs more than once"))
                    continue
                if value is not None:
                    out[key] = value
                if ext is not None:
                    out[f"_{key}"] = ext
        # primitive arrays: drop the all-None companion, pad it otherwise
        for key in [k for k in out if k.startswith("_")]:
            base = key[1:]
            if isinstance(out[key], list):
                if all(e is None for e in out[key]):
                    del out[key]
                else:
                    out[key].extend([None] * (len(out.get(base, ())) - len(out[key])))

    def _primitive(self, el, ptype: str, cel: Element, loc: str):
        value = el.get("value")
        ext: dict = {}
        for name, v in el.attrib.items():
            q = etree.QName(name)
            if q.namespace:
                continue
            if q.localname == "id":
                ext["id"] = v
            elif q.localname != "value":
                self.problems.append(XmlProblem(loc, f"Undefined attribute '@{q.localname}'"))
        extension_el = None
        for child in el:
            if not isinstance(child.tag, str):
                continue
            q = etree.QName(child)
            if q.namespace == r4.XML_NS and q.localname == "extension":
                if extension_el is None:
                    sd = self.defs.type_sd(ptype)
                    extension_el = sd.root.children.get("extension") if sd else None
                item: dict = {}
                self._attributes(child, item, loc, allowed=("id", "url"))
                if extension_el is not None:
                    self.children(child, extension_el, "Extension", item, f"{loc}.extension")
                ext.setdefault("extension", []).append(item)
            else:
                self.problems.append(XmlProblem(loc, f"Undefined element '{q.localname}' in a primitive"))
        if value is not None:
            value = _convert(value, ptype)
        if value is None and not ext:
            ext = {}  # present but empty: ele-1 reports it
        return value, (ext if ext or value is None else None)

    @staticmethod
    def _xhtml(el) -> str:
        return etree.tostring(el, encoding="unicode", with_tail=False)


def _convert(value: str, ptype: str):
    if ptype == "boolean":
        return {"true": True, "false": False}.get(value, value)
    if ptype in ("integer", "positiveInt", "unsignedInt"):
        return int(value) if _INT.fullmatch(value) else value
    if ptype == "decimal":
        if _DEC.fullmatch(value):
            return int(value) if _INT.fullmatch(value) else float(value)
        return value
    return value


_LOOKUPS: dict[int, tuple[dict, dict]] = {}


def _lookup(children: dict[str, Element]) -> dict[str, tuple[Element, str | None]]:
    """XML/JSON element name → (definition, type code), choice types expanded."""
    hit = _LOOKUPS.get(id(children))
    if hit is not None and hit[0] is children:
        return hit[1]
    out: dict[str, tuple[Element, str | None]] = {}
    for name, el in children.items():
        if el.choice:
            prefix = name[:-3]
            for t in el.types:
                out[prefix + t.code[0].upper() + t.code[1:]] = (el, t.code)
        else:
            code = el.types[0].code if len(el.types) == 1 else None
            if code in ("BackboneElement", "Element") and el.children:
                code = None
            out[name] = (el, code)
    _LOOKUPS[id(children)] = (children, out)
    return out
