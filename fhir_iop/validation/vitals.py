"""Profiles the FHIR R4 specification implies for an Observation: the vital signs profiles.

R4 (observation.html#vitals, observation-vitalsigns.html): an Observation whose code is one of
the vital signs codes SHALL conform to the matching core profile (bodytemp, heartrate…), whether
or not it names the profile in meta.profile. The codes per profile below are the LOINC codes of
the vital signs table and their SNOMED CT equivalents, as the HL7 Java validator applies them
(its ``getImpliedProfilesForObservation``); the first profile whose codes appear wins.
"""

from __future__ import annotations

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
_BASE = "http://hl7.org/fhir/StructureDefinition/"

#: (profile id, name, LOINC codes, SNOMED CT codes) in the order they are tried
VITAL_SIGNS: tuple[tuple[str, str, frozenset[str], frozenset[str]], ...] = (
    ("vitalspanel", "Vital Signs Panel", frozenset({"85353-1"}), frozenset({"46680005"})),
    ("resprate", "Respiratory Rate",
     frozenset("9279-1 76170-0 76172-6 76171-8 19840-8 33438-3 76270-8 11291-2".split()),
     frozenset("86290005 271625008 271306003".split())),
    ("heartrate", "Heart rate",
     frozenset("60978-4 73795-7 73799-9 76476-1 76477-9 8867-4 8889-8 8890-6 8891-4 8892-2 8893-0 40443-4 "
               "55425-3 68999-2 11328-2 69000-8 8886-4".split()),
     frozenset("271306003 249043002 444981005 399017001 251670001 429525003 429614003".split())),
    ("oxygensat", "Oxygen saturation",
     frozenset("2708-6 19224-5 20564-1 2709-4 2710-2 2713-6 51733-4 59408-5 59417-6 89276-0 97549-0".split()),
     frozenset("442476006 431314004".split())),
    ("bodytemp", "Body temperature",
     frozenset("8310-5 60834-9 60835-6 60836-4 60838-0 60955-2 61009-7 75539-7 75987-8 76010-8 76011-6 "
               "76278-1 8309-7 8328-7 8329-5 8330-3 8331-1 8332-9 8333-7 8334-5 91371-5 98657-0 "
               "98663-8".split()),
     frozenset("386725007 276885007 300076005 1222808002 364246006 307047009 708499008 431598003 698831002 "
               "698832009 415882003 415974002 415929009 415945006".split())),
    ("bodyheight", "Body height", frozenset("8302-2 3137-7 3138-5 8306-3 8308-9".split()),
     frozenset("1153637007 1162419008 50373000 1162418000 1230278008 1162392001 1162417005".split())),
    ("headcircum", "Head circumference", frozenset("9843-4 8287-5".split()),
     frozenset("363812007 169876006 1269262007 363811000".split())),
    ("bodyweight", "Body weight", frozenset("29463-7 3141-9 3142-7 75292-3 79348-9 8350-1 8351-9".split()),
     frozenset("735395000 425024002 424927000 784399000 1162416001 1162415002".split())),
    ("bmi", "Body mass index", frozenset("39156-5 89270-3".split()), frozenset({"60621009"})),
    ("bp", "Blood pressure systolic and diastolic",
     frozenset("85354-9 35094-2 8459-0 76534-7 55284-4 8480-6".split()),
     frozenset("251076008 163033001 163035008 386534000 386536003 271649006 271650006 407556006 407554009 "
               "716579001 399304008".split())),
)


def implied_profile(observation: dict) -> tuple[str, str, str] | None:
    """(profile url, profile name, why) for an Observation the specification puts under a vital signs profile."""
    code = observation.get("code")
    codings = [c for c in (code.get("coding") or ()) if isinstance(c, dict)] if isinstance(code, dict) else []
    if not codings:
        return None
    for system, label, index in ((LOINC, "LOINC", 2), (SNOMED, "SNOMED CT", 3)):
        for entry in VITAL_SIGNS:
            for c in codings:
                if c.get("system") == system and c.get("code") in entry[index]:
                    return _BASE + entry[0], entry[1], f"the {label} code {c['code']} was found"
    return None
