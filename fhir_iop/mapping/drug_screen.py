"""drug_screen ⇄ DiagnosticReport (US Core Lab) + an Observation per analyte + a Specimen.

- DiagnosticReport: panel LOINC (``drug-panel-to-loinc``; none for oral fluid) beside the
  fhir-iop drug-panel coding; the screen method (DiagnosticReport has no method element) and the
  enrollment (no episodeOfCare element) travel in extensions; the accession number is a second
  identifier (and the Specimen's accessionIdentifier); the lab is a display-only performer.
- Observation per analyte: LOINC by method and specimen (``drug-analyte-to-loinc``, urine only)
  beside the fhir-iop drug-analyte coding; ``method`` the screen-method coding; the value is
  ``valueQuantity`` in ng/mL when a concentration was measured, else SNOMED Detected / Not
  detected. **The qualitative result always travels in ``interpretation`` (DET / ND)**, so it
  round-trips when the value is a quantity. The MAT-aware flag (:mod:`fhir_iop.interpret`) adds an
  N / A interpretation, the ``screen-flag`` extension and a ``note`` saying why; the cutoff is
  ``referenceRange.high``.
- Specimen: SNOMED + v2-0487 type (``specimen-kind-to-specimen-type``), accession, collection time,
  and whether collection was observed (extension ``observed-collection``).

Flags are computed when the run includes mat_medications; otherwise those given with the record are
kept (so FHIR → IOP → FHIR is stable). Reading back, a flag comes only from the screen-flag
extension: a lab's own N / A is not read against the client's MAT.
"""

from __future__ import annotations

from typing import NamedTuple
from zoneinfo import ZoneInfo

from fhir_iop.errors import Problem
from fhir_iop.interpret import expected_analytes, explanation, interpret
from fhir_iop.mapping.common import (client_of, UCUM, FhirIndex, MappingContext, Unmappable, cited, codings, ext_code,
                                     ext_url, ext_value)
from fhir_iop.records.model import AnalyteResult, DrugScreen
from fhir_iop.terminology import cs_url

LOINC = "http://loinc.org"
PANEL_MAP, ANALYTE_MAP = "drug-panel-to-loinc", "drug-analyte-to-loinc"
RESULT_SNOMED, RESULT_INTERP, FLAG_INTERP = "analyte-result-to-snomed", "analyte-result-to-interpretation", \
    "screen-flag-to-interpretation"
SPECIMEN_MAP = "specimen-kind-to-specimen-type"
OBSERVED_EXT, ENROLLMENT_EXT = ext_url("observed-collection"), ext_url("enrollment")
_LAB, _LABORATORY = cited("dr-category-lab"), cited("obs-category-laboratory")


def _ng_ml(value: float) -> dict:
    return {"value": value, "unit": "ng/mL", "system": UCUM, "code": "ng/mL"}


