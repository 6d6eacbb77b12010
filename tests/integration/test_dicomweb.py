"""DICOMweb depth on the real stack: WADO-RS (series, metadata, Accept, transfer syntaxes, bulk
data), QIDO-RS visibility under consent, and the research share (de-identified copies only).

Actors are fresh members added through governance; the instances are pydicom's test files
given new UIDs and a patient of their own, so nothing collides with other test modules.
"""

from __future__ import annotations

import io
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from eth_account import Account
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ledger.client import GatewayClient, MedLedgerRequestsAuth
from ledger.demo import _ensure_member
from ledger.keyfiles import read_key
from ledger.multipart import parse_content_type, parse_multipart_related_bytes

pytestmark = pytest.mark.integration

IMPL, EXPL, J2K = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.91"
MP = 'multipart/related; type="application/dicom"'
ISSUER = "DICOMWEB-TEST-ISSUER"


@dataclass
class Inst:
    name: str
    data: bytes
    study: str
    series: str
    sop: str
    ts: str


@dataclass
class World:
    a: GatewayClient  # custodian of S1, S2 (patient P)
    b: GatewayClient  # custodian of S3 (patient Q); TREAT consent for S1 only
    c: GatewayClient  # researcher: HRESCH consent for all of P's studies
    auditor: GatewayClient
    a_id: str
    b_id: str
    c_id: str
    p_name: str
    p_id: str
    s1: list[Inst]
    s2: list[Inst]
    s3: list[Inst]
    catalog: Path


def _make(name: str, study: str, series: str, patient: tuple[str, str], accession: str) -> Inst:
    path = get_testdata_file(name)
    assert path is not None
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = patient
    ds.IssuerOfPatientID = ISSUER
    ds.AccessionNumber = accession
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Inst(
        name, buf.getvalue(), study, series, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)
    )


@pytest.fixture(scope="module")
def world(stack) -> World:  # type: ignore[no-untyped-def]
    url = stack.url
    admins = [GatewayClient(url, read_key(Path(a["key_file"])).key) for a in stack.devnet.data["admins"]]
    keys = {n: Account.create() for n in ("a", "b", "c", "auditor", "p")}
    tag = uuid.uuid4().hex[:6].upper()
    ids = {
        n: _ensure_member(admins, keys[n].address, role, f"DICOMweb {n} {tag}")
        for n, role in (("a", "hospital"), ("b", "hospital"), ("c", "hospital"), ("auditor", "auditor"))
    }
    cl = {n: GatewayClient(url, k.key) for n, k in keys.items()}
    p = (f"Testperson^Alice{tag}", f"MRN-P-{tag}")
    q = (f"Otherperson^Bob{tag}", f"MRN-Q-{tag}")
    s1, s1ct, s1mr = generate_uid(), generate_uid(), generate_uid()
    s2, s2a = generate_uid(), generate_uid()
    s3 = generate_uid()
    study1 = [
        _make("CT_small.dcm", s1, s1ct, p, f"ACC1{tag}"),
        _make("CT_small.dcm", s1, s1ct, p, f"ACC1{tag}"),
        _make("MR_small.dcm", s1, s1mr, p, f"ACC1{tag}"),
    ]
    study2 = [_make("rtplan.dcm", s2, s2a, p, f"ACC2{tag}"), _make("JPEG2000.dcm", s2, s2a, p, f"ACC2{tag}")]
    study3 = [_make("MR_small.dcm", s3, generate_uid(), q, f"ACC3{tag}")]
    status, _ = cl["a"].stow([i.data for i in study1 + study2])
    assert status == 200
    status, _ = cl["b"].stow([i.data for i in study3])
    assert status == 200
    ref = cl["a"].lookup_patient(p[1], ISSUER)
    cl["a"].enroll(ref, keys["p"].address)
    refs = {s["study_instance_uid"]: s["study_ref"] for s in cl["p"].patient(ref)["studies"]}
    cl["p"].grant(ref, ids["b"], ["TREAT"], study_ref=refs[s1])
    cl["p"].grant(ref, ids["c"], ["HRESCH"])
    return World(
        cl["a"],
        cl["b"],
        cl["c"],
        cl["auditor"],
        ids["a"],
        ids["b"],
        ids["c"],
        p[0],
        p[1],
        study1,
        study2,
        study3,
        stack.workdir / "gateway" / "catalog.sqlite",
    )


