"""The one module that imports fhir.resources: its R4B models (R4-compatible) and nothing else.

Structure validation (not bindings, profiles or invariants), and FHIR XML in and out. XML input
is parsed with entity resolution, DTDs and network access off.
"""

from __future__ import annotations

from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class
from lxml import etree
from pydantic import ValidationError

FHIR_VERSION = "4.0.1"
XML_NS = "http://hl7.org/fhir"


def safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True)


@lru_cache(maxsize=None)
def model_class(resource_type: str):
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError):
        return None


def structure_errors(resource: dict) -> list[tuple[str, str]]:
    """``(location, message)`` for each structural error fhir.resources R4B finds."""
    rt = resource.get("resourceType") if isinstance(resource, dict) else None
    cls = model_class(rt) if isinstance(rt, str) else None
    if cls is None:
        return [("resourceType", f"unknown R4 resource type {rt!r}")]
    try:
        cls.model_validate(resource)
    except ValidationError as e:
        return [(".".join(str(p) for p in err["loc"]) or rt, err["msg"]) for err in e.errors(include_url=False)]
    except Exception as e:  # fhir.resources raises plain errors for a few malformed shapes
        return [(rt, str(e))]
    return []


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
    root = etree.fromstring(data, parser=safe_parser())
    if etree.QName(root).namespace != XML_NS:
        raise ValueError(f"root element is not in the FHIR namespace {XML_NS}")
    return root
