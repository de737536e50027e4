"""The one owner of HTTP to EHRs: :class:`EhrClient` over a ``requests.Session``.

    client = EhrClient(connection)
    patient = client.read("Patient", "123")
    for page in client.search("Condition", {"_lastUpdated": "ge2026-01-01"}):   # Bundles, next links followed
        ...
    status, location, version = client.conditional_update(resource, {"system": s, "value": v})

Retries. urllib3 ``Retry`` retries connection errors (nothing was sent) for every method, and read
errors, timeouts and the statuses 429, 500, 502, 503, 504 for the idempotent methods GET, HEAD,
PUT, DELETE and OPTIONS, up to ``max_attempts`` attempts, with exponential backoff
(``backoff``·2ⁿ, at most ``backoff_max``) plus up to one second of jitter; a ``Retry-After`` header
on 429/503 is slept through instead (at most ``max_retry_after`` seconds). POST is retried on
status only for a *safe* transaction: one whose entries are all GET, PUT, DELETE or a POST with
``ifNoneExist`` — replaying it leaves the EHR as one execution would (a transaction is atomic, and
conditional writes match what a first execution wrote). Any other POST is sent once (plus
connection-error retries). A 2xx whose body is not JSON (a broken page) is a transient
:class:`EhrError`; GETs retry it too (``max_attempts`` in all).

Every request has a (connect, read) timeout. An error status becomes :class:`EhrError` whose
message says what the EHR said: the OperationOutcome's issue diagnostics / details.text / code.
A 401 drops the cached token and the request is sent once more with a new one.

Links (``next``, Location, bulk status and files) must lie under the connection's base URL's origin
— a token is never sent elsewhere; bulk files with ``requiresAccessToken: false`` may be anywhere
and are fetched without it.
Logs name the method, the resource type and the status: never a query string (it can hold an
identifier) and never a body.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from fhir_iop import __version__
from fhir_iop.sync.auth import Authenticator, for_connection
from fhir_iop.sync.config import Connection

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TRANSIENT_STATUSES = RETRY_STATUSES | {408, 425}
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: search parameters that are about the result page, not the match: not checked for "ignored"
_PAGING = {"_count", "_format", "_pretty", "_summary", "_elements", "_total", "_getpagesoffset", "_offset",
           "_page", "_cursor"}


class EhrError(Exception):
    """A call to an EHR failed. ``status`` is None when no HTTP answer came (connection, timeout);
    ``transient``: trying later may succeed (429, 5xx, timeouts, broken bodies); ``retry_after``
    the seconds the EHR asked to wait, if it said; ``outcome`` its OperationOutcome, if any."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None,
                 transient: bool = False, outcome: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after, self.transient = status, message, retry_after, transient
        self.outcome = outcome

    def __repr__(self) -> str:
        return f"EhrError({self.status}, {self.message!r}, retry_after={self.retry_after}, transient={self.transient})"

    @property
    def loggable(self) -> str:
        """What may go to the application log: the status and the OperationOutcome's issue codes, never the
        EHR's text (an EHR may quote names, birth dates or identifiers back)."""
        codes = sorted({i.get("code") for i in (self.outcome or {}).get("issue") or () if isinstance(i, dict)
                        and isinstance(i.get("code"), str)})
        return (f"HTTP {self.status}" if self.status else "no HTTP answer") + (
            f" ({', '.join(codes)})" if codes else "") + (", transient" if self.transient else "")


class Page(dict):
    """One search result page: the Bundle itself, plus ``url`` (what was fetched), ``number``
    (1-based) and ``ignored`` (search parameters the EHR did not apply, per its self link; None
    when it cannot be told)."""
    url: str = ""
    number: int = 0
    ignored: frozenset[str] | None = None

    @property
    def resources(self) -> list[dict]:
        return [e["resource"] for e in self.get("entry") or () if isinstance(e, dict) and isinstance(
            e.get("resource"), dict) and (e.get("search") or {}).get("mode", "match") == "match"]

    def link(self, relation: str) -> str | None:
        for link in self.get("link") or ():
            if isinstance(link, dict) and link.get("relation") == relation:
                return link.get("url")
        return None


