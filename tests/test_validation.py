"""fhir_iop.validation: each rule class breaks on a resource made to break it, with the exact issue;
the HL7 R4 and US Core examples validate clean against the base spec or each finding is explained;
the ``fhir-iop validate`` command."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from fhir_iop.cli import main
from fhir_iop.errors import ConfigError
from fhir_iop.terminology import CANONICAL
from fhir_iop.validation import Options, Validator, operation_outcome, validate
from fhir_iop.validation.definitions import definitions_dir, load_definitions
from fhir_iop.validation.files import read_resources
from fhir_iop.validation.fhirpath import root_names

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
R4_EXAMPLES = FIXTURES / "fhir-test-cases-r4-examples"
US_CORE_EXAMPLES = FIXTURES / "us-core" / "examples"
CORE = "http://hl7.org/fhir/StructureDefinition/"

needs_definitions = pytest.mark.skipif(
    not (ROOT / "node_modules" / "@medplum" / "definitions").is_dir(), reason="./dev installs the FHIR definitions")
pytestmark = needs_definitions


@lru_cache(maxsize=None)
def validator(**options) -> Validator:
    return Validator(options=Options(**options))


def found(resource, profiles=(), v: Validator | None = None, severities=("fatal", "error", "warning", "information")):
    return {(i.severity, i.expression, i.message) for i in (v or validator()).validate(resource, profiles)
            if i.severity in severities}


def errors(resource, profiles=(), v=None):
    return found(resource, profiles, v, ("fatal", "error"))


def patient(**fields) -> dict:
    return {"resourceType": "Patient", "id": "p1", **fields}


# -- structure ---------------------------------------------------------------------------------

def test_a_valid_resource_has_no_errors():
    assert errors(patient(name=[{"family": "Chalmers", "given": ["Peter"]}], gender="male",
                          birthDate="1974-12-25")) == set()


def test_unknown_property():
    assert errors(patient(nickname="Pete")) == {("error", "Patient", "Unrecognized property 'nickname'")}


def test_array_where_the_element_repeats_and_object_where_it_does_not():
    assert errors(patient(name={"family": "Chalmers"})) == {
        ("error", "Patient.name", "The property name must be a JSON Array, not an Object")}
    assert errors(patient(gender=["male"])) == {
        ("error", "Patient.gender", "The property gender must be an Object, not an Array")}


def test_empty_array_and_null():
    assert errors(patient(name=[{"given": []}])) == {
        ("error", "Patient.name[0].given", "Array cannot be empty - the property should not be present if it has "
                                           "no values"),
        ("error", "Patient.name[0]", "Constraint failed: ele-1: 'All FHIR elements must have a @value or children'")}
    assert ("error", "Patient.birthDate", "The property birthDate cannot be null") in errors(patient(birthDate=None))


@pytest.mark.parametrize("field,value,message", [
    ("birthDate", "1974-13-25", "Not a valid date format: '1974-13-25'"),
    ("birthDate", "1974-02-30", "Not a valid date: '1974-02-30'"),
    ("deceasedDateTime", "2020-01-01T10:00:00", "If a date has a time, it must have a timezone"),
    ("active", "true", "Error parsing JSON: the primitive value must be a boolean (found 'true')"),
    ("multipleBirthInteger", 2.5, "Error parsing JSON: the primitive value must be a number (found 2.5)"),
    ("gender", "", "@value cannot be empty"),
])
def test_primitive_values(field, value, message):
    loc = "Patient.deceased.ofType(dateTime)" if field == "deceasedDateTime" else \
        "Patient.multipleBirth.ofType(integer)" if field == "multipleBirthInteger" else f"Patient.{field}"
    assert ("error", loc, message) in errors(patient(**{field: value}))


def test_systems_and_urns():
    assert errors(patient(identifier=[{"system": "#local", "value": "1"}, {"system": "urn:ietf:rfc:3986", "value": "1"}],
                          maritalStatus={"coding": [{"system": "v3-MaritalStatus", "code": "M"}]},
                          implicitRules="urn:uuid:68D043B5-9ECF-4559-A57A-396E0D452311")) == {
        ("error", "Patient.identifier[0].system", "Identifier.system must be an absolute reference, not a local "
                                                  "reference ('#local')"),
        ("error", "Patient.identifier[1].value", "if identifier.system is 'urn:ietf:rfc:3986', then the "
                                                 "identifier.value must be a full URI (e.g. start with a scheme), not '1'"),
        ("error", "Patient.maritalStatus.coding[0].system", "Coding.system must be an absolute reference, not a local "
                                                            "reference ('v3-MaritalStatus')"),
        ("error", "Patient.implicitRules", "UUIDs must be valid and lowercase (68D043B5-9ECF-4559-A57A-396E0D452311)")}


def test_resource_ids():
    assert errors(patient(id="bad_id")) == {("error", "Patient.id", "Invalid Resource id: Invalid Characters ('bad_id')")}
    assert errors(patient(id="x" * 65)) == {("error", "Patient.id", "Invalid Resource id: Too long (65 chars)")}


def test_choice_type_not_allowed():
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueAddress": {"city": "X"}}
    assert errors(obs) == {("error", "Observation.value.ofType(Address)",
                            "The type 'Address' is not allowed for Observation.value[x] (allowed: Quantity, "
                            "CodeableConcept, string, boolean, integer, Range, Ratio, SampledData, time, dateTime, "
                            "Period)")}


def test_primitive_extension_companion():
    assert errors(patient(_birthDate={"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                                      "valueDateTime": "1974-12-25T14:35:45-05:00"}]})) == set()
    assert errors(patient(_birthDate={"value": "1974"})) == {("error", "Patient.birthDate",
                                                               "Unrecognized property 'value'")}


def test_xml_element_not_in_r4_and_out_of_order(tmp_path):
    f = tmp_path / "p.xml"
    f.write_text('<Patient xmlns="http://hl7.org/fhir"><id value="p1"/><nickname value="Pete"/>'
                 '<implicitRules/><gender value="male"/><active value="true"/></Patient>')
    [(label, res, issues)] = read_resources(f, load_definitions())
    assert [(i.severity, i.expression, i.message) for i in issues] == [
        ("error", "Patient", "Undefined element 'nickname' at Patient"),
        ("error", "Patient.active", "Element 'active' is out of order (FHIR XML follows the order of the definition)")]
    assert errors(res) == {("error", "Patient.implicitRules",
                            "Constraint failed: ele-1: 'All FHIR elements must have a @value or children'")}


def test_model_check_adds_what_fhir_resources_finds():
    v = validator(model_check=True)
    assert errors(patient(birthDate="x"), v=v) == {("error", "Patient.birthDate", "Not a valid date format: 'x'")}


# -- cardinality, bindings of the core spec ------------------------------------------------------

def test_cardinality_of_the_base_resource():
    assert errors({"resourceType": "Observation", "id": "o1"}) == {
        ("error", "Observation", "Observation.status: minimum required = 1, but only found 0 "
                                 "(from http://hl7.org/fhir/StructureDefinition/Observation)"),
        ("error", "Observation", "Observation.code: minimum required = 1, but only found 0 "
                                 "(from http://hl7.org/fhir/StructureDefinition/Observation)")}


def test_required_binding_on_a_code():
    assert errors(patient(gender="f")) == {
        ("error", "Patient.gender", "The value provided ('f') was not found in the value set 'administrative-gender' "
                                    "(http://hl7.org/fhir/ValueSet/administrative-gender), and a code is required "
                                    "from this value set")}
    enc = {"resourceType": "Encounter", "status": "completed",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}
    assert [m for s, loc, m in errors(enc)] == [
        "The value provided ('completed') was not found in the value set 'encounter-status' "
        "(http://hl7.org/fhir/ValueSet/encounter-status), and a code is required from this value set"]


def test_required_binding_on_a_codeable_concept():
    allergy = {"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p1"},
               "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                                              "code": "gone"}]}}
    assert errors(allergy) == {
        ("error", "AllergyIntolerance.clinicalStatus.coding[0].code",
         "Unknown code 'gone' in the CodeSystem 'http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical' "
         "(AllergyIntoleranceClinicalStatusCodes)"),
        ("error", "AllergyIntolerance.clinicalStatus",
         "The value provided (http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical#gone) was not found in "
         "the value set 'allergyintolerance-clinical' (http://hl7.org/fhir/ValueSet/allergyintolerance-clinical), "
         "and a code is required from this value set")}


def test_extensible_binding_is_a_warning_and_an_unexpandable_value_set_is_not_checked():
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "category": [{"coding": [{"system": "http://example.org/cat", "code": "x"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "39065001"}]}}
    got = found(cond)
    assert ("warning", "Condition.category[0]",
            "None of the codes provided (http://example.org/cat#x) are in the value set 'condition-category' "
            "(http://hl7.org/fhir/ValueSet/condition-category), and a code should come from this value set unless it "
            "has no suitable code") in got
    assert not any(s == "error" for s, *_ in got)


def test_verified_external_codes_count_as_known():
    from fhir_iop.validation.codes import Codes
    url = "http://example.org/ValueSet/all-loinc"
    codes = Codes(load_definitions().overlay([{"resourceType": "ValueSet", "url": url,
                                               "compose": {"include": [{"system": "http://loinc.org"}]}}]))
    assert codes.member(url, "http://loinc.org", "59284-0") is True  # cited in fhir_iop/data/cited-codes.json
    assert codes.member(url, "http://loinc.org", "0000-0") is None   # not known offline: not checked
    consent = {"resourceType": "Consent", "status": "active", "scope": {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Consent"}]}],
        "policyRule": {"text": "x"}}
    assert ("warning", "Consent.category[0].coding[0].display", "Wrong Display Name 'Consent' for "
            "http://loinc.org#59284-0. Valid display is 'Consent Document'") in found(consent)


# -- profiles: a snapshot made here, on core Patient ----------------------------------------------

PROFILE = f"{CANONICAL}/StructureDefinition/test-patient"
CONDITION_PROFILE = f"{CANONICAL}/StructureDefinition/test-condition"
MRN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


@lru_cache(maxsize=1)
def core_snapshots() -> dict:
    bundle = orjson.loads((definitions_dir() / "profiles-resources.json").read_bytes())
    return {e["resource"]["id"]: e["resource"] for e in bundle["entry"]
            if e["resource"]["id"] in ("Patient", "Condition")}


def derive(base: str, url: str, edit) -> dict:
    sd = copy.deepcopy(core_snapshots()[base])
    sd.update(url=url, id=url.rsplit("/", 1)[-1], name=url.rsplit("/", 1)[-1].title().replace("-", ""),
              derivation="constraint", baseDefinition=CORE + base)
    sd.pop("differential", None)
    elements = sd["snapshot"]["element"]
    edit({e["id"]: e for e in elements}, elements)
    return sd


def _patient_profile(by_id, elements):
    by_id["Patient"]["constraint"].append({"key": "test-1", "severity": "error", "human": "A patient has a name",
                                           "expression": "name.exists()", "source": PROFILE})
    by_id["Patient.identifier"].update(min=1, slicing={"discriminator": [{"type": "pattern", "path": "type"}],
                                                      "rules": "closed"})
    by_id["Patient.extension"]["slicing"] = {"discriminator": [{"type": "value", "path": "url"}], "rules": "open"}
    by_id["Patient.gender"]["fixedCode"] = "female"
    by_id["Patient.maritalStatus"]["patternCodeableConcept"] = {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]}
    by_id["Patient.name"]["max"] = "1"
    by_id["Patient.telecom"]["mustSupport"] = True
    at = elements.index(by_id["Patient.extension"]) + 1
    elements.insert(at, {"id": "Patient.extension:birthPlace", "path": "Patient.extension", "sliceName": "birthPlace",
                         "min": 1, "max": "1", "base": {"path": "DomainResource.extension", "min": 0, "max": "*"},
                         "type": [{"code": "Extension",
                                   "profile": ["http://hl7.org/fhir/StructureDefinition/patient-birthPlace"]}]})
    at = elements.index(by_id["Patient.identifier"]) + 1
    elements[at:at] = [
        {"id": "Patient.identifier:mrn", "path": "Patient.identifier", "sliceName": "mrn", "min": 1, "max": "1",
         "base": {"path": "Patient.identifier", "min": 0, "max": "*"}, "type": [{"code": "Identifier"}]},
        {"id": "Patient.identifier:mrn.type", "path": "Patient.identifier.type", "min": 1, "max": "1",
         "base": {"path": "Identifier.type", "min": 0, "max": "1"}, "type": [{"code": "CodeableConcept"}],
         "patternCodeableConcept": MRN},
        {"id": "Patient.identifier:mrn.system", "path": "Patient.identifier.system", "min": 1, "max": "1",
         "base": {"path": "Identifier.system", "min": 0, "max": "1"}, "type": [{"code": "uri"}],
         "fixedUri": "http://hospital.example/mrn"}]


def _condition_profile(by_id, elements):
    by_id["Condition.code"]["binding"] = {"strength": "required", "valueSet": f"{CANONICAL}/ValueSet/sud-diagnoses"}
    by_id["Condition.note"]["constraint"] = [{"key": "test-2", "severity": "warning", "human": "notes say who",
                                              "expression": "author.exists()", "source": CONDITION_PROFILE},
                                             {"key": "test-3", "severity": "error", "human": "conforms",
                                              "expression": "conformsTo('http://example.org/x')",
                                              "source": CONDITION_PROFILE}]


@lru_cache(maxsize=1)
def profile_validator() -> Validator:
    defs = load_definitions().overlay([derive("Patient", PROFILE, _patient_profile),
                                       derive("Condition", CONDITION_PROFILE, _condition_profile)])
    return Validator(defs)


def conformant() -> dict:
    return patient(identifier=[{"type": MRN, "system": "http://hospital.example/mrn", "value": "123"}],
                   extension=[{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                               "valueAddress": {"city": "Seattle"}}],
                   name=[{"family": "Doe"}], gender="female", telecom=[{"system": "phone", "value": "555"}],
                   maritalStatus={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                              "code": "M", "display": "Married"}]})


def profile_errors(res, profiles=(PROFILE,)):
    return errors(res, profiles, profile_validator())


def test_profile_conformant_instance():
    assert profile_errors(conformant()) == set()
    # meta.profile works as --profile does
    res = conformant()
    res["meta"] = {"profile": [PROFILE]}
    res["gender"] = "male"
    assert profile_errors(res, ()) == {("error", "Patient.gender", "Value is 'male' but is fixed to 'female'")}


def test_profile_cardinality():
    res = conformant()
    res["name"].append({"family": "Roe"})
    assert profile_errors(res) == {("error", "Patient", f"Patient.name: max allowed = 1, but found 2 (from {PROFILE})")}


def test_profile_pattern():
    res = conformant()
    res["maritalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "S"}]}
    assert profile_errors(res) == {
        ("error", "Patient.maritalStatus", 'The value does not match the pattern {"coding":[{"system":'
         '"http://terminology.hl7.org/CodeSystem/v3-MaritalStatus","code":"M"}]}')}


def test_profile_required_extension_slice():
    res = conformant()
    del res["extension"]
    assert profile_errors(res) == {
        ("error", "Patient", f"Slice 'Patient.extension:birthPlace': a matching slice is required, but not found "
                             f"(from {PROFILE})")}


def test_profile_pattern_discriminated_slice_closed_slicing_and_fixed_value_in_a_slice():
    res = conformant()
    res["identifier"] = [{"system": "http://other.example/id", "value": "9"}]
    assert profile_errors(res) == {
        ("error", "Patient", f"Slice 'Patient.identifier:mrn': a matching slice is required, but not found "
                             f"(from {PROFILE})"),
        ("error", "Patient.identifier[0]", f"This element does not match any known slice defined in the profile "
                                           f"{PROFILE} (slicing of Patient.identifier is closed)")}
    res["identifier"] = [{"type": MRN, "system": "http://other.example/mrn", "value": "9"}]
    assert profile_errors(res) == {
        ("error", "Patient.identifier[0].system", "Value is 'http://other.example/mrn' but is fixed to "
                                                  "'http://hospital.example/mrn'")}


def test_profile_invariant():
    res = conformant()
    del res["name"]
    assert profile_errors(res) == {("error", "Patient", "Constraint failed: test-1: 'A patient has a name'")}


def test_profile_must_support_is_information_for_fhir_iops_own_profiles():
    res = conformant()
    del res["telecom"]
    assert ("information", "Patient", "must-support element Patient.telecom is absent (profile TestPatient)") in \
        found(res, (PROFILE,), profile_validator())
    assert profile_errors(res) == set()


def test_binding_to_a_fhir_iop_value_set_and_unsupported_fhirpath_functions():
    cond = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "F10.20"}]},
            "note": [{"text": "x"}]}
    got = found(cond, (CONDITION_PROFILE,), profile_validator())
    assert not any(s == "error" for s, *_ in got)
    assert ("warning", "Condition.note[0]", "Constraint failed: test-2: 'notes say who'") in got
    assert ("information", "Condition.note[0]", "Constraint test-3 not evaluated: conformsTo() is not supported") in got
    cond["code"]["coding"][0]["code"] = "J45.909"
    assert profile_errors(cond, (CONDITION_PROFILE,)) == {
        ("error", "Condition.code", "The value provided (http://hl7.org/fhir/sid/icd-10-cm#J45.909) was not found in "
         f"the value set 'sud-diagnoses' ({CANONICAL}/ValueSet/sud-diagnoses), and a code is required from this "
         "value set")}


def test_an_unknown_profile():
    with pytest.raises(ConfigError):
        validator().validate(patient(), ["http://example.org/StructureDefinition/nothing"])
    res = patient(meta={"profile": ["http://example.org/StructureDefinition/nothing"]})
    assert found(res) == {("warning", "Patient.meta.profile[0]", "Profile reference "
                           "'http://example.org/StructureDefinition/nothing' has not been checked because it is unknown")}


def test_us_core_profile_and_implied_vital_signs_profile():
    us_core = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"
    assert errors(patient(name=[{"family": "Doe"}]), [us_core]) == {
        ("error", "Patient", f"Patient.identifier: minimum required = 1, but only found 0 (from {us_core})"),
        ("error", "Patient", f"Patient.gender: minimum required = 1, but only found 0 (from {us_core})")}
    temp = {"resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "276885007"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-06-30T09:50:55Z",
            "valueQuantity": {"value": 36.0, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"}}
    assert errors(temp) == {("error", "Observation.code", "Slice 'Observation.code.coding:BodyTempCode': a matching "
                             "slice is required, but not found (from http://hl7.org/fhir/StructureDefinition/bodytemp)")}


# -- invariants -----------------------------------------------------------------------------------

def test_max_value_set():
    assert errors(patient(language="not a language!")) == {
        ("error", "Patient.language", "The value provided ('not a language!') was not found in the value set "
                                      "'all-languages' (http://hl7.org/fhir/ValueSet/all-languages), and a code is "
                                      "required from this value set")}
    assert errors(patient(language="en-AU")) == set()


def test_core_invariants():
    enc = {"resourceType": "Encounter", "status": "finished",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
           "period": {"start": "2024-05-02T10:00:00Z", "end": "2024-05-01T10:00:00Z"}}
    assert errors(enc) == {("error", "Encounter.period", "Constraint failed: per-1: 'If present, start SHALL have a "
                                                         "lower value than end'")}
    assert errors(patient(contact=[{}])) == {
        ("error", "Patient.contact[0]", "Constraint failed: ele-1: 'All FHIR elements must have a @value or children'"),
        ("error", "Patient.contact[0]", "Constraint failed: pat-1: 'SHALL at least contain a contact's details or a "
                                        "reference to an organization'")}


def test_contained_and_local_references():
    res = patient(contained=[{"resourceType": "Practitioner", "id": "gp"}],
                  generalPractitioner=[{"reference": "#other"}])
    assert errors(res) == {
        ("error", "Patient", "Constraint failed: dom-3: 'If the resource is contained in another resource, it SHALL "
                             "be referred to from elsewhere in the resource or SHALL refer to the containing resource'"),
        ("error", "Patient.generalPractitioner[0]", "Unable to resolve resource with reference '#other'"),
        ("error", "Patient.generalPractitioner[0]", "Constraint failed: ref-1: 'SHALL have a contained resource if a "
                                                    "local reference is provided'")}
    res["generalPractitioner"] = [{"reference": "#gp"}]
    assert errors(res) == set()
    assert errors(patient(generalPractitioner=[{"reference": "Patient/x"}])) == {
        ("error", "Patient.generalPractitioner[0]", "The type 'Patient' implied by the reference URL Patient/x is not a "
                                                    "valid Target for this element (must be one of ['Organization', "
                                                    "'Practitioner', 'PractitionerRole'])")}


def test_narrative():
    assert errors(patient(text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                                                              '<script>x()</script></div>'})) == {
        ("error", "Patient.text.div", "Constraint failed: txt-1: Illegal element name in the XHTML ('script')")}
    assert errors(patient(text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p/></div>'})) \
        == {("error", "Patient.text.div", "Constraint failed: txt-2: The narrative SHALL have some non-whitespace "
                                          "content")}


def test_expressions_memoised_only_on_what_they_read():
    assert root_names("start.hasValue().not() or (start <= end)") == {"start", "end"}
    assert root_names("hasValue() or (children().count() > id.count())") is None
    assert root_names("member.resolve().exists()") is None


# -- extensions ------------------------------------------------------------------------------------

def test_extensions():
    assert errors(patient(extension=[{"url": "http://example.org/ext", "valueString": "x"}])) == {
        ("error", "Patient.extension[0]", "The extension http://example.org/ext could not be found so is not allowed "
                                          "here")}
    assert errors(patient(extension=[{"url": "http://example.org/ext", "valueString": "x"}]),
                  v=validator(extension_domains=("http://example.org/",))) == set()
    assert errors(patient(extension=[{"url": "local", "valueString": "x"}])) == {
        ("error", "Patient.extension[0]", "Extension.url must be an absolute URL")}
    assert errors(patient(extension=[{"valueString": "x"}])) == {
        ("error", "Patient.extension[0]", "Extension.url is required in order to identify, use and validate the "
                                          "extension"),
        ("error", "Patient.extension[0]", "Extension.url: minimum required = 1, but only found 0 "
                                          "(from http://hl7.org/fhir/StructureDefinition/Extension)")}


def test_known_extensions_value_type_context_and_sub_extensions():
    mmn = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
    assert errors(patient(extension=[{"url": mmn, "valueCode": "x"}])) == {
        ("error", "Patient.extension[0].value.ofType(code)", "The type 'code' is not allowed for Extension.value[x] "
                                                             "(allowed: string)"),
        ("error", "Patient.extension[0]", f"Extension.value[x]: minimum required = 1, but only found 0 (from {mmn})")}
    enc = {"resourceType": "Encounter", "status": "finished", "extension": [{"url": mmn, "valueString": "x"}],
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}
    assert errors(enc) == {("error", "Encounter.extension[0]", f"The extension {mmn} is not allowed to be used at "
                                                               "this point (allowed: Patient)")}
    animal = "http://hl7.org/fhir/StructureDefinition/patient-animal"
    assert errors(patient(extension=[{"url": animal, "extension": [
        {"url": "breed", "valueCodeableConcept": {"text": "x"}},
        {"url": "colour", "valueCodeableConcept": {"text": "x"}}]}])) == {
        ("error", "Patient.extension[0]", f"Slice 'Extension.extension:species': a matching slice is required, but not "
                                          f"found (from {animal})"),
        ("error", "Patient.extension[0].extension[1][url='colour']", f"Sub-extension url 'colour' is not defined by "
                                                                     f"the Extension {animal}")}


# -- Bundles ---------------------------------------------------------------------------------------

def document(*entries, **fields) -> dict:
    return {"resourceType": "Bundle", "type": "document", "identifier": {"system": "urn:ietf:rfc:3986",
                                                                         "value": "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0"},
            "timestamp": "2024-05-01T10:00:00Z", "entry": list(entries), **fields}


def composition(**fields) -> dict:
    return {"resourceType": "Composition", "status": "final", "type": {"text": "note"}, "date": "2024-05-01",
            "author": [{"display": "Dr X"}], "title": "Note", **fields}


def test_bundle_references():
    comp = composition(subject={"reference": "Patient/p1"})
    pat = patient()
    good = document({"fullUrl": "http://a.example/fhir/Composition/c1", "resource": {**comp, "id": "c1"}},
                    {"fullUrl": "http://a.example/fhir/Patient/p1", "resource": pat})
    assert errors(good) == set()
    # a urn:uuid fullUrl is no base for Patient/p1; the Patient is then unreachable from the Composition
    bad = document({"fullUrl": "urn:uuid:2b90dd2b-2dab-4c75-9bb9-a355e07401e8", "resource": comp},
                   {"fullUrl": "http://a.example/fhir/Patient/p1", "resource": pat})
    assert errors(bad) == {
        ("error", "Bundle.entry[0].resource.subject", "Can't find 'Patient/p1' in the bundle. Note that there is a "
         "resource in the bundle with the same type and id, but it does not match because of the fullUrl based rules "
         "around matching relative references"),
        ("error", "Bundle.entry[1]", "Entry 'http://a.example/fhir/Patient/p1' isn't reachable by traversing links "
                                     "(forward or backward) from the Composition")}


def test_bundle_full_urls_target_types_and_links():
    org = {"resourceType": "Organization", "name": "x"}
    coll = {"resourceType": "Bundle", "type": "collection",
            "link": [{"relation": "self", "url": "http://a.example/1"}, {"relation": "self", "url": "http://a.example/2"}],
            "entry": [{"fullUrl": "Patient/1", "resource": patient(id="1")},
                      {"fullUrl": "urn:uuid:5d9588d8-3cd6-4b32-8fb7-ad13694e069d", "resource": org},
                      {"fullUrl": "urn:uuid:54fc3e09-e279-4b74-a8ff-2649ec968642", "resource": patient(
                          id="2", generalPractitioner=[{"reference": "urn:uuid:5d9588d8-3cd6-4b32-8fb7-ad13694e069d"},
                                                       {"reference": "Practitioner/5d9588d8-3cd6-4b32-8fb7-ad13694e069d"}],
                          managingOrganization={"reference": "urn:uuid:54fc3e09-e279-4b74-a8ff-2649ec968642"})}]}
    assert errors(coll) == {
        ("error", "Bundle.link[1]", "The link relationship type 'self' can only occur once"),
        ("error", "Bundle.entry[0]", "The fullUrl must be an absolute URL (not 'Patient/1')"),
        ("error", "Bundle.entry[2].resource.generalPractitioner[1]", "Matching reference for reference "
         "Practitioner/5d9588d8-3cd6-4b32-8fb7-ad13694e069d has resourceType Organization"),
        ("error", "Bundle.entry[2].resource.managingOrganization", "The resource "
         "urn:uuid:54fc3e09-e279-4b74-a8ff-2649ec968642 in the bundle is a Patient, which is not a valid target "
         "(must be one of ['Organization'])")}


def test_bundle_invariants_come_from_the_bundle_definition():
    assert ("error", "Bundle", "Constraint failed: bdl-10: 'A document must have a date'") in \
        errors({"resourceType": "Bundle", "type": "document", "entry": [{"resource": composition()}]})


def test_attachment_size():
    media = {"resourceType": "Media", "status": "completed", "content": {"contentType": "text/plain",
                                                                         "data": "aGVsbG8=", "size": 100}}
    assert errors(media) == {("error", "Media.content", "Stated Attachment Size 100 does not match actual attachment "
                                                        "size 5")}


def test_operation_outcome_shape():
    oo = validate(patient(gender="f"))
    assert oo["resourceType"] == "OperationOutcome"
    [issue] = [i for i in oo["issue"] if i["severity"] == "error"]
    assert issue["code"] == "code-invalid" and issue["expression"] == ["Patient.gender"]
    assert issue["diagnostics"].startswith("binding: The value provided ('f')")
    assert operation_outcome([])["issue"][0]["severity"] == "information"


# -- the examples others wrote ---------------------------------------------------------------------

#: findings on the official R4 examples, each explained (the same three validators agree on the first)
R4_EXAMPLE_FINDINGS = {
    "bundle-questionnaire.json": ("Questionnaire.item.linkId: minimum required",
                                  "known defect: items without linkId (fixtures README)"),
    "devicemetric-example.json": ("DeviceDefinition/dc102 is not a valid Target",
                                  "known defect: DeviceMetric.parent is Reference(Device) in R4 (FHIR.js agrees)"),
    "deviceusestatement-example.json": ("Procedure/example is not a valid Target",
                                        "known defect: reasonReference does not allow Procedure in R4 (FHIR.js agrees)"),
    "medicationrequest0301.json": ("Practitioner/f001 is not a valid Target",
                                   "defect: dispenseRequest.performer is Reference(Organization) in R4"),
    "codesystem-example.json": ("csd-1", "defect: the code chol-mass is defined twice"),
    "capabilitystatement-example.json": ("UUIDs must be valid and lowercase",
                                         "defect: url urn:uuid:68D043B5-… in upper case; R4 uuids are lower case"),
    "basic-example.json": ("example.org/do-not-use/fhir-extensions",
                           "extensions the example invents and never defines"),
    "observation-example.xml": ("http://example.com/fhir/StructureDefinition/patient-age",
                                "an extension only the XML twin has, never defined"),
    "patient-glossy-example.xml": ("http://example.org/StructureDefinition/trials",
                                   "an extension the example invents and never defines"),
}


def example_errors(directory: Path, v: Validator) -> dict[str, list[str]]:
    out = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".json", ".xml"):
            continue
        [(_, res, issues)] = read_resources(path, v.defs)
        issues = issues + v.validate(res)
        bad = [str(i) for i in issues if i.severity in ("error", "fatal")]
        if bad:
            out[path.name] = bad
    return out


@pytest.mark.skipif(not R4_EXAMPLES.is_dir(), reason="../shared/fixtures not present")
def test_hl7_r4_examples_validate_clean_against_the_base_spec_or_the_finding_is_explained():
    found_ = example_errors(R4_EXAMPLES, validator(meta_profiles=False))
    unexplained = {f: [e for e in errs if R4_EXAMPLE_FINDINGS.get(f, ("\0",))[0] not in e] for f, errs in found_.items()}
    assert {f: e for f, e in unexplained.items() if e} == {}
    assert set(found_) == set(R4_EXAMPLE_FINDINGS), "an explained finding went away: update the list"


#: US Core 9 examples use extensions newer than what fhir-iop holds (R4 core, US Core 5.0.1)
US_CORE_EXTENSIONS = ("http://hl7.org/fhir/us/core/StructureDefinition/",   # US Core 6–9 extensions
                      "http://hl7.org/fhir/5.0/StructureDefinition/",       # R5 cross-version extensions
                      "http://hl7.org/fhir/StructureDefinition/itemWeight",  # core extensions after R4
                      "http://hl7.org/fhir/StructureDefinition/artifact-versionAlgorithm")


@pytest.mark.skipif(not US_CORE_EXAMPLES.is_dir(), reason="../shared/fixtures not present")
def test_us_core_examples_validate_clean_against_the_base_spec_or_the_finding_is_explained():
    found_ = example_errors(US_CORE_EXAMPLES, validator(meta_profiles=False))
    cbc = found_.pop("diagnosticreport-cbc.json")
    assert cbc == ["error DiagnosticReport.text: Narrative.div: minimum required = 1, but only found 0 "
                   "(from http://hl7.org/fhir/StructureDefinition/Narrative)"], "known defect: text without div"
    for name, errs in found_.items():
        for e in errs:
            assert "could not be found so is not allowed here" in e and any(u in e for u in US_CORE_EXTENSIONS), \
                f"{name}: {e}"
    # with those extensions allowed, they are clean
    v = validator(meta_profiles=False, extension_domains=US_CORE_EXTENSIONS)
    assert set(example_errors(US_CORE_EXAMPLES, v)) == {"diagnosticreport-cbc.json"}


# -- the command -----------------------------------------------------------------------------------

def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_validate_command(tmp_path):
    good, bad, broken = tmp_path / "good.json", tmp_path / "bad.xml", tmp_path / "broken.json"
    good.write_text(json.dumps(patient(name=[{"family": "Doe"}])))
    bad.write_text('<Patient xmlns="http://hl7.org/fhir"><gender value="f"/></Patient>')
    broken.write_text("{not json")
    code, out, _ = run("validate", good)
    assert (code, out) == (0, "")
    code, out, _ = run("validate", good, bad, "--outcome", tmp_path / "oo.json")
    assert code == 1
    assert out.splitlines() == [f"{bad}: error Patient.gender: The value provided ('f') was not found in the value set "
                                "'administrative-gender' (http://hl7.org/fhir/ValueSet/administrative-gender), and a "
                                "code is required from this value set"]
    oo = json.loads((tmp_path / "oo.json").read_text())
    assert oo["issue"][0]["diagnostics"].startswith(f"{bad}: binding: ")
    code, _, err = run("validate", good, broken)
    assert code == 2 and "not valid JSON" in err
    code, _, err = run("validate", good, "--profile", "http://example.org/StructureDefinition/none")
    assert code == 2 and "is not known" in err
    code, out, _ = run("validate", good, "--profile", "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient")
    assert code == 1 and "Patient.identifier: minimum required = 1" in out


def test_definitions_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FHIR_IOP_DEFINITIONS", str(tmp_path))
    with pytest.raises(ConfigError, match="run ./dev"):
        definitions_dir()


def test_fhir_iops_own_transaction_bundle_reads_the_same_in_json_and_xml(tmp_path):
    from fhir_iop import pipeline
    from fhir_iop.fhir.io import BundleWriter
    per_type: dict[str, list] = {}
    for r in pipeline.to_fhir([ROOT / "examples" / "clinic"]):
        if isinstance(r, dict) and len(per_type.setdefault(r["resourceType"], [])) < 3:
            per_type[r["resourceType"]].append(r)
    resources = [r for rs in per_type.values() for r in rs]
    outcomes = []
    for enc in ("json", "xml"):
        path = tmp_path / f"b.{enc}"
        with open(path, "wb") as f:
            w = BundleWriter(f, "transaction", enc)
            for r in resources:
                w.write(r)
            w.close()
        [(_, bundle, read_issues)] = read_resources(path, load_definitions())
        assert read_issues == []
        outcomes.append({(i.severity, i.expression, i.message) for i in validator().validate(bundle)})
    assert outcomes[0] == outcomes[1]
    # what fhir-iop writes breaks no rule, bar R4's gol-1 on Goals (care_plan.goal_to_fhir writes
    # Goal.target.detailString without Goal.target.measure; reported to the lead)
    assert {m for s, _, m in outcomes[0] if s == "error"} <= {
        "Constraint failed: gol-1: 'Goal.target.measure is required if Goal.target.detail is populated'"}
