"""Codes against ValueSets and CodeSystems, offline.

A ValueSet is expanded from what is local: its ``expansion`` if it has one, else its ``compose`` —
enumerated concepts, whole CodeSystems held locally with complete content, and the filters that
can be evaluated on a local CodeSystem (``is-a``, ``descendent-of``, ``is-not-a``, ``=`` on a
property, ``regex``, ``in``, ``exists``). Anything else (SNOMED CT, LOINC, ECL, a CodeSystem not
held) makes the expansion *incomplete*: a code found is a member, a code not found is "not
checked" rather than wrong. Two grammars stand in for code systems no one enumerates: MIME types
(BCP 13) and language tags (BCP 47). The external codes fhir-iop cites with their source
(``fhir_iop/data/cited-codes.json``) are known members of a whole external CodeSystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fhir_iop.validation.definitions import CodeSystemIndex, Definitions, strip_version

MIME = "urn:ietf:bcp:13"
LANG = "urn:ietf:bcp:47"
# type/subtype[;parameters], or the shorthands R4 allows for its own formats (CapabilityStatement.format)
_MIME_RE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+*-]+(\s*;\s*[A-Za-z0-9!#$&^_.+-]+=\S+)*|xml|json|ttl")
_LANG_RE = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")
_GRAMMARS = {MIME: _MIME_RE, LANG: _LANG_RE}


@dataclass
class Expansion:
    """The (system, code) pairs of a ValueSet as far as they can be known offline."""

    codes: dict[str, set[str]] = field(default_factory=dict)   # code -> systems
    grammars: set[str] = field(default_factory=set)             # systems checked by grammar
    complete: bool = True
    why_incomplete: str = ""

    def add(self, system: str, code: str) -> None:
        self.codes.setdefault(code, set()).add(system)

    def contains(self, system: str | None, code: str) -> bool | None:
        """True/False, or None when the answer cannot be known offline."""
        systems = self.codes.get(code)
        if systems is not None and (system is None or system in systems):
            return True
        if system is not None and system in self.grammars:
            return bool(_GRAMMARS[system].fullmatch(code))
        if system is None and any(_GRAMMARS[g].fullmatch(code) for g in self.grammars):
            return True
        return False if self.complete else None


class Codes:
    """ValueSet membership and CodeSystem lookups, cached per ValueSet."""

    def __init__(self, defs: Definitions):
        self.defs = defs
        self._expansions: dict[str, Expansion | None] = {}

    # -- CodeSystems
    def code_system(self, system: str) -> CodeSystemIndex | None:
        return self.defs.code_system(system)

    def check_code(self, system: str, code: str) -> tuple[bool | None, str | None]:
        """Is ``code`` in the CodeSystem ``system``? (None: not known here) and its display."""
        if system in _GRAMMARS:
            return bool(_GRAMMARS[system].fullmatch(code)), None
        cs = self.code_system(system)
        if cs is None or cs.content not in ("complete",) or not cs.codes:
            verified = self.defs.verified.get(system)
            if verified and code in verified:
                return True, verified[code]
            return None, None
        if code in cs.codes:
            return True, cs.codes[code]
        if not cs.case_sensitive:
            low = code.lower()
            for c, d in cs.codes.items():
                if c.lower() == low:
                    return True, d
        verified = self.defs.verified.get(system)  # a code cited from a newer release than the packaged one
        if verified and code in verified:          # (e.g. THO v3-ActCode#RedisclosureProhibitionMark)
            return True, verified[code]
        return False, None

    def displays(self, system: str, code: str) -> set[str] | None:
        cs = self.code_system(system)
        if cs is not None and cs.codes and code in cs.codes:
            out = {cs.codes[code]} if cs.codes[code] else set()
            out |= cs.designations.get(code, set())
            return out or None
        verified = self.defs.verified.get(system)
        if verified and verified.get(code):
            return {verified[code]}
        return None

    # -- ValueSets
    def expansion(self, url: str) -> Expansion | None:
        """The ValueSet's expansion (maybe incomplete), or None if the ValueSet is not known."""
        url = strip_version(url)
        if url in self._expansions:
            return self._expansions[url]
        self._expansions[url] = None  # recursion guard
        vs = self.defs.value_set(url)
        exp = self._expand(vs) if vs is not None else None
        self._expansions[url] = exp
        return exp

    def member(self, url: str, system: str | None, code: str) -> bool | None:
        exp = self.expansion(url)
        if exp is None:
            return None
        return exp.contains(system, code)

    def _expand(self, vs: dict) -> Expansion:
        exp = Expansion()
        if vs.get("expansion", {}).get("contains") and not vs.get("compose"):
            def walk(items):
                for c in items:
                    if c.get("code") and c.get("system"):
                        exp.add(c["system"], c["code"])
                    walk(c.get("contains", ()))
            walk(vs["expansion"]["contains"])
            exp.complete = not vs["expansion"].get("total") or vs["expansion"]["total"] <= sum(
                len(s) for s in exp.codes.values())
            return exp
        compose = vs.get("compose") or {}
        for inc in compose.get("include", ()):
            part = self._include(inc)
            if part is None:
                exp.complete = False
                exp.why_incomplete = exp.why_incomplete or _describe(inc)
                continue
            for code, systems in part.codes.items():
                exp.codes.setdefault(code, set()).update(systems)
            exp.grammars |= part.grammars
            if not part.complete:
                exp.complete = False
                exp.why_incomplete = exp.why_incomplete or part.why_incomplete
        for exc in compose.get("exclude", ()):
            part = self._include(exc)
            if part is None:
                continue  # an exclusion we cannot evaluate: lenient (the code is taken as included)
            for code, systems in part.codes.items():
                left = exp.codes.get(code)
                if left is not None:
                    left -= systems
                    if not left:
                        del exp.codes[code]
        return exp

    def _include(self, inc: dict) -> Expansion | None:
        """One include/exclude entry, or None if it cannot be evaluated offline."""
        system = inc.get("system")
        part: Expansion | None = None
        if system:
            if system in _GRAMMARS and not inc.get("concept") and not inc.get("filter"):
                part = Expansion(grammars={system})
            elif inc.get("concept"):
                part = Expansion()
                for c in inc["concept"]:
                    if c.get("code"):
                        part.add(system, c["code"])
            else:
                cs = self.code_system(system)
                if cs is None or cs.content != "complete" or not cs.codes:
                    verified = self.defs.verified.get(system)
                    if verified and not inc.get("filter"):  # the codes fhir-iop verified are members at least
                        part = Expansion(complete=False, why_incomplete=f"all of {system}, which is not held locally")
                        for code in verified:
                            part.add(system, code)
                        return part
                    return None
                codes = set(cs.codes)
                for f in inc.get("filter", ()):
                    codes = _filter(cs, codes, f)
                    if codes is None:
                        return None
                part = Expansion()
                for code in codes:
                    part.add(system, code)
        for url in inc.get("valueSet", ()):
            other = self.expansion(url)
            if other is None:
                return None
            if part is None:
                part = Expansion(codes={c: set(s) for c, s in other.codes.items()}, grammars=set(other.grammars),
                                 complete=other.complete, why_incomplete=other.why_incomplete)
            else:  # intersection
                part.codes = {c: s & other.codes[c] for c, s in part.codes.items() if c in other.codes}
                part.complete = part.complete and other.complete
        return part


