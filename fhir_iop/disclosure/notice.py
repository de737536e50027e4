"""The redisclosure prohibition that goes with every Part 2 disclosure (42 CFR 2.32).

:func:`mark` gives a copy of a resource that carries

* the Part 2 labels in ``meta.security`` (``fhir_iop.mapping.common.PART2_LABELS``: v3-Confidentiality
  R, v3-ActCode 42CFRPart2, SUD and the refrain policy NORDSCLCD "no redisclosure without consent
  directive") even where the stored copy lacks some, plus v3-ActCode RedisclosureProhibitionMark
  ("prohibition against redisclosure mark", a SecurityLabelMark of the DS4P IG's
  ``valueset-security-label-mark``; reference domain-codes.md §6a) saying that a mark must be shown;
* the mark itself, the §2.32 notice text, in the DS4P IG extension ``extension-display``
  (http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-display, context
  ``Resource.meta``, an Annotation: "a marking should be displayed when the resource is rendered in
  print or in electronic form"; FHIR Data Segmentation for Privacy 1.0.0, reference §6b).

:data:`NOTICE` is Statement 1 of 42 CFR 2.32(a)(1) as amended by the 2024 final rule (89 FR 12472),
https://www.ecfr.gov/current/title-42/chapter-I/subchapter-A/part-2/subpart-C/section-2.32 (the
regulation also allows the short Statement 2, "42 CFR part 2 prohibits unauthorized use or
disclosure of these records."; the full statement is sent, as it tells the recipient what it may do).
"""

from __future__ import annotations

from fhir_iop.mapping.common import PART2_LABELS

ECFR_2_32 = "https://www.ecfr.gov/current/title-42/chapter-I/subchapter-A/part-2/subpart-C/section-2.32"
DISPLAY_EXT = "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-display"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
#: domain-codes.md §6a (THO v3-ActCode; DS4P valueset-security-label-mark)
REDISCLOSURE_MARK = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                     "code": "RedisclosureProhibitionMark", "display": "prohibition against redisclosure mark"}

NOTICE = (
    "This record which has been disclosed to you is protected by Federal confidentiality rules (42 CFR part 2). "
    "These rules prohibit you from using or disclosing this record, or testimony that describes the information "
    "contained in this record, in any civil, criminal, administrative, or legislative proceedings by any Federal, "
    "State, or local authority, against the patient, unless authorized by the consent of the patient, except as "
    "provided at 42 CFR 2.12(c)(5) or as authorized by a court in accordance with 42 CFR 2.64 or 2.65. In "
    "addition, the Federal rules prohibit you from making any other use or disclosure of this record unless at "
    "least one of the following applies: (i) Further use or disclosure is expressly permitted by the written "
    "consent of the individual whose information is being disclosed in this record or as otherwise permitted by "
    "42 CFR part 2. (ii) You are a covered entity or business associate and have received the record for "
    "treatment, payment, or health care operations, or (iii) You have received the record from a covered entity "
    "or business associate as permitted by 45 CFR part 164, subparts A and E. A general authorization for the "
    "release of medical or other information is NOT sufficient to meet the required elements of written consent "
    "to further use or redisclose the record (see 42 CFR 2.31)."
)

NOTICE_EXTENSION = {"url": DISPLAY_EXT, "valueAnnotation": {"text": NOTICE}}


def _key(c: dict) -> tuple:
    return c.get("system"), c.get("code")


def mark(res: dict) -> dict:
    """A copy of ``res`` with the Part 2 labels (incl. NORDSCLCD), the redisclosure mark label and the
    §2.32 notice in ``meta``; ``res`` itself is not changed. Marking twice changes nothing."""
    out = dict(res)
    meta = dict(out.get("meta") or {})
    security = [s for s in meta.get("security") or () if isinstance(s, dict)]
    # exactly one confidentiality code: R, unless the stored copy is more restricted already (V)
    if not any(s.get("system") == CONFIDENTIALITY and s.get("code") == "V" for s in security):
        security = [s for s in security if s.get("system") != CONFIDENTIALITY or s.get("code") == "R"]
    else:
        security = [s for s in security if s.get("system") != CONFIDENTIALITY or s.get("code") == "V"]
    have = {_key(s) for s in security}
    for label in (*PART2_LABELS, REDISCLOSURE_MARK):
        if _key(label) not in have and not (label["system"] == CONFIDENTIALITY and
                                            any(s.get("system") == CONFIDENTIALITY for s in security)):
            security.append(dict(label))
            have.add(_key(label))
    meta["security"] = security
    extensions = list(meta.get("extension") or ())
    if NOTICE_EXTENSION not in extensions:
        extensions.append({"url": DISPLAY_EXT, "valueAnnotation": {"text": NOTICE}})
    meta["extension"] = extensions
    out["meta"] = meta
    return out


def notice_of(res: dict) -> str | None:
    """The §2.32 notice a resource carries (None: unmarked)."""
    for e in (res.get("meta") or {}).get("extension") or ():
        if e.get("url") == DISPLAY_EXT and (e.get("valueAnnotation") or {}).get("text") == NOTICE:
            return NOTICE
    return None
