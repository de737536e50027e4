"""Shared by the fuzz tests (tests/test_fuzz_*.py): case counting, the summary line, example budgets.

Not a conftest: the fuzz modules import it. The first fuzz test registers a small plugin that prints,
at the end of the run, how many cases each fuzzer ran and whether any of them failed::

    fuzz: 1840 cases, no 5xx, no crash (api.bodies 300, api.queries 340, readers.csv 200, …)

Budgets: each fuzzer runs ``max_examples`` cases, sized so that all of them together stay well under
a minute in CI; ``FHIR_IOP_FUZZ_EXAMPLES=N`` runs N cases per fuzzer (a long local run), and
``FHIR_IOP_FUZZ_EXAMPLES=0`` keeps the defaults.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from functools import lru_cache
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fhir_iop.store.params import RESOURCE_TYPES

ROOT = Path(__file__).resolve().parents[1]
CLINIC = ROOT / "examples" / "clinic"

COUNTS: Counter = Counter()
#: HTTP statuses the API fuzzers saw (printed with the summary: a fuzzer that only ever meets 404 tests little)
STATUSES: Counter = Counter()
FAILED: set[str] = set()


def examples(default: int) -> int:
    n = int(os.environ.get("FHIR_IOP_FUZZ_EXAMPLES") or 0)
    return n if n > 0 else default


def fuzz_settings(default: int):
    """hypothesis settings for one fuzzer: no deadline (a database is involved), no example database
    (nothing written to the checkout), the shared-app fixture allowed."""
    return settings(max_examples=examples(default), deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


class _Summary:
    def pytest_runtest_logreport(self, report):
        if "test_fuzz" in report.nodeid and report.failed:
            FAILED.add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter):
        if not COUNTS:
            return
        total = sum(COUNTS.values())
        parts = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        verdict = "no 5xx, no crash" if not FAILED else f"{len(FAILED)} fuzz test(s) FAILED"
        terminalreporter.write_sep("-", "fuzzing")
        terminalreporter.write_line(f"fuzz: {total} cases, {verdict} ({parts})")
        if STATUSES:
            terminalreporter.write_line("fuzz: API statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(STATUSES.items())))


_PLUGIN = _Summary()


@pytest.fixture(scope="session", autouse=False)
def fuzz_summary(request):
    """Registers the summary plugin once per session; use it (directly or through ``count``) in every fuzzer."""
    pm = request.config.pluginmanager
    if not pm.is_registered(_PLUGIN):
        pm.register(_PLUGIN, "fhir-iop-fuzz-summary")
    return COUNTS


@pytest.fixture
def count(fuzz_summary):
    """``count(name)``: one more case of fuzzer ``name``."""
    def add(name: str, n: int = 1) -> None:
        fuzz_summary[name] += n
    return add


# -- seeds: the example clinic as FHIR -------------------------------------------------------------

@lru_cache(maxsize=1)
def clinic() -> tuple[dict, ...]:
    from fhir_iop.errors import Problem
    from fhir_iop.pipeline import to_fhir
    return tuple(r for r in to_fhir([CLINIC]) if not isinstance(r, Problem))


@lru_cache(maxsize=1)
def seeds() -> tuple[dict, ...]:
    """A few resources of each type the clinic has (stable choice)."""
    by_type: dict[str, list[dict]] = {}
    for r in clinic():
        by_type.setdefault(r["resourceType"], []).append(r)
    rnd = random.Random(4)
    return tuple(r for rt in sorted(by_type) for r in rnd.sample(by_type[rt], min(3, len(by_type[rt]))))



# -- strategies ------------------------------------------------------------------------------------

WEIRD = ["", " ", "\u0000", "\t\n", "\x1b[31m", "ﾟ･✿ヾ╲(｡◕‿◕｡)╱✿･ﾟ", "𝄞", "\ufffd", "Patient/", "Patient/../x",
         "urn:uuid:", "urn:uuid:not-a-uuid", "../../etc/passwd", "2024-13-45", "9999-12-31T23:59:59Z", "0001-01-01",
         "2024-02-30", "-0", "1e309", "NaN", "<div>", "<!DOCTYPE x>", "&amp;", "%00", "' OR '1'='1", "\\",
         '"', "a" * 5000, "http://", "#", "Patient/" + "9" * 70, "x" * 65, "…", "⁦", "\u2028"]
FHIR_KEYS = ["resourceType", "id", "meta", "extension", "url", "valueString", "reference", "identifier", "system",
             "value", "code", "coding", "status", "subject", "patient", "period", "start", "end", "text", "div",
             "contained", "_birthDate", "security", "profile", "name", "family", "given", "entry", "resource",
             "request", "method", "fullUrl", "effectiveDateTime", "valueQuantity", "category", "encounter"]

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), st.sampled_from(WEIRD))
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) |
                          st.dictionaries(st.sampled_from(FHIR_KEYS) | st.text(max_size=8), c, max_size=4),
                          max_leaves=15)


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def _get(value, path):
    for p in path:
        value = value[p]
    return value


@st.composite
def mutated(draw, base=None):
    """A clinic resource with one to four random edits (delete, replace, insert, wrap, retype)."""
    res = orjson.loads(orjson.dumps(base or draw(st.sampled_from(seeds()))))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(paths(res))))
        op = draw(st.sampled_from(["delete", "replace", "insert", "wrap", "resourceType", "id"]))
        if op == "resourceType":
            res["resourceType"] = draw(st.sampled_from([*RESOURCE_TYPES, "Bundle", "Nonsense", "", "patient"]))
        elif op == "id":
            res["id"] = draw(st.sampled_from(WEIRD) | st.text(max_size=70))
        elif not path:
            continue
        else:
            parent, key = _get(res, path[:-1]), path[-1]
            if op == "delete":
                del parent[key]
            elif op == "replace":
                parent[key] = draw(json_value)
            elif op == "wrap":
                parent[key] = [parent[key]]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(FHIR_KEYS) | st.text(max_size=8))] = draw(json_value)
            else:
                parent.append(draw(json_value))
    return res


def encode(res) -> bytes:
    """JSON bytes of anything the strategies make (the stdlib writes the integers orjson cannot)."""
    try:
        return orjson.dumps(res, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        import json
        return json.dumps(res, ensure_ascii=False).encode("utf-8", "surrogatepass")




def damage(draw, data: bytes, inserts: list[bytes], most: int = 3) -> bytes:
    """``data`` with up to ``most`` byte-level edits: a flipped byte, a cut, an insert from ``inserts``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, most))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del buf[pos:pos + draw(st.integers(1, 80))]
        else:
            buf[pos:pos] = draw(st.sampled_from(inserts))
    return bytes(buf)
