"""``_elements``: a resource cut down to the requested top-level elements, plus the mandatory ones
(as the spec asks: a subset that is still a valid resource), tagged SUBSETTED.

Mandatory elements come from the R4 StructureDefinitions, packaged as
``fhir_iop/data/r4-required-elements.json`` (read once, when ``_elements`` is first used).
"""

from __future__ import annotations

from functools import lru_cache

import orjson

from fhir_iop.store.params import REQUIRED_ELEMENTS

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


@lru_cache(maxsize=1)
def mandatory() -> dict[str, tuple[str, ...]]:
    """Resource type → names of its top-level elements with min ≥ 1 (``[x]`` kept as a prefix)."""
    return {rt: tuple(names) for rt, names in orjson.loads(REQUIRED_ELEMENTS.read_bytes()).items()}


def subset(body: str | bytes, elements: list[str]) -> bytes:
    res = orjson.loads(body)
    keep = {"resourceType", "id", "meta", *elements}
    musts = mandatory().get(res["resourceType"], ())
    out = {}
    for k, v in res.items():
        if k in keep or any(k == m or m.endswith("[x]") and k.startswith(m[:-3]) for m in musts):
            out[k] = v
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return orjson.dumps(out)
