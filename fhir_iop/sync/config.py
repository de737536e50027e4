"""EHR connections: read from a YAML or JSON file, secrets from the environment.

    from fhir_iop.sync.config import load
    connections = load("ehr.yaml")          # {name: Connection}

The file (``examples/ehr-connections.yaml`` is a commented example)::

    connections:
      county-hospital:
        base_url: https://ehr.example.org/fhir/r4
        auth:
          type: smart-backend          # smart-backend | bearer | client-secret | none
          client_id: fhir-iop-iop
          private_key_env: COUNTY_EHR_KEY        # PEM text in this variable, or private_key_path
          alg: RS384                   # RS384 | ES384
          kid: iop-2026-1
          scopes: [system/Patient.rs, system/ServiceRequest.rs]
          # token_endpoint: …          # else discovered from {base_url}/.well-known/smart-configuration
        resources: {Patient: pull, ServiceRequest: pull, Encounter: push, Observation: both}
        page_size: 100
        schedule: {interval: 15m}
        timeouts: {connect: 5, read: 30}
        retries: {max_attempts: 5, backoff: 0.5, backoff_max: 30, max_retry_after: 120}

Secrets never sit in the file: a key ending in ``_env`` names the environment variable that holds
the value (read when it is needed, so ``sync status`` runs without them), and any string may
contain ``${VAR}`` (replaced at load time; an unset variable is a :class:`ConfigError` naming the
variable, never a value).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_iop.errors import ConfigError

DIRECTIONS = ("pull", "push", "both")
AUTH_TYPES = ("smart-backend", "bearer", "client-secret", "none")
ALGS = ("RS384", "ES384")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def duration(value: Any, where: str) -> float:
    """Seconds from a number or a string such as ``90``, ``30s``, ``15m``, ``1h``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"{where}: {value!r} is not a duration (a number of seconds, or 30s, 15m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _env(name: str, where: str) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        raise ConfigError(f"{where}: the environment variable {name} is not set")
    return value


