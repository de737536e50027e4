"""Payer encounter data: the per-diem rollup, FHIR Claims and the payment disclosure export."""
