"""Fuzzing the file readers of the command line (hypothesis): IOP records as CSV and NDJSON, FHIR as a
JSON Bundle, NDJSON and XML — each derived from the example clinic, then damaged (lines dropped,
duplicated or swapped, cells replaced, bytes flipped, cut or inserted, hostile XML prologues).

The property: no crash. A reader and the mapping behind it yield resources/records or
:class:`~fhir_iop.errors.Problem`\\ s naming the file; a file that cannot be read at all raises
:class:`~fhir_iop.errors.InputError` naming it; the commands (``map to-fhir``, ``map from-fhir``,
``validate``) end with their documented exit codes (0, 1, 2), never with a traceback. The number of
cases is printed at the end of the run (tests/conftest_fuzz.py).
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from conftest_fuzz import CLINIC, WEIRD, count, damage, encode, fuzz_settings, fuzz_summary, mutated, seeds  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

from fhir_iop.cli import main
from fhir_iop.errors import InputError, Problem
from fhir_iop.fhir.io import BundleWriter, read_fhir
from fhir_iop.mapping.common import MappingContext

CSV_FILES = sorted(p.name for p in CLINIC.glob("*.csv"))
CELLS = ['"unterminated', 'a"b', "", " ", "|||", ";@;", "a@b@c@d", "2024-13-45", "2026-02-30", "-1", "NaN", "1e999",
         "\x00", "x" * 3000, "Ñúñez", "=cmd|' /C calc'!A0", "true", "yes", "F11.20|F10.20", "active@2026-01-05;x@y",
         "\t", "M100001", "C-1", "99999999999999999999"]


@lru_cache(maxsize=None)
def head_lines(name: str, n: int = 12) -> tuple[str, ...]:
    """The header and the first ``n`` records of a clinic file (small inputs keep each case fast)."""
    return tuple((CLINIC / name).read_text(encoding="utf-8").splitlines()[: n + 1])


@lru_cache(maxsize=None)
def ndjson_lines(name: str) -> tuple[bytes, ...]:
    from fhir_iop.records.io import dump_records, read_records, record_type_for
    from fhir_iop.records.model import default_context
    ctx = MappingContext()
    path = CLINIC / name
    recs = [r for _, r in (x for x in read_records(path, default_context(ctx.settings.timezone, ctx.terminology))
                           if not isinstance(x, Problem))][:12]
    return tuple(dump_records(recs, record_type_for(path), "ndjson").splitlines())


def line_edits(draw, lines: list, weird_line) -> list:
    for _ in range(draw(st.integers(0, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["drop", "dup", "swap", "weird", "cell"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "weird":
            lines[i] = draw(weird_line)
        else:
            lines[i] = draw(edit_cells(lines[i]))
    return lines


@st.composite
def edit_cells(draw, line):
    if isinstance(line, bytes):  # an NDJSON record: a JSON-level edit
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            return line
        if isinstance(rec, dict) and rec:
            key = draw(st.sampled_from(sorted(rec)))
            rec[key] = draw(st.sampled_from(CELLS) | st.none() | st.integers() | st.lists(st.sampled_from(CELLS),
                                                                                         max_size=3))
        return encode(rec)
    cells = line.split(",")
    i = draw(st.integers(0, len(cells)))
    op = draw(st.sampled_from(["replace", "add", "remove"]))
    if op == "replace" and i < len(cells):
        cells[i] = draw(st.sampled_from(CELLS))
    elif op == "add":
        cells.insert(i, draw(st.sampled_from(CELLS)))
    elif cells:
        cells.pop(min(i, len(cells) - 1))
    return ",".join(cells)


@st.composite
def record_file(draw, fmt: str):
    name = draw(st.sampled_from(CSV_FILES))
    if fmt == "csv":
        lines = line_edits(draw, list(head_lines(name)), st.sampled_from(CELLS) | st.text(max_size=40))
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        data = (eol.join(lines) + eol).encode("utf-8", "surrogatepass")
        suffix = ".csv"
    else:
        lines = line_edits(draw, list(ndjson_lines(name)), st.sampled_from([b"{", b"[]", b"null", b'"x"', b"{}",
                                                                            b'{"a":1,"a":2}', b"\xff"]))
        data = b"\n".join(lines) + b"\n"
        suffix = ".ndjson"
    data = damage(draw, data, [b'"', b"\x00", b"\r", b"\n", b",", b"\xff", b"\xef\xbb\xbf", b"|", b";", b"@", b"{",
                               b"}", b"\\"], most=2)
    return name.removesuffix(".csv") + suffix, data


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash: hypothesis shows the input that caused it
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def consume(items, path: Path) -> None:
    """Every item a resource/record or a Problem naming ``path``; InputError (naming it) for unreadable files."""
    try:
        for item in items:
            if isinstance(item, Problem):
                assert str(path) in item.where, item
                assert item.message
            elif isinstance(item, tuple):  # read_fhir: (where, resource, fullUrl)
                where, res, _ = item
                assert str(path) in where and isinstance(res, dict) and "resourceType" in res, item
            else:  # a FHIR resource (to_fhir) or an IOP record (from_fhir)
                assert isinstance(item, dict) and isinstance(item.get("resourceType"), str) \
                    or hasattr(item, "model_dump"), item
    except InputError as e:
        assert str(path) in str(e), e


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_fuzz_iop_record_files(tmp_path_factory, count, fmt):
    from fhir_iop.pipeline import to_fhir

    @fuzz_settings(100 if fmt == "csv" else 60)
    @given(record_file(fmt), st.booleans())
    def run(item, through_cli):
        name, data = item
        d = tmp_path_factory.mktemp("rec")
        path = d / name
        path.write_bytes(data)
        if through_cli:
            run_cli("map", "to-fhir", path, "-o", d / "out.json", "--problems", d / "problems.json")
        else:
            consume(to_fhir([path], MappingContext()), path)
        count(f"readers.{fmt}-records")
    run()


# -- FHIR files --------------------------------------------------------------------------------------

def bundle_bytes(resources: list[dict], encoding: str) -> bytes:
    buf = io.BytesIO()
    w = BundleWriter(buf, "transaction", encoding)
    for r in resources:
        w.write(r)
    w.close()
    return buf.getvalue()


@st.composite
def fhir_file(draw):
    kind = draw(st.sampled_from(["bundle-json", "ndjson", "resource-json", "bundle-xml", "resource-xml"]))
    picked = draw(st.lists(st.sampled_from(seeds()), min_size=1, max_size=6, unique_by=lambda r: r["id"]))
    if kind != "bundle-xml" and kind != "resource-xml":
        picked = [draw(mutated(r)) if draw(st.booleans()) else r for r in picked]
    if kind == "bundle-json":
        bundle = {"resourceType": "Bundle", "type": "transaction",
                  "entry": [{"fullUrl": f"urn:uuid:{r.get('id')}", "resource": r,
                             "request": {"method": "PUT", "url": f"{r.get('resourceType')}/{r.get('id')}"}}
                            for r in picked]}
        if draw(st.booleans()):
            bundle["entry"].append(draw(st.sampled_from([None, 1, "x", {}, {"resource": []},
                                                         {"request": {"method": "DELETE", "url": "Patient/x"}},
                                                         {"resource": {"resourceType": "Bundle", "entry": [{}]}}])))
        data, suffix = encode(bundle), ".json"
    elif kind == "ndjson":
        data, suffix = b"\n".join(encode(r) for r in picked) + b"\n", ".ndjson"
    elif kind == "resource-json":
        data, suffix = encode(picked[0]), ".json"
    else:
        data = bundle_bytes(picked, "xml") if kind == "bundle-xml" else \
            b'<?xml version="1.0" encoding="UTF-8"?>\n' + _xml(picked[0])
        prologue = draw(st.sampled_from([b"", b'<!DOCTYPE Bundle [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
                                         b'<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>']))
        if prologue:
            data = data.replace(b"?>\n", b"?>\n" + prologue + b"\n", 1)
        suffix = ".xml"
    inserts = [b"<x/>", b"&x;", b"&#0;", b"<![CDATA[", b"\xff", b'"', b"{", b"]", b"\x00", b"null",
               *(w.encode("utf-8", "surrogatepass") for w in WEIRD[:8])]
    return suffix, damage(draw, data, inserts, most=2)


def _xml(res: dict) -> bytes:
    from fhir_iop.fhir import r4
    return r4.to_xml(res)


def test_fuzz_fhir_files(tmp_path_factory, count):
    from fhir_iop.pipeline import from_fhir

    @fuzz_settings(80)
    @given(fhir_file(), st.sampled_from(["read", "from-fhir", "cli-from-fhir", "cli-validate"]))
    def run(item, how):
        suffix, data = item
        d = tmp_path_factory.mktemp("fhir")
        path = d / f"input{suffix}"
        path.write_bytes(data)
        if how == "read":
            consume(read_fhir(path), path)
        elif how == "from-fhir":
            consume(from_fhir([path], MappingContext()), path)
        elif how == "cli-from-fhir":
            run_cli("map", "from-fhir", path, "--out", d / "records")
        else:
            code, out = run_cli("validate", path)
            if code == 2:
                assert str(path) in out, out
        count(f"readers.fhir{suffix}")
    run()
