"""``fhir-iop clients add|list|disable|token`` and the demo client of ``serve --demo``."""

from __future__ import annotations

import json

import jwt
from click.testing import CliRunner
from server_kit import LiveServer

from fhir_iop.cli import main
from fhir_iop.security import clients, keys
from fhir_iop.store import Store


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_add_list_token_disable(tmp_path):
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    key_file = tmp_path / "payer.pem"
    keys.generate_pem(key_file, "RS384")
    code, _, err = run("clients", "add", "payer-x", "--jwks", key_file, "--scope", "system/Coverage.rs",
                       "--scope", "system/Patient.read system/Encounter.read", "--recipient", "PAYER-X",
                       "--purpose", "hpaymt", "--database", db)
    assert code == 0, err
    assert "registered client payer-x (for PAYER-X, purpose HPAYMT" in err
    jwks_file = tmp_path / "ehr.jwks.json"
    jwks_file.write_text(json.dumps(keys.jwks_of(keys.generate("ES384"))))
    assert run("clients", "add", "ehr", "--jwks", jwks_file, "--scope", "system/*.read", "--internal",
               "--emergency-allowed", "--database", db)[0] == 0
    code, out, _ = run("clients", "list", "--database", db)
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows == [["ehr", "ehr", "active", "internal", "TREAT", "emergency", "system/*.read"],
                    ["payer-x", "payer-x", "active", "PAYER-X", "HPAYMT", "-",
                     "system/Coverage.rs system/Patient.read system/Encounter.read"]]
    # the private key is never stored: only its public JWK
    store = Store(db)
    try:
        registered = clients.get(store, "payer-x").jwks["keys"][0]
        assert registered["kty"] == "RSA" and "d" not in registered and registered["alg"] == "RS384"
    finally:
        store.dispose()

    code, out, err = run("clients", "token", "payer-x", "--key", key_file, "--scope", "system/*.read",
                         "--database", db)
    assert code == 0, err
    claims = jwt.decode(out.strip(), options={"verify_signature": False})
    assert claims["client_id"] == "payer-x"
    assert claims["scope"] == "system/Coverage.read system/Patient.read system/Encounter.read"

    assert run("clients", "disable", "payer-x", "--database", db)[0] == 0
    code, _, err = run("clients", "token", "payer-x", "--key", key_file, "--database", db)
    assert code == 2 and "invalid_client" in err and "disabled" in err
    assert "disabled" in run("clients", "list", "--database", db)[1].splitlines()[1]


def test_token_from_the_wrong_key_is_refused(tmp_path):
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    good, bad = tmp_path / "good.pem", tmp_path / "bad.pem"
    keys.generate_pem(good, "ES384")
    keys.generate_pem(bad, "ES384")
    code, _, err = run("clients", "add", "x", "--jwks", good, "--scope", "system/*.read", "--internal", "--database", db)
    assert code == 0, err
    code, out, err = run("clients", "token", "x", "--key", bad, "--database", db)
    assert code == 2 and out == "" and "invalid_client" in err


