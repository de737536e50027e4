"""``fhir-iop clients``: register, list and disable SMART backend clients; get a token for one.

    fhir-iop clients add payer-x --jwks payer-x.jwks.json --scope 'system/Claim.rs system/Coverage.rs' \\
        --recipient PAYER-X --purpose HPAYMT
    fhir-iop clients add ehr --jwks-uri https://ehr.example.org/jwks.json --scope 'system/*.read' \\
        --internal --purpose TREAT
    fhir-iop clients list
    fhir-iop clients disable payer-x
    fhir-iop clients token demo --key var/demo-client.pem --server http://127.0.0.1:8080   # prints a token

``token`` signs a client assertion with the client's private key and exchanges it at the server's
token endpoint (``--server``), or, without ``--server``, in this process against the same store
(the same checks; the token is signed with the store's server key).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import orjson

from fhir_iop.cli_common import EXIT_ERROR, guard
from fhir_iop.errors import FhirIopError

_database_opt = click.option("--database", "database", envvar="FHIR_IOP_DATABASE_URL", show_envvar=True,
                             default="sqlite:///var/fhir-iop.sqlite", show_default=True,
                             help="SQLAlchemy URL of the store: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB.")


def _store(database: str):
    from fhir_iop.store import Store
    return Store(database)


def _authority(store):
    """The authority as the server configures it from the same FHIR_IOP_* environment."""
    from fhir_iop.security.tokens import Authority
    env = os.environ
    return Authority(store, key_file=env.get("FHIR_IOP_SIGNING_KEY_FILE"), alg=env.get("FHIR_IOP_SIGNING_ALG", "ES256"),
                     issuer=env.get("FHIR_IOP_TOKEN_ISSUER", "fhir-iop"),
                     lifetime=int(env.get("FHIR_IOP_TOKEN_LIFETIME", "300")))


def _jwks_from(path: Path) -> dict:
    """A JWKS file, or a PEM key (private or public) whose public JWKS is taken."""
    from fhir_iop.security import keys
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return keys.jwks_of(keys.load_pem(data, str(path)))
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise FhirIopError(f"{path}: not a JWKS (JSON) nor a PEM key: {e}") from None


@click.group("clients")
def clients_group():
    """SMART backend clients allowed to call the FHIR API (SMART Backend Services)."""


@clients_group.command("add")
@click.argument("name")
@click.option("--jwks", "jwks_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The client's public keys: a JWKS file (or a PEM key; its public part is registered).")
@click.option("--jwks-uri", help="Where the client publishes its JWKS (https URL).")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="Allowed SMART scopes (system/Type.read|write|*, system/Type.cruds…); "
                   "repeatable or space-separated.")
@click.option("--recipient", help="Id of the organization the client acts for, as Part 2 consents name it.")
@click.option("--internal", is_flag=True, help="The client is the program itself (no Part 2 disclosure).")
@click.option("--purpose", default="TREAT", show_default=True,
              help="Purpose of use (v3-ActReason: TREAT, HPAYMT, HOPERAT…).")
@click.option("--emergency-allowed", is_flag=True, help="May ask for medical-emergency disclosures (42 CFR 2.51).")
@click.option("--admin", is_flag=True, help="Administrator (reads AuditEvents).")
@click.option("--client-id", help="The client_id [default: NAME].")
@click.option("--replace", is_flag=True, help="Update the registration if the client exists.")
@_database_opt
@guard
def add_cmd(name, jwks_file, jwks_uri, scopes, recipient, internal, purpose, emergency_allowed, admin, client_id,
            replace, database):
    """Register a backend client NAME."""
    from fhir_iop.security import clients
    if (jwks_file is None) == (jwks_uri is None):
        raise click.UsageError("give either --jwks FILE or --jwks-uri URL")
    if internal == (recipient is not None):
        raise click.UsageError("give either --recipient ID (an outside organization) or --internal (the program)")
    store = _store(database)
    try:
        c = clients.register(store, name, scopes=" ".join(scopes), jwks=_jwks_from(jwks_file) if jwks_file else None,
                             jwks_uri=jwks_uri, recipient=recipient, purpose=purpose.upper(),
                             emergency_allowed=emergency_allowed, admin=admin, client_id=client_id, replace=replace)
    finally:
        store.dispose()
    click.echo(f"registered client {c.client_id} ({_who(c)}; scopes {c.scopes})", err=True)


def _who(c) -> str:
    return (f"{'internal' if c.recipient is None else 'for ' + c.recipient}, purpose {c.purpose}"
            + (", emergency allowed" if c.emergency_allowed else "") + (", admin" if c.admin else ""))


@clients_group.command("list")
@_database_opt
@guard
def list_cmd(database):
    """The registered clients (tab-separated: client_id, name, status, acts for, purpose, flags, scopes)."""
    from fhir_iop.security import clients
    store = _store(database)
    try:
        rows = clients.all_clients(store)
    finally:
        store.dispose()
    for c in rows:
        flags = ",".join(f for f, on in (("emergency", c.emergency_allowed), ("admin", c.admin)) if on) or "-"
        click.echo("\t".join([c.client_id, c.name, "active" if c.active else f"disabled {c.disabled:%Y-%m-%d}",
                              c.recipient or "internal", c.purpose, flags, c.scopes]))
    if not rows:
        click.echo("no clients registered", err=True)


@clients_group.command("disable")
@click.argument("name")
@_database_opt
@guard
def disable_cmd(name, database):
    """Disable a client: its tokens stop working at once and it gets no new ones."""
    from fhir_iop.security import clients
    store = _store(database)
    try:
        c = clients.disable(store, name)
    finally:
        store.dispose()
    click.echo(f"client {c.client_id} disabled", err=True)


@clients_group.command("token")
@click.argument("name")
@click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The client's private key (PEM, EC P-384 or RSA).")
@click.option("--server", help="Base URL of the FHIR server: exchange the assertion at its token endpoint.")
@click.option("--scope", "scopes", multiple=True, help="Scopes to ask for [default: all the client may have].")
@_database_opt
@guard
def token_cmd(name, key_file, server, scopes, database):
    """Print an access token for client NAME (developer helper: the client's key signs the assertion)."""
    from fhir_iop.security import keys, tokens
    key = keys.read_pem_file(key_file)
    if not hasattr(key, "private_bytes"):
        raise FhirIopError(f"{key_file} holds a public key; the assertion is signed with the client's private key")
    scope = " ".join(scopes)
    if server:
        import requests
        base = server.rstrip("/")
        try:
            conf = requests.get(f"{base}/.well-known/smart-configuration", timeout=30)
            conf.raise_for_status()
            token_url = conf.json()["token_endpoint"]
            form = _form(name, key, token_url, scope or "system/*.*")
            r = requests.post(token_url, data=form, timeout=30)
        except (requests.RequestException, ValueError, KeyError) as e:
            raise FhirIopError(f"{base}: cannot reach its SMART token endpoint: {e}") from None
        body = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else {}
        if r.status_code != 200:
            click.echo(f"fhir-iop: token refused ({r.status_code}): {body.get('error', '')} "
                       f"{body.get('error_description', r.text[:200])}", err=True)
            sys.exit(EXIT_ERROR)
        click.echo(body["access_token"])
        return
    from fhir_iop.security import clients
    store = _store(database)
    try:
        c = clients.find(store, name)
        if c is None:
            raise FhirIopError(f"no client {name!r} is registered in the store")
        local = "urn:fhir-iop:local-token-endpoint"
        try:
            body = _authority(store).exchange(_form(c.client_id, key, local, scope or c.scopes or "system/*.*"), local)
        except tokens.OAuthError as e:
            raise FhirIopError(f"token refused: {e.error}: {e.description}") from None
    finally:
        store.dispose()
    click.echo(body["access_token"])


def _form(client_id: str, key, token_url: str, scope: str) -> dict:
    from fhir_iop.security import tokens
    return {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": tokens.ASSERTION_TYPE,
            "client_assertion": tokens.client_assertion(client_id, key, token_url)}


DEMO_CLIENT = "demo"
DEMO_KEY = Path("var") / "demo-client.pem"


def demo_client(database: str, key_path: Path = DEMO_KEY) -> Path:
    """Register (or refresh) the demo client: internal, admin, ``system/*.read``, its private key
    written to ``key_path`` (kept when it exists). For ``fhir-iop serve --demo``."""
    from fhir_iop.security import clients, keys
    key = keys.read_pem_file(key_path) if key_path.exists() else keys.generate_pem(key_path, "ES384")
    store = _store(database)
    try:
        clients.register(store, DEMO_CLIENT, scopes="system/*.read", jwks=keys.jwks_of(key), recipient=None,
                         purpose="TREAT", admin=True, replace=True)
    finally:
        store.dispose()
    return key_path
