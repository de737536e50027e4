"""The CapabilityStatement: built from what the server does, so it cannot claim more.

Search parameters are exactly those the store indexes for each type (plus ``_id`` and
``_lastUpdated``); ``_include``/``_revinclude`` are every reference parameter of the type / every
reference parameter of another served type that can point to it.

The statement ``instantiates`` the published one (``profiles/CapabilityStatement-fhir-iop.json``,
built by :mod:`fhir_iop.conformance.build`): each served type lists the profiles published there as
its ``supportedProfile``.
"""

from __future__ import annotations

from functools import lru_cache

from fhir_iop import __version__
from fhir_iop.fhir.r4 import FHIR_VERSION
from fhir_iop.store.params import RESOURCE_TYPES, Registry
from fhir_iop.store.repository import instant, now
from fhir_iop.terminology import CANONICAL
from server.auth import capability_security

INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create", "search-type")
RESULT_PARAMS = [
    ("_count", "number", "Page size (default 50, at most 1000)"),
    ("_offset", "number", "Start of the page (the next/previous links carry it)"),
    ("_sort", "special", "_id, _lastUpdated, or a date, string, token or quantity parameter; - for descending"),
    ("_summary", "token", "count, true (the elements R4 marks isSummary), text, data or false; also on read"),
    ("_elements", "string", "Top-level elements to return (mandatory ones are always kept)"),
    ("_total", "token", "accurate: always; estimate (default): exact up to 1000 matches, left out above; none"),
]
DOCS = {
    "token": "system|code, |code, system| or code; modifiers :not, :missing",
    "uri": "exact; modifiers :below, :missing",
    "string": "starts with, case- and accent-insensitive; modifiers :exact, :contains, :missing",
    "date": "prefixes eq, ne, lt, le, gt, ge, sa, eb; modifier :missing",
    "reference": "Type/id, id or absolute URL; modifiers :Type, :missing",
    "quantity": "[prefix]number|system|code; prefixes eq, ne, lt, le, gt, ge, sa, eb, ap",
    "number": "[prefix]number",
}


def _target_types(registry: Registry, rt: str, code: str) -> list[str]:
    p = registry.get(rt, code)
    return [t for t in (p.resolve_types or p.targets) if t in RESOURCE_TYPES]


@lru_cache(maxsize=1)
def published() -> tuple[str, dict[str, list[str]]]:
    """(canonical URL, type → supported profiles) of the published CapabilityStatement."""
    from fhir_iop.conformance.build import capability_statement as published_statement
    cs = published_statement()
    return cs["url"], {r["type"]: r.get("supportedProfile", []) for r in cs["rest"][0]["resource"]}


#: FHIR Bulk Data v2 export operations (https://hl7.org/fhir/uv/bulkdata/), by where they run
_BULK = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition"
_BULK_DOC = ("Prefer: respond-async; _outputFormat application/fhir+ndjson, _since (the deletions since listed in "
             "the manifest's deleted array), _type; status at the "
             "Content-Location URL, files readable only by the client that started the export; 42 CFR Part 2 "
             "consent applies to every line")
BULK_EXPORT = {
    "*": {"name": "export", "definition": f"{_BULK}/export", "documentation": _BULK_DOC},
    "Patient": {"name": "export", "definition": f"{_BULK}/patient-export", "documentation": _BULK_DOC},
    "Group": {"name": "export", "definition": f"{_BULK}/group-export",
              "documentation": "One Group per payer (identifier: the payer id in the site's payer system): the "
                               "members' Patient, Coverage, EpisodeOfCare, Condition, the Encounters the payer's "
                               "Coverage covered and its Claims; " + _BULK_DOC},
}


def _resource(registry: Registry, rt: str) -> dict:
    params = [{"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"},
              {"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
               "type": "date", "documentation": DOCS["date"]}]
    for code, p in sorted(registry.for_type(rt).items()):
        params.append({"name": code, "definition": p.url, "type": p.type, "documentation": DOCS[p.type]})
    includes = [f"{rt}:{p.code}" for p in registry.references(rt)]
    revincludes = [f"{other}:{p.code}" for other in RESOURCE_TYPES for p in registry.references(other)
                   if rt in _target_types(registry, other, p.code)]
    out = {
        "type": rt,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{rt}",
        "supportedProfile": published()[1].get(rt, []),
        "interaction": [{"code": c} for c in INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "full-support",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local"],
        "searchInclude": includes,
        "searchRevInclude": revincludes,
        "searchParam": params,
        "operation": [{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                       "documentation": "[type]/$validate (POST) and [type]/[id]/$validate (GET: the stored "
                                        "version; POST: the posted one as an update); mode and profile"}],
    }
    if rt in BULK_EXPORT:  # FHIR Bulk Data (server/routes/export.py)
        out["operation"].append(BULK_EXPORT[rt])
    if not out["supportedProfile"]:
        del out["supportedProfile"]
    return out


def capability_statement(registry: Registry, base: str) -> dict:
    from server.audit_hook import capability as audit_capability  # the audit trail (admins, read-only)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": instant(now())[:10],
        "publisher": "fhir-iop",
        "kind": "instance",
        "instantiates": [published()[0]],
        "software": {"name": "fhir-iop", "version": __version__},
        "implementation": {"description": "fhir-iop FHIR facade over the IOP adapter's store", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", "xml"],
        "patchFormat": [],
        "rest": [{
            "mode": "server",
            "security": capability_security(base),
            "documentation": "Unknown search parameters are ignored and reported in the searchset (Prefer: "
                             "handling=lenient, the default) or rejected with 400 (handling=strict). Prefer: "
                             "return=minimal|representation|OperationOutcome is honoured on writes. Chained "
                             "parameters, _has, _include:iterate, composite parameters and PATCH are not "
                             "supported; conditional delete removes one match (412 if several). A search takes at "
                             "most 20 criteria, 100 values in one and 256 in all, 8 _sort keys and 32 "
                             "_include/_revinclude (more: 400 too-costly). Input limits: "
                             "a body over the configured size gets 413; JSON nested deeper than 100 levels, with a name twice in one object or with "
                             "control characters in strings gets 400; XML with a DOCTYPE or entity declaration "
                             "gets 400; a body that is not FHIR JSON or XML gets 415; an Accept or _format "
                             "asking for neither gets 406. A database that cannot be reached or is busy gets 503 "
                             "with Retry-After (nothing was changed).",
            "resource": [_resource(registry, rt) for rt in RESOURCE_TYPES] + [audit_capability()],
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            "searchParam": [{"name": n, "type": t, "documentation": d} for n, t, d in RESULT_PARAMS],
            "operation": [{"name": "load-iop", "definition": f"{CANONICAL}/OperationDefinition/load-iop",
                           "documentation": "POST IOP record files (multipart/form-data, one file per record "
                                            "type, named as in docs/record-format.md): mapped to FHIR and stored"},
                          BULK_EXPORT["*"]],
        }],
    }
