"""The one module that imports fhir.resources: its R4B models (R4-compatible) and nothing else.

Structure validation (not bindings, profiles or invariants), and FHIR XML in and out. XML input
is parsed with entity resolution, DTDs and network access off, and a document with a DOCTYPE
(the carrier of XXE, billion-laughs and quadratic-blowup payloads) is refused outright with
:class:`XmlRefused` rather than parsed with its entities dropped. FHIR XML never needs a DTD or
entities beyond XML's own (the spec has warned since DSTU2 that parsers should ignore XML entities and
resources should not carry them: http://hl7.org/fhir/DSTU2/xml.html), so a DOCTYPE is never content.
"""

from __future__ import annotations

import re
from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class
from lxml import etree
from pydantic import ValidationError

FHIR_VERSION = "4.0.1"
XML_NS = "http://hl7.org/fhir"


class XmlRefused(ValueError):
    """XML refused before or while parsing: a DOCTYPE / entity declaration (XXE, entity expansion)."""


_DOCTYPE_MARKS = tuple(m.encode(enc) for m in ("<!DOCTYPE", "<!ENTITY")
                       for enc in ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"))


def safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True)


def refuse_doctype(data: bytes, root: etree._Element | None = None) -> None:
    """Raise :class:`XmlRefused` if ``data`` declares a DOCTYPE or entities (checked on the bytes in every
    encoding XML allows, and, given the parsed ``root``, on what the parser saw)."""
    head = bytes(data[:1 << 16]) if isinstance(data, (bytes, bytearray, memoryview)) else b""
    found = any(m in head for m in _DOCTYPE_MARKS)
    if root is not None and not found:
        info = root.getroottree().docinfo
        found = bool(info.doctype) or info.internalDTD is not None or info.externalDTD is not None
    if found:
        raise XmlRefused("a DOCTYPE or entity declaration is not allowed in FHIR XML (external entities and "
                         "entity expansion are refused)")


def fromstring(data: bytes) -> etree._Element:
    """Any XML document parsed safely (no entities, DTD or network); a DOCTYPE is refused."""
    refuse_doctype(data)
    root = etree.fromstring(data, parser=safe_parser())
    refuse_doctype(data, root)
    return root


@lru_cache(maxsize=None)
def model_class(resource_type: str):
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None


def structure_errors(resource: dict) -> list[tuple[str, str]]:
    """``(location, message)`` for each structural error fhir.resources R4B finds, and for each string
    holding a control character (:func:`text_errors`)."""
    rt = resource.get("resourceType") if isinstance(resource, dict) else None
    cls = model_class(rt) if isinstance(rt, str) else None
    if cls is None:
        return [("resourceType", f"unknown R4 resource type {rt!r}")]
    found = text_errors(resource)
    try:
        cls.model_validate(resource)
    except ValidationError as e:
        return found + [(".".join(str(p) for p in err["loc"]) or rt, err["msg"])
                        for err in e.errors(include_url=False)]
    except Exception as e:  # fhir.resources raises plain errors for a few malformed shapes
        return found + [(rt, str(e))]
    return found


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def text_errors(resource: dict, limit: int = 10) -> list[tuple[str, str]]:
    """``(location, message)`` for strings and names holding a control character other than tab, CR and LF:
    the R4 ``string`` type excludes them (datatypes.html#string), fhir.resources' pattern lets them
    through, and PostgreSQL cannot store NUL. Iterative, at most ``limit`` findings."""
    out: list[tuple[str, str]] = []
    stack = [(resource, str(resource.get("resourceType", "")) if isinstance(resource, dict) else "")]
    while stack and len(out) < limit:
        value, loc = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            where = f"{loc}.{k}" if isinstance(k, str) else f"{loc}[{k}]"
            if isinstance(k, str) and _CONTROL.search(k):
                out.append((loc, f"an element name holds control character U+{ord(_CONTROL.search(k)[0]):04X}"))
            elif isinstance(v, str) and (m := _CONTROL.search(v)):
                out.append((where, f"the string holds control character U+{ord(m[0]):04X}, which FHIR strings "
                                   "cannot contain"))
            elif isinstance(v, (dict, list)):
                stack.append((v, where))
    return out


def dump_json(resource: dict) -> bytes:
    """The naive path: validate through the model, serialize through the model."""
    return model_class(resource["resourceType"]).model_validate(resource).model_dump_json().encode()


def to_xml(resource: dict) -> bytes:
    """FHIR XML of one resource (no XML declaration)."""
    model = model_class(resource["resourceType"]).model_validate(resource)
    xml = model.model_dump_xml()
    xml = xml if isinstance(xml, bytes) else xml.encode()
    if xml.startswith(b"<?xml"):
        xml = xml[xml.index(b"?>") + 2:].lstrip()
    return xml


def _dict(model) -> dict:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def from_xml_element(element: etree._Element) -> dict:
    """One resource element (already parsed safely) as a JSON-shaped dict."""
    rt = etree.QName(element).localname
    cls = model_class(rt)
    if cls is None:
        raise ValueError(f"unknown R4 resource type {rt!r}")
    try:
        return _dict(cls.model_validate_xml(etree.tostring(element), xmlparser=safe_parser()))
    except KeyError as e:  # fhir.resources' XML reader meets an element R4 does not define
        raise ValueError(f"<{e.args[0]}> is not an element of R4 {rt}") from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{rt}.{loc}: {first['msg']}" + (f" (and {e.error_count() - 1} more)"
                                                           if e.error_count() > 1 else "")) from None


def parse_xml(data: bytes) -> etree._Element:
    """A FHIR XML document's root element; :class:`XmlRefused` for a DOCTYPE, ``etree.XMLSyntaxError`` if
    it is not well-formed, ``ValueError`` if the root is not in the FHIR namespace."""
    root = fromstring(data)
    if etree.QName(root).namespace != XML_NS:
        raise ValueError(f"root element is not in the FHIR namespace {XML_NS}")
    return root