def _substitute(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return _VAR.sub(lambda m: _env(m.group(1), where), value)
    if isinstance(value, list):
        return [_substitute(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, f"{where}.{k}") for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Auth:
    """How fhir-iop authenticates to one EHR. Secrets are read from the environment on use."""
    type: str = "none"
    client_id: str | None = None
    # smart-backend
    private_key_path: str | None = None
    private_key_env: str | None = None
    alg: str = "RS384"
    kid: str | None = None
    scopes: tuple[str, ...] = ()
    token_endpoint: str | None = None
    # bearer
    token_env: str | None = None
    # client-secret
    secret_env: str | None = None

    def private_key(self, where: str = "auth") -> str:
        """The PEM text of the signing key (from ``private_key_env`` or ``private_key_path``)."""
        if self.private_key_env:
            return _env(self.private_key_env, f"{where}.private_key_env")
        if self.private_key_path:
            try:
                return Path(self.private_key_path).read_text()
            except OSError as e:
                raise ConfigError(f"{where}.private_key_path: cannot read the key ({e.strerror})") from None
        raise ConfigError(f"{where}: smart-backend auth needs private_key_env or private_key_path")

    def bearer_token(self, where: str = "auth") -> str:
        return _env(self.token_env or "", f"{where}.token_env")

    def client_secret(self, where: str = "auth") -> str:
        return _env(self.secret_env or "", f"{where}.secret_env")

    @property
    def scope(self) -> str:
        return " ".join(self.scopes)


@dataclass(frozen=True)
class Connection:
    """One EHR: where it is, how to authenticate, which types flow which way, and how hard to try."""
    name: str
    base_url: str
    auth: Auth = field(default_factory=Auth)
    resources: dict[str, str] = field(default_factory=dict)  # type -> pull | push | both
    page_size: int = 100
    interval: float = 900.0  # schedule: seconds between runs
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5  # HTTP attempts per request (first one included); push: attempts per message
    backoff: float = 0.5  # urllib3 backoff_factor: 0.5, 1, 2, 4 … seconds, with jitter
    backoff_max: float = 30.0
    max_retry_after: float = 120.0  # a longer Retry-After is not slept through: the call fails (transient)
    strict: bool = True  # send Prefer: handling=strict and check Bundle.link self for ignored parameters
    verify: bool | str = True  # TLS verification (or a CA bundle path)
    since: str | None = None  # first pull: only resources updated at or after this instant
    recipient: str | None = None  # Part 2 recipient id this EHR's organisation is (push checks consent)
    purpose: str = "TREAT"  # purpose of use of what is pushed
    push: dict = field(default_factory=dict)  # push options (owned by fhir_iop.sync.push)
    bulk: dict = field(default_factory=dict)  # bulk pull options: {types: [...], poll_max: 60}

    def types(self, direction: str) -> tuple[str, ...]:
        """The resource types that flow in ``direction`` ("pull" or "push")."""
        return tuple(t for t, d in self.resources.items() if d in (direction, "both"))

    @property
    def pull_types(self) -> tuple[str, ...]:
        return self.types("pull")

    @property
    def push_types(self) -> tuple[str, ...]:
        return self.types("push")

    @property
    def timeout(self) -> tuple[float, float]:
        return (self.connect_timeout, self.read_timeout)

    @property
    def origin(self) -> str:
        """The store write origin of what is pulled from this EHR."""
        return f"sync:{self.name}"


_CONN_KEYS = {"base_url", "auth", "resources", "page_size", "schedule", "timeouts", "retries", "strict", "verify",
              "since", "recipient", "purpose", "push", "bulk"}
_AUTH_KEYS = {"type", "client_id", "private_key_path", "private_key_env", "alg", "kid", "scopes", "scope",
              "token_endpoint", "token_env", "secret_env"}


def _auth(raw: dict | None, where: str) -> Auth:
    if raw is None:
        return Auth()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping")
    unknown = set(raw) - _AUTH_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (secrets go in *_env variables)")
    kind = raw.get("type", "none")
    if kind not in AUTH_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(AUTH_TYPES)}")
    scopes = raw.get("scopes", raw.get("scope", ()))
    scopes = tuple(scopes.split() if isinstance(scopes, str) else scopes)
    alg = raw.get("alg", "RS384")
    if alg not in ALGS:
        raise ConfigError(f"{where}.alg: {alg!r} is not one of {', '.join(ALGS)}")
    a = Auth(type=kind, client_id=raw.get("client_id"), private_key_path=raw.get("private_key_path"),
             private_key_env=raw.get("private_key_env"), alg=alg, kid=raw.get("kid"), scopes=scopes,
             token_endpoint=raw.get("token_endpoint"), token_env=raw.get("token_env"),
             secret_env=raw.get("secret_env"))
    if kind == "smart-backend":
        if not a.client_id or not (a.private_key_env or a.private_key_path):
            raise ConfigError(f"{where}: smart-backend needs client_id and private_key_env or private_key_path")
        if not a.scopes:
            raise ConfigError(f"{where}: smart-backend needs scopes")
    elif kind == "bearer" and not a.token_env:
        raise ConfigError(f"{where}: bearer needs token_env (the variable that holds the token)")
    elif kind == "client-secret" and not (a.client_id and a.secret_env):
        raise ConfigError(f"{where}: client-secret needs client_id and secret_env")
    return a


def connection(name: str, raw: dict, where: str = "connections") -> Connection:
    """One :class:`Connection` from its mapping in the file (``${VAR}`` already substituted or not)."""
    where = f"{where}.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping")
    raw = _substitute(raw, where)
    unknown = set(raw) - _CONN_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    base = raw.get("base_url")
    if not isinstance(base, str) or not re.match(r"^https?://[^/]+", base):
        raise ConfigError(f"{where}.base_url: an http(s) URL is needed")
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise ConfigError(f"{where}.resources: a mapping of resource type to pull, push or both")
    for t, d in resources.items():
        if d not in DIRECTIONS:
            raise ConfigError(f"{where}.resources.{t}: {d!r} is not one of {', '.join(DIRECTIONS)}")
        if not re.match(r"^[A-Z][A-Za-z]+$", str(t)):
            raise ConfigError(f"{where}.resources: {t!r} is not a resource type")
    schedule = raw.get("schedule") or {}
    interval = schedule.get("interval", 900) if isinstance(schedule, dict) else schedule
    timeouts = raw.get("timeouts") or {}
    retries = raw.get("retries") or {}
    try:
        page_size = int(raw.get("page_size", 100))
        max_attempts = int(retries.get("max_attempts", 5))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: page_size and retries.max_attempts must be integers") from None
    if not 1 <= page_size <= 1000 or not 1 <= max_attempts <= 50:
        raise ConfigError(f"{where}: page_size must be 1-1000 and retries.max_attempts 1-50")
    return Connection(
        name=name, base_url=base.rstrip("/"), auth=_auth(raw.get("auth"), f"{where}.auth"), resources=dict(resources),
        page_size=page_size, interval=duration(interval, f"{where}.schedule.interval"),
        connect_timeout=duration(timeouts.get("connect", 5), f"{where}.timeouts.connect"),
        read_timeout=duration(timeouts.get("read", 30), f"{where}.timeouts.read"),
        max_attempts=max_attempts, backoff=duration(retries.get("backoff", 0.5), f"{where}.retries.backoff"),
        backoff_max=duration(retries.get("backoff_max", 30), f"{where}.retries.backoff_max"),
        max_retry_after=duration(retries.get("max_retry_after", 120), f"{where}.retries.max_retry_after"),
        strict=bool(raw.get("strict", True)), verify=raw.get("verify", True), since=raw.get("since"),
        recipient=raw.get("recipient"), purpose=raw.get("purpose", "TREAT"), push=dict(raw.get("push") or {}),
        bulk=dict(raw.get("bulk") or {}))


def parse(data: Any, source: str | None = None) -> dict[str, Connection]:
    """Connections from the parsed file (``{"connections": {name: {...}}}``); ``source`` names the file."""
    where = f"{source}: connections" if source else "connections"
    if not isinstance(data, dict) or not isinstance(data.get("connections"), dict):
        raise ConfigError(f"{where}: the file needs a 'connections' mapping of name to connection")
    out = {}
    for name, raw in data["connections"].items():
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", str(name)):
            raise ConfigError(f"{where}: {name!r} is not a valid connection name ([A-Za-z0-9_.-], 1-64)")
        out[str(name)] = connection(str(name), raw, where)
    return out


def load(path: str | Path) -> dict[str, Connection]:
    """The connections of a YAML (``.yaml``/``.yml``) or JSON file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the EHR connections file ({e.strerror})") from None
    try:
        if p.suffix.lower() == ".json":
            import orjson
            data = orjson.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, orjson.JSONDecodeError
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}") from None
    return parse(data, str(p))
