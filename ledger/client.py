"""Client SDK for the MedLedger gateway.

    from ledger.client import GatewayClient
    with GatewayClient("http://127.0.0.1:8000", private_key) as gw:
        gw.stow([open("CT_small.dcm", "rb").read()])

Every request is signed (EIP-712, see `ledger.reqsig`). For standard HTTP clients, use
:class:`MedLedgerAuth` (an ``httpx.Auth``) or :class:`MedLedgerRequestsAuth` (a
``requests`` auth): they sign each request as it is sent, e.g.
``httpx.get(url, auth=MedLedgerAuth(key, domain))`` or
``dicomweb_client.DICOMwebClient(url, session=s)`` with ``s.auth = MedLedgerRequestsAuth(...)``.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any
from urllib.parse import urlsplit

import httpx
import requests

from ledger.chain import load_account
from ledger.errors import MedLedgerError
from ledger.multipart import build_multipart_related, parse_content_type, parse_multipart_related_bytes
from ledger.reqsig import HEADER_KEY, address_of, domain_separator, sign_request
from ledger.typed_data import sign_typed


class GatewayError(MedLedgerError):
    """An error response of the gateway: ``status``, ``code`` and ``message`` as it sent them."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "") -> None:
        super().__init__(message, code=code)
        self.http_status = status
        self.status = status
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def _key_bytes(private_key: str | bytes) -> bytes:
    if isinstance(private_key, bytes):
        return private_key
    return bytes.fromhex(private_key.removeprefix("0x"))


class MedLedgerAuth(httpx.Auth):
    """httpx auth that signs each request with the caller's key."""

    requires_request_body = True

    def __init__(self, private_key: str | bytes, separator: bytes) -> None:
        self._key = _key_bytes(private_key)
        self._separator = separator
        self._address = address_of(self._key)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        query = request.url.query.decode() if isinstance(request.url.query, bytes) else str(request.url.query)
        signed = sign_request(
            self._key, self._separator, request.method, request.url.path, query, request.content
        )
        request.headers.update(signed.as_dict())
        request.headers[HEADER_KEY] = self._address
        yield request


class MedLedgerRequestsAuth(requests.auth.AuthBase):
    """`requests` auth that signs each request with the caller's key."""

    def __init__(self, private_key: str | bytes, separator: bytes) -> None:
        self._key = _key_bytes(private_key)
        self._separator = separator
        self._address = address_of(self._key)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        url = urlsplit(r.url or "")
        if r.body is not None and not isinstance(r.body, bytes | str) and hasattr(r.body, "__iter__"):
            # A chunked body (e.g. dicomweb-client's STOW of objects over its chunk size): the
            # signature covers the whole body's hash, so buffer it and send it with a length.
            whole = b"".join(c if isinstance(c, bytes) else str(c).encode() for c in r.body)
            r.body = whole
            r.headers.pop("Transfer-Encoding", None)
            r.headers["Content-Length"] = str(len(whole))
        body = (
            r.body
            if isinstance(r.body, bytes)
            else (r.body or "").encode()
            if isinstance(r.body, str)
            else b""
        )
        if r.body is not None and not isinstance(r.body, bytes | str):
            raise TypeError("streamed request bodies cannot be signed; pass bytes")
        from urllib.parse import unquote

        signed = sign_request(
            self._key, self._separator, r.method or "GET", unquote(url.path), url.query, body
        )
        r.headers.update(signed.as_dict())
        r.headers[HEADER_KEY] = self._address
        return r


