"""FHIR R4 AuditEvent resources for audit events, following IHE Basic Audit Log Patterns (BALP).

Each event becomes one AuditEvent (R4 structure; validated in the tests with the R4B models of
``fhir.resources``, whose AuditEvent is unchanged from R4). Only pseudonymous identifiers are
used: the patient is ``urn:medledger:patient-ref|0x..`` (a random ref, mapped off-chain), the
study and object are keyed pseudonyms, actors are consortium member ids or patient refs. The
``seq`` and leaf hash let a reader tie the resource back to the verifiable log.

Mapping (action -> BALP profile, type/subtype, action code):
    VIEW -> PatientRead (rest/read, R); UPLOAD -> PatientCreate (rest/create, C);
    QUERY, HISTORY, VERIFY, EXPORT -> PatientQuery or Query (rest/search, E);
    CONSENT_GRANT -> PatientCreate, CONSENT_REVOKE, ENROLL, PATIENT_KEY_ROTATE, DELEGATE_SET -> PatientUpdate (rest/update, U);
    SHARE, DEIDENTIFY -> DICOM 110106 Export (R); GOVERNANCE, REQUEST -> DICOM 110113 Security
    Alert (E). Outcomes: ok 0, denied/rejected 4 (minor failure), failed 8 (serious failure).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from ledger.events import Action, AuditEvent, Outcome, leaf_hash
from ledger.purposes import CODE_SYSTEM as PURPOSE_SYSTEM
from ledger.purposes import PURPOSES

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"

SYS_MEMBER = "urn:medledger:member-id"
SYS_PATIENT = "urn:medledger:patient-ref"
SYS_STUDY = "urn:medledger:study-ref"
SYS_OBJECT = "urn:medledger:object-ref"
SYS_CONSENT = "urn:medledger:consent-id"
SYS_KEY = "urn:medledger:key"

_REST: dict[str, tuple[str, str, str, str]] = {
    # action: (profile (patient-specific, generic), subtype code, action code)
    Action.VIEW: ("PatientRead", "Read", "read", "R"),
    Action.UPLOAD: ("PatientCreate", "Create", "create", "C"),
    Action.CONSENT_GRANT: ("PatientCreate", "Create", "create", "C"),
    Action.CONSENT_REVOKE: ("PatientUpdate", "Update", "update", "U"),
    Action.ENROLL: ("PatientUpdate", "Update", "update", "U"),
    Action.PATIENT_KEY_ROTATE: ("PatientUpdate", "Update", "update", "U"),
    Action.DELEGATE_SET: ("PatientUpdate", "Update", "update", "U"),
    Action.QUERY: ("PatientQuery", "Query", "search", "E"),
    Action.HISTORY: ("PatientQuery", "Query", "search", "E"),
    Action.VERIFY: ("PatientQuery", "Query", "search", "E"),
    Action.EXPORT: ("PatientQuery", "Query", "search", "E"),
}
_DICOM: dict[str, tuple[str, str, str]] = {
    Action.SHARE: ("110106", "Export", "R"),
    Action.DEIDENTIFY: ("110106", "Export", "R"),
    Action.GOVERNANCE: ("110113", "Security Alert", "E"),
    Action.REQUEST: ("110113", "Security Alert", "E"),
}
OUTCOME_CODES: dict[str, str] = {
    Outcome.OK: "0",
    Outcome.DENIED: "4",
    Outcome.REJECTED: "4",
    Outcome.FAILED: "8",
}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ident(system: str, value: str) -> dict[str, Any]:
    return {"identifier": {"system": system, "value": value}}


def _purpose(code: str) -> dict[str, Any]:
    display = PURPOSES.get(code, (0, code))[1]
    return {"coding": [{"system": PURPOSE_SYSTEM, "code": code, "display": display}]}


def to_audit_event(ev: AuditEvent, *, gateway_id: str = "") -> dict[str, Any]:
    """The FHIR R4 AuditEvent (as JSON) of one logged event."""
    action = ev.action
    profile: str | None = None
    if action in _REST:
        patient_profile, generic, subtype, code = _REST[action]
        profile = patient_profile if ev.patient_ref else generic
        type_ = {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
        subtypes = [{"system": RESTFUL, "code": subtype}]
    else:
        dcm_code, display, code = _DICOM.get(action, _DICOM[Action.REQUEST])
        type_ = {"system": DCM, "code": dcm_code, "display": display}
        subtypes = []
    if ev.break_glass:
        subtypes.append({"system": DCM, "code": "110127", "display": "Emergency Override Started"})
    purposes = [_purpose(ev.purpose)] if ev.purpose else []
    who = _ident(
        SYS_PATIENT if ev.actor_role in ("patient", "delegate") else SYS_MEMBER, ev.actor or "unknown"
    )
    client: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
        "who": who,
        "requestor": True,
    }
    if ev.actor_key:
        client["altId"] = ev.actor_key
    if ev.actor_role:
        client["role"] = [{"text": ev.actor_role}]
    if purposes:
        client["purposeOfUse"] = purposes
    server: dict[str, Any] = {
        "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
        "who": _ident(SYS_MEMBER, gateway_id or "medledger-gateway"),
        "requestor": False,
    }
    agents = [client, server]
    if ev.counterparty:
        agents.append(
            {
                "type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
                "who": _ident(SYS_MEMBER, ev.counterparty),
                "requestor": False,
            }
        )
    entities: list[dict[str, Any]] = [
        {
            "what": _ident("urn:medledger:audit-seq", str(ev.seq)),
            "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId", "display": "X-Request-Id"},
            "description": ev.request_id or None,
            "detail": [
                {"type": "seq", "valueString": str(ev.seq)},
                {"type": "leaf", "valueString": "0x" + leaf_hash(ev).hex()},
            ],
        }
    ]
    if ev.patient_ref:
        entities.append(
            {
                "what": _ident(SYS_PATIENT, ev.patient_ref),
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    if ev.study_ref:
        entities.append(
            {
                "what": _ident(SYS_STUDY, ev.study_ref),
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            }
        )
    if ev.object_ref:
        entities.append(
            {
                "what": _ident(SYS_OBJECT, ev.object_ref),
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            }
        )
    if ev.consent_id:
        entities.append(
            {
                "what": _ident(SYS_CONSENT, ev.consent_id),
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "13", "display": "Security Resource"},
                "detail": [{"type": "version", "valueString": str(ev.consent_version)}],
            }
        )
    if ev.justification_commitment:
        entities[0]["detail"].append(
            {"type": "break-glass-justification", "valueString": ev.justification_commitment}
        )
    if entities[0]["description"] is None:
        del entities[0]["description"]
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"medledger-{ev.seq}",
        "type": type_,
        "action": code,
        "recorded": _iso(ev.time_ms),
        "outcome": OUTCOME_CODES.get(ev.outcome, "8"),
        "agent": agents,
        "source": {
            "observer": _ident(SYS_MEMBER, gateway_id or "medledger-gateway"),
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": entities,
    }
    if profile:
        resource["meta"] = {"profile": [BALP + "IHE.BasicAudit." + profile]}
    if subtypes:
        resource["subtype"] = subtypes
    if ev.reason:
        resource["outcomeDesc"] = ev.reason
    if purposes:
        resource["purposeOfEvent"] = purposes
    return resource


def export_ndjson(events: Iterable[AuditEvent], *, gateway_id: str = "") -> Iterator[str]:
    """FHIR NDJSON (one AuditEvent per line, as in FHIR Bulk Data)."""
    for ev in events:
        yield (
            json.dumps(to_audit_event(ev, gateway_id=gateway_id), sort_keys=True, separators=(",", ":"))
            + "\n"
        )