def to_fhir(rec: DrugScreen, ctx: MappingContext, problems: list[Problem]) -> list[dict]:
    where = f"drug screen {rec.screen_id}"
    ctx.check_ref(where, "client_mrn", "clients", rec.client_mrn, problems)
    ctx.check_ref(where, "enrollment_id", "enrollments", rec.enrollment_id, problems)
    if (enrolled := ctx.enrollments.get(rec.enrollment_id)) and enrolled[0] != rec.client_mrn:
        problems.append(Problem(where, f"enrollment {rec.enrollment_id!r} belongs to another client",
                                field="enrollment_id"))
    t = ctx.terminology
    orders = None  # the MAT orders behind each expected analyte, when this run knows them
    if "mat_medications" in ctx.seen_types:
        mine = [ctx.mat_orders[m] for m in ctx.mat_by_client.get(rec.client_mrn, ())]
        tz = ZoneInfo(ctx.settings.timezone)
        rec = interpret(rec, mine, t, tz)
        orders = expected_analytes(rec, mine, t, tz)
    patient = ctx.client_ref(rec.client_mrn)
    collected = rec.collected_at.isoformat()
    spec_id = ctx.rid("drug_screen_specimen", rec.screen_id)
    spec_ref = {"reference": f"Specimen/{spec_id}"}
    specimen = {"resourceType": "Specimen", "id": spec_id, "meta": ctx.meta("drug_screen_specimen", True),
                "extension": [{"url": OBSERVED_EXT, "valueBoolean": rec.observed}],
                "type": {"coding": [c.coding() for c in t.translate(SPECIMEN_MAP, "specimen-kind", rec.specimen)],
                         "text": t.codes("specimen-kind")[rec.specimen]},
                "subject": patient, "collection": {"collectedDateTime": collected}}
    if rec.accession_number:
        specimen["accessionIdentifier"] = {"value": rec.accession_number}
    observations = [_observation(rec, r, ctx, spec_ref, orders) for r in rec.results]
    ext = [ctx.ext_coding("screen-method", rec.method)]
    if rec.enrollment_id:
        ext.append({"url": ENROLLMENT_EXT, "valueReference": ctx.enrollment_ref(rec.enrollment_id)})
    identifiers = [{"system": ctx.systems.drug_screen, "value": rec.screen_id}]
    if rec.accession_number:
        identifiers.append({"type": {"text": "Accession ID"}, "value": rec.accession_number})
    report = {"resourceType": "DiagnosticReport", "id": ctx.rid("drug_screen", rec.screen_id),
              "meta": ctx.meta("drug_screen", True), "extension": ext, "identifier": identifiers,
              "status": rec.status, "category": [{"coding": [_LAB]}],
              "code": {"coding": [x.coding() for x in t.translate(PANEL_MAP, "drug-panel", rec.panel, LOINC)]
                       + [t.coding("drug-panel", rec.panel)], "text": t.codes("drug-panel")[rec.panel]},
              "subject": patient, "effectiveDateTime": collected}
    if rec.resulted_at:
        report["issued"] = rec.resulted_at.isoformat()
    if rec.performing_lab:
        report["performer"] = [{"display": rec.performing_lab}]
    report["specimen"] = [spec_ref]
    report["result"] = [{"reference": f"Observation/{o['id']}", "display": o["code"]["text"]} for o in observations]
    return [report, *observations, specimen]


def _observation(rec: DrugScreen, r: AnalyteResult, ctx: MappingContext, spec_ref: dict,
                 orders: dict[str, list] | None) -> dict:
    """One analyte's Observation; ``orders`` are the MAT orders behind each expected analyte, if known."""
    t = ctx.terminology
    loinc = t.translate(ANALYTE_MAP, "drug-analyte", r.analyte, LOINC, screen_method=rec.method,
                        specimen_kind=rec.specimen)
    interpretation = [{"coding": [x.coding() for x in t.translate(RESULT_INTERP, "analyte-result", r.result)]}]
    obs = {"resourceType": "Observation", "id": ctx.rid("drug_screen_result", f"{rec.screen_id}|{r.analyte}"),
           "meta": ctx.meta("drug_screen_result", True)}
    if r.flag:
        obs["extension"] = [ctx.ext_coding("screen-flag", r.flag)]
        interpretation.append({"coding": [x.coding() for x in t.translate(FLAG_INTERP, "screen-flag", r.flag)]})
    obs |= {"status": rec.status, "category": [{"coding": [_LABORATORY]}],
            "code": {"coding": [x.coding() for x in loinc] + [t.coding("drug-analyte", r.analyte)],
                     "text": t.codes("drug-analyte")[r.analyte]},
            "subject": ctx.client_ref(rec.client_mrn), "effectiveDateTime": rec.collected_at.isoformat()}
    if rec.resulted_at:
        obs["issued"] = rec.resulted_at.isoformat()
    if r.measured is not None:
        obs["valueQuantity"] = _ng_ml(r.measured)
    else:
        obs["valueCodeableConcept"] = {"coding": [x.coding() for x in t.translate(RESULT_SNOMED, "analyte-result",
                                                                                  r.result)]}
    obs["interpretation"] = interpretation
    if r.flag:
        obs["note"] = [{"text": explanation(r, None if orders is None else orders.get(r.analyte), t)}]
    if r.cutoff is not None:
        obs["referenceRange"] = [{"high": _ng_ml(r.cutoff), "text": f"cutoff {r.cutoff:g} ng/mL"}]
    obs["method"] = {"coding": [t.coding("screen-method", rec.method)]}
    obs["specimen"] = spec_ref
    return obs


# -- from FHIR ------------------------------------------------------------------------------------

