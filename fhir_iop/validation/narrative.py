"""Narrative XHTML (``Narrative.div``): the checks behind ``htmlChecks()`` (txt-1, txt-2).

txt-1: the div is well-formed XHTML in the XHTML namespace, using only the basic formatting
elements and attributes FHIR allows (no scripts, forms, frames, objects, event attributes or
``javascript:`` links). txt-2: it has some non-whitespace content (text or an image).
"""

from __future__ import annotations

from lxml import etree

from fhir_iop.fhir import r4

XHTML_NS = "http://www.w3.org/1999/xhtml"

ELEMENTS = frozenset("""p br div h1 h2 h3 h4 h5 h6 a span b em i strong small big tt dfn q var abbr acronym
cite blockquote hr address bdo kbd sub sup ul ol li dl dt dd pre table caption colgroup col thead tr tfoot
tbody th td code samp img map area del ins s strike u center font""".split())
ATTRIBUTES = frozenset("""title style class id lang dir accesskey tabindex span width height align valign char
charoff abbr axis headers scope rowspan colspan href name src alt border frame rules cellspacing cellpadding
summary start type value reversed shape coords usemap nowrap bgcolor color face size cite datetime
""".split())


def check_div(div: str) -> list[tuple[str, str]]:
    """``(rule, message)`` for each problem with one Narrative.div."""
    if not isinstance(div, str):
        return [("txt-1", "the narrative div must be a string of XHTML")]
    try:
        root = r4.fromstring(div.encode("utf-8"))
    except r4.XmlRefused as e:
        return [("txt-1", f"the narrative is refused: {e}")]
    except etree.XMLSyntaxError as e:
        return [("txt-1", f"the narrative is not well-formed XHTML: {e}")]
    problems: list[tuple[str, str]] = []
    qn = etree.QName(root)
    if qn.localname != "div":
        problems.append(("txt-1", f"the narrative must be a <div>, not <{qn.localname}>"))
    if qn.namespace != XHTML_NS:
        problems.append(("txt-1", f"Wrong namespace on the XHTML ('{qn.namespace or ''}', should be '{XHTML_NS}')"))
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        name = etree.QName(el)
        if name.namespace not in (XHTML_NS, None):
            problems.append(("txt-1", f"Wrong namespace on the XHTML element <{name.localname}> ('{name.namespace}')"))
        elif name.localname not in ELEMENTS:
            problems.append(("txt-1", f"Illegal element name in the XHTML ('{name.localname}')"))
        for attr, value in el.attrib.items():
            a = etree.QName(attr)
            if a.namespace == "http://www.w3.org/XML/1998/namespace":
                continue
            if a.localname.lower().startswith("on") or a.localname not in ATTRIBUTES:
                problems.append(("txt-1", f"Illegal attribute name in the XHTML ('{a.localname}' on "
                                          f"<{name.localname}>)"))
            elif a.localname in ("href", "src") and value.strip().lower().startswith("javascript:"):
                problems.append(("txt-1", f"Illegal value in the XHTML ({a.localname}='{value[:40]}')"))
    text = "".join(root.itertext()).strip()
    if not text and root.find(f".//{{{XHTML_NS}}}img") is None:
        problems.append(("txt-2", "The narrative SHALL have some non-whitespace content"))
    return problems
