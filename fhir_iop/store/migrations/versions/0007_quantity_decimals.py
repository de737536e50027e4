"""Quantity index rows of decimal values: before this release a quantity or number whose value was
not a whole number (``"value": 4.5``) was left out of ``search_quantity`` (fhirpathpy hands such
values over as ``Decimal``, which the indexer did not take), so ``Observation?value-quantity=4.5``
could not find it. Upgrading a store recomputes the quantity rows of every current resource of a
type with quantity or number parameters.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import orjson
from alembic import op
from sqlalchemy import delete, insert, select

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    from fhir_iop.store.models import resource, search_quantity
    from fhir_iop.store.params import index_rows, load_registry
    registry = load_registry()
    params = {rt: {c: p for c, p in ps.items() if p.type in ("quantity", "number")}
              for rt, ps in registry.params.items()}
    params = {rt: ps for rt, ps in params.items() if ps}
    conn = op.get_bind()
    last = 0
    while True:  # in rid order, a batch at a time (a store may hold millions)
        rows = conn.execute(select(resource.c.rid, resource.c.type, resource.c.body)
                            .where(resource.c.rid > last, resource.c.type.in_(list(params)),
                                   resource.c.deleted.is_(False))
                            .order_by(resource.c.rid).limit(BATCH)).all()
        if not rows:
            return
        last = rows[-1].rid
        fresh = []
        for r in rows:
            for q in index_rows(orjson.loads(r.body), params[r.type])["quantity"]:
                fresh.append({"rid": r.rid, "type": r.type, **q})
        conn.execute(delete(search_quantity).where(search_quantity.c.rid.in_([r.rid for r in rows])))
        if fresh:
            conn.execute(insert(search_quantity), fresh)


def downgrade() -> None:
    pass  # the rows it adds are right under the earlier release too