def _get(
    client: GatewayClient, path: str, accept: str | None = None, purpose: str | None = "TREAT", **params
):  # type: ignore[no-untyped-def]
    headers = {}
    if accept is not None:
        headers["Accept"] = accept
    if purpose is not None:
        headers["X-MedLedger-Purpose"] = purpose
    return client.http.get(path, headers=headers, params=params or None)


def _parts(r) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    mime, params = parse_content_type(r.headers["content-type"])
    assert mime == "multipart/related" and params["type"] == "application/dicom"
    return [
        (p.headers["content-type"], p.data)
        for p in parse_multipart_related_bytes(r.content, params["boundary"])
    ]


def _ts_of(content_type: str) -> str:
    mime, params = parse_content_type(content_type)
    assert mime == "application/dicom"
    return params["transfer-syntax"]


def _path(i: Inst) -> str:
    return f"/dicomweb/studies/{i.study}/series/{i.series}/instances/{i.sop}"


# ---- WADO-RS --------------------------------------------------------------------------------
def test_series_retrieval_returns_exactly_the_series(world: World) -> None:
    ct = world.s1[:2]
    r = _get(
        world.a, f"/dicomweb/studies/{ct[0].study}/series/{ct[0].series}", accept=f"{MP}; transfer-syntax=*"
    )
    assert r.status_code == 200
    parts = _parts(r)
    assert sorted(d for _, d in parts) == sorted(i.data for i in ct)  # byte-identical, both CT
    assert all(_ts_of(ct_) == EXPL for ct_, _ in parts)
    unknown = _get(world.a, f"/dicomweb/studies/{ct[0].study}/series/1.2.3.4")
    assert unknown.status_code == 404


def test_transfer_syntax_star_default_and_transcode(world: World) -> None:
    rtplan, j2k = world.s2
    assert rtplan.ts == IMPL and j2k.ts == J2K
    # '*': the stored syntax, bytes as stored
    r = _get(world.a, f"/dicomweb/studies/{rtplan.study}", accept=f"{MP}; transfer-syntax=*")
    parts = dict((_ts_of(ct), d) for ct, d in _parts(r))
    assert parts == {IMPL: rtplan.data, J2K: j2k.data}
    # no transfer-syntax parameter: Explicit VR LE, converted from the stored implicit VR
    r = _get(world.a, _path(rtplan), accept=MP)
    ((ct, data),) = _parts(r)
    assert _ts_of(ct) == EXPL
    out = pydicom.dcmread(io.BytesIO(data))
    src = pydicom.dcmread(io.BytesIO(rtplan.data))
    assert out.file_meta.TransferSyntaxUID == EXPL and out.to_json_dict() == src.to_json_dict()
    # an explicit request to convert explicit -> implicit
    ct_inst = world.s1[0]
    r = _get(world.a, _path(ct_inst), accept=f"{MP}; transfer-syntax={IMPL}")
    ((ct, data),) = _parts(r)
    assert _ts_of(ct) == IMPL
    out = pydicom.dcmread(io.BytesIO(data))
    assert out.file_meta.TransferSyntaxUID == IMPL
    assert out.PixelData == pydicom.dcmread(io.BytesIO(ct_inst.data)).PixelData


