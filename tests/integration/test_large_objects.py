"""Large multi-frame objects: WADO-RS retrieval streams, so the gateway's memory does not grow
with the object's size.

Own stack (a fresh devnet and gateway processes), so that the gateway process measured is
this test's alone: the object is uploaded through one gateway process, which is then stopped;
a second, fresh process serves the reads, and its peak resident set (``VmHWM`` in
``/proc/<pid>/status``) is compared before and after streaming the object, as a single
instance and inside a study's multipart/related response. The bound is on memory, not time.

Uploads are still buffered by the gateway (issue 5, part 2, not done), which is why the
upload goes through a process of its own.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from eth_account import Account
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ledger.client import GatewayClient
from ledger.keyfiles import read_key
from ledger.multipart import MultipartParser, parse_content_type
from tests.integration.actors import add_member

pytestmark = pytest.mark.integration

FRAMES = 7000  # 128 x 128 x 16 bit = 32 KiB a frame: ~229 MB of pixel data
MiB = 1024 * 1024


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _frames(rows: int, cols: int) -> Iterator[bytes]:
    seed = secrets.token_bytes(16)
    size = rows * cols * 2
    for i in range(FRAMES):  # distinct frames, so a misplaced chunk changes the hash
        block = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        yield (block * (size // len(block) + 1))[:size]


def write_large_instance(path: Path, study: str) -> tuple[int, str]:
    """CT_small's header with FRAMES native frames, written lazily; returns (size, sha256)."""
    src = get_testdata_file("CT_small.dcm")
    assert src is not None
    ds = pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    for tag in [t for t in ds.keys() if int(t) >= 0x7FE00010]:
        del ds[tag]
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "MRN-LARGE-1", "TEST-LARGE", "Test^Large"
    sop = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.NumberOfFrames = FRAMES
    with path.open("wb") as f:
        ds.save_as(f, enforce_file_format=True)
        length = FRAMES * ds.Rows * ds.Columns * 2
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for frame in _frames(ds.Rows, ds.Columns):
            f.write(frame)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def small_instance(study: str) -> bytes:
    src = get_testdata_file("MR_small.dcm")
    assert src is not None
    ds = pydicom.dcmread(src)
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "MRN-LARGE-1", "TEST-LARGE", "Test^Large"
    sop = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _get_to_file(client: GatewayClient, path: str, accept: str, out: Path) -> httpx.Headers:
    headers = {"X-MedLedger-Purpose": "TREAT", "Accept": accept}
    with client.http.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200, r.read()[:300]
        with out.open("wb") as f:
            for chunk in r.iter_bytes(MiB):
                f.write(chunk)
        return r.headers


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def test_retrieval_streams_large_objects_in_bounded_memory(tmp_path_factory: pytest.TempPathFactory) -> None:
    from devnet import manager
    from ledger.service import start_detached, stop_service

    workdir = tmp_path_factory.mktemp("large")
    files = tmp_path_factory.mktemp("large-files")
    net = manager.up(workdir)
    try:
        study = generate_uid()
        big = files / "big.dcm"
        size, sha = write_large_instance(big, study)
        assert size > 200 * MiB
        small = small_instance(study)
        key, auditor_key = Account.create(), Account.create()

        pid, url = start_detached(workdir)  # the upload's process (uploads are still buffered)
        try:
            admins = [GatewayClient(url, read_key(Path(a["key_file"])).key) for a in net.data["admins"]]
            add_member(admins, key.address, "hospital", "Large Objects Hospital")
            add_member(admins, auditor_key.address, "auditor", "Large Objects Auditor")
            hospital = GatewayClient(url, key.key, timeout=600)
            status, _ = hospital.stow([small, big.read_bytes()])
            assert status == 200
            upload_peak = _vm_hwm(pid)  # reported, not bounded: uploads are still buffered
            hospital.close()
        finally:
            stop_service(workdir, pid)

        pid, url = start_detached(workdir)  # a fresh process: its high-water mark is the reads'
        try:
            hospital = GatewayClient(url, key.key, timeout=600)
            auditor = GatewayClient(url, auditor_key.key)
            ds = pydicom.dcmread(big, stop_before_pixels=True)
            base = f"/dicomweb/studies/{study}"
            big_path = f"{base}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
            small_ds = pydicom.dcmread(__import__("io").BytesIO(small), stop_before_pixels=True)
            small_path = f"{base}/series/{small_ds.SeriesInstanceUID}/instances/{small_ds.SOPInstanceUID}"
            # warm up the code paths (imports, connections) on the small object, then measure
            _get_to_file(hospital, small_path, "application/dicom; transfer-syntax=*", files / "warm.dcm")
            assert (files / "warm.dcm").read_bytes() == small
            baseline = _vm_hwm(pid)

            out = files / "single.dcm"
            headers = _get_to_file(hospital, big_path, "application/dicom; transfer-syntax=*", out)
            assert int(headers["content-length"]) == size
            assert _sha256_file(out) == sha  # byte-identical
            after_single = _vm_hwm(pid)

            out_study = files / "study.multipart"
            headers = _get_to_file(hospital, base, 'multipart/related; type="application/dicom"', out_study)
            mime, params = parse_content_type(headers["content-type"])
            assert mime == "multipart/related"
            assert int(headers["content-length"]) == out_study.stat().st_size
            parser = MultipartParser(params["boundary"])
            parts = []
            with out_study.open("rb") as f:
                while chunk := f.read(8 * MiB):
                    parts += [(p.headers, hashlib.sha256(p.data).hexdigest()) for p in parser.feed(chunk)]
            parser.close()
            assert sorted(h for _, h in parts) == sorted([sha, hashlib.sha256(small).hexdigest()])
            after_study = _vm_hwm(pid)

            # control: a transcoded read needs the dataset, so it is buffered; the same measure
            # sees it (so the bounds above are not vacuous)
            implicit = "application/dicom; transfer-syntax=1.2.840.10008.1.2"
            _get_to_file(hospital, big_path, implicit, files / "implicit.dcm")
            after_buffered = _vm_hwm(pid)

            # integrity fails part way (the catalog's plaintext hash no longer matches): the
            # VIEW was recorded before the response; the connection is aborted short of its
            # Content-Length and a FAILED VIEW is recorded for the object
            with sqlite3.connect(workdir / "gateway" / "catalog.sqlite") as db:
                db.execute(
                    "UPDATE instances SET sha256=? WHERE sop_instance_uid=?", ("00" * 32, ds.SOPInstanceUID)
                )
            got = 0
            headers_seen: dict[str, str] = {}
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                with hospital.http.stream(
                    "GET", big_path, headers={"X-MedLedger-Purpose": "TREAT", "Accept": "application/dicom"}
                ) as r:
                    assert r.status_code == 200
                    headers_seen = dict(r.headers)
                    for chunk in r.iter_raw(MiB):
                        got += len(chunk)
            assert int(headers_seen["content-length"]) == size and got < size
            events = [e for e in auditor.events() if e.get("request_id") == headers_seen["x-request-id"]]
            assert [(e["action"], e["outcome"], e["reason"]) for e in events] == [
                ("VIEW", "ok", ""),
                ("VIEW", "failed", "corrupt_object"),
            ]
            hospital.close()
        finally:
            stop_service(workdir, pid)
        print(
            f"object {size / MiB:.0f} MiB; upload process VmHWM {upload_peak / MiB:.0f} MiB; "
            f"read process VmHWM baseline {baseline / MiB:.0f} MiB, "
            f"after single {after_single / MiB:.0f} MiB, after study {after_study / MiB:.0f} MiB, "
            f"after a buffered (transcoded) read {after_buffered / MiB:.0f} MiB"
        )
        assert after_buffered > after_study + size
        # a buffered read holds the ciphertext and the plaintext (>= 2x the object); streamed,
        # the peak must not grow by anything near the object's size
        assert after_single < baseline + size / 4
        assert after_study < baseline + size / 4
    finally:
        manager.down(workdir)
