"""MAT-aware reading of drug screens: pure domain logic (no FHIR).

Each result is read against the client's medication-assisted treatment (MAT) on the collection
date: buprenorphine detected for a client on buprenorphine is expected, its absence is flagged
(possible non-adherence or diversion); likewise methadone (and EDDP). Any other substance
detected is flagged unexpected. Which analytes a MAT product shows comes from the
``mat-drug-to-analyte`` ConceptMap.

=========================  ==========================  ================
analyte expected from MAT  result                      flag
=========================  ==========================  ================
yes                        detected                    expected
yes                        not-detected                expected-not-detected
no                         detected                    unexpected
no                         not-detected                (none)
=========================  ==========================  ================

An order counts when its period covers the collection date: ``start <= date <= end`` (an order
without ``end`` is open). The order's status is not consulted: its period says when the client
was on it (a completed or stopped order has an ``end``).
"""

from __future__ import annotations

from datetime import date, tzinfo

from fhir_iop.records.model import AnalyteResult, DrugScreen, MatMedication
from fhir_iop.terminology import Terminology

MAT_MAP = "mat-drug-to-analyte"


def collection_date(screen: DrugScreen, tz: tzinfo | None = None) -> date:
    """The day the specimen was collected: in ``tz`` (the site's) when given, else as written."""
    return (screen.collected_at.astimezone(tz) if tz else screen.collected_at).date()


def covering_orders(screen: DrugScreen, orders: list[MatMedication], tz: tzinfo | None = None) -> list[MatMedication]:
    """The client's orders whose period covers the collection date."""
    day = collection_date(screen, tz)
    return [o for o in orders if o.client_mrn == screen.client_mrn
            and o.start <= day and (o.end is None or day <= o.end)]


def expected_analytes(screen: DrugScreen, orders: list[MatMedication], terminology: Terminology,
                      tz: tzinfo | None = None) -> dict[str, list[MatMedication]]:
    """analyte -> the orders that make it expected on the collection date."""
    out: dict[str, list[MatMedication]] = {}
    for order in covering_orders(screen, orders, tz):
        for target in terminology.translate(MAT_MAP, "mat-drug", order.drug):
            out.setdefault(target.code, []).append(order)
    return out


def flag_for(result: AnalyteResult, expected: bool) -> str | None:
    if expected:
        return "expected" if result.result == "detected" else "expected-not-detected"
    return "unexpected" if result.result == "detected" else None


def interpret(screen: DrugScreen, orders: list[MatMedication], terminology: Terminology,
              tz: tzinfo | None = None) -> DrugScreen:
    """A copy of ``screen`` with each result's flag set from the client's MAT orders."""
    expected = expected_analytes(screen, orders, terminology, tz)
    results = [r.model_copy(update={"flag": flag_for(r, r.analyte in expected)}) for r in screen.results]
    return screen.model_copy(update={"results": results})


def explanation(result: AnalyteResult, orders: list[MatMedication] | None, terminology: Terminology) -> str | None:
    """A sentence for a person explaining the flag; ``orders`` are the ones behind an expectation
    (None when the MAT orders are not known in this run and the flag was given with the record)."""
    if result.flag is None:
        return None
    analyte = terminology.codes("drug-analyte")[result.analyte]
    ids = ", ".join(o.mat_id for o in orders or ())
    if result.flag == "expected":
        if not orders:
            return f"Expected: {analyte} is the client's MAT medication or its metabolite"
        drugs = "; ".join(dict.fromkeys(terminology.codes("mat-drug")[o.drug] for o in orders))
        return f"Expected: client on {drugs} (MAT order {ids})"
    if result.flag == "expected-not-detected":
        why = f" (MAT order {ids})" if orders else ""
        return f"{analyte} expected{why} but not detected: possible non-adherence or diversion"
    return f"Unexpected substance: {analyte}"
