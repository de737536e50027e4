"""SMART Backend Services end to end: a registered client signs an assertion (RS384 or ES384), the
token endpoint checks it and answers a token, the facade accepts the token and enforces its scopes;
every way an assertion or a token can be wrong is refused. Also: the external authorization server
(JWKS over HTTP), jwks_uri clients, disabled clients, emergency access, discovery, the dev flag."""

from __future__ import annotations

import logging
import time
import uuid

import jwt
import pytest
from flask import Flask, g, jsonify
from server_kit import LiveServer, db_url, secured_app, token_for  # noqa: F401  (fixtures)

from fhir_iop.security import clients, keys, tokens
from fhir_iop.security.tokens import ASSERTION_TYPE

TOKEN_URL = "http://localhost/auth/token"  # what the test client's requests look like to the app


def store_of(app):
    return app.extensions["fhir_iop"].store


def register(app, alg="ES384", scopes="system/*.read", **kw):
    """A client registered with the public half of a new key; returns (client_id, private key)."""
    key = keys.generate(alg)
    name = f"c-{uuid.uuid4().hex[:10]}"
    clients.register(store_of(app), name, scopes=scopes, jwks=keys.jwks_of(key, alg=alg), **kw)
    return name, key


def ask(app, client_id, key, scope="system/*.read", **claims):
    assertion = tokens.client_assertion(client_id, key, claims.pop("aud", TOKEN_URL), **claims)
    form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    return app.test_client().post("/auth/token", data=form)


def seed_patient(app):
    with store_of(app).transaction() as tx:
        return tx.create({"resourceType": "Patient", "gender": "female"}).stored.id


def refused(resp, error, status=None):
    assert resp.status_code == (status or (401 if error == "invalid_client" else 400)), resp.get_data(as_text=True)
    assert resp.json["error"] == error, resp.json
    assert resp.headers["Cache-Control"] == "no-store"
    return resp.json["error_description"]


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_token_exchange_end_to_end(secured_app, alg):
    pid = seed_patient(secured_app)
    cid, key = register(secured_app, alg, scopes="system/Patient.rs system/Encounter.read")
    r = ask(secured_app, cid, key, scope="system/Patient.read system/Observation.read")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.json
    assert body["token_type"] == "bearer" and body["expires_in"] == 300
    assert body["scope"] == "system/Patient.read"  # requested ∩ allowed; Observation is not allowed
    assert r.headers["Cache-Control"] == "no-store"
    c = secured_app.test_client()
    auth = {"Authorization": f"Bearer {body['access_token']}"}
    got = c.get(f"/Patient/{pid}", headers=auth)
    assert got.status_code == 200 and got.json["id"] == pid
    assert c.get("/Encounter", headers=auth).status_code == 403  # allowed by the client, not asked for
    # the token is the server's JWT: signed with its key (published at /auth/jwks), naming the client
    jwks = c.get("/auth/jwks").json
    header = jwt.get_unverified_header(body["access_token"])
    pub = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(body["access_token"], pub.key, algorithms=[header["alg"]], audience="fhir-iop")
    assert claims["client_id"] == cid and claims["scope"] == "system/Patient.read"


