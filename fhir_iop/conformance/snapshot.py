"""A differential applied to its parent's snapshot: the standard rules, kept small.

The parent's snapshot is copied; each differential element, in order, is found by its ``id`` (made
first if need be) and merged into the copy:

- an element below one whose children the snapshot does not list yet (``Encounter.identifier.system``)
  expands that element from its one type's snapshot (a profile on the type if the element names one we
  hold), or from the element a ``contentReference`` points to (``Consent.provision.provision``);
- a slice (``Encounter.extension:sessionKind``) is a copy of the sliced element and its descendants,
  ``sliceName`` set, ``min`` 0 unless the differential says otherwise, placed after the last slice
  already there. Extensions are sliced by url even when the differential does not say so (as the
  HL7 tools do); any other element must be sliced first;
- merging narrows: ``min`` may only rise, ``max`` only fall, types only drop (and a binding goes
  with the last coded type), a required binding stays required; ``fixed[x]``/``pattern[x]``
  replace the parent's; ``constraint`` adds by key, ``condition`` and ``mapping`` add; anything
  else (mustSupport, short, definition, slicing, …) replaces.

A differential may say ``fixed`` or ``pattern`` without the type suffix: the element's one type
decides (``pattern`` on a CodeableConcept becomes ``patternCodeableConcept``), and the returned
differential carries the resolved name.
"""

from __future__ import annotations

import copy

from fhir_iop.errors import ConfigError

EXTENSION_SLICING = {"discriminator": [{"type": "value", "path": "url"}],
                     "description": "Extensions are always sliced by (at least) url", "ordered": False,
                     "rules": "open"}
FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
#: types a binding applies to (ElementDefinition eld-11)
CODED = frozenset({"code", "Coding", "CodeableConcept", "Quantity", "string", "uri", "canonical"})


class SnapshotError(ConfigError):
    """A differential that does not apply to its parent (unknown element, a widening, …)."""


def card(value: str | int) -> float:
    return float("inf") if value == "*" else int(value)


