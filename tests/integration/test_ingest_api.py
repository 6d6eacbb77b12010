"""Every pydicom test file through the real gateway: stored and retrieved byte-identical, or
rejected with its specific reason, leaving nothing behind (catalog, IPFS pins) and a REJECTED
audit event. The expected outcome of each file is the literal table in tests/unit/test_dicom_ingest.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from eth_account import Account

from ledger.client import GatewayClient
from ledger.demo import _ensure_member
from ledger.keyfiles import read_key
from tests.integration.audit_support import own_stack
from tests.unit.test_dicom_ingest import TEST_FILES, TEST_FILES_DIR

pytestmark = pytest.mark.integration


def _pins(api: str) -> set[str]:
    r = httpx.post(api + "/api/v0/pin/ls?type=recursive", timeout=30)
    return set(r.json().get("Keys", {}))


def _instances(workdir: Path) -> int:
    db = sqlite3.connect(str(workdir / "gateway" / "catalog.sqlite"))
    try:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    finally:
        db.close()


@dataclass
class IngestStack:
    workdir: Path
    url: str
    ipfs_api: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestStack]:
    """A devnet and gateway of this module only: other tests upload the same SOP Instance UIDs."""
    with own_stack(tmp_path_factory.mktemp("ingest") / "net") as st:
        yield IngestStack(st.workdir, st.url, str(st.data["ipfs_api"]))


@pytest.fixture(scope="module")
def uploader(stack: IngestStack) -> tuple[GatewayClient, GatewayClient]:
    data = json.loads((stack.workdir / "devnet.json").read_text())
    admins = [GatewayClient(stack.url, read_key(Path(a["key_file"])).key) for a in data["admins"]]
    h, aud = Account.create(), Account.create()
    _ensure_member(admins, h.address, "hospital", "Ingest Test Hospital")
    _ensure_member(admins, aud.address, "auditor", "Ingest Test Auditor")
    return GatewayClient(stack.url, h.key), GatewayClient(stack.url, aud.key)


def test_every_pydicom_file_through_the_api(
    uploader: tuple[GatewayClient, GatewayClient], stack: IngestStack
) -> None:
    hospital, auditor = uploader
    stored_sops: dict[str, bytes] = {}
    study_patient: dict[str, str] = {}
    expected_rejections: dict[str, int] = {}
    for name in sorted(TEST_FILES):
        data = (TEST_FILES_DIR / name).read_bytes()
        expected = TEST_FILES[name]
        pins, rows = _pins(stack.ipfs_api), _instances(stack.workdir)
        status, body = hospital.stow([data])
        if expected == "accept":
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            sop, study = str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)
            patient = f"{ds.get('IssuerOfPatientID', '')}|{ds.PatientID}"
            if sop in stored_sops and stored_sops[sop] != data:
                expected = "sop_instance_conflict"  # another file of the set reuses this SOP Instance UID
            elif sop not in stored_sops and study_patient.get(study, patient) != patient:
                expected = "patient_mismatch"  # another file reuses this Study UID for another patient
        if expected == "accept":
            assert status == 200, (name, body)
            stored_sops.setdefault(sop, data)
            study_patient.setdefault(study, patient)
            got = hospital.retrieve(study, str(ds.SeriesInstanceUID), sop, purpose="TREAT")
            assert got == stored_sops[sop], name
        else:
            assert status == 409, (name, status, body)
            comment = body["00081198"]["Value"][0]["00000902"]["Value"][0]
            assert comment.startswith(expected + ":"), (name, comment)
            assert _pins(stack.ipfs_api) == pins, f"{name}: a rejected upload left a pin"
            assert _instances(stack.workdir) == rows, f"{name}: a rejected upload left a catalog row"
            expected_rejections[expected] = expected_rejections.get(expected, 0) + 1

    # every rejection is in the audit log as REJECTED with its reason
    events = auditor.events()
    mine = [
        e
        for e in events
        if e["action"] == "UPLOAD" and e["outcome"] == "rejected" and e["actor_key"] == hospital.address
    ]
    got: dict[str, int] = {}
    for e in mine:
        got[e["reason"]] = got.get(e["reason"], 0) + 1
    assert got == expected_rejections
    assert sum(expected_rejections.values()) >= 30


def test_rejected_upload_leaves_no_block_pinned(
    uploader: tuple[GatewayClient, GatewayClient], stack: IngestStack
) -> None:
    """A garbage part and a valid part in one STOW: 202, only the valid one stored."""
    from ledger.ipfs import KuboClient

    hospital, _ = uploader
    good = pydicom.dcmread(TEST_FILES_DIR / "CT_small.dcm")
    good.SOPInstanceUID = pydicom.uid.generate_uid()
    good.file_meta.MediaStorageSOPInstanceUID = good.SOPInstanceUID
    buf = BytesIO()
    good.save_as(buf, enforce_file_format=True)
    status, body = hospital.stow([b"\x00" * 200, buf.getvalue()])
    assert status == 202
    assert len(body["00081199"]["Value"]) == 1 and len(body["00081198"]["Value"]) == 1

    async def pinned() -> bool:
        async with KuboClient(stack.ipfs_api) as ipfs:
            return all([await ipfs.pin_ls(c) for c in hospital.last_cids])

    assert asyncio.run(pinned())