def test_accept_q_values_and_406(world: World) -> None:
    ct_inst, (_, j2k) = world.s1[0], world.s2
    # preferred JPEG baseline is impossible (no compression here): the q=0.5 implicit VR is used
    accept = f"{MP}; transfer-syntax=1.2.840.10008.1.2.4.50; q=1.0, {MP}; transfer-syntax={IMPL}; q=0.5"
    ((ct, _),) = _parts(_get(world.a, _path(ct_inst), accept=accept))
    assert _ts_of(ct) == IMPL
    # higher q for the stored syntax ('*') wins over a conversion
    accept = f"{MP}; transfer-syntax={IMPL}; q=0.2, {MP}; transfer-syntax=*; q=0.8"
    ((ct, data),) = _parts(_get(world.a, _path(ct_inst), accept=accept))
    assert _ts_of(ct) == EXPL and data == ct_inst.data
    # a bare application/dicom for one instance: a single-part body
    single = _get(world.a, _path(ct_inst), accept="application/dicom")
    assert single.headers["content-type"].startswith("application/dicom") and single.content == ct_inst.data
    # 406: the J2K object cannot be sent uncompressed; nothing acceptable for DICOM JSON either
    for accept in (
        MP,
        f"{MP}; transfer-syntax={EXPL}",
        "application/dicom+json",
        f"{MP}; transfer-syntax=*; q=0",
    ):
        r = _get(world.a, _path(j2k), accept=accept)
        assert r.status_code == 406, accept
        assert r.json()["error"] == "not_acceptable"
    # but a consent refusal comes first: C has no TREAT consent for this study
    r = _get(world.c, _path(j2k), accept=MP)
    assert r.status_code == 403 and r.json()["error"] == "wrong_purpose"


def _strip_bulk(obj: dict) -> dict:
    out = {}
    for tag, elem in obj.items():
        if "BulkDataURI" in elem or "InlineBinary" in elem:
            continue
        if elem.get("vr") == "SQ" and "Value" in elem:
            elem = {**elem, "Value": [_strip_bulk(i) for i in elem["Value"]]}
        out[tag] = elem
    return out


