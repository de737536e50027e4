"""The one Part 2 gate every exit asks: what may leave under an :class:`~fhir_iop.security.access.Access`.

    gate = Gate(tx, access)                 # tx: a store Tx (or a SQLAlchemy Connection)
    gate.decide(stored_or_resource)         # Decision(allowed, consent, reason)
    gate.filter(resources)                  # the allowed ones
    select(resource).where(gate.visible_clause(resource))   # inside any SELECT over resource tables

Rules (42 CFR Part 2):

* Internal access (``access.recipient`` None: the program itself) sees everything.
* A resource without the Part 2 label (and never stored with it) is not Part 2 data: it leaves.
* A Part 2 resource leaves to an outside recipient only when a Consent of the Patient it is about
  grants that recipient, the access's purpose of use and the resource's type (data class) today:
  started, not ended, not revoked (revocation takes effect on its day), as
  :func:`fhir_iop.mapping.consent.covers` decides. A Part 2 resource about no Patient never leaves.
* ``access.emergency`` (a medical emergency, 42 CFR 2.51; the authorization layer sets it only when
  the client asked for it and its registration allows emergency access) lets Part 2 data go without
  a consent; the Decision says ``reason="emergency"`` so the disclosure is audited as one.

"Today" is the site's calendar day (``site.json`` time zone), as the consent dates are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import and_, exists, or_, select, true

from fhir_iop.disclosure.index import context, labelled, patient_of
from fhir_iop.disclosure.notice import mark
from fhir_iop.store.models import part2_grant, part2_resource, resource


@dataclass(frozen=True)
class Decision:
    allowed: bool
    consent: str | None  # "Consent/<id>" that allowed it
    reason: str  # internal, not labelled, consent, emergency, withheld


def site_timezone() -> ZoneInfo:
    """The site's time zone (``site.json``), where its calendar days begin and end."""
    return ZoneInfo(context().settings.timezone)


def today() -> date:
    """The site's calendar day."""
    return datetime.now(site_timezone()).date()


class Gate:
    def __init__(self, tx, access, on: date | None = None):
        self.tx = tx
        self.conn = getattr(tx, "conn", tx)
        self.access = access
        self._on = on

    @property
    def on(self) -> date:
        """The day grants are judged on (the site's today unless given), worked out when first needed:
        most requests are internal and never ask."""
        if self._on is None:
            self._on = today()
        return self._on

    # -- what the access may see ------------------------------------------------------------------

    @property
    def unrestricted(self) -> bool:
        """Nothing is withheld: internal access, or an emergency disclosure."""
        return self.access.recipient is None or bool(self.access.emergency)

    @property
    def outside(self) -> bool:
        """What leaves goes to an outside recipient (and so carries the redisclosure prohibition)."""
        return self.access.recipient is not None

    def _granted(self, patient_id, resource_type, grant=part2_grant):
        """A grant of the access's recipient and purpose for that patient and type, in force today
        (``covers``: start <= on <= end, not revoked on or before ``on``)."""
        g, on = grant.c, self.on
        return and_(g.patient_id == patient_id, g.resource_type == resource_type,
                    g.recipient_id == self.access.recipient, g.purpose == self.access.purpose,
                    g.start_on <= on, or_(g.end_on.is_(None), g.end_on >= on),
                    or_(g.revoked_on.is_(None), g.revoked_on > on))

    def visible_clause(self, resource_table=resource):
        """True for the rows of ``resource_table`` (``resource``, ``resource_version`` or an alias;
        anything with a ``rid`` column) this access may see."""
        if self.unrestricted:
            return true()
        # aliases of its own, so an enclosing SELECT that joins the index tables cannot capture them
        pr, gr = part2_resource.alias("p2_res"), part2_grant.alias("p2_grant")
        granted = exists(select(gr.c.consent_id).where(self._granted(pr.c.patient_id, pr.c.type, gr)))
        withheld = select(pr.c.rid).where(pr.c.rid == resource_table.c.rid, ~granted)
        return ~exists(withheld)

    # -- one resource -----------------------------------------------------------------------------

    def _indexed(self, rt: str, rid: str | None):
        if not rid:
            return None
        stmt = select(part2_resource.c.patient_id).select_from(
            part2_resource.join(resource, resource.c.rid == part2_resource.c.rid)) \
            .where(resource.c.type == rt, resource.c.id == rid)
        return self.conn.execute(stmt).first()

    @staticmethod
    def _parts(item) -> tuple[str, str | None, dict | None]:
        if isinstance(item, dict):
            return item.get("resourceType"), item.get("id"), item
        body = getattr(item, "body", None)
        return item.type, item.id, (orjson.loads(body) if body else None)

    def protected(self, item) -> bool:
        """Part 2 data: labelled now or stored with the label at some time."""
        rt, rid, res = self._parts(item)
        return (res is not None and labelled(res)) or self._indexed(rt, rid) is not None

    def decide(self, item) -> Decision:
        """May ``item`` (a Stored or a resource dict) leave under this access?"""
        if self.access.recipient is None:
            return Decision(True, None, "internal")
        rt, rid, res = self._parts(item)
        row = self._indexed(rt, rid)
        if row is None and not (res is not None and labelled(res)):
            return Decision(True, None, "not labelled")
        patient = row.patient_id if row is not None else patient_of(res)
        if patient is not None:
            consent = self.conn.execute(select(part2_grant.c.consent_id).where(self._granted(patient, rt))
                                        .order_by(part2_grant.c.consent_id).limit(1)).scalar()
            if consent is not None:
                return Decision(True, f"Consent/{consent}", "consent")
        if self.access.emergency:
            return Decision(True, None, "emergency")
        return Decision(False, None, "withheld")

    def filter(self, items: Iterable) -> Iterator:
        """The items that may leave (in order)."""
        for item in items:
            if self.decide(item).allowed:
                yield item

    # -- what leaves ------------------------------------------------------------------------------

    def outgoing(self, rt: str, rid: str, body: str | bytes) -> str | bytes:
        """The JSON text to send for a stored body: marked (:func:`mark`) when it is Part 2 data going
        to an outside recipient, else as stored."""
        if not self.outside:
            return body
        res = orjson.loads(body)
        if labelled(res) or self._indexed(rt, rid) is not None:
            return orjson.dumps(mark(res))
        return body