def _filter(cs: CodeSystemIndex, codes: set[str], f: dict) -> set[str] | None:
    prop, op, value = f.get("property"), f.get("op"), f.get("value", "")
    if prop in ("concept", "code", "parent", "child") or op in ("is-a", "descendent-of", "is-not-a"):
        if op == "is-a":
            return {c for c in codes if c == value or value in cs.ancestors(c)}
        if op == "descendent-of":
            return {c for c in codes if value in cs.ancestors(c)}
        if op == "is-not-a":
            return {c for c in codes if c != value and value not in cs.ancestors(c)}
        if op == "in":
            wanted = set(value.split(","))
            return codes & wanted
        if op == "=" and prop in ("concept", "code"):
            return codes & {value}
        if op == "regex":
            rx = re.compile(value)
            return {c for c in codes if rx.fullmatch(c)}
        return None
    if op in ("=", "in", "exists", "regex"):
        wanted = set(value.split(",")) if op == "in" else {value}
        lowered = {w.lower() for w in wanted}
        out = set()
        for c in codes:
            values = cs.properties.get(c, {}).get(prop)
            if op == "exists":
                if (values is not None) == (value == "true"):
                    out.add(c)
            elif values and op != "regex" and any(str(v).lower() in lowered for v in values):
                out.add(c)
            elif op == "regex" and values and any(re.fullmatch(value, str(v)) for v in values):
                out.add(c)
        if not out and not any(prop in p for p in cs.properties.values()):
            return None  # the property is not in this CodeSystem's content as held: cannot tell
        return out
    return None


def _describe(inc: dict) -> str:
    if inc.get("filter"):
        return f"a filter on {inc.get('system')}"
    if inc.get("system"):
        return f"all of {inc['system']}, which is not held locally"
    return "an imported ValueSet that is not known"
