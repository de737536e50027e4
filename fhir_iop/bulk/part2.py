"""What the bulk and payer exports use of Part 2 and the audit trail — one import point.

* the disclosure gate, the redisclosure mark and the Part 2 label test: ``fhir_iop.disclosure``
  (``Gate(tx, access).decide(...) -> Decision``, ``mark``, ``labelled``);
* the audit record: ``fhir_iop.audit.record`` (one AuditEvent per disclosure, action ``export``).

Claims are not stored, so the gate's index knows nothing of them and no consent names the Claim
type; a Claim leaves when the payer rollup's own consent check lets its service days go
(``fhir_iop.payer.export.disclosable``: HPAYMT, that payer, every data class a claim carries, on
each service day) and its client's Patient may leave under the gate.
"""

from __future__ import annotations

from fhir_iop.audit import record
from fhir_iop.disclosure import Decision, Gate, labelled, mark

__all__ = ["Decision", "gate", "labelled", "mark", "patient_of", "record"]


def gate(tx, access) -> Gate:
    return Gate(tx, access)


def patient_of(resource: dict) -> str | None:
    """The id of the Patient a resource is about (None: not about one patient); Claims included."""
    rt = resource.get("resourceType")
    if rt == "Patient":
        return resource.get("id")
    for element in ("subject", "patient", "beneficiary"):
        ref = (resource.get(element) or {}).get("reference") or ""
        if ref.startswith("Patient/"):
            return ref.split("/", 1)[1]
    return None
