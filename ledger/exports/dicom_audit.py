"""DICOM PS3.15 Annex A.5 audit messages (XML) for audit events.

One ``AuditMessage`` per event, with the elements of the DICOM audit message schema in schema
order: ``EventIdentification`` (``EventID``, ``EventTypeCode``*, ``EventOutcomeDescription``?,
``PurposeOfUse``*), ``ActiveParticipant``+, ``AuditSourceIdentification``,
``ParticipantObjectIdentification``*. Coded values carry ``csd-code``, ``codeSystemName`` and
``originalText``. A file holds the messages as children of an ``AuditMessages`` element.

Only pseudonymous identifiers appear: the patient's ``ParticipantObjectID`` is its random
patientRef, the study's is its keyed pseudonym (so the study is identified with a MedLedger
code, not DCM 110180, which would require the real Study Instance UID); no names, no UIDs.

Event mapping (A.5.3): a refusal by policy (outcome ``denied``) is a Security Alert (110113,
type 110132 Use of Restricted Function); otherwise VIEW -> DICOM Instances Accessed (110103,
R); SHARE -> Begin Transferring DICOM Instances (110102, E); UPLOAD -> DICOM Instances
Transferred (110104, C); QUERY -> Query (110112, E); HISTORY, VERIFY, EXPORT -> Audit Log Used
(110101, R); CONSENT_GRANT, CONSENT_REVOKE, ENROLL, PATIENT_KEY_ROTATE, DELEGATE_SET -> Patient Record
(110110, C/U/U/U/U);
DEIDENTIFY -> Export (110106, R); GOVERNANCE -> Security Alert (110113, type 110136 Security
Roles Changed); REQUEST -> Security Alert. Break-glass reads add type 110127 Emergency Override
Started. Outcome indicator: 0 success, 4 minor failure (denied, rejected), 8 serious failure.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

from ledger.events import Action, AuditEvent, Outcome, leaf_hash
from ledger.purposes import PURPOSES

PURPOSE_SYSTEM_OID = "2.16.840.1.113883.5.8"  # HL7 v3 ActReason (PurposeOfUse)

# action: (EventID code, its meaning, EventActionCode)
EVENT_IDS: dict[str, tuple[str, str, str]] = {
    Action.VIEW: ("110103", "DICOM Instances Accessed", "R"),
    Action.SHARE: ("110102", "Begin Transferring DICOM Instances", "E"),
    Action.UPLOAD: ("110104", "DICOM Instances Transferred", "C"),
    Action.QUERY: ("110112", "Query", "E"),
    Action.HISTORY: ("110101", "Audit Log Used", "R"),
    Action.VERIFY: ("110101", "Audit Log Used", "R"),
    Action.EXPORT: ("110101", "Audit Log Used", "R"),
    Action.CONSENT_GRANT: ("110110", "Patient Record", "C"),
    Action.CONSENT_REVOKE: ("110110", "Patient Record", "U"),
    Action.ENROLL: ("110110", "Patient Record", "U"),
    Action.PATIENT_KEY_ROTATE: ("110110", "Patient Record", "U"),
    Action.DELEGATE_SET: ("110110", "Patient Record", "U"),
    Action.DEIDENTIFY: ("110106", "Export", "R"),
    Action.GOVERNANCE: ("110113", "Security Alert", "E"),
    Action.REQUEST: ("110113", "Security Alert", "E"),
}
SECURITY_ALERT = ("110113", "Security Alert", "E")
OUTCOME_INDICATORS: dict[str, str] = {
    Outcome.OK: "0",
    Outcome.DENIED: "4",
    Outcome.REJECTED: "4",
    Outcome.FAILED: "8",
}


def _coded(parent: ET.Element, tag: str, code: str, system: str, text: str) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": text})


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _object(
    parent: ET.Element,
    object_id: str,
    type_code: str,
    role: str,
    id_type: tuple[str, str, str],
    details: dict[str, str] | None = None,
) -> ET.Element:
    el = ET.SubElement(
        parent,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": object_id,
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _coded(el, "ParticipantObjectIDTypeCode", *id_type)
    for key, value in (details or {}).items():
        ET.SubElement(
            el, "ParticipantObjectDetail", {"type": key, "value": base64.b64encode(value.encode()).decode()}
        )
    return el


def to_message(ev: AuditEvent, *, gateway_id: str = "") -> ET.Element:
    """The A.5 ``AuditMessage`` element of one logged event."""
    refused = ev.outcome == Outcome.DENIED
    code, meaning, action_code = SECURITY_ALERT if refused else EVENT_IDS.get(ev.action, SECURITY_ALERT)
    msg = ET.Element("AuditMessage")
    ident = ET.SubElement(
        msg,
        "EventIdentification",
        {
            "EventActionCode": action_code,
            "EventDateTime": _time(ev.time_ms),
            "EventOutcomeIndicator": OUTCOME_INDICATORS.get(ev.outcome, "8"),
        },
    )
    _coded(ident, "EventID", code, "DCM", meaning)
    if refused:
        _coded(ident, "EventTypeCode", "110132", "DCM", "Use of Restricted Function")
    elif ev.action == Action.GOVERNANCE:
        _coded(ident, "EventTypeCode", "110136", "DCM", "Security Roles Changed")
    if ev.break_glass:
        _coded(ident, "EventTypeCode", "110127", "DCM", "Emergency Override Started")
    if ev.reason or refused:
        ET.SubElement(
            ident, "EventOutcomeDescription"
        ).text = f"{ev.action} {ev.outcome}: {ev.reason}".strip()
    if ev.purpose:
        _coded(
            ident,
            "PurposeOfUse",
            ev.purpose,
            PURPOSE_SYSTEM_OID,
            PURPOSES.get(ev.purpose, (0, ev.purpose))[1],
        )

    requestor = {"UserID": ev.actor or "unknown", "UserIsRequestor": "true"}
    if ev.actor_key:
        requestor["AlternativeUserID"] = ev.actor_key
    ap = ET.SubElement(msg, "ActiveParticipant", requestor)
    _coded(ap, "RoleIDCode", "110153", "DCM", "Source Role ID")
    gw = ET.SubElement(
        msg, "ActiveParticipant", {"UserID": gateway_id or "medledger-gateway", "UserIsRequestor": "false"}
    )
    if ev.counterparty:
        _coded(gw, "RoleIDCode", "110150", "DCM", "Application")
        dest = ET.SubElement(
            msg, "ActiveParticipant", {"UserID": ev.counterparty, "UserIsRequestor": "false"}
        )
        _coded(dest, "RoleIDCode", "110152", "DCM", "Destination Role ID")
    else:
        _coded(gw, "RoleIDCode", "110152", "DCM", "Destination Role ID")

    src = ET.SubElement(
        msg, "AuditSourceIdentification", {"AuditSourceID": gateway_id or "medledger-gateway"}
    )
    _coded(src, "AuditSourceTypeCode", "4", "DCM", "Application Server")

    if ev.patient_ref:
        _object(msg, ev.patient_ref, "1", "1", ("2", "RFC-3881", "Patient Number"))
    if ev.study_ref:
        details = {"ObjectRef": ev.object_ref} if ev.object_ref else {}
        if ev.consent_id:
            details["ConsentID"] = ev.consent_id
        _object(
            msg, ev.study_ref, "2", "3", ("STUDYREF", "MEDLEDGER", "Pseudonymous Study Reference"), details
        )
    elif ev.consent_id:
        _object(msg, ev.consent_id, "2", "13", ("CONSENT", "MEDLEDGER", "Consent Identifier"))
    if ev.action in (Action.HISTORY, Action.VERIFY, Action.EXPORT):
        _object(msg, "urn:medledger:audit-log", "2", "13", ("12", "RFC-3881", "URI"))
    # the record's place in the verifiable log (not PHI: a number and a hash)
    _object(
        msg,
        str(ev.seq),
        "4",
        "13",
        ("SEQ", "MEDLEDGER", "Audit Log Sequence Number"),
        {"LeafHash": "0x" + leaf_hash(ev).hex(), "RequestID": ev.request_id},
    )
    return msg


def export_xml(events: Iterable[AuditEvent], *, gateway_id: str = "") -> bytes:
    """Every event's ``AuditMessage`` under one ``AuditMessages`` root, UTF-8 XML."""
    root = ET.Element("AuditMessages")
    for ev in events:
        root.append(to_message(ev, gateway_id=gateway_id))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
