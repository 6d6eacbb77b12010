"""Keyed pseudonyms for identifiers that must not appear in clear on-chain or in the catalog.

A plain hash of a patient ID or a DICOM UID is still PHI: the input space is small and
structured, so it can be brute-forced. Pseudonyms are therefore keyed, with the gateway's secret
pseudonymization key (:attr:`ledger.keystore.KeyStore.pseudonym_key`) and domain separation::

    pseudonym = "0x" || hex(HMAC-SHA256(key, msg))                 (66 chars, lowercase hex)
    msg       = UTF-8(domain) || 0x00 || part_1 || ... || part_k
    part_i    = u32be(len(UTF-8(p_i))) || UTF-8(p_i)

The domain must not contain NUL, so the domain/parts boundary is unambiguous, and every part is
length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` give different pseudonyms. Inputs are
hashed exactly as given: callers pass DICOM values with their padding already stripped (as
pydicom returns them), and must normalise consistently.

The on-chain ``patientRef`` is *not* a pseudonym of the patient ID: it is random
(:func:`new_patient_ref`), and the catalog maps it to the patient through
:func:`patient_lookup_key`, so nothing on-chain is a function of the patient's identity.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "DOMAIN_OBJECT_REF",
    "DOMAIN_PATIENT_LOOKUP",
    "DOMAIN_STUDY_REF",
    "MIN_KEY_SIZE",
    "new_patient_ref",
    "object_ref",
    "patient_lookup_key",
    "pseudonym",
    "study_ref",
]

DOMAIN_STUDY_REF = "medledger/study-ref/v1"
DOMAIN_OBJECT_REF = "medledger/object-ref/v1"
DOMAIN_PATIENT_LOOKUP = "medledger/patient-lookup/v1"
MIN_KEY_SIZE = 32
_MAX_PART = 2**32 - 1


def pseudonym(key: bytes, domain: str, *parts: str) -> str:
    """``"0x"`` + 64 hex chars of HMAC-SHA256 over the domain and length-prefixed parts."""
    if len(key) < MIN_KEY_SIZE:
        raise ValueError(f"pseudonym key must be at least {MIN_KEY_SIZE} bytes")
    if not domain or "\x00" in domain:
        raise ValueError("domain must be a non-empty string without NUL")
    mac = hmac.new(bytes(key), domain.encode("utf-8") + b"\x00", hashlib.sha256)
    for part in parts:
        if not isinstance(part, str):
            raise TypeError("pseudonym parts must be str")
        raw = part.encode("utf-8")
        if len(raw) > _MAX_PART:
            raise ValueError("pseudonym part too long")
        mac.update(len(raw).to_bytes(4, "big"))
        mac.update(raw)
    return "0x" + mac.hexdigest()


def study_ref(key: bytes, study_instance_uid: str) -> str:
    """The pseudonymous ref of a study (Study Instance UID, 0020,000D)."""
    return pseudonym(key, DOMAIN_STUDY_REF, study_instance_uid)


def object_ref(key: bytes, sop_instance_uid: str) -> str:
    """The pseudonymous ref of one stored object (SOP Instance UID, 0008,0018)."""
    return pseudonym(key, DOMAIN_OBJECT_REF, sop_instance_uid)


def patient_lookup_key(key: bytes, issuer: str, patient_id: str) -> str:
    """The catalog's lookup key for a patient (Issuer of Patient ID 0010,0021 and Patient ID
    0010,0020); it maps to the random on-chain patientRef and never goes on-chain itself."""
    return pseudonym(key, DOMAIN_PATIENT_LOOKUP, issuer, patient_id)


def new_patient_ref() -> str:
    """A fresh random on-chain patientRef: ``"0x"`` + 64 hex chars of 32 random bytes."""
    return "0x" + secrets.token_bytes(32).hex()
