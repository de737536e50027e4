"""An outside EHR for the sync tests: sekmet-fhir on loopback, and a fault-injecting proxy before it.

    from tests.ehr_kit import sekmet, FaultProxy          # or: pytest fixtures `sekmet_ehr`, `ehr_proxy`

    with Sekmet(tmp_path) as ehr:                         # `sekmet serve` in a subprocess, killed afterwards
        ehr.transaction([...resources...])                # seed it (directly, no faults)
        with FaultProxy(ehr.base_url) as proxy:           # http://127.0.0.1:<port>/fhir, forwarding to sekmet
            proxy.plan(Fault("status", status=429, retry_after=1), match="GET /fhir/Patient")
            connection = ehr_connection("ehr", proxy.base_url, ...)

sekmet-fhir (PyPI) is a FHIR R4 hospital simulator nobody here wrote: offset paging
(``_count``/``_offset`` in next links), ``_sort=_lastUpdated``, conditional writes, atomic
transactions, ``$export``, and a SMART Backend Services token endpoint that checks the assertion's
signature (``/auth/token``). It ignores unknown search parameters unless sent
``Prefer: handling=strict``. Its settings are written into the test's tmp_path with
``simulator: {enabled: false}`` (no simulated hospital traffic), ``base_url`` matching the port.
Tests skip cleanly when the ``sekmet`` command is not installed.

:class:`FaultProxy` is a threaded HTTP server forwarding every request to the upstream and
rewriting the upstream's base URL into its own in bodies and Location headers (as a reverse proxy
does). Its plan is a list of :class:`Fault` consumed in order by the requests they ``match``
(``"METHOD path-prefix"`` or a callable): ``status`` (answer with a status, e.g. 429 + Retry-After,
500, 503, without forwarding), ``hang`` (wait ``seconds`` then close: a timeout), ``delay`` (wait ``seconds``, then forward), ``broken``
(forward, then send a truncated JSON body), ``duplicate`` (answer a page request with the previous
page served for the same resource type again), ``reset`` (close the connection without an
answer, before forwarding) and ``lose`` (forward — the EHR does the work — then reset: the answer
is lost). ``proxy.log`` lists (method, path, status, fault name) of every request.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sekmet_command() -> str | None:
    exe = VENV_BIN / "sekmet"
    return str(exe) if exe.exists() else shutil.which("sekmet")


# -- sekmet ----------------------------------------------------------------------------------------

class Sekmet:
    """``sekmet serve`` on a free loopback port, with its data in ``workdir``."""

    def __init__(self, workdir: Path, smart_clients: list[dict] | None = None, auth_types: list[str] | None = None,
                 tokens: list[str] | None = None, token_lifetime: int = 3600, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root_url}/fhir"
        self.settings = {
            "base_url": self.base_url, "host": "127.0.0.1", "port": self.port,
            "data_dir": str(self.workdir / "data"), "own_private_key_path": str(self.workdir / "keys" / "own.pem"),
            "simulator": {"enabled": False}, "log_inbound": False,
            "validation": {"inbound": "strict"},
            "server_auth": {"types": auth_types or ["none"], "smart_clients": smart_clients or [],
                            "tokens": tokens or [], "token_lifetime": token_lifetime},
        }
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Sekmet:
        exe = sekmet_command()
        if exe is None:
            pytest.skip("sekmet-fhir is not installed (pip install 'fhir-iop[test]')")
        import yaml
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "settings.yaml"
        cfg.write_text(yaml.safe_dump(self.settings))
        self._log = open(self.workdir / "sekmet.log", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
        self.proc = subprocess.Popen([exe, "serve", "-c", str(cfg), "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                tail = (self.workdir / "sekmet.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"sekmet exited at start (code {self.proc.returncode}): {tail}")
            try:
                status, _, _ = http_request("GET", f"{self.base_url}/metadata", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.skip(f"sekmet did not answer within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "_log", None) and not self._log.closed:
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- direct access (no faults), for seeding and counting --

    def transaction(self, resources: list[dict], method: str = "POST") -> dict:
        """Write resources in one transaction Bundle (POST, or PUT for ones with ids)."""
        entries = []
        for r in resources:
            if method == "PUT" or r.get("id"):
                entries.append({"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}})
            else:
                entries.append({"fullUrl": r.get("_fullUrl") or None, "resource": r,
                                "request": {"method": "POST", "url": r["resourceType"]}})
        for e in entries:
            if e.get("fullUrl") is None:
                e.pop("fullUrl", None)
            e["resource"].pop("_fullUrl", None)
        status, _, body = http_request("POST", self.base_url, {"resourceType": "Bundle", "type": "transaction",
                                                              "entry": entries}, headers=self.headers())
        if status != 200:
            raise AssertionError(f"sekmet transaction failed: {status} {body[:500]!r}")
        return orjson.loads(body)

    def headers(self) -> dict:
        tokens = self.settings["server_auth"].get("tokens") or []
        return {"Authorization": f"Bearer {tokens[0]}"} if tokens else {}

    def search_all(self, rtype: str, params: str = "") -> list[dict]:
        """Every current resource of a type (following next links)."""
        out, url = [], f"{self.base_url}/{rtype}?_count=500&{params}"
        while url:
            status, _, body = http_request("GET", url, headers=self.headers())
            assert status == 200, (status, body[:300])
            bundle = orjson.loads(body)
            out += [e["resource"] for e in bundle.get("entry", ()) if e.get("search", {}).get("mode") == "match"]
            url = next((link["url"] for link in bundle.get("link", ()) if link["relation"] == "next"), None)
        return out


def http_request(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 30):
    """(status, headers, body bytes) with http.client (independent of the code under test)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = body if body is None or isinstance(body, bytes) else orjson.dumps(body)
        hdrs = {"Accept": "application/fhir+json", **(headers or {})}
        if data is not None:
            hdrs.setdefault("Content-Type", "application/fhir+json")
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def sekmet_ehr(tmp_path):
    with Sekmet(tmp_path / "sekmet") as ehr:
        yield ehr


