"""Code tables as data: fhir-iop's CodeSystems (``profiles/``) and ConceptMaps (``mappings/``).

Nothing in the mapping code spells a translation table: each lookup goes through a
:class:`Terminology` loaded from FHIR CodeSystem and ConceptMap JSON. A site overrides or adds
tables by pointing ``--mappings`` (or ``FHIR_IOP_MAPPINGS``) at a directory of its own files; a file
whose ``url`` matches a shipped resource replaces it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import orjson

from fhir_iop.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_ROOT / "profiles"
MAPPINGS_DIR = PROJECT_ROOT / "mappings"

#: The canonical base of everything fhir-iop publishes (profiles, CodeSystems, extensions).
CANONICAL = "http://fhir-iop.org/fhir"

# Equivalences under which a target may be read back as its source (ConceptMap R4 semantics:
# "wider" means the target is wider than the source, so reading back would guess).
_EXACT = ("equivalent", "equal")


def cs_url(cs_id: str) -> str:
    return f"{CANONICAL}/CodeSystem/{cs_id}"


@dataclass(frozen=True)
class Target:
    system: str
    code: str
    display: str | None
    equivalence: str
    depends_on: tuple[tuple[str, str], ...] = ()

    def coding(self) -> dict:
        c = {"system": self.system, "code": self.code}
        if self.display:
            c["display"] = self.display
        return c


@dataclass
class ConceptMapTable:
    url: str
    id: str
    # (source system, source code) -> targets in file order
    forward: dict[tuple[str, str], list[Target]] = field(default_factory=dict)
    # (target system, target code) -> [(source system, source code, equivalence)]
    backward: dict[tuple[str, str], list[tuple[str, str, str]]] = field(default_factory=dict)

    def translate(self, system: str, code: str, target_system: str | None = None,
                  **depends: str) -> list[Target]:
        """Targets for a source code whose ``dependsOn`` conditions all hold.

        A ``minimum-minutes`` dependency picks the target with the largest minimum not above
        ``minutes`` (a time-based code such as CPT 90832/90834/90837).
        """
        out = []
        timed: list[tuple[int, Target]] = []
        for t in self.forward.get((system, code), ()):
            if t.equivalence == "unmatched" or (target_system and t.system != target_system):
                continue
            ok = True
            for prop, value in t.depends_on:
                if prop == "minimum-minutes":
                    minutes = depends.get("minutes")
                    if minutes is None or int(minutes) < int(value):
                        ok = False
                    else:
                        timed.append((int(value), t))
                        ok = False  # decided below
                elif depends.get(prop.replace("-", "_")) != value:
                    ok = False
            if ok:
                out.append(t)
        if timed:
            out.append(max(timed, key=lambda p: p[0])[1])
        return out

    def reverse(self, system: str, code: str) -> str | None:
        """The source code a target reads back as: the exact entry, else the only source."""
        sources = self.backward.get((system, code), ())
        exact = [s for s in sources if s[2] in _EXACT]
        if exact:
            return exact[0][1]
        codes = {s[1] for s in sources}
        return codes.pop() if len(codes) == 1 else None


class Terminology:
    """All CodeSystems and ConceptMaps in force for one run."""

    def __init__(self, directories: list[Path]):
        self.code_systems: dict[str, dict[str, str]] = {}  # url -> code -> display
        self.concept_maps: dict[str, ConceptMapTable] = {}  # id and url -> table
        self.value_sets: dict[str, dict[tuple[str, str], str | None]] = {}  # url -> (sys, code) -> display
        self.sources: list[Path] = []
        by_url: dict[str, tuple[Path, dict]] = {}
        for d in directories:
            if not d.is_dir():
                raise ConfigError(f"mappings directory {d} does not exist")
            for path in sorted(d.glob("*.json")):
                try:
                    res = orjson.loads(path.read_bytes())
                except orjson.JSONDecodeError as e:
                    raise ConfigError(f"{path}: not valid JSON: {e}") from e
                if not isinstance(res, dict) or res.get("resourceType") not in ("CodeSystem", "ConceptMap", "ValueSet"):
                    continue
                if "url" not in res:
                    raise ConfigError(f"{path}: {res['resourceType']} has no url")
                by_url[res["url"]] = (path, res)  # later directories override earlier ones
        for path, res in by_url.values():
            self.sources.append(path)
            if res["resourceType"] == "CodeSystem":
                self._load_code_system(path, res)
            elif res["resourceType"] == "ValueSet":
                self.value_sets[res["url"]] = {
                    (inc["system"], c["code"]): c.get("display")
                    for inc in res.get("compose", {}).get("include", ()) if "system" in inc
                    for c in inc.get("concept", ())}
        for path, res in by_url.values():
            if res["resourceType"] == "ConceptMap":
                self._load_concept_map(path, res)
        # inbound site translations: source system -> our CodeSystem, keyed by our CS url
        self.inbound: dict[str, dict[str, str]] = {}
        for table in {id(t): t for t in self.concept_maps.values()}.values():
            for (src_sys, src_code), targets in table.forward.items():
                for t in targets:
                    if t.system in self.code_systems and not src_sys.startswith(CANONICAL) \
                            and t.equivalence in _EXACT + ("wider",):
                        self.inbound.setdefault(t.system, {})[src_code] = t.code

    def _load_code_system(self, path: Path, res: dict) -> None:
        concepts: dict[str, str] = {}

        def walk(items):
            for c in items or ():
                if "code" not in c:
                    raise ConfigError(f"{path}: a concept has no code")
                concepts[c["code"]] = c.get("display", c["code"])
                walk(c.get("concept"))

        walk(res.get("concept"))
        self.code_systems[res["url"]] = concepts

    def _load_concept_map(self, path: Path, res: dict) -> None:
        table = ConceptMapTable(url=res["url"], id=res.get("id", res["url"].rsplit("/", 1)[-1]))
        for g in res.get("group", ()):
            src, tgt = g.get("source"), g.get("target")
            if not src or not tgt:
                raise ConfigError(f"{path}: every group needs source and target systems")
            if src in self.code_systems:
                known = self.code_systems[src]
                for el in g.get("element", ()):
                    if el.get("code") not in known:
                        raise ConfigError(f"{path}: source code {el.get('code')!r} is not in {src}")
            for el in g.get("element", ()):
                for t in el.get("target", ()):
                    eq = t.get("equivalence", "equivalent")
                    if eq != "unmatched" and "code" not in t:
                        raise ConfigError(f"{path}: element {el.get('code')!r} has a target without code")
                    if tgt in self.code_systems and eq != "unmatched" and t["code"] not in self.code_systems[tgt]:
                        raise ConfigError(f"{path}: target code {t['code']!r} is not in {tgt}")
                    target = Target(tgt, t.get("code", ""), t.get("display"), eq,
                                    tuple((d["property"], d["value"]) for d in t.get("dependsOn", ())))
                    table.forward.setdefault((src, el["code"]), []).append(target)
                    if eq != "unmatched":
                        table.backward.setdefault((tgt, target.code), []).append((src, el["code"], eq))
        self.concept_maps[table.id] = table
        self.concept_maps[table.url] = table

    # -- lookups ---------------------------------------------------------------------------
    def codes(self, cs_id: str) -> dict[str, str]:
        try:
            return self.code_systems[cs_url(cs_id)]
        except KeyError:
            raise ConfigError(f"CodeSystem {cs_id} is not loaded") from None

    def coding(self, cs_id: str, code: str) -> dict:
        """A Coding in one of fhir-iop's own CodeSystems."""
        return {"system": cs_url(cs_id), "code": code, "display": self.codes(cs_id)[code]}

    def normalize(self, cs_id: str, value: str) -> str | None:
        """A code of ours for ``value``: itself if known, else a site inbound translation."""
        url = cs_url(cs_id)
        if value in self.code_systems.get(url, ()):
            return value
        return self.inbound.get(url, {}).get(value)

    def value_set_display(self, vs_id: str, system: str, code: str) -> str | None:
        return self.value_sets.get(f"{CANONICAL}/ValueSet/{vs_id}", {}).get((system, code))

    def concept_map(self, map_id: str) -> ConceptMapTable:
        try:
            return self.concept_maps[map_id]
        except KeyError:
            raise ConfigError(f"ConceptMap {map_id} is not loaded") from None

    def translate(self, map_id: str, cs_id: str, code: str, target_system: str | None = None,
                  **depends: str) -> list[Target]:
        return self.concept_map(map_id).translate(cs_url(cs_id), code, target_system, **depends)

    def reverse(self, map_id: str, system: str | None, code: str | None) -> str | None:
        if not system or not code:
            return None
        return self.concept_map(map_id).reverse(system, code)


def mapping_dirs(extra: str | os.PathLike | None = None) -> list[Path]:
    dirs = [PROFILES_DIR, MAPPINGS_DIR]
    extra = extra or os.environ.get("FHIR_IOP_MAPPINGS")
    if extra:
        dirs.append(Path(extra))
    return dirs


@lru_cache(maxsize=8)
def _load(dirs: tuple[Path, ...]) -> Terminology:
    return Terminology(list(dirs))


def load_terminology(extra: str | os.PathLike | None = None) -> Terminology:
    return _load(tuple(mapping_dirs(extra)))