class GatewayClient:
    """A signed client for one caller (hospital, auditor, admin or patient key)."""

    def __init__(self, base_url: str, private_key: str | bytes, *, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = _key_bytes(private_key)
        self.address = load_account("0x" + self._key.hex()).address
        info = httpx.get(self.base_url + "/info", timeout=timeout)
        info.raise_for_status()
        self.info: dict[str, Any] = info.json()
        self.chain_id = int(self.info["chain_id"])
        self.contracts: dict[str, str] = dict(self.info["contracts"])
        self.domain = domain_separator(self.chain_id, self.contracts["Membership"])
        self.auth = MedLedgerAuth(self._key, self.domain)
        self.last_cids: list[str] = []
        self.http = httpx.Client(base_url=self.base_url, auth=self.auth, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ----------------------------------------------------------------------
    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                data = r.json()
                raise GatewayError(
                    r.status_code,
                    data.get("error", "error"),
                    data.get("message", r.text),
                    data.get("request_id", ""),
                )
            except ValueError:
                raise GatewayError(r.status_code, "error", r.text[:200]) from None
        return r

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import json

        content = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return self._check(self.http.request(method, path, content=content, headers=headers)).json()

    def sign(self, primary: str, message: dict[str, Any]) -> str:
        return sign_typed(self._key, primary, message, self.chain_id, self.contracts)

    # ---- DICOMweb --------------------------------------------------------------------------
    def stow(self, instances: list[bytes]) -> tuple[int, dict[str, Any]]:
        """STOW-RS; returns (HTTP status, DICOM JSON response). 409 (none stored) is not raised."""
        body, ctype = build_multipart_related(
            [({"Content-Type": "application/dicom"}, d) for d in instances], "application/dicom"
        )
        r = self.http.post(
            "/dicomweb/studies",
            content=body,
            headers={"Content-Type": ctype, "Accept": "application/dicom+json"},
        )
        self.last_cids = [c for c in r.headers.get("x-medledger-cids", "").split(",") if c]
        if r.status_code in (200, 202, 409) and r.headers.get("content-type", "").startswith(
            "application/dicom+json"
        ):
            return r.status_code, r.json()
        self._check(r)
        return r.status_code, r.json()

    def _parts(self, r: httpx.Response) -> list[bytes]:
        mime, params = parse_content_type(r.headers.get("content-type", ""))
        if mime == "application/dicom":
            return [r.content]
        return [p.data for p in parse_multipart_related_bytes(r.content, params["boundary"])]

    def retrieve(
        self, study: str, series: str, sop: str, *, purpose: str, break_glass: str | None = None
    ) -> bytes:
        headers = {  # transfer-syntax=*: the stored bytes, never a conversion (PS3.18 8.7.3.5)
            "X-MedLedger-Purpose": purpose,
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        }
        if break_glass is not None:
            headers["X-MedLedger-Break-Glass"] = break_glass
        r = self._check(
            self.http.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}", headers=headers)
        )
        parts = self._parts(r)
        if len(parts) != 1:
            raise GatewayError(502, "bad_response", f"expected one instance, got {len(parts)}")
        return parts[0]

    def retrieve_study(self, study: str, *, purpose: str, break_glass: str | None = None) -> list[bytes]:
        headers = {"X-MedLedger-Purpose": purpose}
        if break_glass is not None:
            headers["X-MedLedger-Break-Glass"] = break_glass
        return self._parts(self._check(self.http.get(f"/dicomweb/studies/{study}", headers=headers)))

    # ---- patients and consent ---------------------------------------------------------------
    def lookup_patient(self, patient_id: str, issuer: str = "") -> str:
        return str(
            self._json("POST", "/patients/lookup", {"patient_id": patient_id, "issuer": issuer})[
                "patient_ref"
            ]
        )

    def enroll(self, patient_ref: str, patient_key: str, *, ttl: int = 600) -> dict[str, Any]:
        """As a hospital: attest that `patient_key` belongs to the patient behind `patient_ref`."""
        deadline = int(time.time()) + ttl
        sig = self.sign(
            "Enroll", {"patientRef": patient_ref, "patientKey": patient_key, "deadline": deadline}
        )
        return dict(
            self._json(
                "POST",
                f"/patients/{patient_ref}/enrollment",
                {"patient_key": patient_key, "deadline": deadline, "signature": sig},
            )
        )

    def patient(self, patient_ref: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/patients/{patient_ref}"))

    def grant(
        self,
        patient_ref: str,
        grantee: str,
        purposes: list[str],
        *,
        study_ref: str | None = None,
        not_before: int | None = None,
        not_after: int | None = None,
        nonce: int | None = None,
    ) -> dict[str, Any]:
        """As the patient: sign and submit a consent grant."""
        from ledger.purposes import purposes_mask

        now = int(time.time())
        nb = now - 60 if not_before is None else not_before
        na = now + 30 * 86400 if not_after is None else not_after
        n = int(self.patient(patient_ref)["nonce"]) if nonce is None else nonce
        msg = {
            "patientRef": patient_ref,
            "grantee": grantee,
            "studyRef": study_ref or "0x" + "00" * 32,
            "purposes": purposes_mask(purposes),
            "notBefore": nb,
            "notAfter": na,
            "nonce": n,
        }
        body = {
            "grantee": grantee,
            "study_ref": study_ref,
            "purposes": purposes,
            "not_before": nb,
            "not_after": na,
            "nonce": n,
            "signature": self.sign("Grant", msg),
        }
        return dict(self._json("POST", f"/patients/{patient_ref}/consents", body))

    def revoke(self, patient_ref: str, consent_id: int, *, nonce: int | None = None) -> dict[str, Any]:
        n = int(self.patient(patient_ref)["nonce"]) if nonce is None else nonce
        sig = self.sign("Revoke", {"consentId": consent_id, "nonce": n})
        return dict(
            self._json(
                "POST",
                f"/patients/{patient_ref}/consents/{consent_id}/revoke",
                {"nonce": n, "signature": sig},
            )
        )

    def rotate_patient_key(
        self, patient_ref: str, new_key: str, *, nonce: int | None = None
    ) -> dict[str, Any]:
        """As the patient (signing with the current key): replace the patient's key with `new_key`.

        Afterwards sign with the new key (e.g. a new GatewayClient); the old key is refused.
        """
        n = int(self.patient(patient_ref)["nonce"]) if nonce is None else nonce
        sig = self.sign("RotatePatientKey", {"patientRef": patient_ref, "newKey": new_key, "nonce": n})
        return dict(
            self._json(
                "POST",
                f"/patients/{patient_ref}/key-rotation",
                {"new_key": new_key, "nonce": n, "signature": sig},
            )
        )

    def set_delegate(
        self, patient_ref: str, delegate: str, until: int, *, nonce: int | None = None
    ) -> dict[str, Any]:
        """As the patient: let `delegate` (a guardian's key) act for the patient until `until`.

        `until` is unix seconds; 0 (or any past time) removes the delegate.
        """
        n = int(self.patient(patient_ref)["nonce"]) if nonce is None else nonce
        msg = {"patientRef": patient_ref, "delegate": delegate, "until": until, "nonce": n}
        return dict(
            self._json(
                "POST",
                f"/patients/{patient_ref}/delegates",
                {"delegate": delegate, "until": until, "nonce": n, "signature": self.sign("Delegate", msg)},
            )
        )

    def remove_delegate(self, patient_ref: str, delegate: str) -> dict[str, Any]:
        return self.set_delegate(patient_ref, delegate, 0)

    def history(self, patient_ref: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/patients/{patient_ref}/history"))

    def share(self, study_instance_uid: str, recipient: str, purpose: str) -> dict[str, Any]:
        return dict(
            self._json(
                "POST",
                "/shares",
                {"study_instance_uid": study_instance_uid, "recipient": recipient, "purpose": purpose},
            )
        )

    # ---- audit and governance --------------------------------------------------------------
    def verify(self) -> dict[str, Any]:
        return dict(self._json("GET", "/audit/verify"))

    def events(self, from_seq: int = 0) -> list[dict[str, Any]]:
        """As an auditor: the audit log (from event `from_seq` on)."""
        import json

        r = self._check(self.http.get("/audit/events", params={"from_seq": from_seq} if from_seq else None))
        return [json.loads(line) for line in r.text.splitlines() if line]

    def export(self, fmt: str = "jsonl") -> bytes:
        """As an auditor: the audit log exported (jsonl with proofs, fhir, dicom-xml or csv)."""
        return self._check(self.http.get("/audit/export", params={"format": fmt})).content

    def members(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/members"))

    def propose(
        self,
        action: str,
        member_id: str,
        *,
        key: str | None = None,
        role: str = "none",
        name: str = "",
        value: int = 0,
        ttl: int = 3600,
    ) -> dict[str, Any]:
        """As an admin: sign and submit a membership proposal (counts as this admin's approval)."""
        from devnet.manager import ROLE_IDS

        actions = {"add": 0, "remove": 1, "change_role": 2, "rotate_key": 3, "set_threshold": 4}
        nonce = int(self._admin_nonce())
        deadline = int(time.time()) + ttl
        msg = {
            "action": actions[action],
            "memberId": member_id,
            "key": key or "0x" + "00" * 20,
            "role": ROLE_IDS[role],
            "name": name,
            "value": value,
            "deadline": deadline,
            "nonce": nonce,
        }
        body = {
            "action": action,
            "member_id": member_id,
            "key": key,
            "role": role,
            "name": name,
            "value": value,
            "deadline": deadline,
            "nonce": nonce,
            "signature": self.sign("Propose", msg),
        }
        return dict(self._json("POST", "/governance/proposals", body))

    def approve(self, proposal_id: int) -> dict[str, Any]:
        sig = self.sign("Approve", {"proposalId": proposal_id})
        return dict(self._json("POST", f"/governance/proposals/{proposal_id}/approvals", {"signature": sig}))

    def _admin_nonce(self) -> int:
        return int(self._json("GET", f"/governance/nonces/{self.address}")["nonce"])
