"""Registered SMART backend clients (table ``smart_client``) and used client-assertion ids.

A client: ``client_id``, a name, its public keys (a JWKS inline or a ``jwks_uri``), the scopes it
may be granted, the recipient organization it acts for (``None`` = the program itself), its purpose
of use (v3-ActReason: TREAT, HPAYMT, HOPERAT, ETREAT, ...), whether it may ask for a
medical-emergency disclosure, whether it is an administrator, when it was created and disabled.
``fhir-iop clients add|list|disable`` (``fhir_iop.security.cli``) manage them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from fhir_iop.errors import FhirIopError
from fhir_iop.security import scopes as smart_scopes
from fhir_iop.store.models import smart_assertion_jti, smart_client
from fhir_iop.store.repository import now

#: purposes of use a registration may name: the v3-ActReason codes listed in
#: ../shared/reference/domain-codes.md (purpose of use), as the Part 2 consents name them
PURPOSES = ("TREAT", "ETREAT", "HPAYMT", "HOPERAT", "COC", "CAREMGT", "PUBHLTH", "HRESCH", "PATRQT")


class ClientError(FhirIopError):
    """A registration that cannot be made or changed."""


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    jwks: dict | None
    jwks_uri: str | None
    scopes: str
    recipient: str | None
    purpose: str
    emergency_allowed: bool
    admin: bool
    created: datetime
    disabled: datetime | None

    @property
    def active(self) -> bool:
        return self.disabled is None

    @property
    def scope_set(self) -> smart_scopes.ScopeSet:
        return smart_scopes.ScopeSet(self.scopes)


def _client(row) -> Client:
    m = row._mapping
    return Client(m["client_id"], m["name"], orjson.loads(m["jwks"]) if m["jwks"] else None, m["jwks_uri"],
                  m["scopes"], m["recipient"], m["purpose"], bool(m["emergency_allowed"]), bool(m["admin"]),
                  m["created"], m["disabled"])


def check_scopes(scopes: str) -> str:
    """The allowed scopes of a registration, normalized; only unrestricted ``system/`` scopes."""
    parsed = smart_scopes.parse(scopes, strict=True)
    for s in parsed:
        if s.context != "system":
            raise ClientError(f"scope {s}: backend clients get system/ scopes only")
        if s.restriction:
            raise ClientError(f"scope {s}: restricted scopes (?param=value) are not enforced, so not granted")
    if len(parsed) != len(scopes.split()):
        raise ClientError(f"{scopes!r}: only SMART resource scopes (system/Type.permissions) can be allowed")
    return " ".join(str(s) for s in parsed)


def check_jwks(jwks: dict) -> dict:
    import jwt
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise ClientError("a JWKS is a JSON object with a non-empty 'keys' list")
    for k in jwks["keys"]:
        if any(p in k for p in ("d", "p", "q", "dp", "dq", "qi")):
            raise ClientError(f"JWKS key {k.get('kid', '?')} holds private key material: register the public key only")
        try:
            jwt.PyJWK.from_dict(k)
        except Exception as e:
            raise ClientError(f"JWKS key {k.get('kid', '?')} is not usable: {e}") from None
    return jwks


def register(store, name: str, *, scopes: str, jwks: dict | None = None, jwks_uri: str | None = None,
             recipient: str | None = None, purpose: str = "TREAT", emergency_allowed: bool = False,
             admin: bool = False, client_id: str | None = None, replace: bool = False) -> Client:
    """Register a client (``client_id`` defaults to ``name``); ``replace`` updates an existing one."""
    if (jwks is None) == (jwks_uri is None):
        raise ClientError("a client has either a JWKS (its public keys) or a jwks_uri, not both and not neither")
    if jwks is not None:
        check_jwks(jwks)
    if jwks_uri is not None and not jwks_uri.startswith(("https://", "http://")):
        raise ClientError(f"jwks_uri {jwks_uri!r} is not an http(s) URL")
    if purpose not in PURPOSES:
        raise ClientError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)} (v3-ActReason)")
    if recipient is not None and not recipient.strip():
        raise ClientError("recipient id is empty (use internal for the program itself)")
    values = {"client_id": client_id or name, "name": name, "jwks": orjson.dumps(jwks).decode() if jwks else None,
              "jwks_uri": jwks_uri, "scopes": check_scopes(scopes), "recipient": recipient, "purpose": purpose,
              "emergency_allowed": emergency_allowed, "admin": admin, "created": now(), "disabled": None}
    # a write transaction from its start (SQLite: BEGIN IMMEDIATE): a read-then-write transaction
    # begun deferred fails at once with "database is locked" when another writer (the audit shipper)
    # commits between its read and its write
    with store.transaction() as tx:
        conn = tx.conn
        existing = conn.execute(select(smart_client.c.client_id).where(
            smart_client.c.client_id == values["client_id"])).first()
        if existing is not None:
            if not replace:
                raise ClientError(f"client {values['client_id']!r} is already registered")
            conn.execute(update(smart_client).where(smart_client.c.client_id == values["client_id"])
                         .values({k: v for k, v in values.items() if k != "created"}))
        else:
            try:
                conn.execute(insert(smart_client).values(values))
            except IntegrityError:
                raise ClientError(f"a client named {name!r} is already registered") from None
    _changed()
    return get(store, values["client_id"])


#: bumped by every registration change made in this process (``register``, ``disable``): token checks
#: (``tokens.Authority.verify``) forget what they remembered of any client at once
_generation = 0


def generation() -> int:
    return _generation


def _changed() -> None:
    global _generation
    _generation += 1


def get(store, client_id: str) -> Client | None:
    """The registration (token checks remember it briefly: ``tokens.Authority.client_ttl``):
    one statement on the store's autocommit reader, no BEGIN/ROLLBACK around it."""
    with store.reading() as tx:
        conn = tx.conn
        row = conn.execute(select(smart_client).where(smart_client.c.client_id == client_id)).first()
    return _client(row) if row is not None else None


def find(store, name_or_id: str) -> Client | None:
    c = get(store, name_or_id)
    if c is not None:
        return c
    with store.engine.connect() as conn:
        row = conn.execute(select(smart_client).where(smart_client.c.name == name_or_id)).first()
    return _client(row) if row is not None else None


def all_clients(store) -> list[Client]:
    with store.engine.connect() as conn:
        return [_client(r) for r in conn.execute(select(smart_client).order_by(smart_client.c.name))]


def disable(store, name_or_id: str) -> Client:
    c = find(store, name_or_id)
    if c is None:
        raise ClientError(f"no client {name_or_id!r} is registered")
    with store.engine.begin() as conn:
        conn.execute(update(smart_client).where(smart_client.c.client_id == c.client_id,
                                                smart_client.c.disabled.is_(None)).values(disabled=now()))
    _changed()
    return get(store, c.client_id)


def use_jti(store, client_id: str, jti: str, exp: datetime) -> bool:
    """Record a client assertion's ``jti``; False when it was seen before (a replay). Expired
    entries are purged on the way (an expired assertion is refused before its jti is checked)."""
    with store.engine.begin() as conn:
        conn.execute(delete(smart_assertion_jti).where(smart_assertion_jti.c.exp < now() - timedelta(minutes=5)))
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(smart_assertion_jti).values(client_id=client_id, jti=jti, exp=exp))
    except IntegrityError:
        return False
    return True
