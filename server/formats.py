"""JSON and XML on the wire: what the client asked for, what it sent, and the response in that format.

Output format: ``_format`` (json, xml or a MIME type) wins over ``Accept``; the default is JSON.
A ``_format`` we do not know, or an ``Accept`` header that admits neither FHIR JSON nor FHIR XML
(``*/*``, ``application/*`` and ``text/html`` do), is refused with 406 before anything is done.
Input: ``Content-Type`` application/fhir+json, application/json, application/fhir+xml,
application/xml or text/xml, else 415. Resource bodies already stored as JSON text are sent as
they are.

Hardened input (every refusal an OperationOutcome):

- body size: ``MAX_CONTENT_LENGTH`` (64 MiB by default) → 413, with or without ``Content-Length``
  (a chunked body is cut off while it is read);
- JSON: UTF-8 only (orjson refuses anything else and lone surrogates); nesting deeper than
  ``MAX_JSON_DEPTH`` (default 100; the deepest FHIR resource in practice is far below that) → 400;
  strings and names holding control characters below U+0020 other than tab, CR and LF → 400 (the
  FHIR ``string`` type excludes them, and PostgreSQL cannot store NUL); **duplicate names in one
  object → 400**: RFC 8259 leaves their meaning to the parser, so a body such as
  ``{"meta": {"security": […]}, "meta": {}}`` could mean different things to different readers
  of the same bytes; we do not guess which one the sender meant;
- XML: the safe parser of :mod:`fhir_iop.fhir.r4` (no entities, DTD or network; a DOCTYPE is
  refused → 400);
- the path and query string: invalid UTF-8 or control characters → 400, checked after
  authentication (see :func:`init_app`).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from functools import lru_cache
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import unquote_to_bytes

import orjson
from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from fhir_iop.fhir import r4
from server.errors import FhirHttpError

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
XML_TYPES = ("application/fhir+xml", "application/xml", "application/xml+fhir", "text/xml")
FORMAT_NAMES = {"json": "json", "xml": "xml", "html": "json", "text/html": "json"}
CONTENT_TYPE = {"json": "application/fhir+json; charset=utf-8", "xml": "application/fhir+xml; charset=utf-8"}


def negotiate() -> str | None:
    """``json`` or ``xml`` as asked for by ``_format`` / ``Accept``; None when nothing we produce is acceptable
    (worked out once per request)."""
    gg = g._get_current_object()  # (one context lookup)
    cached = gg.get("fhir_iop_format", False)
    if cached is not False:
        return cached
    gg.fhir_iop_format = found = _negotiate()
    return found


#: Accept values that settle on JSON at once (what most clients send)
_ANY = ("", "*/*", "application/fhir+json", "application/json", "application/fhir+json, */*", "*/*;q=0.8")


def _negotiate() -> str | None:
    fmt = request.args.get("_format") if request.query_string else None
    if fmt:
        f = fmt.split(";")[0].strip().lower().replace(" ", "+")  # an unescaped + arrives as a space
        if f in FORMAT_NAMES:
            return FORMAT_NAMES[f]
        if f in JSON_TYPES:
            return "json"
        if f in XML_TYPES:
            return "xml"
        return None
    if request.environ.get("HTTP_ACCEPT", "").strip() in _ANY:
        return "json"
    best = request.accept_mimetypes.best_match(JSON_TYPES + XML_TYPES)
    if best is None:
        return "json" if request.accept_mimetypes.best_match(("text/html",)) else None  # browsers
    return "xml" if best in XML_TYPES else "json"


def wanted() -> str:
    """``json`` or ``xml``: the format the response goes out in (JSON when negotiation failed: the 406
    OperationOutcome itself must go out in something)."""
    return negotiate() or "json"


#: control characters FHIR strings cannot hold (all of C0 except tab, LF, CR)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _no_duplicates(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FhirHttpError(400, f"the body has the name {dup[:64]!r} twice in one JSON object; duplicate names "
                                 "are refused (their meaning depends on the parser)")
    return d


def check_json(value, max_depth: int) -> int:
    """400 for nesting deeper than ``max_depth`` or control characters in a string or name (iterative:
    a hostile body cannot exhaust the Python stack). Returns the number of names in all objects."""
    names = 0
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            raise FhirHttpError(400, f"the JSON body is nested deeper than {max_depth} levels")
        if isinstance(v, dict):
            names += len(v)
            for k, item in v.items():
                if _CONTROL.search(k):
                    raise FhirHttpError(400, "a JSON name holds a control character (U+0000-U+001F other than "
                                             "tab, CR, LF)")
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str) and _CONTROL.search(item):
                    raise FhirHttpError(400, f"the value of {k[:64]!r} holds a control character (U+0000-U+001F "
                                             "other than tab, CR, LF), which FHIR strings cannot contain")
        elif isinstance(v, list):
            for item in v:
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif isinstance(item, str) and _CONTROL.search(item):
                    raise FhirHttpError(400, "a JSON string holds a control character (U+0000-U+001F other "
                                             "than tab, CR, LF), which FHIR strings cannot contain")
    return names


#: every JSON string of a valid document, in order, with the ``:`` that makes it a name. Scanning a
#: document orjson accepted, each match starts at a real string (no ``"`` occurs outside strings), and
#: a string followed by ``:`` is always a name.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"([ \t\r\n]*:)?')


def parse_json(data: bytes, max_depth: int = 100) -> dict:
    """A FHIR JSON body as a dict, refused (400) as the module docstring lists."""
    try:
        value = orjson.loads(data)  # strict UTF-8, no lone surrogates, its own depth cap (1024)
    except orjson.JSONDecodeError as e:
        raise FhirHttpError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise FhirHttpError(400, "the body is not a JSON object")
    names = check_json(value, max_depth)
    found = _STRING.findall(data)
    if len(found) - found.count(b"") != names:  # fewer names parsed than written: some name came twice
        json.loads(data, object_pairs_hook=_no_duplicates)  # which one (the stdlib keeps every pair)
        raise FhirHttpError(400, "the body has a name twice in one JSON object")
    return value


def read_body() -> dict:
    """The request body as a JSON-shaped dict; 415 for other media types, 400 if it does not parse or is
    refused, 413 if it is larger than ``MAX_CONTENT_LENGTH``."""
    mime = (request.mimetype or "").lower()
    data = request.get_data(cache=True)  # werkzeug raises 413 when Content-Length is past MAX_CONTENT_LENGTH
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit and request.content_length is None and len(data) >= limit:
        # a chunked body: werkzeug's LimitedStream stops at the limit and returns what it has, cut
        raise RequestEntityTooLarge()
    if mime in JSON_TYPES:
        return parse_json(data, int(current_app.config.get("MAX_JSON_DEPTH") or 100))
    if mime in XML_TYPES:
        try:
            return r4.from_xml_element(r4.parse_xml(data))
        except r4.XmlRefused as e:
            raise FhirHttpError(400, f"the XML body is refused: {e}", "security") from None
        except Exception as e:  # lxml syntax errors and structural errors alike
            raise FhirHttpError(400, f"the body is not FHIR XML: {e}") from None
    raise FhirHttpError(415, f"Content-Type {request.mimetype or '(none)'} is not supported: send "
                             "application/fhir+json or application/fhir+xml")


@lru_cache(maxsize=4096)
def http_date(dt: datetime) -> str:
    return format_datetime(dt.replace(tzinfo=UTC), usegmt=True)


def respond(body, status: int = 200, headers: dict | None = None, fmt: str | None = None) -> Response:
    """A response in the wanted format; ``body`` is a dict, JSON bytes/text, or None (no body)."""
    if body is None:
        return Response(b"", status=status, headers=headers)
    try:
        fmt = fmt or wanted()
    except RuntimeError:
        fmt = "json"
    if fmt == "xml":
        value = orjson.loads(body) if isinstance(body, (bytes, str)) else body
        try:
            data = b'<?xml version="1.0" encoding="UTF-8"?>\n' + r4.to_xml(value)
        except Exception:  # content that fhir.resources cannot render as XML goes out as JSON
            fmt, data = "json", orjson.dumps(value)
    else:
        data = body.encode() if isinstance(body, str) else body if isinstance(body, bytes) else orjson.dumps(body)
    # (a list of pairs: werkzeug takes it in with less work than a dict)
    return Response(data, status, [*(headers or {}).items(), ("Content-Type", CONTENT_TYPE[fmt])])


def prefer(environ: dict | None = None) -> dict[str, str]:
    """The ``Prefer`` header as a dict (``return``, ``handling``…), of this request or ``environ``."""
    out: dict[str, str] = {}
    value = (environ or request.environ).get("HTTP_PREFER")
    if not value:
        return out
    for part in value.split(","):
        k, _, v = part.strip().partition("=")
        if k:
            out[k.strip().lower()] = v.strip().strip('"').lower()
    return out


def not_modified(version_id: int, last_updated: datetime, environ: dict | None = None) -> bool:
    """Conditional read: true when ``If-None-Match`` names the current version (or ``*``), or, without
    it, when nothing changed since ``If-Modified-Since`` (HTTP dates have whole seconds; an unparsable
    date is ignored, as RFC 9110 says). Of this request or ``environ``."""
    env = environ or request.environ
    inm = env.get("HTTP_IF_NONE_MATCH")
    if inm is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in inm.split(",")}
        return "*" in tags or str(version_id) in tags
    ims = env.get("HTTP_IF_MODIFIED_SINCE")
    if ims:
        try:
            since = parsedate_to_datetime(ims)
        except (TypeError, ValueError, IndexError):
            return False
        if since.tzinfo is None:
            return False  # not an HTTP date (they are GMT)
        return last_updated.replace(tzinfo=UTC, microsecond=0) <= since
    return False


def if_match() -> int | None:
    """The version an ``If-Match`` header names (``W/"3"``, ``"3"`` or ``3``)."""
    value = request.headers.get("If-Match")
    if value is None:
        return None
    v = value.strip().removeprefix("W/").strip('"')
    if not v.isdigit():
        raise FhirHttpError(400, f"If-Match {value!r} is not a version ETag such as W/\"3\"")
    return int(v)


# -- checks on every request ----------------------------------------------------------------------

def _decodes(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not _CONTROL.search(text)


#: endpoints whose answers are not FHIR JSON/XML, so ``Accept`` is theirs to judge: Bulk Data NDJSON files
#: (``Accept: application/fhir+ndjson``), the SMART configuration, token endpoint and JWKS (OAuth JSON)
OWN_MEDIA_TYPES = {"export.download", "smart.configuration", "smart.token", "smart.jwks"}


def check_request() -> None:
    """400 for a path or query string that is not UTF-8 or holds control characters; 406 when the client
    accepts nothing we produce. Runs before the view, so nothing is written for a request refused here."""
    req = request._get_current_object()
    path = req.environ.get("PATH_INFO", "")
    if not _decodes(path.encode("latin-1", "replace")) or "\ufffd" in req.path:  # (as a test client decodes)
        raise FhirHttpError(400, "the request path is not UTF-8 or holds control characters")
    if req.query_string and not _decodes(unquote_to_bytes(req.query_string)):
        raise FhirHttpError(400, "the query string is not UTF-8 or holds control characters")
    if negotiate() is None and req.endpoint not in OWN_MEDIA_TYPES:
        raise FhirHttpError(406, "the response can be FHIR JSON (application/fhir+json) or FHIR XML "
                                 "(application/fhir+xml); _format or Accept asks for neither")


def init_app(app: Flask) -> None:
    """Register :func:`check_request`. ``create_app`` calls this last, so it runs after the authorization
    layer: an unauthenticated request gets 401 whatever else is wrong with it."""
    app.config.setdefault("MAX_JSON_DEPTH", 100)
    # werkzeug would answer "/Patient//x" with an HTML 308 to "/Patient/x" (Flask hands routing redirects
    # to the client without the error handler); FHIR ids hold no "/", so such a path is a 404 like any other
    app.url_map.merge_slashes = False
    app.before_request(check_request)
