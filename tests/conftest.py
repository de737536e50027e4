"""Session-wide log capture for the PHI scan (tests/test_log_phi.py).

Every record any logger emits during the run reaches ``CAPTURED`` (as formatted text, exception
text included); the application's loggers log at DEBUG. ``pytest_sessionfinish`` scans everything
once more after the last test, writes ``log-phi-report.txt`` in pytest's base temp directory and
fails the run if it finds a name, birth date or MRN of the example clinic.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

CLINIC = Path(__file__).resolve().parents[1] / "examples" / "clinic"
#: the application's loggers, logged at DEBUG during the run (third-party ones keep their level)
APP_LOGGERS = ("fhir_iop", "server", "werkzeug", "flask", "urllib3", "gunicorn")
CAPTURED: list[str] = []


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            CAPTURED.append(f"{record.name}:{record.levelname}: {self.format(record)}")
        except Exception as e:  # a record that cannot be formatted is kept as what we know of it
            CAPTURED.append(f"{record.name}:{record.levelname}: {record.msg!r} {record.args!r} ({type(e).__name__})")


HANDLER = _Capture(logging.DEBUG)
HANDLER.setFormatter(logging.Formatter("%(message)s"))


def phi_terms(extra: tuple[str, ...] = ()) -> dict[str, re.Pattern]:
    """The example clinic's family and given names, birth dates and MRNs (clients.csv) as whole-word,
    case-sensitive patterns, plus ``extra`` terms."""
    terms: set[str] = set(extra)
    with (CLINIC / "clients.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            terms.update(t for t in (row["mrn"], row["family_name"], row["birth_date"]) if t)
            terms.update(g for g in row["given_names"].split("|") if g)
    return {t: re.compile(rf"(?<![\w-]){re.escape(t)}(?![\w-])") for t in sorted(terms)}


def phi_hits(lines: list[str], extra: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(term, line) for every captured line that holds a term."""
    patterns = phi_terms(extra)
    return [(t, line) for line in lines for t, p in patterns.items() if t in line and p.search(line)]


def pytest_configure(config):
    logging.getLogger().addHandler(HANDLER)
    for name in APP_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)


def pytest_sessionfinish(session, exitstatus):
    logging.getLogger().removeHandler(HANDLER)
    hits = phi_hits(CAPTURED)
    try:
        base = session.config._tmp_path_factory.getbasetemp()
    except Exception:  # no tmp_path factory (plugin disabled)
        base = Path(".")
    report = Path(base) / "log-phi-report.txt"
    lines = [f"{len(CAPTURED)} log record(s) scanned for the example clinic's names, birth dates and MRNs; "
             f"{len(hits)} hit(s)"] + [f"{t!r} in: {line[:500]}" for t, line in hits[:200]]
    try:
        report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError:
        pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"log PHI scan: {lines[0]} (report: {report})")
    if hits:
        session.exitstatus = 1
