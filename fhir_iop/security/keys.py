"""Keys: the server's token-signing key, and client key pairs (PEM files, JWKS).

The server signs its access tokens with its own key: ES256 (P-256) by default, or RS256. It is
generated on first start and kept in the store (table ``smart_server_key``, so every worker of a
gunicorn server and every process on the same database uses the same key) or, when configured
(``SIGNING_KEY_FILE``), in a PEM file (created with mode 0600 if missing). Tokens are verified
against every key of the store (a rotated-in key does not invalidate tokens signed by the older one).

Client keys: ``fhir-iop clients add --jwks FILE`` takes a JWKS of public keys; ``generate_pem``
writes a new private key (P-384 for ES384 or RSA 3072 for RS384) and ``jwks_of`` gives the
public JWKS of a private or public key, with ``kid`` the RFC 7638 thumbprint.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from fhir_iop.errors import FhirIopError
from fhir_iop.store.models import smart_server_key
from fhir_iop.store.repository import now

SERVER_ALGS = ("ES256", "RS256")
CLIENT_ALGS = ("RS384", "ES384")


class KeyProblem(FhirIopError):
    """A key file that cannot be read or used."""


def generate(alg: str):
    """A new private key for ``alg`` (ES256, ES384, RS256, RS384)."""
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg in ("RS256", "RS384"):
        return rsa.generate_private_key(public_exponent=65537, key_size=3072 if alg == "RS384" else 2048)
    raise KeyProblem(f"algorithm {alg!r} is not one of ES256, ES384, RS256, RS384")


def pem(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def load_pem(data: bytes | str, what: str = "key"):
    """A private key (or, failing that, a public key) from PEM text."""
    data = data.encode() if isinstance(data, str) else data
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        pass
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyProblem(f"{what} is not an unencrypted PEM private or public key: {e}") from None


def read_pem_file(path: str | Path):
    try:
        return load_pem(Path(path).read_bytes(), str(path))
    except OSError as e:
        raise KeyProblem(f"{path}: {e.strerror}") from None


def write_pem_file(path: str | Path, private_key) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem(private_key))


def alg_of(key, family: str = "384") -> str:
    """The JWS algorithm a key signs with: ES256/ES384 by curve for EC keys, RS``family`` for RSA."""
    k = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(k, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384"}.get(k.curve.name) or _no(k.curve.name)
    if isinstance(k, rsa.RSAPublicKey):
        return f"RS{family}"
    return _no(type(k).__name__)


def _no(what):
    raise KeyProblem(f"{what} keys are not supported (EC P-256/P-384 or RSA)")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key, alg: str | None = None) -> dict:
    """The public JWK of a key, with ``kid`` = RFC 7638 thumbprint, ``alg`` and ``use: sig``."""
    pub = key.public_key() if hasattr(key, "public_key") else key
    alg = alg or alg_of(pub)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
        required = ("crv", "kty", "x", "y")
    else:
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
        required = ("e", "kty", "n")
    canonical = orjson.dumps({k: jwk[k] for k in required}, option=orjson.OPT_SORT_KEYS)
    kid = _b64(hashlib.sha256(canonical).digest())
    return {**{k: jwk[k] for k in required}, "kid": kid, "alg": alg, "use": "sig"}


def jwks_of(*keys, alg: str | None = None) -> dict:
    return {"keys": [public_jwk(k, alg) for k in keys]}


def generate_pem(path: str | Path, alg: str = "ES384"):
    """Write a new client private key to ``path`` (0600); returns it."""
    key = generate(alg)
    write_pem_file(path, key)
    return key


class ServerKeys:
    """The server's signing key and the keys its tokens are verified with."""

    def __init__(self, store, key_file: str | None = None, alg: str = "ES256"):
        if alg not in SERVER_ALGS:
            raise KeyProblem(f"server signing algorithm {alg!r} is not one of {', '.join(SERVER_ALGS)}")
        self.store, self.key_file, self.alg = store, key_file, alg
        self._lock = threading.Lock()
        self._signing = None  # (kid, alg, private key)
        self._public: dict[str, tuple[str, object]] = {}  # kid -> (alg, public key)

    def _load_file(self):
        path = Path(self.key_file)
        if path.exists():
            key = read_pem_file(path)
            if not hasattr(key, "private_bytes"):
                raise KeyProblem(f"{path} holds a public key; the server needs its private signing key")
        else:
            key = generate(self.alg)
            write_pem_file(path, key)
        alg = alg_of(key, "256")
        if alg not in SERVER_ALGS:
            raise KeyProblem(f"{path}: a {alg} key; the server signs with ES256 (P-256) or RS256")
        kid = public_jwk(key, alg)["kid"]
        return kid, alg, key

    def _load_store(self):
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(smart_server_key).order_by(smart_server_key.c.created,
                                                                  smart_server_key.c.kid)).all()
        if not rows:
            key = generate(self.alg)
            kid = public_jwk(key, self.alg)["kid"]
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(insert(smart_server_key).values(kid=kid, alg=self.alg, private_pem=pem(key).decode(),
                                                                 created=now()))
            except IntegrityError:
                pass
            with self.store.engine.connect() as conn:  # another process may have won the race: use the oldest
                rows = conn.execute(select(smart_server_key).order_by(smart_server_key.c.created,
                                                                      smart_server_key.c.kid)).all()
        for r in rows:
            self._public[r.kid] = (r.alg, load_pem(r.private_pem).public_key())
        first = rows[0]
        return first.kid, first.alg, load_pem(first.private_pem)

    def signing(self):
        """(kid, alg, private key) of the key that signs."""
        with self._lock:
            if self._signing is None:
                self._signing = self._load_file() if self.key_file else self._load_store()
                kid, alg, key = self._signing
                self._public[kid] = (alg, key.public_key())
            return self._signing

    def public(self, kid: str | None):
        """(alg, public key) for a token's ``kid``, or None (an unknown key: looked up again in the store)."""
        self.signing()
        found = self._public.get(kid or "")
        if found is None and not self.key_file:
            with self._lock:
                with self.store.engine.connect() as conn:
                    row = conn.execute(select(smart_server_key).where(smart_server_key.c.kid == (kid or ""))).first()
                if row is not None:
                    found = self._public[row.kid] = (row.alg, load_pem(row.private_pem).public_key())
        return found

    def jwks(self) -> dict:
        self.signing()
        return {"keys": [public_jwk(k, alg) for alg, k in self._public.values()]}