def type_code(t: dict) -> str:
    """A type's FHIR name (primitive values in R4 snapshots are typed ``System.String`` + an extension)."""
    code = t["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for e in t.get("extension", ()):
            if e.get("url") == FHIR_TYPE_EXT:
                return e.get("valueUrl") or e.get("valueUri") or code
    return code


def path_of(element_id: str) -> str:
    """``Encounter.extension:kind.url`` → ``Encounter.extension.url``."""
    return ".".join(part.split(":", 1)[0] for part in element_id.split("."))


def apply(parent: list[dict], differential: list[dict], defs, where: str = "") -> tuple[list[dict], list[dict]]:
    """``(snapshot, differential)``: the parent's snapshot constrained by ``differential``."""
    s = _Snapshot(copy.deepcopy(parent), defs, where)
    resolved = []
    for d in differential:
        if "id" not in d:
            d = {"id": d["path"], **d}
        if path_of(d["id"]) != d["path"]:
            raise SnapshotError(f"{where}{d['id']}: id and path {d['path']!r} disagree")
        resolved.append(s.merge(s.ensure(d["id"]), d))
    return s.elements, resolved


class _Snapshot:
    def __init__(self, elements: list[dict], defs, where: str):
        self.elements = elements
        self.defs = defs
        self.where = where
        self.root = elements[0]["path"]
        self._index: dict[str, int] | None = None
        self._alias: dict[str, str] = {}  # a renamed choice (Observation.valueQuantity) -> its element id

    def _find(self, element_id: str) -> int | None:
        if self._index is None:
            self._index = {e["id"]: i for i, e in enumerate(self.elements)}
        return self._index.get(element_id)

    def _insert(self, at: int, new: list[dict]) -> None:
        self.elements[at:at] = new
        self._index = None

    def _error(self, element_id: str, message: str) -> SnapshotError:
        return SnapshotError(f"{self.where}{element_id}: {message}")

    # -- finding and making elements ------------------------------------------------------------
    def _canonical(self, element_id: str) -> str:
        parts, out = element_id.split("."), ""
        for part in parts:
            out = f"{out}.{part}" if out else part
            out = self._alias.get(out, out)
        return out

    def ensure(self, element_id: str) -> dict:
        element_id = self._canonical(element_id)
        i = self._find(element_id)
        if i is not None:
            return self.elements[i]
        if "." not in element_id:
            raise self._error(element_id, f"the root element is {self.root!r}")
        parent_id, last = element_id.rsplit(".", 1)
        name, _, slice_name = last.partition(":")
        if slice_name:
            self.ensure(f"{parent_id}.{name}")
            return self._slice(f"{parent_id}.{name}", slice_name)
        self._expand(self.ensure(parent_id))
        i = self._find(element_id)
        if i is None:
            return self._renamed_choice(parent_id, name)
        return self.elements[i]

    def _renamed_choice(self, parent_id: str, name: str) -> dict:
        """``Observation.valueQuantity``: the choice narrowed to that type, and a type slice of it when
        the choice had several types (what the HL7 tools make of a type-specific name)."""
        for e in self.elements:
            stem = e["id"][len(parent_id) + 1:-3] if e["id"].startswith(parent_id + ".") else ""
            if e["id"].endswith("[x]") and stem and "." not in stem and ":" not in stem \
                    and name.startswith(stem) and name[len(stem):][:1].isupper():
                wanted = name[len(stem):]
                match = [t for t in e.get("type", ()) if type_code(t)[0].upper() + type_code(t)[1:] == wanted]
                if not match:
                    break
                several = len(e.get("type", ())) > 1
                e["type"] = copy.deepcopy(match)
                target = e
                if several:
                    e.setdefault("slicing", {"discriminator": [{"type": "type", "path": "$this"}],
                                             "ordered": False, "rules": "closed"})
                    target = self._slice(e["id"], name)
                self._alias[f"{parent_id}.{name}"] = target["id"]
                return target
        raise self._error(f"{parent_id}.{name}", "no such element")

    def _expand(self, parent: dict) -> None:
        pid = parent["id"]
        i = self._find(pid)
        if i + 1 < len(self.elements) and self.elements[i + 1]["id"].startswith(pid + "."):
            return  # its children are listed already
        if "contentReference" in parent:
            ref = parent["contentReference"].split("#", 1)[1]
            source = self.defs.base_elements(ref.split(".", 1)[0])
            prefix = ref
            children = [e for e in source if e["id"].startswith(ref + ".")]
        else:
            types = parent.get("type") or []
            codes = {type_code(t) for t in types}
            if len(codes) != 1:
                raise self._error(pid, f"has types {sorted(codes) or 'none'}: constrain it to one type "
                                       "before constraining its children")
            if codes & {"BackboneElement", "Element"}:
                raise self._error(pid, "an inline element whose children are missing from the snapshot")
            t = types[0]
            source = self.defs.type_elements(type_code(t), (t.get("profile") or [None])[0])
            prefix = source[0]["id"]
            children = source[1:]
        new = []
        for e in children:
            c = copy.deepcopy(e)
            c["id"] = pid + e["id"][len(prefix):]
            c["path"] = parent["path"] + e["path"][len(path_of(prefix)):]
            new.append(c)
        self._insert(i + 1, new)

    def _slice(self, base_id: str, name: str) -> dict:
        i = self._find(base_id)
        base = self.elements[i]
        if "slicing" not in base:
            if base["path"].endswith((".extension", ".modifierExtension")):
                base["slicing"] = copy.deepcopy(EXTENSION_SLICING)
            else:
                raise self._error(f"{base_id}:{name}", f"a slice of {base_id}, which is not sliced")
        end = i + 1
        while end < len(self.elements) and self.elements[end]["id"].startswith((base_id + ".", base_id + ":")):
            end += 1
        slice_id = f"{base_id}:{name}"
        new = []
        for e in self.elements[i:end]:
            if e is base or e["id"].startswith(base_id + "."):
                c = copy.deepcopy(e)
                c["id"] = slice_id + e["id"][len(base_id):]
                new.append(c)
        head = new[0]
        head.pop("slicing", None)
        rebuilt = {}
        for k, v in head.items():  # sliceName right after path, as FHIR orders ElementDefinition
            rebuilt[k] = v
            if k == "path":
                rebuilt["sliceName"] = name
        head.clear()
        head.update(rebuilt)
        head["min"] = 0
        self._insert(end, new)
        return head

    # -- merging ---------------------------------------------------------------------------------
    def merge(self, el: dict, d: dict) -> dict:
        """Constrain ``el`` by ``d``; returns ``d`` with ``fixed``/``pattern`` resolved to their type."""
        out = {}
        eid = d["id"]
        for k, v in d.items():
            if k in ("fixed", "pattern"):
                k = k + self._suffix(el, eid)
            out[k] = v
            if k in ("id", "path"):
                continue
            if k == "sliceName":
                if el.get("sliceName") != v:
                    raise self._error(eid, f"sliceName {v!r} does not match the id")
            elif k == "min":
                if v < el.get("min", 0):
                    raise self._error(eid, f"min {v} is below the parent's {el['min']}")
                el["min"] = v
            elif k == "max":
                if "max" in el and card(v) > card(el["max"]):
                    raise self._error(eid, f"max {v} is above the parent's {el['max']}")
                el["max"] = v
            elif k.startswith(("fixed", "pattern")):
                for old in [x for x in el if x.startswith(("fixed", "pattern"))]:
                    del el[old]
                el[k] = copy.deepcopy(v)
            elif k == "type":
                allowed = {type_code(t) for t in el.get("type", ())}
                extra = {type_code(t) for t in v} - allowed
                if allowed and extra:
                    raise self._error(eid, f"types {sorted(extra)} are not among the parent's {sorted(allowed)}")
                el["type"] = copy.deepcopy(v)
                if "binding" in el and "binding" not in d and not {type_code(t) for t in v} & CODED:
                    del el["binding"]  # narrowed to types no binding applies to
            elif k == "binding":
                old = el.get("binding", {})
                if old.get("strength") == "required" and v.get("strength") != "required":
                    raise self._error(eid, "a required binding cannot be loosened")
                el["binding"] = copy.deepcopy(v)
            elif k == "constraint":
                keep = [c for c in el.get("constraint", ()) if c["key"] not in {n["key"] for n in v}]
                el["constraint"] = keep + copy.deepcopy(v)
            elif k in ("condition", "mapping", "alias"):
                el[k] = el.get(k, []) + [x for x in copy.deepcopy(v) if x not in el.get(k, [])]
            else:
                el[k] = copy.deepcopy(v)
        if card(el["max"]) < el["min"]:
            raise self._error(eid, f"min {el['min']} is above max {el['max']}")
        return out

    def _suffix(self, el: dict, eid: str) -> str:
        codes = {type_code(t) for t in el.get("type", ())}
        if len(codes) != 1:
            raise self._error(eid, f"fixed/pattern on an element of types {sorted(codes)}: say which type")
        code = codes.pop()
        return code[0].upper() + code[1:]