@dataclass(frozen=True)
class ExportStatus:
    """The state of a Bulk Data export job: ``done`` with the ``manifest``, or in progress."""
    done: bool
    retry_after: float | None = None
    progress: str | None = None
    manifest: dict | None = None


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def outcome_text(outcome: dict) -> str:
    """What an OperationOutcome says, issue by issue."""
    parts = []
    for issue in outcome.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or next(
            (c.get("display") or c.get("code") for c in (issue.get("details") or {}).get("coding") or ()
             if isinstance(c, dict)), None) or issue.get("code") or "?"
        where = issue.get("expression") or issue.get("location")
        parts.append(f"{issue.get('severity', 'error')}: {text}" + (f" (at {', '.join(where)})" if where else ""))
    return "; ".join(parts)


def safe_transaction(bundle: dict) -> bool:
    """Whether replaying this transaction cannot write anything twice (see the module docstring)."""
    entries = bundle.get("entry") or []
    for e in entries:
        req = e.get("request") or {}
        method = req.get("method")
        if method in ("GET", "HEAD", "PUT", "DELETE"):
            continue
        if method == "POST" and req.get("ifNoneExist"):
            continue
        return False
    return bundle.get("type") == "transaction"


def _retry(connection: Connection, methods: frozenset[str]) -> Retry:
    kwargs = dict(total=connection.max_attempts - 1, connect=connection.max_attempts - 1,
                  read=connection.max_attempts - 1, status=connection.max_attempts - 1, other=0, redirect=3,
                  allowed_methods=methods, status_forcelist=RETRY_STATUSES, backoff_factor=connection.backoff,
                  backoff_max=connection.backoff_max, backoff_jitter=1.0 if connection.backoff else 0.0,
                  respect_retry_after_header=True, raise_on_status=False, raise_on_redirect=False)
    try:
        return Retry(**kwargs, retry_after_max=int(connection.max_retry_after))
    except TypeError:  # urllib3 < 2.6 has no cap on Retry-After
        return Retry(**kwargs)


def _session(connection: Connection, methods: frozenset[str]) -> requests.Session:
    s = requests.Session()
    adapter = HTTPAdapter(max_retries=_retry(connection, methods), pool_connections=2, pool_maxsize=4)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers.update({"Accept": FHIR_JSON, "User-Agent": f"fhir-iop/{__version__}"})
    s.verify = connection.verify
    s.trust_env = False  # no proxies or .netrc credentials from the environment: the EHR gets what we send
    return s


