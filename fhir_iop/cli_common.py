"""What every ``fhir-iop`` command group shares: exit codes, the library-error guard, the run context."""

from __future__ import annotations

import functools
import sys

import click

from fhir_iop.errors import FhirIopError

EXIT_OK, EXIT_REJECTED, EXIT_ERROR = 0, 1, 2


def guard(fn):
    """Library errors become a message and exit code 2; nothing else is caught."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FhirIopError as e:
            click.echo(f"fhir-iop: {e}", err=True)
            sys.exit(EXIT_ERROR)
    return wrapper


def mapping_context(mappings: str | None):
    """Site settings and code tables for one run (shipped ones, overridden by ``mappings``)."""
    from fhir_iop.mapping.common import MappingContext
    from fhir_iop.settings import load_settings
    from fhir_iop.terminology import load_terminology
    return MappingContext(settings=load_settings(mappings), terminology=load_terminology(mappings))
