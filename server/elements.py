"""``_elements``: a resource cut down to the requested top-level elements, plus the mandatory ones
(as the spec asks: a subset that is still a valid resource), tagged SUBSETTED; and ``_summary``
(http://hl7.org/fhir/R4/search.html#summary): ``true`` keeps the elements R4 marks ``isSummary``,
``text`` keeps ``text`` and the mandatory elements, ``data`` drops ``text``; each tagged SUBSETTED.
``id`` and ``meta`` (where the Part 2 labels and the redisclosure notice are) are always kept.

Mandatory elements come from the R4 StructureDefinitions, packaged as
``fhir_iop/data/r4-required-elements.json`` (read once, when ``_elements`` is first used).
"""

from __future__ import annotations

from functools import lru_cache

import orjson

from fhir_iop.store.params import REQUIRED_ELEMENTS, SUMMARY_ELEMENTS

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


@lru_cache(maxsize=1)
def mandatory() -> dict[str, tuple[str, ...]]:
    """Resource type → names of its top-level elements with min ≥ 1 (``[x]`` kept as a prefix)."""
    return {rt: tuple(names) for rt, names in orjson.loads(REQUIRED_ELEMENTS.read_bytes()).items()}


SUMMARY_MODES = ("true", "text", "data")


@lru_cache(maxsize=1)
def summary() -> dict[str, tuple[str, ...]]:
    """Resource type → names of its top-level elements R4 marks ``isSummary``."""
    return {rt: tuple(names) for rt, names in orjson.loads(SUMMARY_ELEMENTS.read_bytes()).items()}


def _named(k: str, names) -> bool:
    return any(k == m or m.endswith("[x]") and k.startswith(m[:-3]) for m in names)


def subset(body: str | bytes, elements: list[str]) -> bytes:
    res = orjson.loads(body)
    keep = {"resourceType", "id", "meta", *elements}
    musts = mandatory().get(res["resourceType"], ())
    out = {k: v for k, v in res.items() if k in keep or _named(k, musts)}
    return _tagged(out)


def summarize(body: str | bytes, mode: str) -> bytes:
    """The ``_summary=true|text|data`` form of a resource (JSON text in, JSON bytes out)."""
    res = orjson.loads(body)
    rt = res.get("resourceType")
    if mode == "data":
        out = {k: v for k, v in res.items() if k != "text"}
    else:
        keep = {"resourceType", "id", "meta", *(("text",) if mode == "text" else ())}
        names = mandatory().get(rt, ()) + (summary().get(rt, ()) if mode == "true" else ())
        out = {k: v for k, v in res.items() if k in keep or _named(k, names)}
    return _tagged(out)


def _tagged(out: dict) -> bytes:
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return orjson.dumps(out)