def test_bad_registrations_are_refused_with_the_reason(tmp_path):
    db = f"sqlite:///{tmp_path / 'c.sqlite'}"
    key_file = tmp_path / "k.pem"
    private = keys.generate_pem(key_file, "ES384")
    private_jwk = tmp_path / "private.jwks.json"
    from jwt.algorithms import ECAlgorithm
    private_jwk.write_text(json.dumps({"keys": [ECAlgorithm.to_jwk(private, as_dict=True)]}))
    cases = [
        (["--scope", "system/*.read"], "--recipient ID"),  # neither --recipient nor --internal
        (["--scope", "system/*.read", "--internal", "--recipient", "R"], "--recipient ID"),
        (["--scope", "user/*.read", "--internal"], "system/ scopes only"),
        (["--scope", "system/Observation.rs?category=laboratory", "--internal"], "restricted"),
        (["--scope", "system/Encounter.sr", "--internal"], "c r u d s"),
        (["--scope", "openid", "--internal"], "only SMART resource scopes"),
        (["--scope", "system/*.read", "--internal", "--purpose", "FUN"], "v3-ActReason"),
    ]
    for extra, message in cases:
        code, _, err = run("clients", "add", "x", "--jwks", key_file, *extra, "--database", db)
        assert code == 2 and message in err, (extra, err)
    code, _, err = run("clients", "add", "x", "--jwks", private_jwk, "--scope", "system/*.read", "--internal",
                       "--database", db)
    assert code == 2 and "private key material" in err
    assert run("clients", "add", "x", "--jwks", key_file, "--scope", "system/*.read", "--internal",
               "--database", db)[0] == 0
    code, _, err = run("clients", "add", "x", "--jwks", key_file, "--scope", "system/*.read", "--internal",
                       "--database", db)
    assert code == 2 and "already registered" in err


def test_demo_client_and_token_over_http(tmp_path, monkeypatch):
    """What ``serve --demo`` prints works: the demo client's key signs, the server's endpoint answers."""
    from server import create_app
    from fhir_iop.security.cli import DEMO_CLIENT, demo_client
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    key = demo_client(db)
    assert str(key) == "var/demo-client.pem" and (tmp_path / key).stat().st_mode & 0o077 == 0
    assert demo_client(db) == key  # again: the same key, the registration refreshed
    app = create_app({"DATABASE_URL": db, "TESTING": True})
    try:
        with app.extensions["fhir_iop"].store.transaction() as tx:
            tx.create({"resourceType": "Patient", "gender": "male"})
        with LiveServer(app) as server:
            code, out, err = run("clients", "token", DEMO_CLIENT, "--key", key, "--server", server.url)
            assert code == 0, err
            import requests
            r = requests.get(f"{server.url}/Patient?_summary=count", headers={"Authorization": f"Bearer {out.strip()}"},
                             timeout=30)
            assert r.status_code == 200 and r.json()["total"] == 1
            r = requests.post(f"{server.url}/Patient", json={"resourceType": "Patient"}, timeout=30,
                              headers={"Authorization": f"Bearer {out.strip()}"})
            assert r.status_code == 403  # the demo client reads; it does not write
            code, _, err = run("clients", "token", DEMO_CLIENT, "--key", key, "--server", server.url,
                               "--scope", "system/Patient.write")
            assert code == 2 and "invalid_scope" in err
    finally:
        app.extensions["fhir_iop"].store.dispose()


def test_registering_while_another_process_keeps_writing(tmp_path):
    """SQLite: a registration reads then writes; begun deferred, it failed at once with "database is
    locked" whenever another writer (the audit shipper, every 0.1 s) committed in between. It now
    starts as a write transaction and waits its turn."""
    import threading

    from fhir_iop.audit import Entity, build, write_many
    url = f"sqlite:///{tmp_path / 'busy.sqlite'}"
    store, other = Store(url), Store(url, migrate=False)
    stop, errors = threading.Event(), []

    def shipper():
        n = 0
        while not stop.is_set():
            try:
                with other.transaction() as tx:
                    write_many(tx.conn, [build(None, "read", 0, [Entity(f"Patient/p{n}")])])
            except Exception as e:  # (the writer itself must not fail either)
                errors.append(e)
            n += 1
    t = threading.Thread(target=shipper)
    t.start()
    try:
        for i in range(60):
            clients.register(store, f"busy-{i}", scopes="system/*.rs", jwks=keys.jwks_of(keys.generate("ES256")))
            clients.register(store, f"busy-{i}", scopes="system/Patient.rs", replace=True,
                             jwks=keys.jwks_of(keys.generate("ES256")))
    finally:
        stop.set()
        t.join()
        store.dispose()
        other.dispose()
    assert errors == []
