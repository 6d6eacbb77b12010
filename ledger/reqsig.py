"""Request signatures: EIP-712 typed data over each HTTP request.

Every gateway request (except `/health`, `/info` and the OpenAPI document) carries:

    X-MedLedger-Timestamp: <unix seconds, decimal>
    X-MedLedger-Nonce:     0x<64 hex>  (32 random bytes, never reused)
    X-MedLedger-Signature: 0x<130 hex> (r || s || v, v in {27, 28})
    X-MedLedger-Key:       0x<40 hex>  (optional: the signer's address; the SDK always sends it)

The signature is an EIP-712 signature (the same digest `eth_signTypedData_v4` produces) of

    domain  = EIP712Domain(string name, string version, uint256 chainId, address verifyingContract)
              name "MedLedger Gateway", version "1", the chain id, the Membership contract
    message = Request(string method, string path, string query, bytes32 bodyHash,
                      uint64 timestamp, bytes32 nonce)
      method    upper-case HTTP method, e.g. "GET"
      path      the raw request path, e.g. "/dicomweb/studies"
      query     the raw query string without "?", "" when none
      bodyHash  SHA-256 of the exact request body bytes (SHA-256 of "" when empty)

    digest = keccak256(0x19 0x01 || domainSeparator || hashStruct(message))

The signer's address is recovered from the signature; the gateway then looks the address up
in on-chain membership (or, for patient endpoints, in the patient's enrolled key). A request is
refused when the timestamp is more than `MAX_SKEW_S` away from the gateway's clock, or when
its (signer, nonce) pair was seen before. With `X-MedLedger-Key`, a signature that does not
recover to that address (a tampered request, another chain or deployment) is refused as a bad
signature (401) instead of being attributed to an unknown key (403). A test vector is in `tests/unit/test_reqsig.py` and
the README.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from coincurve import PrivateKey, PublicKey
from eth_utils import keccak, to_checksum_address

from ledger.errors import AuthenticationFailed, MissingSignature, RequestExpired

DOMAIN_NAME = "MedLedger Gateway"
DOMAIN_VERSION = "1"
MAX_SKEW_S = 300

HEADER_TIMESTAMP = "x-medledger-timestamp"
HEADER_NONCE = "x-medledger-nonce"
HEADER_SIGNATURE = "x-medledger-signature"
HEADER_KEY = "x-medledger-key"

_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_REQUEST_TYPEHASH = keccak(
    text="Request(string method,string path,string query,bytes32 bodyHash,uint64 timestamp,bytes32 nonce)"
)
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def domain_separator(chain_id: int, verifying_contract: str) -> bytes:
    return keccak(
        _DOMAIN_TYPEHASH
        + keccak(text=DOMAIN_NAME)
        + keccak(text=DOMAIN_VERSION)
        + chain_id.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(verifying_contract.removeprefix("0x"))
    )


def request_digest(
    separator: bytes, method: str, path: str, query: str, body_hash: bytes, timestamp: int, nonce: bytes
) -> bytes:
    struct_hash = keccak(
        _REQUEST_TYPEHASH
        + keccak(text=method.upper())
        + keccak(text=path)
        + keccak(text=query)
        + body_hash
        + timestamp.to_bytes(32, "big")
        + nonce
    )
    return keccak(b"\x19\x01" + separator + struct_hash)


def sign_digest(private_key: bytes, digest: bytes) -> bytes:
    """65-byte r||s||v signature (v = 27/28), low-s, as Ethereum expects."""
    sig = PrivateKey(private_key).sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])


def recover_address(digest: bytes, signature: bytes) -> str:
    """Checksummed address that produced `signature` over `digest`; AuthenticationFailed if invalid."""
    if len(signature) != 65:
        raise AuthenticationFailed("signature must be 65 bytes (r || s || v)")
    v = signature[64]
    if v >= 27:
        v -= 27
    s = int.from_bytes(signature[32:64], "big")
    if v not in (0, 1) or s == 0 or s > _SECP256K1_N // 2:
        raise AuthenticationFailed("signature is malformed (bad v or high s)")
    try:
        pub = PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception as exc:
        raise AuthenticationFailed("signature does not verify") from exc
    return to_checksum_address(keccak(pub.format(compressed=False)[1:])[-20:])


@dataclass(frozen=True)
class SignedHeaders:
    timestamp: int
    nonce: bytes
    signature: bytes

    def as_dict(self) -> dict[str, str]:
        return {
            HEADER_TIMESTAMP: str(self.timestamp),
            HEADER_NONCE: "0x" + self.nonce.hex(),
            HEADER_SIGNATURE: "0x" + self.signature.hex(),
        }


def sign_request(
    private_key: bytes,
    separator: bytes,
    method: str,
    path: str,
    query: str,
    body: bytes,
    *,
    timestamp: int | None = None,
    nonce: bytes | None = None,
) -> SignedHeaders:
    ts = int(time.time()) if timestamp is None else timestamp
    n = secrets.token_bytes(32) if nonce is None else nonce
    digest = request_digest(separator, method, path, query, hashlib.sha256(body).digest(), ts, n)
    return SignedHeaders(timestamp=ts, nonce=n, signature=sign_digest(private_key, digest))


@dataclass(frozen=True)
class VerifiedRequest:
    signer: str
    timestamp: int
    nonce: bytes


def _hex_header(headers: dict[str, str], name: str, size: int) -> bytes:
    raw = headers.get(name, "")
    try:
        value = bytes.fromhex(raw.removeprefix("0x"))
    except ValueError as exc:
        raise AuthenticationFailed(f"header {name} is not hex") from exc
    if len(value) != size:
        raise AuthenticationFailed(f"header {name} must be {size} bytes")
    return value


def precheck_headers(
    headers: dict[str, str], *, now: float | None = None, max_skew: int = MAX_SKEW_S
) -> tuple[int, bytes, bytes]:
    """The checks that need no body: signature headers present and well-formed, timestamp fresh.

    Returns (timestamp, nonce, signature). The gateway runs these before it reads a request
    body, so an unsigned or stale request cannot make it buffer a large body.
    """
    if HEADER_SIGNATURE not in headers:
        raise MissingSignature("the request is not signed (X-MedLedger-Signature missing)")
    for name in (HEADER_TIMESTAMP, HEADER_NONCE):
        if name not in headers:
            raise MissingSignature(f"header {name} is missing")
    try:
        ts = int(headers[HEADER_TIMESTAMP])
    except ValueError as exc:
        raise AuthenticationFailed("X-MedLedger-Timestamp must be unix seconds") from exc
    current = time.time() if now is None else now
    if abs(current - ts) > max_skew:
        raise RequestExpired(f"request timestamp is outside the accepted window of {max_skew}s")
    return ts, _hex_header(headers, HEADER_NONCE, 32), _hex_header(headers, HEADER_SIGNATURE, 65)


def verify_request(
    separator: bytes,
    method: str,
    path: str,
    query: str,
    body_hash: bytes,
    headers: dict[str, str],
    *,
    now: float | None = None,
    max_skew: int = MAX_SKEW_S,
) -> VerifiedRequest:
    """Check the signature headers (lower-case names) of a request; return the signer.

    Freshness is checked here (RequestExpired); replay (seen nonces) is the caller's job,
    because it needs durable state.
    """
    ts, nonce, signature = precheck_headers(headers, now=now, max_skew=max_skew)
    digest = request_digest(separator, method, path, query, body_hash, ts, nonce)
    signer = recover_address(digest, signature)
    claimed = headers.get(HEADER_KEY)
    if claimed is not None and claimed.strip().lower() != signer.lower():
        raise AuthenticationFailed(
            "the signature does not verify for the key in X-MedLedger-Key "
            "(request altered, or signed for another chain or deployment)"
        )
    return VerifiedRequest(signer=signer, timestamp=ts, nonce=nonce)


def address_of(private_key: bytes) -> str:
    """The checksummed Ethereum address of a private key."""
    pub = PrivateKey(private_key).public_key.format(compressed=False)[1:]
    return to_checksum_address(keccak(pub)[-20:])
