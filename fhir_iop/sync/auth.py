"""Authenticating to an EHR: SMART Backend Services, a static bearer token, or a client secret.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html): fhir-iop
signs a JWT (RS384 or ES384, header ``kid``) with ``iss = sub = client_id``, ``aud`` = the token
endpoint, a fresh ``jti`` and ``exp`` five minutes ahead, and posts it as a
``client_credentials`` grant (``client_assertion_type =
urn:ietf:params:oauth:client-assertion-type:jwt-bearer``) with the configured scopes. The token
endpoint is the connection's ``token_endpoint`` or, when absent, the ``token_endpoint`` of
``{base_url}/.well-known/smart-configuration``.
The access token is cached until 60 seconds (at most a tenth of its lifetime) before it expires.
When the EHR answers 401 the client calls :meth:`Authenticator.invalidate` and retries the request
once with a new token (see ``EhrClient``).

Every HTTP call goes through the ``EhrClient``'s session (one owner of HTTP); the token request is a
POST and is therefore retried only on connection errors (nothing was sent), each attempt with a new
assertion (a ``jti`` is never reused).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from fhir_iop.sync.config import Connection

if TYPE_CHECKING:
    from fhir_iop.sync.client import EhrClient

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds: "no more than five minutes in the future"
RENEW_MARGIN = 60.0


class Authenticator:
    """No authentication: base of the others."""
    renewable = False

    def __init__(self, connection: Connection):
        self.connection = connection

    def headers(self, client: EhrClient) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        """Forget a cached token (the EHR answered 401)."""


class BearerAuth(Authenticator):
    """A static token read from the environment variable ``token_env`` (re-read on each use)."""

    def headers(self, client):
        return {"Authorization": f"Bearer {self.connection.auth.bearer_token(f'connections.{self.connection.name}.auth')}"}


class _TokenAuth(Authenticator):
    """An OAuth 2 client_credentials token, cached until shortly before it expires."""
    renewable = True

    def __init__(self, connection: Connection):
        super().__init__(connection)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0
        self._endpoint: str | None = connection.auth.token_endpoint
        self.fetched = 0  # tokens obtained (tests and status)

    def token_endpoint(self, client: EhrClient) -> str:
        if self._endpoint is None:
            conf = client.smart_configuration()
            endpoint = conf.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
                from fhir_iop.sync.client import EhrError
                raise EhrError(None, f"{self.connection.name}: .well-known/smart-configuration has no token_endpoint",
                               transient=False)
            self._endpoint = endpoint
        return self._endpoint

    def headers(self, client):
        with self._lock:
            if self._token is None or time.time() >= self._expires:
                self._fetch(client)
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        with self._lock:
            self._token, self._expires = None, 0.0

    def _form(self, endpoint: str) -> tuple[dict, tuple[str, str] | None]:
        raise NotImplementedError

    def _fetch(self, client: EhrClient) -> None:
        from fhir_iop.sync.client import EhrError
        endpoint = self.token_endpoint(client)
        form, basic = self._form(endpoint)
        body = client.token_request(endpoint, form, basic)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise EhrError(None, f"{self.connection.name}: the token endpoint answered without an access_token",
                           transient=False)
        try:
            lifetime = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        self._token = token
        self._expires = time.time() + lifetime - min(RENEW_MARGIN, lifetime / 10)
        self.fetched += 1
        log.info("sync %s: access token obtained (expires in %ds)", self.connection.name, int(lifetime))


class SmartBackendAuth(_TokenAuth):
    """SMART Backend Services: a signed JWT client assertion."""

    def __init__(self, connection: Connection):
        super().__init__(connection)
        self._key = None

    def assertion(self, endpoint: str) -> str:
        import jwt
        a = self.connection.auth
        if self._key is None:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            from fhir_iop.errors import ConfigError
            try:
                self._key = load_pem_private_key(a.private_key(f"connections.{self.connection.name}.auth").encode(),
                                                 password=None)
            except ValueError as e:
                raise ConfigError(f"connections.{self.connection.name}.auth: the private key is not a usable "
                                  f"PEM key ({e})") from None
        now = int(time.time())
        claims = {"iss": a.client_id, "sub": a.client_id, "aud": endpoint, "jti": str(uuid.uuid4()),
                  "iat": now, "exp": now + ASSERTION_LIFETIME}
        headers = {"kid": a.kid} if a.kid else {}
        return jwt.encode(claims, self._key, algorithm=a.alg, headers={"typ": "JWT", **headers})

    def _form(self, endpoint):
        return ({"grant_type": "client_credentials", "scope": self.connection.auth.scope,
                 "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion(endpoint)}, None)


class ClientSecretAuth(_TokenAuth):
    """client_credentials with the client id and secret in HTTP Basic (RFC 6749 §2.3.1)."""

    def _form(self, endpoint):
        a = self.connection.auth
        form = {"grant_type": "client_credentials"}
        if a.scopes:
            form["scope"] = a.scope
        return form, (a.client_id, a.client_secret(f"connections.{self.connection.name}.auth"))


def for_connection(connection: Connection) -> Authenticator:
    return {"smart-backend": SmartBackendAuth, "bearer": BearerAuth, "client-secret": ClientSecretAuth}.get(
        connection.auth.type, Authenticator)(connection)
