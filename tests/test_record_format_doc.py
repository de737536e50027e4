"""The documented record format is the one the code accepts."""

from pathlib import Path

from fhir_iop.records.doc import record_format_markdown
from fhir_iop.records.model import RECORD_TYPES

DOC = Path(__file__).resolve().parents[1] / "docs" / "record-format.md"


def test_record_format_doc_is_current():
    assert DOC.read_text(encoding="utf-8") == record_format_markdown(), \
        "run: python -m fhir_iop.records.doc > docs/record-format.md"


def test_every_field_is_documented():
    for model in RECORD_TYPES:
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