def test_bad_signature_is_refused(secured_app):
    cid, _key = register(secured_app)
    assert "no registered key" in refused(ask(secured_app, cid, keys.generate("ES384")), "invalid_client")
    # an attacker's key under the registered key's kid
    registered_kid = clients.get(store_of(secured_app), cid).jwks["keys"][0]["kid"]
    forged = tokens.client_assertion(cid, keys.generate("ES384"), TOKEN_URL, kid=registered_kid)
    r = secured_app.test_client().post("/auth/token", data={
        "grant_type": "client_credentials", "scope": "system/*.read", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": forged})
    assert "signature" in refused(r, "invalid_client")


def test_wrong_audience_is_refused(secured_app):
    cid, key = register(secured_app)
    assert "aud" in refused(ask(secured_app, cid, key, aud="http://elsewhere.example/token"), "invalid_client")


def test_expired_assertion_is_refused(secured_app):
    cid, key = register(secured_app)
    past = int(time.time()) - 600
    assert "expired" in refused(ask(secured_app, cid, key, exp=past, iat=past - 60), "invalid_client")


def test_assertion_living_longer_than_five_minutes_is_refused(secured_app):
    cid, key = register(secured_app)
    assert "five minutes" in refused(ask(secured_app, cid, key, exp=int(time.time()) + 3600), "invalid_client")


def test_replayed_jti_is_refused(secured_app):
    cid, key = register(secured_app)
    assertion = tokens.client_assertion(cid, key, TOKEN_URL)
    form = {"grant_type": "client_credentials", "scope": "system/*.read", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    c = secured_app.test_client()
    assert c.post("/auth/token", data=form).status_code == 200
    assert "replay" in refused(c.post("/auth/token", data=form), "invalid_client")
    # the same jti in a fresh assertion is a replay too
    jti = jwt.decode(assertion, options={"verify_signature": False})["jti"]
    assert "replay" in refused(ask(secured_app, cid, key, jti=jti), "invalid_client")


def test_unknown_and_disabled_clients_are_refused(secured_app):
    key = keys.generate("ES384")
    assert "unknown" in refused(ask(secured_app, "nobody", key), "invalid_client")
    cid, key = register(secured_app)
    r = ask(secured_app, cid, key)
    assert r.status_code == 200
    auth = {"Authorization": f"Bearer {r.json['access_token']}"}
    assert secured_app.test_client().get("/Patient", headers=auth).status_code == 200
    clients.disable(store_of(secured_app), cid)
    assert "disabled" in refused(ask(secured_app, cid, key), "invalid_client")
    resp = secured_app.test_client().get("/Patient", headers=auth)  # its token stops working at once
    assert resp.status_code == 401 and resp.json["resourceType"] == "OperationOutcome"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_scope_not_allowed_is_refused(secured_app):
    cid, key = register(secured_app, scopes="system/Encounter.rs")
    assert "allowed" in refused(ask(secured_app, cid, key, scope="system/Patient.read"), "invalid_scope")
    assert refused(ask(secured_app, cid, key, scope="system/Encounter.sr"), "invalid_scope")
    # a restricted v2 scope is not granted (fhir-iop does not enforce the restriction)
    refused(ask(secured_app, cid, key, scope="system/Encounter.rs?status=finished"), "invalid_scope")
    # user/ and patient/ scopes are not for backend clients
    refused(ask(secured_app, cid, key, scope="user/Encounter.rs"), "invalid_scope")


@pytest.mark.parametrize("alg", ["HS256", "RS256", "none"])
def test_other_assertion_algorithms_are_refused(secured_app, alg):
    cid, _key = register(secured_app, "RS384")
    t = int(time.time())
    claims = {"iss": cid, "sub": cid, "aud": TOKEN_URL, "exp": t + 60, "jti": uuid.uuid4().hex}
    key = {"HS256": "a-shared-secret-of-32-bytes-long!", "RS256": keys.generate("RS256"), "none": None}[alg]
    assertion = jwt.encode(claims, key, algorithm=alg)
    r = secured_app.test_client().post("/auth/token", data={
        "grant_type": "client_credentials", "scope": "system/*.read", "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion})
    assert "alg" in refused(r, "invalid_client")


def test_malformed_token_requests(secured_app):
    c = secured_app.test_client()
    cid, key = register(secured_app)
    good = {"grant_type": "client_credentials", "scope": "system/*.read", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": tokens.client_assertion(cid, key, TOKEN_URL)}
    refused(c.post("/auth/token", data={**good, "grant_type": "password"}), "unsupported_grant_type")
    refused(c.post("/auth/token", data={**good, "client_assertion_type": "secret"}), "invalid_request")
    refused(c.post("/auth/token", data={k: v for k, v in good.items() if k != "scope"}), "invalid_request")
    refused(c.post("/auth/token", json=good), "invalid_request")
    refused(c.post("/auth/token", data={**good, "client_assertion": "not.a.jwt"}), "invalid_client")
    # iss and sub must both be the client
    sub = tokens.client_assertion(cid, key, TOKEN_URL, sub="someone-else")
    refused(c.post("/auth/token", data={**good, "client_assertion": sub}), "invalid_client")


def test_jwks_uri_client(secured_app):
    key = keys.generate("RS384")
    jwks_app = Flask("client-jwks")
    jwks_app.get("/jwks.json")(lambda: jsonify(keys.jwks_of(key)))
    with LiveServer(jwks_app) as server:
        clients.register(store_of(secured_app), "remote", scopes="system/Patient.read",
                         jwks_uri=f"{server.url}/jwks.json")
        r = ask(secured_app, "remote", key, scope="system/Patient.read")
        assert r.status_code == 200, r.get_data(as_text=True)
        kid = keys.public_jwk(key)["kid"]
        forged = ask(secured_app, "remote", keys.generate("RS384"), kid=kid)
        assert "signature" in refused(forged, "invalid_client")


def test_access_token_checks(secured_app):
    c = secured_app.test_client()
    cid, _ = register(secured_app, scopes="system/Patient.read")
    auth = secured_app.extensions["fhir_iop_auth"]
    for bad in (None, "Basic dXNlcjpwYXNz", "Bearer ", "Bearer not-a-jwt",
                "Bearer " + auth.issue(cid, "system/Patient.read", lifetime=-120),  # expired
                "Bearer " + auth.issue("never-registered", "system/*.*"),
                # signed by a key the server does not have
                "Bearer " + jwt.encode({"iss": "fhir-iop", "aud": "fhir-iop", "sub": cid, "client_id": cid,
                                        "scope": "system/*.*", "iat": int(time.time()),
                                        "exp": int(time.time()) + 60}, keys.generate("ES256"), algorithm="ES256",
                                       headers={"kid": auth.keys.signing()[0]})):
        r = c.get("/Patient", headers={"Authorization": bad} if bad else {})
        assert r.status_code == 401, (bad, r.get_data(as_text=True))
        assert r.json["resourceType"] == "OperationOutcome" and r.json["issue"][0]["code"] == "login"
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="fhir-iop"')
    # a token cannot widen its client: the scope claim is narrowed by the registration
    wide = {"Authorization": "Bearer " + auth.issue(cid, "system/*.cruds")}
    assert c.get("/Patient", headers=wide).status_code == 200
    assert c.get("/Encounter", headers=wide).status_code == 403


def test_external_authorization_server(db_url, tmp_path):  # noqa: F811
    from server import create_app
    as_key = keys.generate("RS256")
    jwks_app = Flask("external-as")
    jwks_app.get("/jwks")(lambda: jsonify(keys.jwks_of(as_key, alg="RS256")))
    with LiveServer(jwks_app) as server:
        app = create_app({"DATABASE_URL": db_url, "TESTING": True, "AUTH_JWKS_URL": f"{server.url}/jwks",
                          "AUTH_ISSUER": "https://as.example.org", "AUTH_AUDIENCE": "https://fhir.example.org"})
        try:
            clients.register(store_of(app), "payer-x", scopes="system/Patient.read system/Coverage.read",
                             jwks_uri="https://as.example.org/clients/payer-x/jwks", recipient="PAYER-X",
                             purpose="HPAYMT")
            kid = keys.public_jwk(as_key, "RS256")["kid"]

            def token(**over):
                t = int(time.time())
                claims = {"iss": "https://as.example.org", "aud": "https://fhir.example.org", "client_id": "payer-x",
                          "sub": "payer-x", "scope": "system/Patient.read system/Encounter.read", "iat": t,
                          "exp": t + 300, **over}
                return {"Authorization": "Bearer " + jwt.encode(claims, over.pop("key", as_key), algorithm="RS256",
                                                                headers={"kid": kid})}
            c = app.test_client()
            assert c.get("/Patient", headers=token()).status_code == 200
            assert c.get("/Encounter", headers=token()).status_code == 403  # not allowed by the registration
            with app.test_request_context("/Patient", headers=token()):
                from server.auth import authorize_request
                assert authorize_request() is None
                assert (g.access.client_id, g.access.recipient, g.access.purpose) == ("payer-x", "PAYER-X", "HPAYMT")
            assert c.get("/Patient", headers=token(aud="https://other.example.org")).status_code == 401
            assert c.get("/Patient", headers=token(client_id="unregistered", sub="unregistered")).status_code == 401
            assert c.get("/Patient", headers=token(exp=int(time.time()) - 600)).status_code == 401
            forged = {"iss": "https://as.example.org", "aud": "https://fhir.example.org", "client_id": "payer-x",
                      "scope": "system/*.read", "exp": int(time.time()) + 60}
            bad = jwt.encode(forged, keys.generate("RS256"), algorithm="RS256", headers={"kid": kid})
            assert c.get("/Patient", headers={"Authorization": f"Bearer {bad}"}).status_code == 401
            # the server's own tokens keep working beside the external ones
            own = token_for(app, "system/Patient.read")
            assert c.get("/Patient", headers={"Authorization": own}).status_code == 200
        finally:
            store_of(app).dispose()


def test_access_context_comes_from_the_registration(secured_app):
    from server.auth import authorize_request
    header = token_for(secured_app, "system/*.read", recipient="ORG-7", purpose="HOPERAT")
    with secured_app.test_request_context("/Patient", headers={"Authorization": header}):
        assert authorize_request() is None
        a = g.access
        assert (a.recipient, a.purpose, a.emergency, a.admin) == ("ORG-7", "HOPERAT", False, False)
        assert a.scopes.allows("Patient", "read") and not a.scopes.allows("Patient", "create")
    header = token_for(secured_app, "system/*.read", admin=True)
    with secured_app.test_request_context("/Patient", headers={"Authorization": header}):
        authorize_request()
        assert g.access.internal and g.access.admin


def test_emergency_access_only_for_clients_allowed_to(secured_app):
    from server.auth import EMERGENCY_HEADER, authorize_request
    c = secured_app.test_client()
    plain = token_for(secured_app, "system/*.read", recipient="ER-1")
    r = c.get("/Patient", headers={"Authorization": plain, EMERGENCY_HEADER: "true"})
    assert r.status_code == 403 and r.json["resourceType"] == "OperationOutcome"
    assert c.get("/Patient", headers={"Authorization": plain}).status_code == 200
    allowed = token_for(secured_app, "system/*.read", recipient="ER-1", emergency_allowed=True)
    with secured_app.test_request_context("/Patient", headers={"Authorization": allowed, EMERGENCY_HEADER: "true"}):
        assert authorize_request() is None
        assert g.access.emergency and g.access.purpose == "ETREAT" and g.access.recipient == "ER-1"
    with secured_app.test_request_context("/Patient", headers={"Authorization": allowed}):
        authorize_request()
        assert not g.access.emergency and g.access.purpose == "TREAT"  # only when asked for
    assert c.get("/Patient", headers={"Authorization": allowed, EMERGENCY_HEADER: "maybe"}).status_code == 403


def test_discovery_is_public(secured_app):
    c = secured_app.test_client()
    conf = c.get("/.well-known/smart-configuration")
    assert conf.status_code == 200
    body = conf.json
    assert body["token_endpoint"] == TOKEN_URL
    assert body["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(body["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert body["grant_types_supported"] == ["client_credentials"]
    assert {"client-confidential-asymmetric", "permission-v1", "permission-v2"} <= set(body["capabilities"])
    assert "system/*.read" in body["scopes_supported"]
    meta = c.get("/metadata")
    assert meta.status_code == 200
    security = meta.json["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = security["extension"][0]
    assert uris["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    assert {"url": "token", "valueUri": TOKEN_URL} in uris["extension"]


def test_server_key_is_shared_by_apps_on_one_store(secured_app):
    """A second app (another gunicorn worker) on the same database verifies the first one's tokens."""
    from server import create_app
    header = token_for(secured_app, "system/Patient.read")
    other = create_app({"STORE": store_of(secured_app), "TESTING": True})
    assert other.test_client().get("/Patient", headers={"Authorization": header}).status_code == 200


def test_signing_key_file(db_url, tmp_path):  # noqa: F811
    from server import create_app
    key_file = tmp_path / "var" / "signing.pem"
    app = create_app({"DATABASE_URL": db_url, "TESTING": True, "SIGNING_KEY_FILE": str(key_file)})
    try:
        header = token_for(app, "system/Patient.read")
        assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert app.test_client().get("/Patient", headers={"Authorization": header}).status_code == 200
        # a token signed with the store's key is not accepted by an app that signs with the file
        store_key_token = tokens.issue(jwt.decode(header.split()[1], options={"verify_signature": False})["sub"],
                                       "system/Patient.read", store=store_of(app))
        assert app.test_client().get("/Patient", headers={
            "Authorization": f"Bearer {store_key_token}"}).status_code == 401
    finally:
        store_of(app).dispose()


def test_insecure_flag_warns_loudly(db_url, caplog):  # noqa: F811
    from server import create_app
    with caplog.at_level(logging.WARNING):
        app = create_app({"DATABASE_URL": db_url, "TESTING": True, "INSECURE_NO_AUTH": True})
    try:
        assert any("INSECURE_NO_AUTH" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        assert app.test_client().get("/Patient").status_code == 200
    finally:
        store_of(app).dispose()


def test_migration_0004_downgrades_and_upgrades_again(db_url):  # noqa: F811
    from alembic import command
    from sqlalchemy import inspect

    from fhir_iop.store.engine import WRITE, alembic_config, current_revision, make_engine, upgrade
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        tables = {"smart_client", "smart_assertion_jti", "smart_server_key"}
        assert tables <= set(inspect(engine).get_table_names())
        with engine.connect().execution_options(**WRITE) as conn, conn.begin():
            command.downgrade(alembic_config(conn), "0003")
        assert current_revision(engine) == "0003" and not tables & set(inspect(engine).get_table_names())
        upgrade(engine)
        assert tables <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_a_token_request_is_audited_with_the_client_it_went_to(secured_app):
    from server_kit import token_for
    cid, key = register(secured_app, scopes="system/Patient.rs")
    assert ask(secured_app, cid, key, scope="system/Patient.read").status_code == 200
    other, _ = register(secured_app)
    assert ask(secured_app, other, keys.generate("ES384")).status_code == 401  # forged: refused, no client named
    admin = token_for(secured_app, scopes="system/AuditEvent.rs", admin=True)
    c = secured_app.test_client()
    got = c.get(f"/AuditEvent?agent={cid}", headers={"Authorization": admin}).json
    assert got["total"] == 1
    event = got["entry"][0]["resource"]
    assert event["outcome"] == "0" and any(a.get("who", {}).get("identifier", {}).get("value") == cid
                                           for a in event["agent"])
    assert c.get(f"/AuditEvent?agent={other}", headers={"Authorization": admin}).json["total"] == 0
