"""WADO-RS representation logic (ledger.wado) and research copies (ledger.research), pure."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_testdata_file

from ledger.errors import NotAcceptable
from ledger.research import deidentify_attrs, deidentify_bytes, research_context
from ledger.wado import metadata_json, negotiate, negotiate_json, parse_accept, transcode

IMPL, EXPL, DEFL, J2K = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.91",
)
MP = 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize(
    ("accept", "stored", "targets", "multipart"),
    [
        (None, [J2K], [J2K], True),  # no Accept: */*, no preference
        ("*/*", [IMPL, J2K], [IMPL, J2K], True),
        (MP, [IMPL], [EXPL], True),  # default of application/dicom: Explicit VR LE
        (MP, [EXPL], [EXPL], True),
        (f"{MP}; transfer-syntax=*", [IMPL, J2K], [IMPL, J2K], True),
        (f"{MP}; transfer-syntax={IMPL}", [EXPL, DEFL], [IMPL, IMPL], True),
        (f'multipart/related; type="application/dicom"; transfer-syntax="{DEFL}"', [EXPL], [DEFL], True),
        # q-values: the most preferred producible range wins
        (f"{MP}; transfer-syntax={J2K}; q=1, {MP}; transfer-syntax={IMPL}; q=0.5", [EXPL], [IMPL], True),
        (f"{MP}; transfer-syntax={IMPL}; q=0.4, {MP}; transfer-syntax=*; q=0.9", [EXPL], [EXPL], True),
        (f"{MP}; transfer-syntax={IMPL}; q=0.9, {MP}; transfer-syntax=*; q=0.4", [EXPL], [IMPL], True),
        # equal q: the stored syntax (no conversion) is preferred
        (f"{MP}; transfer-syntax={IMPL}, {MP}; transfer-syntax={EXPL}", [EXPL], [EXPL], True),
        # per instance: each gets its best producible one
        (
            f"{MP}; transfer-syntax={EXPL}; q=0.9, {MP}; transfer-syntax=*; q=0.1",
            [IMPL, J2K],
            [EXPL, J2K],
            True,
        ),
        # single part only for one instance
        ("application/dicom", [EXPL], [EXPL], False),
        (f"application/dicom; transfer-syntax={IMPL}", [EXPL], [IMPL], False),
        (f"application/dicom, {MP}; q=0.5", [EXPL, EXPL], [EXPL, EXPL], True),
    ],
)
def test_negotiate(accept: str | None, stored: list[str], targets: list[str], multipart: bool) -> None:
    plan = negotiate(accept, stored, single_allowed=True)
    assert plan.targets == targets and plan.multipart is multipart


@pytest.mark.parametrize(
    ("accept", "stored"),
    [
        (MP, [J2K]),  # default Explicit VR LE: would need decompression
        (f"{MP}; transfer-syntax={IMPL}", [J2K]),
        (f"{MP}; transfer-syntax=*; q=0", [EXPL]),  # q=0: not acceptable
        ("application/dicom+json", [EXPL]),
        ('multipart/related; type="application/octet-stream"', [EXPL]),
        ("application/dicom", [EXPL, EXPL]),  # one part cannot carry two instances
        (f"{MP}; transfer-syntax={EXPL}", [EXPL, J2K]),  # one instance has no acceptable form
        ("text/html", [EXPL]),
    ],
)
def test_negotiate_406(accept: str, stored: list[str]) -> None:
    with pytest.raises(NotAcceptable):
        negotiate(accept, stored, single_allowed=True)


def test_parse_accept_quotes_and_q() -> None:
    (r1, r2) = parse_accept('multipart/related; type="application/dicom"; q=0.3, application/json;q=1')
    assert r1.mime == "multipart/related" and r1.params == {"type": "application/dicom"} and r1.q == 0.3
    assert r2.mime == "application/json" and r2.q == 1.0
    with pytest.raises(NotAcceptable):
        parse_accept("application/json; q=2")


def test_negotiate_json() -> None:
    assert negotiate_json(None) == "application/dicom+json"
    assert negotiate_json("application/json") == "application/json"
    assert negotiate_json("application/json; q=0.5, application/dicom+json") == "application/dicom+json"
    with pytest.raises(NotAcceptable):
        negotiate_json('multipart/related; type="application/dicom+xml"')


def _file(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("target", [IMPL, EXPL, DEFL])
def test_transcode_keeps_the_data_set(target: str) -> None:
    data = _file("CT_small.dcm")
    out = transcode(data, EXPL, target)
    a, b = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(out))
    assert b.file_meta.TransferSyntaxUID == target
    assert a.to_json_dict() == b.to_json_dict()
    if target == EXPL:
        assert out == data


def test_metadata_bulk_data_as_uri() -> None:
    ds = pydicom.dcmread(io.BytesIO(_file("CT_small.dcm")))
    md = metadata_json(ds, "https://gw/dicomweb/studies/1/series/2/instances/3")
    assert md["7FE00010"] == {
        "vr": "OW",
        "BulkDataURI": "https://gw/dicomweb/studies/1/series/2/instances/3/bulkdata/7FE00010",
    }
    reference = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "")
    assert {k: v for k, v in md.items() if "BulkDataURI" not in v} == {
        k: v for k, v in reference.items() if "BulkDataURI" not in v
    }


def test_research_copies_are_consistent_per_study_and_reader() -> None:
    data = _file("MR_small.dcm")
    src = pydicom.dcmread(io.BytesIO(data))
    key = b"\x01" * 32
    one = pydicom.dcmread(
        io.BytesIO(deidentify_bytes(data, research_context(key, "r1", src.StudyInstanceUID, "p")))
    )
    again = pydicom.dcmread(
        io.BytesIO(deidentify_bytes(data, research_context(key, "r1", src.StudyInstanceUID, "p")))
    )
    other = pydicom.dcmread(
        io.BytesIO(deidentify_bytes(data, research_context(key, "r2", src.StudyInstanceUID, "p")))
    )
    assert one.SOPInstanceUID == again.SOPInstanceUID != src.SOPInstanceUID
    assert one.StudyInstanceUID != other.StudyInstanceUID
    assert one.StudyDate == again.StudyDate != src.StudyDate
    assert one.PatientIdentityRemoved == "YES" and one.LongitudinalTemporalInformationModified == "MODIFIED"
    assert one.file_meta.MediaStorageSOPInstanceUID == one.SOPInstanceUID
    attrs = deidentify_attrs(
        {
            "StudyInstanceUID": src.StudyInstanceUID,
            "SOPInstanceUID": src.SOPInstanceUID,
            "StudyDate": src.StudyDate,
            "PatientName": str(src.PatientName),
        },
        research_context(key, "r1", src.StudyInstanceUID, "p"),
    )
    assert attrs["StudyInstanceUID"] == one.StudyInstanceUID and attrs["SOPInstanceUID"] == one.SOPInstanceUID
    assert attrs["StudyDate"] == one.StudyDate and attrs["PatientName"] == str(one.PatientName)
