"""Domain errors of MedLedger.

Every error the core raises on purpose is a :class:`MedLedgerError`. Each carries a stable
machine-readable ``code`` (also the audit reason code for refusals) and a message that is safe
to show to the caller: messages never contain PHI (no patient names, IDs, or plain hashes of
them). The HTTP mapping lives in one place, :mod:`api.errors`, keyed on ``http_status``.
"""

from __future__ import annotations


class MedLedgerError(Exception):
    """Base of all domain errors. ``code`` is stable; ``str(err)`` is PHI-free."""

    code: str = "error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


# ---- input ---------------------------------------------------------------------------------
class InvalidInput(MedLedgerError):
    """The request or file is malformed (bad JSON, bad field, wrong type)."""

    code = "invalid_input"
    http_status = 400


class NotDicom(InvalidInput):
    """The uploaded object is not a valid DICOM Part 10 object."""

    code = "not_dicom"
    http_status = 400


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"
    http_status = 415


class NotAcceptable(InvalidInput):
    code = "not_acceptable"
    http_status = 406


# ---- authentication (who are you) -----------------------------------------------------------
class AuthenticationFailed(MedLedgerError):
    """The request signature is missing, malformed, stale, replayed, or does not verify."""

    code = "bad_signature"
    http_status = 401


class MissingSignature(AuthenticationFailed):
    code = "missing_signature"


class RequestExpired(AuthenticationFailed):
    code = "request_expired"


class ReplayedRequest(AuthenticationFailed):
    code = "replay"


# ---- authorization (may you) ----------------------------------------------------------------
class Forbidden(MedLedgerError):
    code = "forbidden"
    http_status = 403


class NotAMember(Forbidden):
    """The signer is not an active member of the consortium."""

    code = "not_a_member"


class WrongRole(Forbidden):
    """The signer is a member, but its role may not call this endpoint."""

    code = "wrong_role"


class ConsentDenied(Forbidden):
    """No consent in force allows this access. ``code`` says which rule refused it."""

    code = "no_consent"


# ---- lookup ---------------------------------------------------------------------------------
class NotFound(MedLedgerError):
    code = "not_found"
    http_status = 404


class UnknownStudy(NotFound):
    code = "unknown_study"


class UnknownInstance(NotFound):
    code = "unknown_instance"


class UnknownPatient(NotFound):
    code = "unknown_patient"


class Conflict(MedLedgerError):
    code = "conflict"
    http_status = 409


# ---- integrity and infrastructure -----------------------------------------------------------
class CorruptObject(MedLedgerError):
    """A stored object failed its content check (CID, ciphertext hash or AEAD tag)."""

    code = "corrupt_object"
    http_status = 502


class ChainError(MedLedgerError):
    """The chain refused or failed a call; the message names the contract error if known."""

    code = "chain_error"
    http_status = 502


class StoreUnavailable(MedLedgerError):
    code = "store_unavailable"
    http_status = 503


class DevnetError(MedLedgerError):
    code = "devnet_error"
    http_status = 500
