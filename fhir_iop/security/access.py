"""The access context of one request or job: who acts, for which recipient, why, with which scopes.

Every exit (API read/search/history/include, bulk export, sync push, payer export) is given an
:class:`Access` and asks the Part 2 gate (``fhir_iop.disclosure``) what may leave under it; the
audit trail (``fhir_iop.audit``) records it.

* ``recipient``: the id of the organization the client acts for, as consents name it (the
  Consent's recipient identifier value, ``Consent.recipient_id`` in the record model; for a payer,
  its payer id). ``None`` means the program itself (its own staff and systems): Part 2 allows use
  inside the program, so nothing is withheld, but everything is still audited.
* ``purpose``: a v3-ActReason purpose of use (TREAT, HPAYMT, HOPERAT, ETREAT, ...).
* ``emergency``: a medical-emergency disclosure (42 CFR 2.51): only when the client asked for it
  explicitly and is allowed to; always audited.
* ``scopes``: the SMART scopes granted (parsed by ``fhir_iop.security.scopes``), or ``None`` when
  authorization is off (the loudly named development flag), which permits every interaction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    client_id: str
    recipient: str | None = None
    purpose: str = "TREAT"
    emergency: bool = False
    scopes: object = None
    admin: bool = False

    @property
    def internal(self) -> bool:
        """Use inside the Part 2 program itself: no disclosure to an outside recipient."""
        return self.recipient is None


#: what a request gets when authorization is switched off for development (``INSECURE_NO_AUTH``)
DEVELOPMENT = Access(client_id="development (no authorization)", recipient=None, purpose="TREAT", admin=True)