class ObsFacts(NamedTuple):
    """What an Observation says, as read in the first pass (terminology applied later, per run)."""
    label: str
    codes: tuple           # (system, code) of Observation.code
    method: tuple          # (system, code) of Observation.method
    interpretation: tuple  # (system, code) of every interpretation
    value_codes: tuple     # (system, code) of valueCodeableConcept
    quantity: tuple | None  # (value, UCUM code or unit)
    cutoff: tuple | None   # referenceRange[0].high as (value, code or unit)
    flag: str | None


class SpecimenFacts(NamedTuple):
    types: tuple
    accession: str | None
    collected: str | None
    observed: bool | None


def _pairs(concepts) -> tuple:
    return tuple((c.get("system"), c.get("code")) for c in codings(concepts))


def _qty(q: dict | None) -> tuple | None:
    return (q["value"], q.get("code") or q.get("unit")) if q and q.get("value") is not None else None


def _obs_facts(obs: dict) -> ObsFacts:
    ranges = obs.get("referenceRange") or [{}]
    return ObsFacts(f"Observation/{obs.get('id')}", _pairs(obs.get("code")), _pairs(obs.get("method")),
                    _pairs(obs.get("interpretation")), _pairs(obs.get("valueCodeableConcept")),
                    _qty(obs.get("valueQuantity")), _qty(ranges[0].get("high")), ext_code(obs, "screen-flag"))


def _specimen_facts(spec: dict) -> SpecimenFacts:
    return SpecimenFacts(_pairs(spec.get("type")), (spec.get("accessionIdentifier") or {}).get("value"),
                         (spec.get("collection") or {}).get("collectedDateTime"), ext_value(spec, OBSERVED_EXT))


def index(res: dict, ix: FhirIndex, refs: list[str]) -> None:
    """First-pass facts for Observations and Specimens, which map only as parts of a drug screen."""
    facts = _obs_facts(res) if res["resourceType"] == "Observation" else _specimen_facts(res)
    for r in refs:
        ix.facts[r] = facts


def _own(pairs, cs_id: str) -> str | None:
    return next((code for system, code in pairs if system == cs_url(cs_id)), None)


def _first(pairs, map_id: str, ctx: MappingContext, cs_id: str | None = None) -> str | None:
    """Our code: the fhir-iop coding itself, else the first code the ConceptMap reads back."""
    if cs_id and (mine := _own(pairs, cs_id)) is not None:
        return mine
    for system, code in pairs:
        if (mine := ctx.terminology.reverse(map_id, system, code)) is not None:
            return mine
    return None


def is_drug_result(facts, ctx: MappingContext) -> bool:
    """Whether first-pass Observation facts name a drug analyte (the fhir-iop coding or its LOINC)."""
    return isinstance(facts, ObsFacts) and _first(facts.codes, ANALYTE_MAP, ctx, "drug-analyte") is not None


def _depends(ctx: MappingContext, analyte: str, loinc: str, prop: str) -> set[str]:
    """The ``prop`` values (screen-method, specimen-kind) under which ``analyte`` maps to ``loinc``."""
    targets = ctx.terminology.concept_map(ANALYTE_MAP).forward.get((cs_url("drug-analyte"), analyte), ())
    return {v for t in targets if t.code == loinc for p, v in t.depends_on if p == prop}


def _label(pairs) -> str:
    return ", ".join(f"{s or '?'}|{c}" for s, c in pairs) or "none"


def _result(f: ObsFacts, analyte: str, ctx: MappingContext) -> dict:
    result = _first(f.interpretation, RESULT_INTERP, ctx) or _first(f.value_codes, RESULT_SNOMED, ctx)
    for what, q in (("valueQuantity", f.quantity), ("referenceRange.high", f.cutoff)):
        if q and q[1] != "ng/mL":
            raise Unmappable(f"{f.label} ({analyte}): {what} is in {q[1]!r}, not ng/mL", f"Observation.{what}")
    if result is None and f.quantity and f.cutoff:  # the cutoff is where "detected" starts
        result = "detected" if f.quantity[0] >= f.cutoff[0] else "not-detected"
    if result is None:
        raise Unmappable(f"{f.label} ({analyte}) gives no qualitative result: no DET/ND interpretation, "
                         "no Detected/Not detected value, no quantity with a cutoff", "Observation.interpretation")
    return {"analyte": analyte, "result": result, "cutoff": f.cutoff and f.cutoff[0],
            "measured": f.quantity and f.quantity[0], "flag": f.flag}


