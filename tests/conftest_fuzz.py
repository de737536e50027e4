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
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

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