class EhrClient:
    """FHIR R4 REST and Bulk Data calls to one EHR (see the module docstring)."""

    def __init__(self, connection: Connection, auth: Authenticator | None = None,
                 session: requests.Session | None = None):
        self.connection = connection
        self.base = connection.base_url.rstrip("/")
        self.auth = auth or for_connection(connection)
        self.session = session or _session(connection, IDEMPOTENT)
        self._safe_post = _session(connection, IDEMPOTENT | {"POST"}) if session is None else session
        self._smart: dict | None = None
        split = urlsplit(self.base)
        self._origin = (split.scheme, split.netloc)

    def close(self) -> None:
        self.session.close()
        self._safe_post.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        """An absolute URL from a path relative to the base, or a link, which must stay at the EHR."""
        if path.startswith(("http://", "https://")):
            url = path
        else:
            url = urljoin(self.base + "/", path.lstrip("/"))
        s = urlsplit(url)
        if (s.scheme, s.netloc) != self._origin:
            raise EhrError(None, f"{self.connection.name}: a link leads away from the EHR ({s.scheme}://{s.netloc})",
                           transient=False)
        return url

    def _what(self, method: str, url: str) -> str:
        path = urlsplit(url).path
        base_path = urlsplit(self.base).path
        rel = path[len(base_path):].lstrip("/") if path.startswith(base_path) else path
        return f"{method} {rel.split('/')[0] or '/'}"  # the type (or operation) only: ids can be PHI-adjacent

    def _request(self, method: str, url: str, *, params=None, body: bytes | None = None, headers=None,
                 stream: bool = False, authenticate: bool = True, safe_post: bool = False) -> requests.Response:
        session = self._safe_post if safe_post else self.session
        hdrs = dict(headers or {})
        if body is not None and "Content-Type" not in hdrs:
            hdrs["Content-Type"] = FHIR_JSON
        for attempt in (1, 2):
            if authenticate:
                hdrs.update(self.auth.headers(self))
            try:
                resp = session.request(method, url, params=params, data=body, headers=hdrs, stream=stream,
                                       timeout=self.connection.timeout, allow_redirects=False)
            except requests.exceptions.RetryError as e:
                raise EhrError(None, f"{self.connection.name}: {self._what(method, url)}: gave up after "
                                     f"{self.connection.max_attempts} attempts ({type(e.args[0]).__name__ if e.args else e})",
                               transient=True) from None
            except requests.exceptions.Timeout:
                raise EhrError(None, f"{self.connection.name}: {self._what(method, url)}: timed out after "
                                     f"{self.connection.max_attempts} attempt(s)", transient=True) from None
            except requests.exceptions.ConnectionError as e:
                raise EhrError(None, f"{self.connection.name}: {self._what(method, url)}: cannot connect "
                                     f"({_reason(e)})", transient=True) from None
            except requests.exceptions.RequestException as e:
                raise EhrError(None, f"{self.connection.name}: {self._what(method, url)}: {type(e).__name__}",
                               transient=True) from None
            log.debug("sync %s: %s -> %s", self.connection.name, self._what(method, url), resp.status_code)
            if resp.status_code == 401 and authenticate and self.auth.renewable and attempt == 1:
                resp.close()
                log.info("sync %s: 401 on %s; renewing the token once", self.connection.name, self._what(method, url))
                self.auth.invalidate()
                continue
            break
        if resp.status_code >= 400:
            raise self._error(method, url, resp)
        return resp

    def _error(self, method: str, url: str, resp: requests.Response) -> EhrError:
        status = resp.status_code
        outcome = None
        try:
            body = orjson.loads(resp.content[:1_000_000])
            if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
                outcome = body
        except orjson.JSONDecodeError:
            body = None
        said = outcome_text(outcome) if outcome else (
            body.get("error_description") or body.get("error") if isinstance(body, dict) and "error" in body
            else (resp.reason or ""))
        retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        return EhrError(status, f"{self.connection.name}: {self._what(method, url)}: HTTP {status}"
                                + (f": {said}" if said else ""),
                        retry_after=retry_after, transient=status in TRANSIENT_STATUSES, outcome=outcome)

    def _decode(self, method: str, url: str, resp: requests.Response) -> dict:
        try:
            body = orjson.loads(resp.content)
        except (orjson.JSONDecodeError, requests.exceptions.RequestException):
            raise EhrError(resp.status_code, f"{self.connection.name}: {self._what(method, url)}: the answer is "
                                             "not valid JSON", transient=True) from None
        if not isinstance(body, dict):
            raise EhrError(resp.status_code, f"{self.connection.name}: {self._what(method, url)}: the answer is "
                                             "not a JSON object", transient=True)
        return body

    def _sleep(self, attempt: int) -> None:
        c = self.connection
        time.sleep(min(c.backoff_max, c.backoff * 2 ** (attempt - 1)) + (random.random() if c.backoff else 0))

    def get_json(self, url: str, params=None, headers=None) -> dict:
        """GET a JSON body; a broken (non-JSON) body is fetched again, ``max_attempts`` in all."""
        for attempt in range(1, self.connection.max_attempts + 1):
            resp = self._request("GET", url, params=params, headers=headers)
            try:
                return self._decode("GET", url, resp)
            except EhrError:
                if attempt == self.connection.max_attempts:
                    raise
                log.warning("sync %s: %s: broken body, fetching again", self.connection.name, self._what("GET", url))
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def _write_result(self, resp: requests.Response) -> tuple[int, str | None, str | None]:
        location = resp.headers.get("Location") or resp.headers.get("Content-Location")
        version = None
        etag = resp.headers.get("ETag")
        if etag:
            version = etag.removeprefix("W/").strip('"')
        elif location and "/_history/" in location:
            version = location.rsplit("/_history/", 1)[1].split("/")[0]
        if version is None and resp.content:
            try:
                version = (orjson.loads(resp.content).get("meta") or {}).get("versionId")
            except (orjson.JSONDecodeError, AttributeError):
                pass
        return resp.status_code, location, version

    # -- discovery --------------------------------------------------------------------------------

    def capabilities(self) -> dict:
        """The EHR's CapabilityStatement (``GET [base]/metadata``; no token needed)."""
        return self.get_json(self.url("metadata"))

    def smart_configuration(self) -> dict:
        """``[base]/.well-known/smart-configuration`` (cached)."""
        if self._smart is None:
            resp = self._request("GET", self.url(".well-known/smart-configuration"), authenticate=False,
                                 headers={"Accept": "application/json"})
            self._smart = self._decode("GET", resp.url, resp)
        return self._smart

    def token_request(self, endpoint: str, form: dict, basic: tuple[str, str] | None = None) -> dict:
        """POST a form to a token endpoint (used by the authenticators); the answer's JSON."""
        s = urlsplit(endpoint)
        if s.scheme != "https" and s.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise EhrError(None, f"{self.connection.name}: the token endpoint must use https", transient=False)
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        if basic:
            hdrs["Authorization"] = requests.auth._basic_auth_str(*basic)
        resp = self._request("POST", endpoint, body=urlencode(form).encode(), headers=hdrs, authenticate=False)
        return self._decode("POST", endpoint, resp)

    # -- REST -------------------------------------------------------------------------------------

    def read(self, rtype: str, rid: str) -> dict:
        return self.get_json(self.url(f"{rtype}/{rid}"))

    def search(self, rtype: str, params=None, *, follow: bool = True) -> Iterator[Page]:
        """The result pages of a search (``_count`` = the page size unless given), following ``next``
        links. Paging may be offset-based at the EHR: a caller that needs every match even while
        the EHR changes should page by its own cursor (see ``fhir_iop.sync.pull``)."""
        items = list(params.items() if isinstance(params, dict) else params or ())
        if not any(k == "_count" for k, _ in items):
            items.append(("_count", str(self.connection.page_size)))
        headers = {"Prefer": "handling=strict"} if self.connection.strict else None
        url = self.url(rtype)
        sent = {k.split(":")[0] for k, _ in items} - _PAGING
        number, query = 0, items
        while url:
            body = self.get_json(url, params=query, headers=headers)
            if body.get("resourceType") != "Bundle":
                raise EhrError(200, f"{self.connection.name}: GET {rtype}: the answer is a "
                                    f"{body.get('resourceType')}, not a Bundle", transient=False)
            page = Page(body)
            number += 1
            page.number, page.url = number, url
            if number == 1:
                page.ignored = _ignored(page.link("self"), sent)
            yield page
            nxt = page.link("next") if follow else None
            url, query = (self.url(nxt) if nxt else None), None

    def update(self, resource: dict, if_match: str | None = None) -> tuple[int, str | None, str | None]:
        """PUT ``[type]/[id]``: (status, location, version)."""
        hdrs = {"If-Match": f'W/"{if_match}"'} if if_match else {}
        resp = self._request("PUT", self.url(f"{resource['resourceType']}/{resource['id']}"),
                             body=orjson.dumps(resource), headers=hdrs)
        return self._write_result(resp)

    def conditional_update(self, resource: dict, identifier, if_match: str | None = None
                           ) -> tuple[int, str | None, str | None]:
        """PUT ``[type]?identifier=system|value``: creates (201) or updates (200) the one match; 412
        when several match. ``identifier``: an Identifier dict or a ``system|value`` string. Safe to
        retry. Returns (status, location, version)."""
        if isinstance(identifier, dict):
            identifier = f"{identifier.get('system', '')}|{identifier['value']}"
        hdrs = {"If-Match": f'W/"{if_match}"'} if if_match else {}
        body = {k: v for k, v in resource.items() if k != "id"}  # the EHR picks or keeps its own id
        resp = self._request("PUT", self.url(resource["resourceType"]), params={"identifier": identifier},
                             body=orjson.dumps(body), headers={**hdrs, "Prefer": "return=minimal"})
        return self._write_result(resp)

    def transaction(self, bundle: dict, safe: bool | None = None) -> dict:
        """POST a transaction (or batch) Bundle; the response Bundle. Retried on 429/5xx only when
        ``safe`` (default: :func:`safe_transaction`)."""
        safe = safe_transaction(bundle) if safe is None else safe
        resp = self._request("POST", self.base, body=orjson.dumps(bundle), safe_post=safe,
                             headers={"Prefer": "return=minimal"})
        body = self._decode("POST", self.base, resp)
        if body.get("resourceType") != "Bundle":
            raise EhrError(resp.status_code, f"{self.connection.name}: POST /: the answer is not a Bundle",
                           transient=False)
        return body

    def delete(self, rtype: str, rid: str | None = None, params=None) -> int:
        """DELETE ``[type]/[id]`` or conditional ``[type]?params``; the status (200/202/204; 404 and
        410 count as done: deleting is idempotent)."""
        url = self.url(f"{rtype}/{rid}" if rid else rtype)
        try:
            resp = self._request("DELETE", url, params=None if rid else params)
        except EhrError as e:
            if e.status in (404, 410):
                return e.status
            raise
        return resp.status_code

    # -- Bulk Data --------------------------------------------------------------------------------

    def export_kickoff(self, types=None, since: str | None = None, level: str = "") -> str:
        """``GET [base]/[level]/$export`` with ``Prefer: respond-async``: the status URL."""
        params = {"_outputFormat": "application/fhir+ndjson"}
        if types:
            params["_type"] = ",".join(types)
        if since:
            params["_since"] = since
        path = f"{level.strip('/')}/$export" if level else "$export"
        resp = self._request("GET", self.url(path), params=params,
                             headers={"Prefer": "respond-async", "Accept": FHIR_JSON})
        if resp.status_code != 202 or not resp.headers.get("Content-Location"):
            raise EhrError(resp.status_code, f"{self.connection.name}: GET $export: expected 202 with "
                                             f"Content-Location, got {resp.status_code}", transient=False)
        return self.url(resp.headers["Content-Location"])

    def export_status(self, status_url: str) -> ExportStatus:
        """One poll of an export job: 202 in progress (``Retry-After``, ``X-Progress``), 200 done."""
        # 429 on a status poll is retried by the session; an error (4xx/5xx) raises EhrError
        for attempt in range(1, self.connection.max_attempts + 1):
            resp = self._request("GET", self.url(status_url), headers={"Accept": "application/json"})
            if resp.status_code == 202:
                return ExportStatus(False, retry_after_seconds(resp.headers.get("Retry-After")),
                                    resp.headers.get("X-Progress"))
            try:
                return ExportStatus(True, manifest=self._decode("GET", status_url, resp))
            except EhrError:
                if attempt == self.connection.max_attempts:
                    raise
                self._sleep(attempt)
        raise AssertionError("unreachable")

    def export_wait(self, status_url: str, max_wait: float = 3600.0, poll: float = 1.0) -> dict:
        """Poll until the export is done (honouring Retry-After, at most ``max_retry_after`` per wait);
        the manifest."""
        deadline = time.monotonic() + max_wait
        while True:
            st = self.export_status(status_url)
            if st.done:
                return st.manifest
            if time.monotonic() >= deadline:
                raise EhrError(202, f"{self.connection.name}: the export is not done after {max_wait:.0f}s "
                                    f"(progress: {st.progress or '?'})", transient=True)
            wait = st.retry_after if st.retry_after is not None else poll
            time.sleep(max(0.0, min(wait, self.connection.max_retry_after, deadline - time.monotonic())))
            poll = min(poll * 2, 30.0)

    def export_cancel(self, status_url: str) -> None:
        self.delete_url(status_url)

    def delete_url(self, url: str) -> None:
        try:
            self._request("DELETE", self.url(url))
        except EhrError as e:
            if e.status not in (404, 410):
                raise

    def download(self, file_url: str, requires_token: bool = True, skip: int = 0) -> Iterator[dict]:
        """The resources of one NDJSON file, streamed line by line (memory stays flat); ``skip``
        lines are passed over (resuming). A broken line is a transient error."""
        for number, line in self.download_lines(file_url, requires_token, skip):
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                raise EhrError(200, f"{self.connection.name}: bulk file line {number} is not JSON",
                               transient=True) from None

    def download_lines(self, file_url: str, requires_token: bool = True, skip: int = 0) -> Iterator[tuple[int, bytes]]:
        """(line number, line bytes) of an NDJSON file, streamed; blank lines left out."""
        if requires_token:
            url, authenticate = self.url(file_url), True
        else:
            url, authenticate = file_url, False  # e.g. a signed storage URL: no token goes there
        resp = self._request("GET", url, stream=True, authenticate=authenticate,
                             headers={"Accept": "application/fhir+ndjson"})
        number = 0
        try:
            for line in resp.iter_lines(chunk_size=64 * 1024):
                if not line.strip():
                    continue
                number += 1
                if number <= skip:
                    continue
                yield number, line
        except requests.exceptions.RequestException as e:
            raise EhrError(None, f"{self.connection.name}: bulk file download broke off after line {number} "
                                 f"({type(e).__name__})", transient=True) from None
        finally:
            resp.close()


def _reason(e: Exception) -> str:
    text = str(e.args[0] if e.args else e)
    for key in ("Connection refused", "Connection reset", "Name or service not known", "timed out",
                "RemoteDisconnected", "Max retries exceeded"):
        if key in text:
            return key
    return type(e).__name__


def _ignored(self_link: str | None, sent: set[str]) -> frozenset[str] | None:
    """The sent parameters missing from the self link (None: no self link or one without a query)."""
    if not self_link or "?" not in self_link:
        return None
    got = {k.split(":")[0] for k, _ in parse_qsl(urlsplit(self_link).query, keep_blank_values=True)}
    return frozenset(sent - got)
