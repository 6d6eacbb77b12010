"""Interoperability with real DICOM peers: dicomweb-client, Orthanc (+ DICOMweb plugin), dcmdump.

Every peer is the real program or package; the gateway is the session's detached process on
the real devnet. Peers that cannot sign (Orthanc) go through `medledger edge`, run as a real
process holding the hospital's key.
"""

from __future__ import annotations

import secrets
import subprocess
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from ledger.client import GatewayError, MedLedgerRequestsAuth
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


@pytest.fixture(scope="module")
def peer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="module")
def hospital(stack, peer_dir: Path) -> Member:  # type: ignore[no-untyped-def]
    return new_member(stack, peer_dir, "peer-hospital")


@pytest.fixture(scope="module")
def edge(stack, hospital: Member, peer_dir: Path):  # type: ignore[no-untyped-def]
    with running_edge(stack.url, hospital.key_file, peer_dir, purpose="TREAT") as e:
        yield e


def _patient() -> str:
    return f"PEER-{secrets.token_hex(6)}"


def _session(hospital: Member, purpose: str | None = "TREAT") -> requests.Session:
    s = requests.Session()
    s.auth = MedLedgerRequestsAuth(hospital.client._key, hospital.client.domain)
    if purpose:
        s.headers["X-MedLedger-Purpose"] = purpose
    return s


# ---- dicomweb-client -------------------------------------------------------------------------
def test_dicomweb_client_stores_and_retrieves_through_the_sdk_auth(stack, hospital: Member) -> None:  # type: ignore[no-untyped-def]
    data = fresh_instance("CT_small.dcm", patient_id=_patient())
    study, series, sop = uids(data)
    original = pydicom.dcmread(BytesIO(data))
    client = DICOMwebClient(url=stack.url + "/dicomweb", session=_session(hospital))
    answer = client.store_instances(datasets=[original])
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [sop]

    got = client.retrieve_instance(study, series, sop)
    assert got == original
    assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    # what the gateway holds is exactly what dicomweb-client encoded: compare with the SDK
    assert dataset_bytes(hospital.client.retrieve(study, series, sop, purpose="TREAT")) == dataset_bytes(data)

    # without the signing auth the same client is refused
    anonymous = DICOMwebClient(url=stack.url + "/dicomweb")
    with pytest.raises(requests.HTTPError) as refused:
        anonymous.retrieve_instance(study, series, sop)
    assert refused.value.response is not None and refused.value.response.status_code == 401


def test_dicomweb_client_chunked_upload_is_signed_whole(stack, hospital: Member) -> None:  # type: ignore[no-untyped-def]
    # dicomweb-client sends bodies over its chunk size with chunked transfer encoding; the
    # signing auth buffers them (the signature covers the body's hash).
    data = fresh_instance("MR_small.dcm", patient_id=_patient())
    study, series, sop = uids(data)
    original = pydicom.dcmread(BytesIO(data))
    client = DICOMwebClient(url=stack.url + "/dicomweb", session=_session(hospital))
    client.set_chunk_size(4096)
    assert len(data) > 4096
    client.store_instances(datasets=[original])
    assert client.retrieve_instance(study, series, sop) == original


def test_dicomweb_client_through_the_edge_needs_no_auth(stack, hospital: Member, edge) -> None:  # type: ignore[no-untyped-def]
    data = fresh_instance("CT_small.dcm", patient_id=_patient())
    study, series, sop = uids(data)
    original = pydicom.dcmread(BytesIO(data))
    client = DICOMwebClient(url=edge.url + "/dicomweb")  # plain DICOMweb, no purpose header
    client.store_instances(datasets=[original])
    assert client.retrieve_instance(study, series, sop) == original
    # it was stored as the edge's hospital (the custodian reads it back with the SDK)
    assert pydicom.dcmread(BytesIO(hospital.client.retrieve(study, series, sop, purpose="TREAT"))) == original
    # the gateway's errors pass through the edge unchanged
    r = httpx.get(edge.url + "/dicomweb/studies/1.2.3/series/4.5/instances/6.7")
    assert r.status_code == 404 and r.json()["error"] in ("unknown_study", "unknown_instance")
    assert r.headers["x-request-id"]
    # only DICOMweb is proxied
    assert httpx.post(edge.url + "/shares", json={}).status_code == 404