def from_fhir(dr: dict, ix: FhirIndex, ctx: MappingContext) -> dict:
    contained = {f"#{c.get('id')}": c for c in dr.get("contained", ()) if isinstance(c, dict)}

    def facts(ref: dict | None):
        key = FhirIndex.ref_key(ref)
        c = contained.get(key, {})
        read = {"Observation": _obs_facts, "Specimen": _specimen_facts}.get(c.get("resourceType"))
        return key, read(c) if read else ix.facts.get(key)

    code = _pairs(dr.get("code"))
    panel = _first(code, PANEL_MAP, ctx, "drug-panel")
    results, missing = [], []  # results that are not drug analytes stay unmapped (the pipeline names them)
    for ref in dr.get("result", ()):
        key, f = facts(ref)
        if not isinstance(f, ObsFacts):
            missing.append(ref.get("reference") or "(no reference)")
        elif analyte := _first(f.codes, ANALYTE_MAP, ctx, "drug-analyte"):
            results.append((key, f, analyte))
    if panel is None and not results:
        raise Unmappable(f"not a drug screen: code ({_label(code)}) is not a drug-screen panel and none of its "
                         f"{len(dr.get('result', ()))} results is a drug-analyte Observation in this input",
                         "DiagnosticReport.code")
    if panel is None:
        raise Unmappable(f"code ({_label(code)}) is not a drug-screen panel (drug-panel, or its LOINC through "
                         f"{PANEL_MAP})", "DiagnosticReport.code")
    if missing:
        raise Unmappable(f"result {', '.join(missing)} is not an Observation in this input",
                         "DiagnosticReport.result")
    if not results:
        raise Unmappable("none of its results is a drug analyte (a drug-analyte coding, or a LOINC code "
                         f"through {ANALYTE_MAP})", "DiagnosticReport.result")
    mrn = client_of(dr, "subject", ix, ctx)
    spec_key, spec = facts((dr.get("specimen") or [None])[0])
    spec = spec if isinstance(spec, SpecimenFacts) else None
    loincs = [(a, c) for _, f, a in results for s, c in f.codes if s == LOINC]
    method = ext_code(dr, "screen-method") or _own([p for _, f, _ in results for p in f.method], "screen-method")
    if method is None:
        options = set.intersection(*(_depends(ctx, a, c, "screen-method") for a, c in loincs)) if loincs else set()
        if len(options) != 1:
            raise Unmappable("the screen method (point-of-care, lab immunoassay or confirmation) is not recorded "
                             "and the results' LOINC codes do not tell", "Observation.method")
        method = options.pop()
    kind = spec and _first(spec.types, SPECIMEN_MAP, ctx, "specimen-kind")
    if kind is None:
        options = set.intersection(*(_depends(ctx, a, c, "specimen-kind") for a, c in loincs)) if loincs else set()
        if len(options) != 1:
            raise Unmappable("no Specimen with a urine or oral-fluid type, and the results' LOINC codes do not "
                             "tell the specimen", "DiagnosticReport.specimen")
        kind = options.pop()
    collected = dr.get("effectiveDateTime") or (dr.get("effectivePeriod") or {}).get("start") \
        or (spec and spec.collected)
    if not collected:
        raise Unmappable("no collection time (effectiveDateTime or Specimen.collection.collectedDateTime)",
                         "DiagnosticReport.effective")
    accession = spec and spec.accession or next(
        (i.get("value") for i in dr.get("identifier", ()) if (i.get("type") or {}).get("text") == "Accession ID"
         or ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN") in _pairs(i.get("type"))), None)
    performer = (dr.get("performer") or [{}])[0]
    enrollment = ext_value(dr, ENROLLMENT_EXT)
    records = [_result(f, a, ctx) for _, f, a in results]
    ix.consumed.update(k for k, _, _ in results)
    if spec is not None:
        ix.consumed.add(spec_key)
    return {"screen_id": ix.key_of(dr, ctx.systems.drug_screen), "client_mrn": mrn,
            "enrollment_id": ix.resolve(enrollment, ctx.systems.enrollment) if enrollment else None,
            "specimen": kind, "collected_at": collected, "observed": spec and spec.observed, "method": method,
            "panel": panel, "results": records, "status": dr.get("status"), "resulted_at": dr.get("issued"),
            "performing_lab": performer.get("display") or ix.names.get(FhirIndex.ref_key(performer)),
            "accession_number": accession}
