"""JSON and XML on the wire: what the client asked for, what it sent, and the response in that format.

Output format: ``_format`` (json, xml or a MIME type) wins over ``Accept``; the default is JSON.
Input: ``Content-Type`` application/fhir+json, application/json, application/fhir+xml,
application/xml or text/xml, else 415. Resource bodies already stored as JSON text are sent as
they are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import orjson
from flask import Response, request

from fhir_iop.fhir import r4
from server.errors import FhirHttpError

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
XML_TYPES = ("application/fhir+xml", "application/xml", "application/xml+fhir", "text/xml")
FORMAT_NAMES = {"json": "json", "xml": "xml", "html": "json", "text/html": "json"}
CONTENT_TYPE = {"json": "application/fhir+json; charset=utf-8", "xml": "application/fhir+xml; charset=utf-8"}


def wanted() -> str:
    """``json`` or ``xml``: the format the response goes out in."""
    fmt = request.args.get("_format")
    if fmt:
        f = fmt.split(";")[0].strip().lower().replace(" ", "+")  # an unescaped + arrives as a space
        if f in FORMAT_NAMES:
            return FORMAT_NAMES[f]
        if f in JSON_TYPES:
            return "json"
        if f in XML_TYPES:
            return "xml"
        return "json"  # an unknown _format must not hide the answer (errors included)
    best = request.accept_mimetypes.best_match(JSON_TYPES + XML_TYPES)
    return "xml" if best in XML_TYPES else "json"


def read_body() -> dict:
    """The request body as a JSON-shaped dict; 415 for other media types, 400 if it does not parse."""
    mime = (request.mimetype or "").lower()
    data = request.get_data(cache=True)
    if mime in JSON_TYPES:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise FhirHttpError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise FhirHttpError(400, "the body is not a JSON object")
        return value
    if mime in XML_TYPES:
        try:
            return r4.from_xml_element(r4.parse_xml(data))
        except Exception as e:  # lxml syntax errors and structural errors alike
            raise FhirHttpError(400, f"the body is not FHIR XML: {e}") from None
    raise FhirHttpError(415, f"Content-Type {request.mimetype or '(none)'} is not supported: send "
                             "application/fhir+json or application/fhir+xml")


def http_date(dt: datetime) -> str:
    return format_datetime(dt.replace(tzinfo=UTC), usegmt=True)


def respond(body, status: int = 200, headers: dict | None = None, fmt: str | None = None) -> Response:
    """A response in the wanted format; ``body`` is a dict, JSON bytes/text, or None (no body)."""
    headers = dict(headers or {})
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
    return Response(data, status=status, headers=headers, content_type=CONTENT_TYPE[fmt])


def prefer() -> dict[str, str]:
    """The ``Prefer`` header as a dict (``return``, ``handling``…)."""
    out = {}
    for part in request.headers.get("Prefer", "").split(","):
        k, _, v = part.strip().partition("=")
        if k:
            out[k.strip().lower()] = v.strip().strip('"').lower()
    return out


def if_match() -> int | None:
    """The version an ``If-Match`` header names (``W/"3"``, ``"3"`` or ``3``)."""
    value = request.headers.get("If-Match")
    if value is None:
        return None
    v = value.strip().removeprefix("W/").strip('"')
    if not v.isdigit():
        raise FhirHttpError(400, f"If-Match {value!r} is not a version ETag such as W/\"3\"")
    return int(v)