def test_edge_refuses_to_sign_for_a_non_member(stack, peer_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from ledger.keyfiles import create_key

    key_file = peer_dir / "not-a-member.key"
    create_key(key_file)
    data = fresh_instance("CT_small.dcm", patient_id=_patient())
    with running_edge(stack.url, key_file, peer_dir) as e:
        client = DICOMwebClient(url=e.url + "/dicomweb")
        with pytest.raises(requests.HTTPError) as refused:
            client.store_instances(datasets=[pydicom.dcmread(BytesIO(data))])
        assert refused.value.response is not None and refused.value.response.status_code == 403
        assert refused.value.response.json()["error"] == "not_a_member"


# ---- Orthanc ----------------------------------------------------------------------------------
def test_orthanc_sends_a_study_to_the_gateway_and_reads_it_back(
    stack,  # type: ignore[no-untyped-def]
    hospital: Member,
    edge,
    peer_dir: Path,
) -> None:
    patient = _patient()
    study_uid = pydicom.uid.generate_uid()
    series_uid = pydicom.uid.generate_uid()
    files = [
        fresh_instance("CT_small.dcm", patient_id=patient, study_uid=study_uid, series_uid=series_uid)
        for _ in range(2)
    ]
    with running_orthanc(peer_dir / "orthanc", dicomweb_servers={"medledger": edge.url + "/dicomweb/"}) as o:
        with o.api() as api:
            ids = []
            for f in files:
                r = api.post("/instances", content=f, headers={"Content-Type": "application/dicom"})
                assert r.status_code == 200, r.text
                ids.append(r.json()["ID"])
            orthanc_study = api.get(f"/instances/{ids[0]}/study").json()["ID"]

            # Orthanc -> edge -> gateway (STOW-RS)
            r = api.post("/dicom-web/servers/medledger/stow", json={"Resources": [orthanc_study]})
            assert r.status_code == 200, r.text

            # it landed, byte for byte, as the edge's hospital
            for f in files:
                s, se, sop = uids(f)
                assert hospital.client.retrieve(s, se, sop, purpose="TREAT") == f

            # Orthanc forgets the study, then retrieves it from the gateway (WADO-RS via the edge)
            assert api.delete(f"/studies/{orthanc_study}").status_code == 200
            assert api.get("/instances").json() == []
            r = api.post(
                "/dicom-web/servers/medledger/retrieve",
                json={"Resources": [{"Study": study_uid}]},
            )
            assert r.status_code == 200, r.text
            back = api.get("/instances").json()
            assert len(back) == len(files)
            got = sorted(api.get(f"/instances/{i}/file").content for i in back)
            assert got == sorted(files)

            # a read the gateway refuses is an error in Orthanc too, not an empty success
            r = api.post(
                "/dicom-web/servers/medledger/retrieve",
                json={"Resources": [{"Study": pydicom.uid.generate_uid()}]},
            )
            assert r.status_code >= 400 and api.get("/instances").json() == back
        log = edge.log.read_text()
        assert study_uid not in log and patient not in log  # no UIDs or IDs in the edge's log


# ---- dcmdump ----------------------------------------------------------------------------------
def test_dcmdump_reads_what_the_gateway_returns(stack, hospital: Member, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in ("CT_small.dcm", "JPEG2000.dcm"):
        data = fresh_instance(name, patient_id=_patient())
        study, series, sop = uids(data)
        status, _ = hospital.client.stow([data])
        assert status == 200
        out = tmp_path / f"{sop}.dcm"
        out.write_bytes(hospital.client.retrieve(study, series, sop, purpose="TREAT"))
        dump = subprocess.run(["dcmdump", "+E", str(out)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert "E: " not in dump.stderr
        assert f"(0008,0018) UI [{sop}]" in dump.stdout
        assert f"(0002,0003) UI [{sop}]" in dump.stdout
    # and a refusal is not something dcmdump could mistake for DICOM: the SDK raises
    with pytest.raises(GatewayError):
        hospital.client.retrieve(study, series, sop, purpose="NOT-A-PURPOSE")
