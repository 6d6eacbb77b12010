"""The optional X-MedLedger-Key header: a signature must recover to the key it names."""

from __future__ import annotations

import hashlib

import pytest
from eth_account import Account

from ledger.errors import AuthenticationFailed
from ledger.reqsig import (
    HEADER_KEY,
    HEADER_TIMESTAMP,
    address_of,
    domain_separator,
    sign_request,
    verify_request,
)

KEY = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
ADDRESS = Account.from_key(KEY).address
MEMBERSHIP = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
TS = 1_800_000_000
EMPTY = hashlib.sha256(b"").digest()


def _signed(sep: bytes, **extra: str) -> dict[str, str]:
    return {**sign_request(KEY, sep, "GET", "/x", "q=1", b"", timestamp=TS).as_dict(), **extra}


def test_address_of_matches_eth_account() -> None:
    assert address_of(KEY) == ADDRESS


@pytest.mark.parametrize("claim", [ADDRESS, ADDRESS.lower(), " " + ADDRESS.upper().replace("0X", "0x")])
def test_named_key_that_signed_is_accepted(claim: str) -> None:
    sep = domain_separator(31337, MEMBERSHIP)
    ok = verify_request(sep, "GET", "/x", "q=1", EMPTY, _signed(sep, **{HEADER_KEY: claim}), now=TS)
    assert ok.signer == ADDRESS


def test_changed_request_or_domain_is_a_bad_signature_when_the_key_is_named() -> None:
    sep = domain_separator(31337, MEMBERSHIP)
    headers = _signed(sep, **{HEADER_KEY: ADDRESS})
    cases = [
        (sep, "GET", "/y", "q=1", headers),  # another path
        (sep, "GET", "/x", "q=2", headers),  # another query
        (sep, "GET", "/x", "q=1", {**headers, HEADER_TIMESTAMP: str(TS + 1)}),  # another time
        (domain_separator(31338, MEMBERSHIP), "GET", "/x", "q=1", headers),  # another chain
        (domain_separator(31337, "0x" + "22" * 20), "GET", "/x", "q=1", headers),  # another deployment
    ]
    for separator, method, path, query, h in cases:
        with pytest.raises(AuthenticationFailed) as info:
            verify_request(separator, method, path, query, EMPTY, h, now=TS)
        assert info.value.code == "bad_signature"
    # someone else's valid signature, naming this key: refused too
    other = Account.create()
    forged = {
        **sign_request(bytes(other.key), sep, "GET", "/x", "q=1", b"", timestamp=TS).as_dict(),
        HEADER_KEY: ADDRESS,
    }
    with pytest.raises(AuthenticationFailed):
        verify_request(sep, "GET", "/x", "q=1", EMPTY, forged, now=TS)
