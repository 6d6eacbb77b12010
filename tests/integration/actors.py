"""Helpers for the zero-trust tests: fresh members through governance, fresh DICOM, raw signed requests.

Everything goes through the real gateway's HTTP API; nothing here touches the chain directly
except to read events.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ledger.client import GatewayClient
from ledger.keyfiles import read_key
from ledger.reqsig import (
    HEADER_KEY,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    address_of,
    sign_request,
)

SMALL_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "waveform_ecg.dcm")


def admin_clients(stack: Any) -> list[GatewayClient]:
    return [GatewayClient(stack.url, read_key(Path(a["key_file"])).key) for a in stack.devnet.data["admins"]]


def add_member(admins: list[GatewayClient], address: str, role: str, name: str) -> str:
    """A new member under a fresh id: proposal by admin 1, approval by admin 2 (2-of-3)."""
    member_id = "0x" + secrets.token_bytes(32).hex()
    proposal = admins[0].propose("add", member_id, key=address, role=role, name=name)
    assert not proposal["executed"]
    assert admins[1].approve(int(proposal["proposal_id"]))["executed"]
    return member_id


def remove_member(admins: list[GatewayClient], member_id: str) -> None:
    proposal = admins[0].propose("remove", member_id)
    assert admins[1].approve(int(proposal["proposal_id"]))["executed"]


@dataclass(frozen=True)
class Instance:
    data: bytes
    study: str
    series: str
    sop: str


def fresh_instances(patient_id: str, issuer: str, files: tuple[str, ...] = SMALL_FILES) -> list[Instance]:
    """Real pydicom test files relabelled as one (made-up) patient, each in a study of its own."""
    out = []
    for name in files:
        path = get_testdata_file(name)
        assert path is not None, name
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        ds.IssuerOfPatientID = issuer
        ds.PatientName = "Test^Authz"
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(Instance(buf.getvalue(), study, series, sop))
    return out


def instance_path(i: Instance) -> str:
    return f"/dicomweb/studies/{i.study}/series/{i.series}/instances/{i.sop}"


class RawSender:
    """Signed requests built by hand, so each can be sent unsigned, tampered, expired or twice."""

    def __init__(self, url: str, domain: bytes) -> None:
        self.http = httpx.Client(base_url=url, timeout=120)
        self.domain = domain

    def close(self) -> None:
        self.http.close()

    def headers(
        self,
        key: bytes | None,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        query: str = "",
        timestamp: int | None = None,
        domain: bytes | None = None,
        claim: str | None = "",
    ) -> dict[str, str]:
        """Signature headers; `claim` "" names the signer's own key, None sends no key header."""
        if key is None:
            return {}
        signed = sign_request(key, domain or self.domain, method, path, query, body, timestamp=timestamp)
        h = signed.as_dict()
        if claim is not None:
            h[HEADER_KEY] = claim or address_of(key)
        return h

    def send(
        self, method: str, path: str, body: bytes, headers: dict[str, str], *, query: str = ""
    ) -> httpx.Response:
        return self.http.request(method, path + (f"?{query}" if query else ""), content=body, headers=headers)


def tamper(headers: dict[str, str]) -> dict[str, str]:
    """The same signature over a changed message (timestamp off by one second)."""
    return {**headers, HEADER_TIMESTAMP: str(int(headers[HEADER_TIMESTAMP]) - 1)}


def garbage(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, HEADER_SIGNATURE: "0x" + "11" * 65}


def jbody(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class AuditReader:
    """The auditor's view of the log (GET /audit/events?from_seq=...), read incrementally."""

    def __init__(self, auditor: GatewayClient) -> None:
        self.auditor = auditor
        self.next_seq = 0
        self.by_request: dict[str, list[dict[str, Any]]] = {}

    def events_of(self, request_id: str) -> list[dict[str, Any]]:
        assert request_id, "every response must carry a request id"
        if request_id not in self.by_request:
            for ev in self.auditor.events(from_seq=self.next_seq):
                self.by_request.setdefault(ev["request_id"], []).append(ev)
                self.next_seq = max(self.next_seq, int(ev["seq"]) + 1)
        return self.by_request.get(request_id, [])


def wait_until(t: float) -> None:
    delay = t - time.time()
    if delay > 0:
        time.sleep(delay)