# -- the fault-injecting proxy --------------------------------------------------------------------

@dataclass
class Fault:
    """One planned fault (see the module docstring for the kinds)."""
    kind: str  # status | hang | delay | broken | duplicate | reset | lose
    status: int = 500
    retry_after: float | str | None = None
    seconds: float = 5.0
    body: dict | None = None  # for status: the answer's body (default: an OperationOutcome)
    match: str | Callable | None = None  # "GET /fhir/Patient" (method and path prefix), or fn(method, path)
    times: int = 1
    fired: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        if self.match is None:
            return True
        if callable(self.match):
            return bool(self.match(method, path))
        m, _, prefix = self.match.partition(" ")
        if not prefix:
            m, prefix = "", m
        return (not m or m == method) and path.startswith(prefix)


_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-authenticate", "host", "content-length"}


class FaultProxy:
    """A threaded HTTP proxy to ``upstream`` (a base URL) with a programmable fault plan."""

    def __init__(self, upstream: str, port: int | None = None):
        up = urlsplit(upstream)
        self.upstream_host, self.upstream_port = up.hostname, up.port
        self.upstream_root = f"{up.scheme}://{up.netloc}"
        self._lock = threading.Lock()
        self._plan: list[Fault] = []
        self._last_page: dict[str, tuple[int, list, bytes]] = {}
        self.log: list[tuple[str, str, int | None, str | None]] = []
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a reset connection is the point, not an error
                pass

        self.server = Server(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.root_url = f"http://127.0.0.1:{self.server.server_port}"
        self.base_url = self.root_url + up.path.rstrip("/")
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    # -- the plan --

    def plan(self, *faults: Fault, match: str | Callable | None = None, times: int | None = None) -> None:
        with self._lock:
            for f in faults:
                if match is not None:
                    f.match = match
                if times is not None:
                    f.times = times
                self._plan.append(f)

    def clear(self) -> None:
        with self._lock:
            self._plan.clear()

    @property
    def pending(self) -> list[Fault]:
        with self._lock:
            return [f for f in self._plan if f.fired < f.times]

    def fired(self, kind: str | None = None) -> int:
        return sum(1 for *_, k in self.log if k and (kind is None or k == kind))

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self._plan:
                if f.fired < f.times and f.matches(method, path):
                    f.fired += 1
                    return f
        return None

    # -- serving --

    def _rewrite(self, data: bytes) -> bytes:
        return data.replace(self.upstream_root.encode(), self.root_url.encode())

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._take(method, path)
        kind = fault.kind if fault else None
        rtype = urlsplit(path).path.rstrip("/").split("/")[-1]
        if fault and fault.kind == "status":
            payload = orjson.dumps(fault.body or {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "throttled" if fault.status == 429 else "transient",
                 "diagnostics": f"injected {fault.status}"}]})
            headers = [("Content-Type", "application/fhir+json")]
            if fault.retry_after is not None:
                headers.append(("Retry-After", str(fault.retry_after)))
            self._send(h, fault.status, headers, payload, method, path, kind)
            return
        if fault and fault.kind == "hang":
            with self._lock:
                self.log.append((method, path, None, kind))
            self._stop.wait(fault.seconds)
            self._reset(h, method, path, None)
            return
        if fault and fault.kind == "delay":  # a slow EHR: wait, then forward as usual
            self._stop.wait(fault.seconds)
        if fault and fault.kind == "reset":
            self._reset(h, method, path, kind)
            return
        if fault and fault.kind == "duplicate" and rtype in self._last_page:
            status, headers, payload = self._last_page[rtype]
            self._send(h, status, headers, payload, method, path, kind)
            return
        try:
            status, headers, payload = self._forward(method, path, h.headers, body)
        except OSError:
            self._send(h, 502, [("Content-Type", "application/fhir+json")], orjson.dumps(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient",
                                                               "diagnostics": "upstream unreachable"}]}),
                       method, path, "upstream-down")
            return
        if fault and fault.kind == "lose":
            self._reset(h, method, path, kind)
            return
        if method == "GET" and status == 200 and b'"searchset"' in payload[:400]:
            self._last_page[rtype] = (status, headers, payload)
        if fault and fault.kind == "broken":
            payload = payload[: max(1, len(payload) // 2)]
        self._send(h, status, headers, payload, method, path, kind)

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            hdrs = {k: v for k, v in headers.items() if k.lower() not in _HOP}
            hdrs["Host"] = f"{self.upstream_host}:{self.upstream_port}"
            if body is not None:
                body = body.replace(self.root_url.encode(), self.upstream_root.encode())
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            payload = self._rewrite(resp.read())
            out = [(k, self._rewrite(v.encode("latin-1")).decode("latin-1")) for k, v in resp.getheaders()
                   if k.lower() not in _HOP]
            return resp.status, out, payload
        finally:
            conn.close()

    def _send(self, h, status, headers, payload, method, path, kind):
        try:
            h.send_response(status)
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            pass
        with self._lock:
            self.log.append((method, path, status, kind))

    def _reset(self, h, method, path, kind):
        """Close the connection with a TCP reset (SO_LINGER 0) and no answer."""
        if kind is not None:
            with self._lock:
                self.log.append((method, path, None, kind))
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        except OSError:
            pass
        h.close_connection = True


@pytest.fixture
def ehr_proxy(sekmet_ehr):
    with FaultProxy(sekmet_ehr.base_url) as proxy:
        yield proxy
