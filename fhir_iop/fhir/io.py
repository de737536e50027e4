"""FHIR JSON, NDJSON and XML in and out, for the CLI and the tests.

Readers yield ``(where, resource, full_url)`` or a :class:`Problem` per resource; writers stream
a transaction or collection Bundle (JSON or XML) or NDJSON per resource type.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

import orjson
from lxml import etree

from fhir_iop.errors import InputError, Problem
from fhir_iop.fhir import r4

JSON_SUFFIXES = (".json",)
NDJSON_SUFFIXES = (".ndjson", ".jsonl")
XML_SUFFIXES = (".xml",)


def _label(resource: dict, n: int | None = None) -> str:
    rt = resource.get("resourceType", "?") if isinstance(resource, dict) else "?"
    rid = resource.get("id") if isinstance(resource, dict) else None
    return f"{rt}/{rid}" if rid else (f"{rt} (entry {n})" if n is not None else rt)


def _from_value(path: Path, value) -> Iterator[tuple[str, dict, str | None] | Problem]:
    if not isinstance(value, dict) or "resourceType" not in value:
        yield Problem(str(path), "not a FHIR resource (no resourceType)")
        return
    if value["resourceType"] == "Bundle":
        for n, entry in enumerate(value.get("entry", ())):
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(res, dict) or "resourceType" not in res:
                if isinstance(entry, dict) and entry.get("request", {}).get("method") == "DELETE":
                    yield Problem(f"{path}: entry {n}", "DELETE entries carry no record", severity="warning",
                                  code="not-supported")
                else:
                    yield Problem(f"{path}: entry {n}", "entry has no resource")
                continue
            yield f"{path}: {_label(res, n)}", res, entry.get("fullUrl")
    else:
        yield f"{path}: {_label(value)}", value, None


def read_fhir(path: Path) -> Iterator[tuple[str, dict, str | None] | Problem]:
    """Resources in a Bundle, a single resource (JSON or XML) or NDJSON."""
    suffix = path.suffix.lower()
    try:
        if suffix in NDJSON_SUFFIXES:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        value = orjson.loads(line)
                    except orjson.JSONDecodeError as e:
                        yield Problem(f"{path}:{n}", f"not valid JSON: {e}")
                        continue
                    for item in _from_value(path, value):
                        if isinstance(item, tuple):
                            yield f"{path}:{n}: {_label(item[1])}", item[1], item[2]
                        else:
                            yield item
        elif suffix in JSON_SUFFIXES:
            try:
                value = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as e:
                yield Problem(str(path), f"not valid JSON: {e}")
                return
            yield from _from_value(path, value)
        elif suffix in XML_SUFFIXES:
            yield from _read_xml(path)
        else:
            yield Problem(str(path), "unknown file format: use .json, .ndjson or .xml")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from e


def _read_xml(path: Path):
    try:
        root = r4.parse_xml(path.read_bytes())
    except (etree.XMLSyntaxError, ValueError) as e:
        yield Problem(str(path), f"not FHIR XML: {e}")
        return
    ns = f"{{{r4.XML_NS}}}"
    if root.tag == f"{ns}Bundle":
        for n, entry in enumerate(root.iterfind(f"{ns}entry")):
            full = entry.find(f"{ns}fullUrl")
            res = entry.find(f"{ns}resource")
            if res is None or len(res) == 0:
                yield Problem(f"{path}: entry {n}", "entry has no resource")
                continue
            try:
                d = r4.from_xml_element(res[0])
            except Exception as e:  # a structural error in one entry
                yield Problem(f"{path}: entry {n}", f"not a valid R4 resource: {e}")
                continue
            yield f"{path}: {_label(d, n)}", d, full.get("value") if full is not None else None
    else:
        try:
            d = r4.from_xml_element(root)
        except Exception as e:
            yield Problem(str(path), f"not a valid R4 resource: {e}")
            return
        yield f"{path}: {_label(d)}", d, None


# -- writers --------------------------------------------------------------------------------------

class BundleWriter:
    """Streams a transaction (PUT per resource: re-sending is idempotent) or collection Bundle."""

    def __init__(self, stream: typing.BinaryIO, bundle_type: str = "transaction", encoding: str = "json"):
        self.stream, self.type, self.encoding, self.first = stream, bundle_type, encoding, True
        if encoding == "json":
            stream.write(b'{"resourceType":"Bundle","type":"' + bundle_type.encode() + b'","entry":[')
        else:
            stream.write(b'<?xml version="1.0" encoding="UTF-8"?>\n<Bundle xmlns="http://hl7.org/fhir">'
                         b'<type value="' + bundle_type.encode() + b'"/>')

    def write(self, resource: dict) -> None:
        full_url = f"urn:uuid:{resource['id']}"
        if self.encoding == "json":
            entry = {"fullUrl": full_url, "resource": resource}
            if self.type == "transaction":
                entry["request"] = {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
            self.stream.write((b"" if self.first else b",") + orjson.dumps(entry))
        else:
            req = b""
            if self.type == "transaction":
                req = (b'<request><method value="PUT"/><url value="' + resource["resourceType"].encode()
                       + b"/" + resource["id"].encode() + b'"/></request>')
            self.stream.write(b'<entry><fullUrl value="' + full_url.encode() + b'"/><resource>'
                              + r4.to_xml(resource) + b"</resource>" + req + b"</entry>")
        self.first = False

    def close(self) -> None:
        self.stream.write(b"]}\n" if self.encoding == "json" else b"</Bundle>\n")


class NdjsonWriter:
    """One ``<ResourceType>.ndjson`` per type in a directory, as FHIR Bulk Data lays them out."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, typing.BinaryIO] = {}

    def write(self, resource: dict) -> None:
        rt = resource["resourceType"]
        f = self.files.get(rt)
        if f is None:
            f = self.files[rt] = open(self.dir / f"{rt}.ndjson", "wb")
        f.write(orjson.dumps(resource) + b"\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()
