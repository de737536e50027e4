"""42 CFR Part 2 at every exit: the access index, the gate, and the redisclosure notice.

    from fhir_iop.disclosure import Gate, labelled, mark, NOTICE
    gate = Gate(tx, access)
    gate.decide(stored) -> Decision(allowed, consent, reason)
    gate.filter(resources) ; gate.visible_clause(resource_table)
    mark(resource) -> resource with the Part 2 labels (incl. NORDSCLCD) and the §2.32 notice

The index is kept by a store write hook (:func:`fhir_iop.disclosure.index.hook`, registered by
``fhir_iop.store.repository``) in tables ``part2_resource`` and ``part2_grant`` (migration 0002).
"""

from fhir_iop.disclosure.gate import Decision, Gate, today
from fhir_iop.disclosure.index import PATIENT_PATHS, grants, labelled, patient_of
from fhir_iop.disclosure.notice import DISPLAY_EXT, NOTICE, REDISCLOSURE_MARK, mark, notice_of

__all__ = ["DISPLAY_EXT", "Decision", "Gate", "NOTICE", "PATIENT_PATHS", "REDISCLOSURE_MARK", "grants", "labelled",
           "mark", "notice_of", "patient_of", "today"]
