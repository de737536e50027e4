"""Bundle rules beyond the Bundle StructureDefinition's own invariants (bdl-1…bdl-12).

- ``fullUrl`` is an absolute URL; a RESTful one (``…/Type/id``) agrees with the resource's type and
  id; a ``urn:uuid:`` one is a UUID;
- references inside entries resolve as the FHIR specification says ("Resolving references in
  Bundles"): absolute ones by fullUrl, relative ones against the RESTful base of the referring
  entry's fullUrl, ``/_history/`` against ``meta.versionId``; ``urn:uuid:``/``urn:oid:``
  references must resolve in any Bundle, all references must in a document or message; in a
  transaction, ``Type/id`` also resolves to the entry that PUTs that ``Type/id``;
  several matches are an error in a document or message and a warning elsewhere; the resolved
  resource must be of a type the element allows;
- a document's entries are all reachable from its Composition (and a message's from its
  MessageHeader), following references forward or backward;
- the link relations self, first, previous, next and last occur at most once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_RESTFUL = re.compile(r"^(?P<base>https?://.+?)/(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-\.]{1,64})"
                      r"(?:/_history/(?P<version>[A-Za-z0-9\-\.]{1,64}))?$")
_RELATIVE = re.compile(r"^(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-\.]{1,64})"
                       r"(?:/_history/(?P<version>[A-Za-z0-9\-\.]{1,64}))?$")
_UUID = re.compile(r"^urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ABSOLUTE = re.compile(r"^(https?://|urn:uuid:|urn:oid:)")
_UNIQUE_LINKS = ("self", "first", "previous", "prev", "next", "last")


@dataclass
class _Ref:
    location: str
    reference: str
    allowed: set[str] | None
    entry: int | None


@dataclass
class BundleState:
    bundle: dict
    location: str
    entries: list[tuple[str | None, dict | None]] = field(default_factory=list)  # (fullUrl, resource)
    by_resource: dict[int, int] = field(default_factory=dict)    # id(resource) -> entry index
    by_full_url: dict[str, list[int]] = field(default_factory=dict)
    refs: list[_Ref] = field(default_factory=list)
    by_request_url: dict[str, list[int]] = field(default_factory=dict)  # PUT Type/id in a transaction

    def __post_init__(self):
        for i, e in enumerate(self.bundle.get("entry", ()) or ()):
            if not isinstance(e, dict):
                self.entries.append((None, None))
                continue
            fu = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else None
            res = e.get("resource") if isinstance(e.get("resource"), dict) else None
            self.entries.append((fu, res))
            if res is not None:
                self.by_resource[id(res)] = i
            if fu:
                self.by_full_url.setdefault(fu, []).append(i)
            req = e.get("request") if isinstance(e.get("request"), dict) else {}
            if req.get("method") == "PUT" and isinstance(req.get("url"), str) and _RELATIVE.match(req["url"]):
                self.by_request_url.setdefault(req["url"], []).append(i)

    @property
    def type(self) -> str | None:
        return self.bundle.get("type")

    def reference(self, location: str, ref: str, allowed, resource: dict) -> None:
        self.refs.append(_Ref(location, ref, allowed, self.by_resource.get(id(resource))))

    def resolve(self, ref: str, entry: int | None) -> list[int]:
        """Entries ``ref`` resolves to (by the specification's rules)."""
        version = None
        m = _RESTFUL.match(ref)
        if m and m.group("version"):
            version = m.group("version")
            ref = ref[: ref.index("/_history/")]
        if not _ABSOLUTE.match(ref):
            rel = _RELATIVE.match(ref)
            if rel is None or entry is None:
                return []
            if rel.group("version"):
                version = rel.group("version")
                ref = ref[: ref.index("/_history/")]
            if self.type in ("transaction", "batch") and ref in self.by_request_url and version is None:
                return list(self.by_request_url[ref])  # the resource this transaction PUTs at Type/id
            full = self.entries[entry][0]
            base = _RESTFUL.match(full or "")
            if base is None:
                return []
            ref = f"{base.group('base')}/{ref}"
        hits = list(self.by_full_url.get(ref, ()))
        if version is not None:
            hits = [i for i in hits if ((self.entries[i][1] or {}).get("meta") or {}).get("versionId") == version]
        return hits

    def by_type_and_id(self, ref: str) -> list[int]:
        rel = _RELATIVE.match(ref) or _RESTFUL.match(ref)
        if rel is None:
            return []
        return [i for i, (_, res) in enumerate(self.entries) if res is not None
                and res.get("resourceType") == rel.group("type") and res.get("id") == rel.group("id")]

    def resolver_for(self, resource: dict):
        entry = self.by_resource.get(id(resource))

        def resolve(ref: str):
            hits = self.resolve(ref, entry)
            return self.entries[hits[0]][1] if len(hits) == 1 else None
        return resolve


class BundleRules:
    def __init__(self, validator):
        self.v = validator

    def state(self, bundle: dict, location: str) -> BundleState:
        return BundleState(bundle, location)

    def check(self, run, bundle: dict, loc: str) -> None:
        from fhir_iop.validation.validator import Issue
        state: BundleState = run.bundles[-1]
        btype = state.type
        strict = btype in ("document", "message")
        for i, (fu, res) in enumerate(state.entries):
            eloc = f"{loc}.entry[{i}]"
            if fu is None:
                continue
            if not _ABSOLUTE.match(fu) and not re.match(r"^[a-z][a-z0-9+.-]*:", fu, re.I):
                run.add(Issue("error", "invalid", eloc, f"The fullUrl must be an absolute URL (not '{fu}')", "bundle"))
                continue
            if fu.startswith("urn:uuid:") and not _UUID.match(fu):
                run.add(Issue("error", "invalid", eloc, f"The fullUrl '{fu}' is not a valid urn:uuid", "bundle"))
            m = _RESTFUL.match(fu)
            if m and res is not None:
                rid = res.get("id")
                if rid is None:
                    if not (btype in ("transaction", "batch") and
                            ((bundle["entry"][i].get("request") or {}).get("method") == "POST")):
                        run.add(Issue("error", "invalid", eloc, f"The fullUrl '{fu}' looks like a RESTful server URL, "
                                      "but the resource has no id", "bundle"))
                elif rid != m.group("id") or res.get("resourceType") != m.group("type"):
                    run.add(Issue("error", "invalid", eloc, f"The fullUrl '{fu}' does not match the resource "
                                  f"{res.get('resourceType')}/{rid}", "bundle"))
        # references
        edges: dict[int, set[int]] = {}
        for r in state.refs:
            hits = state.resolve(r.reference, r.entry)
            if len(hits) > 1:
                run.add(Issue("error" if strict else "warning", "invalid", r.location,
                              f"Found {len(hits)} matches for '{r.reference}' in the bundle", "bundle-reference"))
            elif len(hits) == 1:
                self._target_type(run, state, r, hits[0])
                if r.entry is not None:
                    edges.setdefault(r.entry, set()).add(hits[0])
            else:
                loose = state.by_type_and_id(r.reference)
                rel = _RELATIVE.match(r.reference)
                uuid_hits = state.by_full_url.get(f"urn:uuid:{rel.group('id')}", []) if rel else []
                if uuid_hits and not loose:
                    target = state.entries[uuid_hits[0]][1] or {}
                    if target.get("resourceType") != rel.group("type"):
                        run.add(Issue("error", "required", r.location, f"Matching reference for reference "
                                      f"{r.reference} has resourceType {target.get('resourceType')}",
                                      "bundle-reference"))
                    elif r.entry is not None:
                        edges.setdefault(r.entry, set()).add(uuid_hits[0])
                    continue
                if not strict:
                    if r.reference.startswith(("urn:uuid:", "urn:oid:")):
                        run.add(Issue("warning", "not-found", r.location, f"URN reference is not locally contained "
                                      f"within the bundle: {r.reference}", "bundle-reference"))
                    elif loose:
                        run.add(Issue("warning", "invalid", r.location, f"'{r.reference}' does not resolve by fullUrl; "
                                      f"{len(loose)} entr{'y has' if len(loose) == 1 else 'ies have'} that type and id",
                                      "bundle-reference"))
                    continue
                note = ""
                if loose:
                    note = (" Note that there " + ("is a resource" if len(loose) == 1 else f"are {len(loose)} resources")
                            + " in the bundle with the same type and id, but it does not match because of the "
                            "fullUrl based rules around matching relative references")
                run.add(Issue("error", "not-found" if not loose else "invalid", r.location,
                              f"Can't find '{r.reference}' in the bundle.{note}", "bundle-reference"))
        # reachability in documents and messages
        if strict and state.entries and state.entries[0][1] is not None:
            first = state.entries[0][1].get("resourceType")
            if (btype, first) in (("document", "Composition"), ("message", "MessageHeader")):
                reached = {0}
                changed = True
                while changed:
                    changed = False
                    for src, targets in edges.items():
                        if src in reached and not targets <= reached:
                            reached |= targets
                            changed = True
                        elif src not in reached and targets & reached:
                            reached.add(src)
                            changed = True
                for i, (fu, res) in enumerate(state.entries):
                    if i not in reached and res is not None:
                        run.add(Issue("error", "informational", f"{loc}.entry[{i}]",
                                      f"Entry '{fu or i}' isn't reachable by traversing links (forward or backward) "
                                      f"from the {first}", "bundle-reachability"))
        # links
        seen: dict[str, int] = {}
        for i, link in enumerate(bundle.get("link", ()) or ()):
            rel = link.get("relation") if isinstance(link, dict) else None
            if rel in _UNIQUE_LINKS:
                if rel in seen:
                    run.add(Issue("error", "invalid", f"{loc}.link[{i}]",
                                  f"The link relationship type '{rel}' can only occur once", "bundle"))
                seen[rel] = i

    @staticmethod
    def _target_type(run, state: BundleState, r: _Ref, hit: int) -> None:
        from fhir_iop.validation.validator import Issue
        target = state.entries[hit][1]
        if target is None:
            return
        rt = target.get("resourceType")
        m = _RELATIVE.match(r.reference) or _RESTFUL.match(r.reference)
        if m and m.group("type") != rt:
            run.add(Issue("error", "required", r.location, f"Matching reference for reference {r.reference} has "
                          f"resourceType {rt}", "bundle-reference"))
        elif r.allowed and rt not in r.allowed:
            run.add(Issue("error", "structure", r.location, f"The resource {r.reference} in the bundle is a {rt}, "
                          f"which is not a valid target (must be one of {sorted(r.allowed)})", "bundle-reference"))
