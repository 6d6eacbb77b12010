"""The audit event record and its canonical encoding.

An audit event is what the gateway commits to for every mediated request: who (``actor``, an
institution id or a patientRef), did what (``action``) to which pseudonymous subject
(``patient_ref``, ``study_ref``), why (``purpose``), with what result (``outcome`` and
``reason``), when (``time_ms``), under which consent (``consent_id``/``consent_version``), and
whether it was an emergency (``break_glass``). No field holds PHI: refs are random or keyed
pseudonyms, the justification of a break-glass read is stored off-chain and only its
commitment is here.

Canonical encoding (version 1), the bytes every hash is taken over:
    UTF-8 JSON of the object with exactly the fields below, keys sorted by code point, no
    insignificant whitespace, integers as decimal without exponent, strings with JSON escapes
    as produced by ``json.dumps(ensure_ascii=False, separators=(",", ":"), sort_keys=True)``,
    booleans ``true``/``false``. The field ``v`` is the encoding version (1).
Leaf hash (RFC 9162 section 2.1.1): ``SHA-256(0x00 || canonical_bytes)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

ENCODING_VERSION = 1


class Action(StrEnum):
    UPLOAD = "UPLOAD"
    VIEW = "VIEW"
    SHARE = "SHARE"
    QUERY = "QUERY"
    CONSENT_GRANT = "CONSENT_GRANT"
    CONSENT_REVOKE = "CONSENT_REVOKE"
    ENROLL = "ENROLL"
    HISTORY = "HISTORY"
    VERIFY = "VERIFY"
    EXPORT = "EXPORT"
    DEIDENTIFY = "DEIDENTIFY"
    GOVERNANCE = "GOVERNANCE"
    PATIENT_KEY_ROTATE = "PATIENT_KEY_ROTATE"
    DELEGATE_SET = "DELEGATE_SET"
    REQUEST = "REQUEST"  # a request refused before its action was known (e.g. bad signature)


class Outcome(StrEnum):
    OK = "ok"
    DENIED = "denied"  # refused by policy: authentication, membership, role, consent
    REJECTED = "rejected"  # refused as bad input (e.g. not DICOM)
    FAILED = "failed"  # an internal or infrastructure failure


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before the log assigns it a sequence number and time."""

    action: str
    outcome: str
    actor: str = ""  # institution id (0x + 64 hex) or patientRef; "" when unknown
    actor_key: str = ""  # the signing address (0x + 40 hex), "" when unknown
    actor_role: str = ""  # hospital | auditor | gateway | admin | patient | delegate | ""
    reason: str = ""  # a reason code (see ledger.errors codes), "" when ok
    purpose: str = ""  # HL7 PurposeOfUse code, e.g. TREAT, ETREAT
    patient_ref: str = ""  # 0x + 64 hex, random, mapped off-chain
    study_ref: str = ""  # 0x + 64 hex keyed pseudonym of the StudyInstanceUID
    object_ref: str = ""  # 0x + 64 hex keyed pseudonym of the SOPInstanceUID
    request_id: str = ""
    consent_id: str = ""  # decimal consent id when one applied
    consent_version: int = 0
    break_glass: bool = False
    justification_commitment: str = ""  # 0x + 64 hex, SHA-256 of salted justification text
    counterparty: str = ""  # e.g. the institution a study was shared with


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A logged event: a draft plus its gap-free sequence number and log time."""

    seq: int
    time_ms: int
    action: str
    outcome: str
    actor: str = ""
    actor_key: str = ""
    actor_role: str = ""
    reason: str = ""
    purpose: str = ""
    patient_ref: str = ""
    study_ref: str = ""
    object_ref: str = ""
    request_id: str = ""
    consent_id: str = ""
    consent_version: int = 0
    break_glass: bool = False
    justification_commitment: str = ""
    counterparty: str = ""
    v: int = field(default=ENCODING_VERSION)

    @classmethod
    def from_draft(cls, draft: EventDraft, *, seq: int, time_ms: int) -> AuditEvent:
        return cls(seq=seq, time_ms=time_ms, **asdict(draft))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEvent:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown audit event fields: {sorted(unknown)}")
        return cls(**data)


def canonical_bytes(event: AuditEvent) -> bytes:
    """The canonical encoding (version 1) of ``event``; see the module docstring."""
    return json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode(
        "utf-8"
    )


def leaf_hash(event: AuditEvent) -> bytes:
    """RFC 9162 leaf hash of the event: SHA-256(0x00 || canonical bytes)."""
    return hashlib.sha256(b"\x00" + canonical_bytes(event)).digest()
