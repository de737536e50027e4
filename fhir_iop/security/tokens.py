"""Access tokens: fhir-iop as the authorization server of SMART Backend Services, and the checks
of every bearer token the facade receives.

Token endpoint (https://hl7.org/fhir/smart-app-launch/backend-services.html): a registered client
POSTs ``grant_type=client_credentials``, ``scope``, ``client_assertion_type=
urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and ``client_assertion``: a JWT it signed
(RS384 or ES384) with ``iss`` = ``sub`` = its client_id, ``aud`` = the token endpoint URL, ``exp``
at most five minutes ahead, and a ``jti`` never used before (kept in ``smart_assertion_jti`` until
the assertion expires). The answer is ``{"access_token", "token_type": "bearer", "expires_in",
"scope"}``; the scopes granted are the requested ones narrowed to what the registration allows
(``scopes.intersect``). Errors are OAuth 2.0 errors (RFC 6749 §5.2): ``invalid_client`` (401) when
the client cannot be authenticated; ``invalid_request``, ``unsupported_grant_type``,
``invalid_scope`` (400).

Access tokens are JWTs signed by the server's own key (``keys.ServerKeys``), with ``iss`` = ``aud``
= the configured issuer (``TOKEN_ISSUER``, default ``fhir-iop``), ``sub`` = ``client_id``,
``scope``, ``iat``, ``exp`` (``TOKEN_LIFETIME`` seconds, default 300) and ``jti``. What the client
acts for (recipient, purpose, emergency permission, admin) is not in the token: it comes from the
registration, which a server process remembers for at most ``client_ttl`` seconds
(``CLIENT_CACHE_SECONDS``, default 2; 0 reads it on every request). Disabling or narrowing a client
takes effect at once in the process that did it (``clients.generation``) and within ``client_ttl``
seconds everywhere else.

An external authorization server can issue tokens too (``AUTH_JWKS_URL``, ``AUTH_ISSUER``,
``AUTH_AUDIENCE``): a token whose ``iss`` is ``AUTH_ISSUER`` is verified against that JWKS (and its
``aud`` against ``AUTH_AUDIENCE`` when set); its ``client_id`` (or ``azp``, or ``sub``) must name a
registered client, whose registration gives recipient, purpose and admin; its ``scope`` (or
``scp``) is the grant, narrowed by the registration's allowed scopes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt

from fhir_iop.security import clients as registry
from fhir_iop.security import scopes as smart_scopes
from fhir_iop.security.keys import CLIENT_ALGS, ServerKeys

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_SECONDS = 300  # "exp ... no more than five minutes in the future"
LEEWAY = 30  # clock skew tolerated, seconds
CHECKED_TOKENS = 4096  # signature checks remembered (per process)
EXTERNAL_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384")


class OAuthError(Exception):
    """An OAuth 2.0 error response of the token endpoint."""

    def __init__(self, error: str, description: str, status: int | None = None):
        super().__init__(description)
        self.error, self.description = error, description
        self.status = status or (401 if error == "invalid_client" else 400)

    def body(self) -> dict:
        return {"error": self.error, "error_description": self.description}


class InvalidToken(Exception):
    """A bearer token that is not accepted (401 with WWW-Authenticate: Bearer error="invalid_token")."""


@dataclass(frozen=True)
class Verified:
    client: registry.Client
    scopes: smart_scopes.ScopeSet
    claims: dict


class Authority:
    """Issues and verifies tokens for one store (the registry of clients and the server key)."""

    def __init__(self, store, *, key_file: str | None = None, alg: str = "ES256", issuer: str = "fhir-iop",
                 lifetime: int = 300, jwks_url: str | None = None, external_issuer: str | None = None,
                 external_audience: str | None = None, client_ttl: float = 2.0):
        self.store, self.issuer, self.lifetime = store, issuer, int(lifetime)
        self.client_ttl = float(client_ttl)
        #: token → (registry generation, monotonic deadline, Verified): the registration and the granted
        #: scopes of a token seen within client_ttl seconds
        self._verified: OrderedDict[str, tuple[int, float, Verified]] = OrderedDict()
        self.keys = ServerKeys(store, key_file, alg)
        self.jwks_url, self.external_issuer, self.external_audience = jwks_url, external_issuer, external_audience
        self._jwk_clients: dict[str, jwt.PyJWKClient] = {}
        #: tokens whose signature and claims were checked: token → (claims, client_id, scope), until exp
        self._checked: OrderedDict[str, tuple[dict, str, object]] = OrderedDict()
        self._checked_lock = threading.Lock()

    # -- issuing -------------------------------------------------------------------------------------

    def issue(self, client_id: str, scopes: str, lifetime: int | None = None) -> str:
        """A signed access token for a registered client (the scopes as given: narrow them first)."""
        kid, alg, key = self.keys.signing()
        t = int(time.time())
        claims = {"iss": self.issuer, "aud": self.issuer, "sub": client_id, "client_id": client_id, "scope": scopes,
                  "iat": t, "exp": t + int(lifetime if lifetime is not None else self.lifetime),
                  "jti": uuid.uuid4().hex}
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})

    def exchange(self, form, token_url: str) -> dict:
        """The token endpoint: a client_credentials grant with a JWT client assertion → token response."""
        grant = form.get("grant_type")
        if grant != "client_credentials":
            raise OAuthError("unsupported_grant_type", f"grant_type {grant!r}: only client_credentials is supported")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        assertion = form.get("client_assertion")
        if not assertion:
            raise OAuthError("invalid_request", "client_assertion is required")
        requested = form.get("scope")
        if not requested:
            raise OAuthError("invalid_request", "scope is required")
        client = self.authenticate(assertion, token_url)
        if form.get("client_id") and form.get("client_id") != client.client_id:
            raise OAuthError("invalid_client", "client_id does not match the client assertion's iss")
        try:
            wanted = smart_scopes.parse(requested, strict=True)
        except smart_scopes.ScopeError as e:
            raise OAuthError("invalid_scope", str(e)) from None
        granted = smart_scopes.intersect(wanted, client.scope_set.scopes)
        if not granted:
            raise OAuthError("invalid_scope", f"none of the requested scopes is allowed for client {client.client_id}"
                                              " (backend clients get unrestricted system/ scopes)")
        text = " ".join(str(s) for s in granted)
        return {"access_token": self.issue(client.client_id, text), "token_type": "bearer",
                "expires_in": self.lifetime, "scope": text}

    def authenticate(self, assertion: str, token_url: str) -> registry.Client:
        """The registered client that signed ``assertion`` (private_key_jwt), or OAuthError."""
        def refuse(why: str):
            return OAuthError("invalid_client", why)
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refuse("client_assertion is not a JWT") from None
        alg = header.get("alg")
        if alg not in CLIENT_ALGS:
            raise refuse(f"client_assertion alg {alg!r}: sign with {' or '.join(CLIENT_ALGS)}")
        iss, sub = unverified.get("iss"), unverified.get("sub")
        if not isinstance(iss, str) or iss != sub:
            raise refuse("client_assertion iss and sub must both be the client_id")
        client = registry.get(self.store, iss)
        if client is None or not client.active:
            raise refuse("unknown or disabled client")
        candidates = self._client_keys(client, header.get("kid"), alg)
        if not candidates:
            raise refuse(f"no registered key of client {client.client_id} matches kid {header.get('kid')!r} / {alg}")
        claims = None
        for key in candidates:
            try:
                claims = jwt.decode(assertion, key, algorithms=[alg], audience=token_url, issuer=client.client_id,
                                    leeway=LEEWAY, options={"require": ["iss", "sub", "aud", "exp", "jti"]})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise refuse("client_assertion has expired") from None
            except jwt.InvalidAudienceError:
                raise refuse(f"client_assertion aud must be the token endpoint URL {token_url}") from None
            except jwt.MissingRequiredClaimError as e:
                raise refuse(f"client_assertion lacks the {e.claim} claim") from None
            except jwt.PyJWTError as e:
                raise refuse(f"client_assertion is not valid: {e}") from None
        if claims is None:
            raise refuse("client_assertion signature does not verify with the client's registered keys")
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or exp > time.time() + MAX_ASSERTION_SECONDS + LEEWAY:
            raise refuse("client_assertion exp is more than five minutes in the future")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            raise refuse("client_assertion jti must be a string of at most 255 characters")
        exp_at = datetime.fromtimestamp(exp, UTC).replace(tzinfo=None)
        if not registry.use_jti(self.store, client.client_id, jti, exp_at):
            raise refuse("client_assertion jti was used before (replay)")
        return client

    def _jwk_client(self, url: str) -> jwt.PyJWKClient:
        c = self._jwk_clients.get(url)
        if c is None:
            c = self._jwk_clients[url] = jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=10)
        return c

    def _client_keys(self, client: registry.Client, kid: str | None, alg: str) -> list:
        """The client's public keys that may have signed with ``alg`` (and ``kid`` when given)."""
        try:
            if client.jwks is not None:
                keys = jwt.PyJWKSet.from_dict(client.jwks).keys
            else:
                keys = self._jwk_client(client.jwks_uri).get_jwk_set().keys
        except jwt.PyJWKClientError as e:
            raise OAuthError("invalid_client", f"the client's jwks_uri cannot be read: {e}") from None
        except jwt.PyJWTError as e:
            raise OAuthError("invalid_client", f"the client's registered JWKS is not usable: {e}") from None
        family = "EC" if alg.startswith("ES") else "RSA"
        return [k.key for k in keys
                if k.key_type == family and (kid is None or k.key_id == kid)
                and (k.public_key_use in (None, "sig"))]

    # -- verifying bearer tokens --------------------------------------------------------------------

    def verify(self, token: str) -> Verified:
        """The registered client and granted scopes of a bearer token, or InvalidToken. The signature
        check is remembered until the token expires; the client's registration for ``client_ttl``
        seconds (and until a registration changes in this process)."""
        with self._checked_lock:
            hit = self._checked.get(token)
            known = self._verified.get(token) if hit is not None else None
        if hit is not None and hit[0]["exp"] + LEEWAY < time.time():
            raise InvalidToken("the bearer token has expired")
        generation = registry.generation()
        if known is not None and known[0] == generation and known[1] > time.monotonic():
            return known[2]
        claims, client_id, scope = hit if hit is not None else self._check_signature(token)
        if not isinstance(client_id, str) or not client_id:
            raise InvalidToken("the bearer token names no client")
        client = registry.get(self.store, client_id)
        if client is None or not client.active:
            raise InvalidToken("the bearer token's client is not registered or is disabled")
        if isinstance(scope, list):
            scope = " ".join(str(s) for s in scope)
        granted = smart_scopes.ScopeSet(scope if isinstance(scope, str) else "", limit=client.scope_set)
        verified = Verified(client, granted, claims)
        if self.client_ttl > 0:
            with self._checked_lock:
                if token in self._checked:  # (only tokens with an expiry are remembered)
                    self._verified[token] = (generation, time.monotonic() + self.client_ttl, verified)
                    while len(self._verified) > CHECKED_TOKENS:
                        self._verified.popitem(last=False)
        return verified

    def _check_signature(self, token: str) -> tuple[dict, object, object]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise InvalidToken("the bearer token is not a JWT") from None
        try:
            if self.jwks_url and self.external_issuer and unverified.get("iss") == self.external_issuer:
                claims = self._verify_external(token, header)
                client_id = claims.get("client_id") or claims.get("azp") or claims.get("sub")
                scope = claims.get("scope", claims.get("scp"))
            else:
                found = self.keys.public(header.get("kid"))
                if found is None:
                    raise InvalidToken("the bearer token is signed by a key this server does not know")
                alg, key = found
                claims = jwt.decode(token, key, algorithms=[alg], issuer=self.issuer, audience=self.issuer,
                                    leeway=LEEWAY, options={"require": ["iss", "aud", "sub", "exp", "iat"]})
                client_id, scope = claims.get("client_id"), claims.get("scope")
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the bearer token has expired") from None
        except jwt.PyJWKClientError as e:
            raise InvalidToken(f"the authorization server's keys cannot be read: {e}") from None
        except jwt.PyJWTError as e:
            raise InvalidToken(f"the bearer token is not valid: {e}") from None
        if isinstance(claims.get("exp"), (int, float)):
            with self._checked_lock:
                self._checked[token] = (claims, client_id, scope)
                while len(self._checked) > CHECKED_TOKENS:
                    self._checked.popitem(last=False)
        return claims, client_id, scope

    def _verify_external(self, token: str, header: dict) -> dict:
        alg = header.get("alg")
        if alg not in EXTERNAL_ALGS:
            raise InvalidToken(f"bearer token alg {alg!r} is not accepted")
        key = self._jwk_client(self.jwks_url).get_signing_key_from_jwt(token)
        options = {"require": ["iss", "exp"]}
        if not self.external_audience:
            options["verify_aud"] = False
        return jwt.decode(token, key.key, algorithms=[alg], issuer=self.external_issuer,
                          audience=self.external_audience or None, leeway=LEEWAY, options=options)


def issue(client_id: str, scopes: str, *, store, lifetime: int | None = None, **authority_options) -> str:
    """An access token for a registered client, signed with the store's server key (for tests and
    tools in the same deployment; clients get theirs from the token endpoint)."""
    return Authority(store, **authority_options).issue(client_id, scopes, lifetime)


def client_assertion(client_id: str, private_key, token_url: str, *, alg: str | None = None, kid: str | None = None,
                     lifetime: int = 240, jti: str | None = None, **extra_claims) -> str:
    """A client assertion (what a backend client signs to ask for a token); for the CLI and tests."""
    from fhir_iop.security.keys import alg_of, public_jwk
    alg = alg or alg_of(private_key)
    t = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": t + lifetime, "iat": t,
              "jti": jti or uuid.uuid4().hex, **extra_claims}
    return jwt.encode(claims, private_key, algorithm=alg,
                      headers={"kid": kid or public_jwk(private_key, alg)["kid"], "typ": "JWT"})
