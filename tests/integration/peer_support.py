"""Helpers for the real-peer tests: fresh members, fresh DICOM, the edge process, Orthanc."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ledger.client import GatewayClient
from ledger.demo import _ensure_member
from ledger.keyfiles import create_key, read_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Member:
    client: GatewayClient
    key_file: Path
    member_id: str
    address: str


def admins(stack) -> list[GatewayClient]:  # type: ignore[no-untyped-def]
    return [GatewayClient(stack.url, read_key(Path(a["key_file"])).key) for a in stack.devnet.data["admins"]]


def new_member(stack, key_dir: Path, name: str, role: str = "hospital") -> Member:  # type: ignore[no-untyped-def]
    """A fresh key (0600 file) registered through 2-of-3 governance."""
    account = create_key(key_dir / f"{name}.key")
    member_id = _ensure_member(admins(stack), account.address, role, f"Peer test {name}")
    return Member(GatewayClient(stack.url, account.key), key_dir / f"{name}.key", member_id, account.address)


def fresh_instance(
    name: str = "CT_small.dcm",
    *,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> bytes:
    """A real pydicom test file with fresh UIDs (so tests never collide on the shared stack)."""
    path = get_testdata_file(name)
    assert path is not None, name
    ds = pydicom.dcmread(path)
    ds.PatientID = patient_id
    ds.PatientName = "Peer^Test"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # Data Set Trailing Padding is for media only (PS3.10 7.2); DIMSE senders such as storescu
    # drop it, so leave it out to keep "the bytes that arrive are the bytes sent" checkable.
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def dataset_bytes(data: bytes) -> bytes:
    """The encoded data set of a PS3.10 object: everything after its file meta group."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def medledger_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("medledger")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ledger.cli"]


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Edge:
    url: str
    dimse_port: int | None
    log: Path
    proc: subprocess.Popen[bytes]


@contextmanager
def running_edge(
    gateway_url: str,
    key_file: Path,
    workdir: Path,
    *,
    purpose: str | None = "TREAT",
    dimse_config: Path | None = None,
) -> Iterator[Edge]:
    """`medledger edge` as a real process (and its C-STORE SCP when a config is given)."""
    port = free_port()
    cmd = [*medledger_cmd(), "edge", "--gateway", gateway_url, "--key", str(key_file)]
    cmd += ["--listen", f"127.0.0.1:{port}"]
    if purpose:
        cmd += ["--purpose", purpose]
    dimse_port = None
    if dimse_config is not None:
        dimse_port = free_port()
        cmd += ["--dimse-config", str(dimse_config), "--dimse-port", str(dimse_port)]
    log = workdir / f"edge-{port}.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", proc, log)
        yield Edge(url, dimse_port, log, proc)
    finally:
        _stop(proc)


ORTHANC_DICOMWEB_PLUGINS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


def orthanc_dicomweb_plugin() -> Path:
    for p in ORTHANC_DICOMWEB_PLUGINS:
        if p.exists():
            return p
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    assert found, "the orthanc-dicomweb package is not installed (./run tests installs it)"
    return found[0]


@dataclass
class Orthanc:
    url: str
    dicom_port: int
    aet: str
    log: Path
    proc: subprocess.Popen[bytes]

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@contextmanager
def running_orthanc(
    workdir: Path,
    *,
    dicomweb_servers: dict[str, str],
    modalities: dict[str, tuple[str, str, int]] | None = None,
) -> Iterator[Orthanc]:
    """A real Orthanc (Debian package) with the DICOMweb plugin, all state under `workdir`."""
    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    assert Path(orthanc).exists(), "the orthanc package is not installed (./run tests installs it)"
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    storage = workdir / "orthanc-db"
    config = {
        "Name": "MedLedgerPeerTest",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpTimeout": 60,
        "Plugins": [str(orthanc_dicomweb_plugin())],
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {name: {"Url": url} for name, url in dicomweb_servers.items()},
        },
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = workdir / "orthanc.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [orthanc, str(cfg)], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        url = f"http://127.0.0.1:{http_port}"
        _wait_http(url + "/system", proc, log)
        yield Orthanc(url, dicom_port, "ORTHANC", log, proc)
    finally:
        _stop(proc)
