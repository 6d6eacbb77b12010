"""EIP-712 messages that patients, hospitals and admins sign for the contracts.

The gateway relays these; the contracts verify them. Type strings here must match the
contracts' typehashes exactly (tested against the deployed contracts).
"""

from __future__ import annotations

from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

_DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]

TYPES: dict[str, list[dict[str, str]]] = {
    "Grant": [
        {"name": "patientRef", "type": "bytes32"},
        {"name": "grantee", "type": "bytes32"},
        {"name": "studyRef", "type": "bytes32"},
        {"name": "purposes", "type": "uint256"},
        {"name": "notBefore", "type": "uint64"},
        {"name": "notAfter", "type": "uint64"},
        {"name": "nonce", "type": "uint256"},
    ],
    "Revoke": [{"name": "consentId", "type": "uint256"}, {"name": "nonce", "type": "uint256"}],
    "Enroll": [
        {"name": "patientRef", "type": "bytes32"},
        {"name": "patientKey", "type": "address"},
        {"name": "deadline", "type": "uint64"},
    ],
    "RotatePatientKey": [
        {"name": "patientRef", "type": "bytes32"},
        {"name": "newKey", "type": "address"},
        {"name": "nonce", "type": "uint256"},
    ],
    "Delegate": [
        {"name": "patientRef", "type": "bytes32"},
        {"name": "delegate", "type": "address"},
        {"name": "until", "type": "uint64"},
        {"name": "nonce", "type": "uint256"},
    ],
    "Propose": [
        {"name": "action", "type": "uint8"},
        {"name": "memberId", "type": "bytes32"},
        {"name": "key", "type": "address"},
        {"name": "role", "type": "uint8"},
        {"name": "name", "type": "string"},
        {"name": "value", "type": "uint64"},
        {"name": "deadline", "type": "uint64"},
        {"name": "nonce", "type": "uint256"},
    ],
    "Approve": [{"name": "proposalId", "type": "uint256"}],
}

CONTRACT_DOMAINS = {"Membership": "MedLedger Membership", "Consent": "MedLedger Consent"}
PRIMARY_CONTRACT = {
    "Grant": "Consent",
    "Revoke": "Consent",
    "Enroll": "Consent",
    "RotatePatientKey": "Consent",
    "Delegate": "Consent",
    "Propose": "Membership",
    "Approve": "Membership",
}


def _b32(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    raw = bytes.fromhex(value.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError("a bytes32 value must be 32 bytes")
    return raw


def typed_message(
    primary: str, message: dict[str, Any], chain_id: int, contracts: dict[str, str]
) -> dict[str, Any]:
    contract = PRIMARY_CONTRACT[primary]
    msg = {
        k: (_b32(v) if t["type"] == "bytes32" else v)
        for t in TYPES[primary]
        for k, v in message.items()
        if k == t["name"]
    }
    missing = {t["name"] for t in TYPES[primary]} - set(msg)
    if missing:
        raise ValueError(f"{primary} message is missing {sorted(missing)}")
    return {
        "types": {"EIP712Domain": _DOMAIN_FIELDS, primary: TYPES[primary]},
        "primaryType": primary,
        "domain": {
            "name": CONTRACT_DOMAINS[contract],
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": contracts[contract],
        },
        "message": msg,
    }


def sign_typed(
    private_key: bytes | str, primary: str, message: dict[str, Any], chain_id: int, contracts: dict[str, str]
) -> str:
    """0x-hex 65-byte signature of the EIP-712 message."""
    signable = encode_typed_data(full_message=typed_message(primary, message, chain_id, contracts))
    signed = Account.sign_message(signable, private_key=private_key)
    return "0x" + bytes(signed.signature).hex()
