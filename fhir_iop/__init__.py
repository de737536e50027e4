"""fhir-iop: Intensive Outpatient Program records ⇄ HL7 FHIR R4."""

__version__ = "0.1.0"