def test_metadata_round_trip_and_bulk_data(world: World) -> None:
    ct_inst = world.s1[0]
    r = _get(world.a, _path(ct_inst) + "/metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    (md,) = r.json()
    src = pydicom.dcmread(io.BytesIO(ct_inst.data))
    assert _strip_bulk(md) == _strip_bulk(src.to_json_dict())
    # the JSON parses back to the same data set (modulo bulk data)
    back = pydicom.Dataset.from_json(_strip_bulk(md))
    assert back.PatientID == world.p_id and back.SOPInstanceUID == ct_inst.sop
    uri = md["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"{_path(ct_inst)}/bulkdata/7FE00010")
    bulk = _get(
        world.a, uri[uri.index("/dicomweb") :], accept="multipart/related; type=application/octet-stream"
    )
    assert bulk.status_code == 200
    _mime, params = parse_content_type(bulk.headers["content-type"])
    (part,) = parse_multipart_related_bytes(bulk.content, params["boundary"])
    assert part.data == src.PixelData
    # study and series metadata list every instance
    study_md = _get(world.a, f"/dicomweb/studies/{ct_inst.study}/metadata").json()
    assert sorted(m["00080018"]["Value"][0] for m in study_md) == sorted(i.sop for i in world.s1)
    series_md = _get(world.a, f"/dicomweb/studies/{ct_inst.study}/series/{ct_inst.series}/metadata").json()
    assert len(series_md) == 2
    xml = _get(
        world.a, _path(ct_inst) + "/metadata", accept='multipart/related; type="application/dicom+xml"'
    )
    assert xml.status_code == 406


# ---- QIDO-RS --------------------------------------------------------------------------------
def _studies(client: GatewayClient, purpose: str | None, **params: str) -> list[str]:
    r = _get(client, "/dicomweb/studies", accept="application/dicom+json", purpose=purpose, **params)
    if r.status_code == 204:
        assert r.content == b""
        return []
    assert r.status_code == 200, r.text
    return sorted(item["0020000D"]["Value"][0] for item in r.json())


def test_qido_visibility_follows_consent(world: World) -> None:
    s1, s2, s3 = world.s1[0].study, world.s2[0].study, world.s3[0].study
    assert _studies(world.a, None) == sorted([s1, s2])  # the custodian sees its own
    assert _studies(world.b, None) == [s3]  # without a purpose: only its own
    assert _studies(world.b, "TREAT") == sorted([s1, s3])  # + exactly the consented study
    assert _studies(world.b, "COC") == [s3]  # consent is for TREAT only
    assert _studies(world.c, None) == [] and _studies(world.c, "TREAT") == []  # nothing of another's
    # matching, on what is visible
    assert _studies(world.b, "TREAT", PatientName=world.p_name.upper()) == [s1]
    assert _studies(world.b, "TREAT", PatientID=world.p_id[:6] + "*") == [s1]
    assert _studies(world.a, None, ModalitiesInStudy="RTPLAN") == [s2]
    assert _studies(world.a, None, StudyInstanceUID=f"{s1},{s3}") == [s1]
    assert _studies(world.a, None, StudyDate="20040101-20041231") == [s1]  # CT 20040119, MR 20040826
    assert _studies(world.a, None, StudyDate="-20031231") == [s2]  # rtplan 20030716
    # series and instances, top level and scoped
    r = _get(world.b, f"/dicomweb/studies/{s1}/series", purpose="TREAT", includefield="all")
    assert r.status_code == 200
    series = {item["00080060"]["Value"][0]: item for item in r.json()}
    assert sorted(series) == ["CT", "MR"] and series["CT"]["00201209"]["Value"] == [2]
    r = _get(world.b, f"/dicomweb/studies/{s2}/series", purpose="TREAT")
    assert r.status_code == 204  # not consented: as if absent
    r = _get(world.a, "/dicomweb/instances", purpose=None, Modality="CT", limit="1", offset="1")
    (one,) = r.json()
    assert one["00080018"]["Value"][0] in {i.sop for i in world.s1[:2]}
    assert one["00100020"]["Value"] == [world.p_id]  # study attributes at the top level
    inst = world.s1[2]
    r = _get(world.a, f"/dicomweb/studies/{inst.study}/series/{inst.series}/instances", purpose=None)
    (only,) = r.json()
    assert only["00080018"]["Value"] == [inst.sop]
    assert only["00081190"]["Value"][0].endswith(_path(inst))
    bad = _get(world.a, "/dicomweb/studies", purpose=None, NotAKeyword="x")
    assert bad.status_code == 400
    fuzzy = _get(world.a, "/dicomweb/studies", purpose=None, fuzzymatching="true")
    assert fuzzy.status_code == 200 and fuzzy.headers["warning"].startswith("299 ")


def test_each_query_is_one_phi_free_query_event(world: World) -> None:
    before = len(world.auditor.events())
    _studies(world.b, "TREAT", PatientName=world.p_name)
    events = world.auditor.events(before)
    queries = [e for e in events if e["action"] == "QUERY" and e["actor"] == world.b_id]
    assert len(queries) == 1
    (ev,) = queries
    assert ev["outcome"] == "ok" and ev["reason"] == "matches:1" and ev["purpose"] == "TREAT"
    text = str(ev)
    assert world.p_name not in text and world.p_id not in text and world.s1[0].study not in text


def test_dicomweb_client_interoperates(world: World, stack) -> None:  # type: ignore[no-untyped-def]
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = MedLedgerRequestsAuth(world.a._key, world.a.domain)
    session.headers["X-MedLedger-Purpose"] = "TREAT"
    client = DICOMwebClient(url=f"{stack.url}/dicomweb", session=session)
    found = client.search_for_studies(search_filters={"PatientID": world.p_id})
    assert sorted(f["0020000D"]["Value"][0] for f in found) == sorted({world.s1[0].study, world.s2[0].study})
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY-HERE"}) == []  # 204
    ct_inst = world.s1[0]
    ds = client.retrieve_instance(ct_inst.study, ct_inst.series, ct_inst.sop)
    assert ds.SOPInstanceUID == ct_inst.sop
    md = client.retrieve_instance_metadata(ct_inst.study, ct_inst.series, ct_inst.sop)
    assert md["00100020"]["Value"] == [world.p_id]
    series = client.retrieve_series(ct_inst.study, ct_inst.series)
    assert sorted(s.SOPInstanceUID for s in series) == sorted(i.sop for i in world.s1[:2])


# ---- research share -------------------------------------------------------------------------
def _needles(world: World, insts: list[Inst]) -> list[bytes]:
    values = {
        world.p_name,
        world.p_id,
        *(i.sop for i in insts),
        *(i.study for i in insts),
        *(i.series for i in insts),
    }
    values |= {f"ACC1{world.p_id[-6:]}", f"ACC2{world.p_id[-6:]}"}
    return [v.encode() for v in values]


def test_research_read_returns_only_deidentified_copies(world: World) -> None:
    insts = world.s1 + world.s2
    before = len(world.auditor.events())
    copies: list[bytes] = []
    for study in (world.s1[0].study, world.s2[0].study):
        r = _get(world.c, f"/dicomweb/studies/{study}", accept=f"{MP}; transfer-syntax=*", purpose="HRESCH")
        assert r.status_code == 200, r.text
        copies += [d for _, d in _parts(r)]
    assert len(copies) == len(insts)
    for data in copies:
        for needle in _needles(world, insts):
            assert needle not in data
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert str(ds.PatientName).startswith("RS") and ds.PatientID == str(ds.PatientName)
    assert {c for c in copies}.isdisjoint({i.data for i in insts})

    # the link to each source is a DEIDENTIFY event naming the source object_ref
    db = sqlite3.connect(str(world.catalog))
    try:
        refs = {
            r[0]
            for r in db.execute(
                f"SELECT object_ref FROM instances WHERE sop_instance_uid IN ({','.join('?' * len(insts))})",
                [i.sop for i in insts],
            )
        }
    finally:
        db.close()
    events = world.auditor.events(before)
    deid = [e for e in events if e["action"] == "DEIDENTIFY" and e["actor"] == world.c_id]
    assert {e["object_ref"] for e in deid} == refs and len(deid) == len(insts)
    assert all(e["purpose"] == "HRESCH" and e["consent_id"] for e in deid)
    views = [e for e in events if e["action"] == "VIEW" and e["actor"] == world.c_id and e["outcome"] == "ok"]
    assert {e["object_ref"] for e in views} == refs

    # the research QIDO view shows the copies' UIDs, and WADO-RS accepts them
    r = _get(world.c, "/dicomweb/instances", purpose="HRESCH", includefield="all")
    assert r.status_code == 200
    found = r.json()
    copy_uids = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in copies}
    assert {f["00080018"]["Value"][0] for f in found} == copy_uids
    for needle in _needles(world, insts):
        assert needle not in r.content
    first = found[0]
    path = first["00081190"]["Value"][0]
    again = _get(
        world.c, path[path.index("/dicomweb") :], accept=f"{MP}; transfer-syntax=*", purpose="HRESCH"
    )
    ((_, data),) = _parts(again)
    assert data in copies  # the same copy, deterministically

    # research needs an HRESCH consent: B has TREAT only; C nothing of patient Q
    r = _get(world.b, f"/dicomweb/studies/{world.s1[0].study}", purpose="HRESCH")
    assert r.status_code == 403 and r.json()["error"] == "wrong_purpose"
    r = _get(world.c, f"/dicomweb/studies/{world.s3[0].study}", purpose="HRESCH")
    assert r.status_code == 403
    # even the custodian gets only de-identified copies for research (and needs consent)
    r = _get(world.a, _path(world.s1[0]), purpose="HRESCH")
    assert r.status_code == 403

    report = world.auditor.verify()
    assert report["ok"], report["problems"]
