"""DIMSE ingest: the edge's C-STORE SCP with real senders (dcmtk's storescu, Orthanc, pynetdicom).

The SCP runs inside a real `medledger edge` process; each instance it receives is forwarded
to the session's gateway as a signed STOW-RS upload and audited there as UPLOAD.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from ledger.client import GatewayError
from ledger.keyfiles import create_key
from ledger.keystore import KeyStore
from ledger.pseudonym import object_ref
from tests.integration.peer_support import (
    Member,
    dataset_bytes,
    fresh_instance,
    new_member,
    running_edge,
    running_orthanc,
    uids,
)

pytestmark = pytest.mark.integration

CALLED_AET = "MEDLEDGER"


@pytest.fixture(scope="module")
def dimse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dimse")


@pytest.fixture(scope="module")
def hospital(stack, dimse_dir: Path) -> Member:  # type: ignore[no-untyped-def]
    return new_member(stack, dimse_dir, "dimse-hospital")


@pytest.fixture(scope="module")
def other_hospital(stack, dimse_dir: Path) -> Member:  # type: ignore[no-untyped-def]
    return new_member(stack, dimse_dir, "dimse-other-hospital")


@pytest.fixture(scope="module")
def auditor(stack, dimse_dir: Path) -> Member:  # type: ignore[no-untyped-def]
    return new_member(stack, dimse_dir, "dimse-auditor", role="auditor")


@pytest.fixture(scope="module")
def edge(stack, hospital: Member, other_hospital: Member, dimse_dir: Path):  # type: ignore[no-untyped-def]
    outsider_key = dimse_dir / "dimse-outsider.key"
    create_key(outsider_key)
    config = dimse_dir / "dimse.toml"
    config.write_text(
        f'ae_title = "{CALLED_AET}"\n'
        "[callers.MODALITY1]\n"  # the edge's own key (--key)
        "[callers.ORTHANC]\n"
        'hosts = ["127.0.0.1"]\n'
        "[callers.CT2]\n"
        f'key_file = "{other_hospital.key_file.name}"\n'  # relative to the config file
        "[callers.OUTSIDER]\n"
        f'key_file = "{outsider_key}"\n'
        "[callers.FARAWAY]\n"
        'hosts = ["192.0.2.1"]\n'  # never this machine: such associations are rejected
    )
    with running_edge(stack.url, hospital.key_file, dimse_dir, dimse_config=config) as e:
        assert e.dimse_port is not None
        yield e


def _patient() -> str:
    return f"DIMSE-{secrets.token_hex(6)}"


def _storescu(
    port: int,
    files: list[Path],
    *,
    aet: str = "MODALITY1",
    aec: str = CALLED_AET,
    options: tuple[str, ...] = (),
):
    return subprocess.run(
        ["storescu", *options, "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _upload_events(auditor: Member, actor: str) -> list[dict]:
    return [e for e in auditor.client.events() if e["action"] == "UPLOAD" and e["actor"] == actor]


def test_storescu_study_lands_and_is_audited_as_upload(
    stack,  # type: ignore[no-untyped-def]
    edge,
    hospital: Member,
    auditor: Member,
    tmp_path: Path,
) -> None:
    patient, study_uid, series_uid = _patient(), pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    datas = [
        fresh_instance(name, patient_id=patient, study_uid=study_uid, series_uid=series_uid)
        for name in ("CT_small.dcm", "CT_small.dcm", "JPEG2000.dcm")
    ]
    files = []
    for i, d in enumerate(datas):
        files.append(tmp_path / f"ct{i}.dcm")
        files[-1].write_bytes(d)
    before = _upload_events(auditor, hospital.member_id)

    sent = _storescu(edge.dimse_port, files[:2])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    # -xw: propose JPEG 2000 too, so the compressed instance travels as it is
    sent = _storescu(edge.dimse_port, files[2:], options=("-xw",))
    assert sent.returncode == 0, sent.stdout + sent.stderr

    pkey = KeyStore.open_or_create(stack.workdir / "gateway" / "keystore.json").pseudonym_key
    for i, d in enumerate(datas):
        study, series, sop = uids(d)
        got = hospital.client.retrieve(study, series, sop, purpose="TREAT")
        sent_ds, got_ds = pydicom.dcmread(BytesIO(d)), pydicom.dcmread(BytesIO(got))
        # PS3.10 with file meta from the association: same transfer syntax, no transcoding
        assert got_ds.file_meta.MediaStorageSOPInstanceUID == sop
        assert got_ds.file_meta.TransferSyntaxUID == sent_ds.file_meta.TransferSyntaxUID
        assert got_ds == sent_ds
        assert got_ds.PixelData == sent_ds.PixelData
        if i < 2:
            # storescu sends these data sets as they are in the file: byte for byte
            # (for the JPEG 2000 one, dcmtk re-encodes its sequences with explicit lengths)
            assert dataset_bytes(got) == dataset_bytes(d)
    after = _upload_events(auditor, hospital.member_id)
    new = [e for e in after if e not in before]
    assert sorted(e["object_ref"] for e in new) == sorted(object_ref(pkey, uids(d)[2]) for d in datas)
    assert all(e["outcome"] == "ok" and e["actor_role"] == "hospital" for e in new)
    # the edge's log holds no UIDs or patient IDs
    log = edge.log.read_text()
    assert patient not in log and study_uid not in log


def test_calling_ae_maps_to_its_member_key(
    edge, other_hospital: Member, hospital: Member, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    data = fresh_instance("MR_small.dcm", patient_id=_patient())
    (tmp_path / "mr.dcm").write_bytes(data)
    sent = _storescu(edge.dimse_port, [tmp_path / "mr.dcm"], aet="CT2")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study, series, sop = uids(data)
    # stored as CT2's member: its custodian reads it without consent; the edge's hospital may not
    assert dataset_bytes(
        other_hospital.client.retrieve(study, series, sop, purpose="TREAT")
    ) == dataset_bytes(data)
    with pytest.raises(GatewayError) as refused:
        hospital.client.retrieve(study, series, sop, purpose="TREAT")
    assert refused.value.status == 403


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(edge, hospital: Member, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = fresh_instance("CT_small.dcm", patient_id=_patient())
    path = tmp_path / "ct.dcm"
    path.write_bytes(data)
    study, series, sop = uids(data)
    echo = subprocess.run(
        ["echoscu", "-aet", "MODALITY1", "-aec", CALLED_AET, "127.0.0.1", str(edge.dimse_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stdout + echo.stderr  # a configured AE is accepted (C-ECHO)
    for aet, aec in (("INTRUDER", CALLED_AET), ("MODALITY1", "SOMEONE-ELSE"), ("FARAWAY", CALLED_AET)):
        sent = _storescu(edge.dimse_port, [path], aet=aet, aec=aec)
        assert sent.returncode != 0, (aet, aec)
        assert "Association Rejected" in sent.stdout + sent.stderr, (aet, aec)
    with pytest.raises(GatewayError) as missing:
        hospital.client.retrieve(study, series, sop, purpose="TREAT")
    assert missing.value.status == 404


def _c_store(port: int, calling: str, data: bytes) -> int:
    ds = pydicom.dcmread(BytesIO(data))
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED_AET)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def test_c_store_status_follows_the_gateways_answer(edge, hospital: Member) -> None:  # type: ignore[no-untyped-def]
    data = fresh_instance("CT_small.dcm", patient_id=_patient())
    assert _c_store(edge.dimse_port, "MODALITY1", data) == 0x0000
    assert _c_store(edge.dimse_port, "MODALITY1", data) == 0x0000  # the same object again: stored
    # a different object under the same SOP Instance UID: the gateway refuses, 0x0111
    ds = pydicom.dcmread(BytesIO(data))
    ds.SeriesDescription = "changed"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert _c_store(edge.dimse_port, "MODALITY1", buf.getvalue()) == 0x0111
    # a calling AE mapped to a key that is no member: refused, not authorized
    assert (
        _c_store(edge.dimse_port, "OUTSIDER", fresh_instance("CT_small.dcm", patient_id=_patient())) == 0x0124
    )
    study, series, sop = uids(data)
    assert dataset_bytes(hospital.client.retrieve(study, series, sop, purpose="TREAT")) == dataset_bytes(data)


def test_orthanc_pushes_a_study_by_c_store(edge, hospital: Member, dimse_dir: Path) -> None:  # type: ignore[no-untyped-def]
    patient, study_uid = _patient(), pydicom.uid.generate_uid()
    datas = [
        fresh_instance(n, patient_id=patient, study_uid=study_uid) for n in ("CT_small.dcm", "MR_small.dcm")
    ]
    with running_orthanc(
        dimse_dir / "orthanc",
        dicomweb_servers={},
        modalities={"medledger": (CALLED_AET, "127.0.0.1", edge.dimse_port)},
    ) as o:
        with o.api() as api:
            for d in datas:
                r = api.post("/instances", content=d, headers={"Content-Type": "application/dicom"})
                assert r.status_code == 200, r.text
            (orthanc_study,) = api.get("/studies").json()
            r = api.post("/modalities/medledger/store", content=json.dumps([orthanc_study]))
            assert r.status_code == 200, r.text
            assert r.json().get("FailedInstancesCount", 0) == 0, r.text
    for d in datas:
        study, series, sop = uids(d)
        assert dataset_bytes(hospital.client.retrieve(study, series, sop, purpose="TREAT")) == dataset_bytes(
            d
        )
