"""Request signatures: the documented test vector, and equality with eth-account's EIP-712."""

from __future__ import annotations

import hashlib

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from ledger.errors import AuthenticationFailed, MissingSignature, RequestExpired
from ledger.reqsig import (
    domain_separator,
    recover_address,
    request_digest,
    sign_request,
    verify_request,
)

KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
ADDRESS = Account.from_key(KEY).address
CHAIN_ID = 31337
MEMBERSHIP = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
NONCE = bytes.fromhex("11" * 32)
TS = 1_800_000_000
BODY = b'{"patient_id":"x"}'

# The README's test vector: change nothing here without changing the README.
VECTOR_DOMAIN = "f27d66187ed94caa2399dabbd295893b60ab863c658925318084365f246a6222"
VECTOR_DIGEST = "93d13d15c6dbf8e3bdfc3ddc6bf55eeab73660bfc026d6e77853f9e2667aa927"
VECTOR_SIGNATURE = (
    "965b8b6442a8ea9bf6a131c373f7df7f2db5f03e71fd0adfcf4d5669592ab615"
    "5f69b0de70fbbd6dd4ea57b820833439c89b91892c61f09ed99ed80aae600ccc1c"
)


def _eth_account_digest(method: str, path: str, query: str, body: bytes) -> bytes:
    msg = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Request": [
                {"name": "method", "type": "string"},
                {"name": "path", "type": "string"},
                {"name": "query", "type": "string"},
                {"name": "bodyHash", "type": "bytes32"},
                {"name": "timestamp", "type": "uint64"},
                {"name": "nonce", "type": "bytes32"},
            ],
        },
        "primaryType": "Request",
        "domain": {
            "name": "MedLedger Gateway",
            "version": "1",
            "chainId": CHAIN_ID,
            "verifyingContract": MEMBERSHIP,
        },
        "message": {
            "method": method,
            "path": path,
            "query": query,
            "bodyHash": hashlib.sha256(body).digest(),
            "timestamp": TS,
            "nonce": NONCE,
        },
    }
    signable = encode_typed_data(full_message=msg)
    from eth_account.messages import _hash_eip191_message  # type: ignore[attr-defined]

    return bytes(_hash_eip191_message(signable))


def test_digest_equals_eth_account_eip712() -> None:
    sep = domain_separator(CHAIN_ID, MEMBERSHIP)
    ours = request_digest(sep, "POST", "/patients/lookup", "a=1", hashlib.sha256(BODY).digest(), TS, NONCE)
    assert ours == _eth_account_digest("POST", "/patients/lookup", "a=1", BODY)


def test_vector() -> None:
    sep = domain_separator(CHAIN_ID, MEMBERSHIP)
    signed = sign_request(KEY, sep, "POST", "/patients/lookup", "", BODY, timestamp=TS, nonce=NONCE)
    # Same signature as eth-account signing the same typed data (deterministic RFC 6979).
    eth_sig = Account.unsafe_sign_hash(
        _eth_account_digest("POST", "/patients/lookup", "", BODY), KEY
    ).signature
    assert signed.signature == bytes(eth_sig)
    assert signed.as_dict()["x-medledger-signature"] == "0x" + bytes(eth_sig).hex()
    assert sep.hex() == VECTOR_DOMAIN
    assert _eth_account_digest("POST", "/patients/lookup", "", BODY).hex() == VECTOR_DIGEST
    assert signed.signature.hex() == VECTOR_SIGNATURE


def test_verify_round_trip_and_tampering() -> None:
    sep = domain_separator(CHAIN_ID, MEMBERSHIP)
    signed = sign_request(KEY, sep, "GET", "/x", "q=1", b"", timestamp=TS, nonce=NONCE)
    headers = signed.as_dict()
    ok = verify_request(sep, "GET", "/x", "q=1", hashlib.sha256(b"").digest(), headers, now=TS)
    assert ok.signer == ADDRESS
    # any changed field gives another signer (never the real one)
    for method, path, query, body in [
        ("POST", "/x", "q=1", b""),
        ("GET", "/y", "q=1", b""),
        ("GET", "/x", "q=2", b""),
        ("GET", "/x", "q=1", b"!"),
    ]:
        other = verify_request(sep, method, path, query, hashlib.sha256(body).digest(), headers, now=TS)
        assert other.signer != ADDRESS
    other_domain = domain_separator(CHAIN_ID + 1, MEMBERSHIP)
    assert (
        verify_request(other_domain, "GET", "/x", "q=1", hashlib.sha256(b"").digest(), headers, now=TS).signer
        != ADDRESS
    )


def test_refusals() -> None:
    sep = domain_separator(CHAIN_ID, MEMBERSHIP)
    bh = hashlib.sha256(b"").digest()
    with pytest.raises(MissingSignature):
        verify_request(sep, "GET", "/x", "", bh, {}, now=TS)
    signed = sign_request(KEY, sep, "GET", "/x", "", b"", timestamp=TS, nonce=NONCE).as_dict()
    with pytest.raises(RequestExpired):
        verify_request(sep, "GET", "/x", "", bh, signed, now=TS + 301)
    with pytest.raises(AuthenticationFailed):
        verify_request(sep, "GET", "/x", "", bh, {**signed, "x-medledger-signature": "0x1234"}, now=TS)
    with pytest.raises(AuthenticationFailed):
        recover_address(b"\x00" * 32, b"\x00" * 65)
