"""SMART scopes (App Launch 1.0 "v1" and 2.0 "v2") and what they allow.

Grammar (https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html)::

    <context>/<type>.<permissions>     context: system | user | patient; type: a resource type or *
    v1 permissions: read | write | *   (read = r+s, write = c+u+d, * = cruds)
    v2 permissions: the letters c r u d s, in that order, each at most once (rs, cruds, c, u, d, ...)

v2 permission letters and the FHIR interactions they allow (SMART 2.0, "Scopes for requesting
FHIR resources"): ``c`` type create; ``r`` read, vread, instance history; ``u`` update (also an
update that creates), conditional update; ``d`` delete; ``s`` type search, type history, system
search, system history. Our decisions beyond the spec:

* **Restricted v2 scopes** (``system/Observation.rs?category=laboratory``) are **not granted**:
  fhir-iop does not enforce search-parameter restrictions, and granting the scope without the
  restriction would widen access. The token endpoint drops them (``invalid_scope`` when nothing
  is left), a registration refuses them, and a restricted scope in an external token allows nothing.
* ``$validate`` on a type reads and writes nothing stored: any of ``r``, ``c`` or ``u`` on the type
  allows it (a client that may read or write the type may check a resource of it).
* ``$load-iop`` writes resources of every type: it needs ``c`` and ``u`` on ``*``.
* System-level history (``GET /_history``) and other cross-type interactions need the permission on
  ``*`` (a wildcard scope): a per-type scope cannot see every type.
* ``user/`` and ``patient/`` scopes parse, but a backend client is granted ``system/`` scopes only;
  a ``patient/`` or ``user/`` scope in a token allows nothing here (fhir-iop has no launch context).
* Other scopes (``openid``, ``launch``, ``offline_access``, ...) parse as non-resource scopes and
  allow nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from fhir_iop.errors import FhirIopError

V2_ORDER = "cruds"
V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}

#: interaction -> the v2 permission letters any one of which allows it
INTERACTIONS: dict[str, frozenset[str]] = {
    "read": frozenset("r"),
    "vread": frozenset("r"),
    "history-instance": frozenset("r"),
    "history": frozenset("r"),  # instance history; type/system history are "history-type"/"history-system"
    "history-type": frozenset("s"),
    "history-system": frozenset("s"),
    "search": frozenset("s"),
    "search-system": frozenset("s"),
    "create": frozenset("c"),
    "update": frozenset("u"),
    "conditional-update": frozenset("u"),
    "delete": frozenset("d"),
    "$validate": frozenset("rcu"),
}

_SCOPE = re.compile(r"^(system|user|patient)/([A-Za-z]+|\*)\.([a-z*]+)(\?.*)?$")


class ScopeError(FhirIopError):
    """A scope string that is not a SMART resource scope fhir-iop can grant."""


@dataclass(frozen=True)
class Scope:
    context: str  # system, user or patient
    type: str  # a resource type or "*"
    perms: frozenset[str]  # subset of "cruds"
    v1: bool  # written in the v1 form (read/write/*)
    restriction: str | None = None  # the ?param=value part of a v2 scope (never granted)

    def __str__(self) -> str:
        return f"{self.context}/{self.type}.{_perm_text(self.perms, self.v1)}{self.restriction or ''}"

    def covers(self, rt: str) -> bool:
        return self.type == "*" or self.type == rt


def _perm_text(perms: frozenset[str], v1: bool) -> str:
    if v1:
        for name, p in V1.items():
            if p == perms:
                return name
    return "".join(c for c in V2_ORDER if c in perms)


def parse_one(text: str) -> Scope | None:
    """A resource scope, or None for a non-resource scope (openid, launch, ...); ScopeError when
    it looks like a resource scope but is malformed."""
    m = _SCOPE.match(text)
    if m is None:
        if "/" in text and "." in text.split("/", 1)[1] and not text.startswith("launch/"):
            raise ScopeError(f"scope {text!r} is not a SMART resource scope (context/Type.permissions)")
        return None
    context, rt, perm, restriction = m.groups()
    if perm in V1:
        if restriction:
            raise ScopeError(f"scope {text!r}: v1 scopes take no ?restriction")
        return Scope(context, rt, V1[perm], True)
    letters = [c for c in perm]
    if not letters or any(c not in V2_ORDER for c in letters) or letters != sorted(
            set(letters), key=V2_ORDER.index):
        raise ScopeError(f"scope {text!r}: permissions are read, write, * or the letters c r u d s in that order")
    return Scope(context, rt, frozenset(letters), False, restriction or None)


def parse(text: str | Iterable[str] | None, strict: bool = False) -> list[Scope]:
    """The resource scopes of a space-separated scope string (or a list). Malformed ones raise when
    ``strict``, else they are left out (an external token's odd scope grants nothing)."""
    if text is None:
        return []
    items = text.split() if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            s = parse_one(item)
        except ScopeError:
            if strict:
                raise
            continue
        if s is not None:
            out.append(s)
    return out


class ScopeSet:
    """Granted scopes. ``allows(rt, interaction)``: only ``system/`` scopes without a restriction
    count. ``limit``: another ScopeSet that must allow too (the client's registration as it is now,
    so narrowing a registration narrows tokens already issued)."""

    def __init__(self, scopes: Iterable[Scope] | str | None, limit: ScopeSet | None = None):
        self.scopes = parse(scopes) if scopes is None or isinstance(scopes, str) else list(scopes)
        self.limit = limit
        self._perms: dict[str, frozenset[str]] = {}  # rt → perms (a set is never changed once made)

    def __repr__(self) -> str:
        return f"ScopeSet({self.text!r})"

    @property
    def text(self) -> str:
        return " ".join(str(s) for s in self.scopes)

    def perms(self, rt: str) -> frozenset[str]:
        """The permission letters granted on resource type ``rt`` ("*": by wildcard scopes only)."""
        known = self._perms.get(rt)
        if known is not None:
            return known
        got: set[str] = set()
        for s in self.scopes:
            if s.context == "system" and s.restriction is None and (s.type == "*" or s.type == rt):
                got |= s.perms
        if self.limit is not None:
            got &= self.limit.perms(rt)
        if len(self._perms) < 256:  # (types are few; a bound all the same)
            self._perms[rt] = frozenset(got)
        return frozenset(got)

    def allows(self, rt: str, interaction: str) -> bool:
        return allows(self, rt, interaction)


def allows(scopes: ScopeSet | Iterable[Scope] | str | None, resource_type: str, interaction: str) -> bool:
    """Whether the scopes allow ``interaction`` on ``resource_type`` ("*" = every type at once).

    Interactions: read, vread, history-instance (or history), history-type, history-system, search,
    search-system, create, update, conditional-update, delete, $validate, $load-iop, or another
    operation name (``$x``: allowed by ``r`` on the type, i.e. read-only operations only).
    """
    ss = scopes if isinstance(scopes, ScopeSet) else ScopeSet(scopes)
    perms = ss.perms(resource_type)
    if interaction == "$load-iop":
        return {"c", "u"} <= ss.perms("*")
    need = INTERACTIONS.get(interaction)
    if need is None:
        if interaction.startswith("$"):
            need = frozenset("r")
        else:
            raise ValueError(f"unknown interaction {interaction!r}")
    return bool(perms & need)


def intersect(requested: Iterable[Scope], allowed: Iterable[Scope]) -> list[Scope]:
    """What to grant: each requested ``system/`` scope narrowed to the allowed ones (type and
    permissions), written in the form it was requested in; restricted scopes are not granted."""
    out: list[Scope] = []
    allowed = [a for a in allowed if a.context == "system" and a.restriction is None]
    for r in requested:
        if r.context != "system" or r.restriction is not None:
            continue
        for a in allowed:
            if r.type == "*":
                rt = a.type
            elif a.type in ("*", r.type):
                rt = r.type
            else:
                continue
            perms = r.perms & a.perms
            if perms:
                s = Scope("system", rt, frozenset(perms), r.v1 and perms in V1.values())
                if s not in out:
                    out.append(s)
    return out
