"""Ingest validation of DICOM PS3.10 objects (ledger.dicom), table-driven over real files.

TEST_FILES lists every ``*.dcm`` under pydicom's ``data/test_files`` (recursively) with the
outcome the gateway must reach: "accept" or the reject reason code (``NotDicom.code``). A file
that pydicom adds in a new release and that is not in the table fails
``test_table_lists_every_file`` so that someone decides its outcome. CHARSET_FILES does the
same for ``data/charset_files`` (Specific Character Set samples).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import struct
import warnings
import zlib
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from ledger.dicom import REASON_CODES, DicomInstance, parse_instance
from ledger.errors import MedLedgerError, NotDicom, PayloadTooLarge

DATA_DIR = Path(pydicom.data.__file__).parent
TEST_FILES_DIR = DATA_DIR / "test_files"
CHARSET_DIR = DATA_DIR / "charset_files"

# fmt: off
TEST_FILES: dict[str, str] = {
    "693_J2KI.dcm":                             "accept",
    "CT_small.dcm":                             "accept",
    "ExplVR_BigEnd.dcm":                        "dicom_missing_patient_id",  # no PatientID at all
    "ExplVR_BigEndNoMeta.dcm":                  "dicom_not_part10",          # bare data set
    "ExplVR_LitEndNoMeta.dcm":                  "dicom_not_part10",          # bare data set
    "GDCMJ2K_TextGBR.dcm":                      "dicom_missing_patient_id",
    "J2K_pixelrep_mismatch.dcm":                "accept",                    # pixel *values* not judged
    "JPEG-lossy.dcm":                           "accept",
    "JPEG2000-embedded-sequence-delimiter.dcm": "accept",                    # delimiter bytes inside a fragment
    "JPEG2000.dcm":                             "accept",
    "JPEGLSNearLossless_08.dcm":                "dicom_missing_uid",         # no StudyInstanceUID
    "JPEGLSNearLossless_16.dcm":                "dicom_missing_uid",         # no StudyInstanceUID
    "JPGExtended.dcm":                          "accept",
    "MR_small.dcm":                             "accept",
    "MR_small_RLE.dcm":                         "accept",
    "MR_small_bigendian.dcm":                   "accept",                    # explicit VR big endian
    "MR_small_expb.dcm":                        "accept",                    # explicit VR big endian
    "MR_small_implicit.dcm":                    "accept",                    # implicit VR little endian
    "MR_small_jp2klossless.dcm":                "accept",
    "MR_small_jpeg_ls_lossless.dcm":            "accept",
    "MR_small_padded.dcm":                      "dicom_pixel_length",        # 8320 bytes for 8192
    "MR_truncated.dcm":                         "dicom_truncated",           # Pixel Data cut short
    "SC_jpeg_no_color_transform.dcm":           "dicom_missing_patient_id",  # empty PatientID
    "SC_jpeg_no_color_transform_2.dcm":         "dicom_missing_patient_id",
    "SC_rgb_dcmtk_+eb+cr.dcm":                  "accept",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm":               "accept",
    "SC_rgb_dcmtk_+eb+cy+n2.dcm":               "accept",
    "SC_rgb_dcmtk_+eb+cy+np.dcm":               "accept",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm":               "accept",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm":               "accept",
    "SC_rgb_gdcm_KY.dcm":                       "accept",
    "SC_rgb_jls_lossy_line.dcm":                "dicom_missing_uid",         # no StudyInstanceUID
    "SC_rgb_jls_lossy_sample.dcm":              "dicom_missing_uid",
    "SC_rgb_jpeg.dcm":                          "dicom_bad_vr",              # implicit VR under explicit TS
    "SC_rgb_jpeg_app14_dcmd.dcm":               "dicom_missing_patient_id",
    "SC_rgb_jpeg_dcmd.dcm":                     "dicom_missing_patient_id",
    "SC_rgb_jpeg_dcmtk.dcm":                    "accept",
    "SC_rgb_jpeg_gdcm.dcm":                     "accept",
    "SC_rgb_jpeg_lossy_gdcm.dcm":               "accept",
    "SC_rgb_rle.dcm":                           "accept",
    "SC_rgb_rle_16bit.dcm":                     "accept",
    "SC_rgb_rle_16bit_2frame.dcm":              "accept",
    "SC_rgb_rle_2frame.dcm":                    "accept",
    "SC_rgb_rle_32bit.dcm":                     "accept",
    "SC_rgb_rle_32bit_2frame.dcm":              "accept",
    "SC_rgb_small_odd.dcm":                     "accept",                    # odd length + 1 pad byte
    "SC_rgb_small_odd_big_endian.dcm":          "accept",
    "SC_rgb_small_odd_jpeg.dcm":                "accept",
    "SC_ybr_full_422_uncompressed.dcm":         "accept",                    # 2 samples per pixel
    "UN_sequence.dcm":                          "dicom_missing_uid",         # only a private UN sequence
    "badVR.dcm":                                "dicom_meta_mismatch",       # meta SOP instance != data set
    "dicomdirtests/DICOMDIR-empty.dcm":         "dicom_missing_uid",         # a DICOMDIR is no instance
    "empty_charset_LEI.dcm":                    "dicom_meta_incomplete",     # no MediaStorageSOPClassUID
    "examples_jpeg2k.dcm":                      "accept",
    "examples_overlay.dcm":                     "accept",
    "examples_palette.dcm":                     "accept",
    "examples_rgb_color.dcm":                   "accept",
    "examples_ybr_color.dcm":                   "accept",
    "image_dfl.dcm":                            "dicom_missing_patient_id",  # deflate + gzip trailer is fine
    "liver_1frame.dcm":                         "accept",
    "liver_expb_1frame.dcm":                    "accept",
    "meta_missing_tsyntax.dcm":                 "dicom_meta_incomplete",     # no TransferSyntaxUID
    "nested_priv_SQ.dcm":                       "dicom_meta_incomplete",     # no MediaStorageSOPClassUID
    "no_meta.dcm":                              "dicom_not_part10",          # CT_small without meta
    "no_meta_group_length.dcm":                 "dicom_missing_uid",         # no SOPClassUID
    "priv_SQ.dcm":                              "dicom_missing_uid",         # no SOPClassUID
    "reportsi.dcm":                             "dicom_missing_patient_id",  # empty PatientID
    "reportsi_with_empty_number_tags.dcm":      "dicom_missing_patient_id",
    "rtdose.dcm":                               "dicom_meta_mismatch",       # meta SOP instance != data set
    "rtdose_1frame.dcm":                        "dicom_meta_mismatch",
    "rtdose_expb.dcm":                          "dicom_meta_mismatch",
    "rtdose_expb_1frame.dcm":                   "dicom_meta_mismatch",
    "rtdose_rle.dcm":                           "accept",                    # bad reference UID: tolerated
    "rtdose_rle_1frame.dcm":                    "accept",
    "rtplan.dcm":                               "dicom_meta_mismatch",
    "rtplan_truncated.dcm":                     "dicom_truncated",           # sequence runs past EOF
    "rtstruct.dcm":                             "dicom_not_part10",          # no preamble/DICM
    "test-SR.dcm":                              "dicom_missing_patient_id",  # empty PatientID
    "waveform_ecg.dcm":                         "accept",
}

CHARSET_FILES: dict[str, str] = {
    "chrArab.dcm":                "accept",
    "chrFren.dcm":                "accept",
    "chrFrenMulti.dcm":           "accept",
    "chrGerm.dcm":                "accept",
    "chrGreek.dcm":               "accept",
    "chrH31.dcm":                 "accept",
    "chrH32.dcm":                 "accept",
    "chrHbrw.dcm":                "accept",
    "chrI2.dcm":                  "accept",
    "chrJapMulti.dcm":            "dicom_meta_mismatch",       # meta SOP instance != data set
    "chrJapMultiExplicitIR6.dcm": "dicom_meta_mismatch",
    "chrKoreanMulti.dcm":         "dicom_missing_pixel_data",  # SC image without Pixel Data
    "chrRuss.dcm":                "accept",
    "chrSQEncoding.dcm":          "dicom_missing_uid",         # sequence-only sample
    "chrSQEncoding1.dcm":         "dicom_missing_uid",
    "chrX1.dcm":                  "accept",
    "chrX2.dcm":                  "accept",
}
# fmt: on

# Decoded PatientName of some charset samples (str(ds.PatientName) after SpecificCharacterSet).
CHARSET_NAMES: dict[str, str] = {
    "chrFren.dcm": "Buc^Jérôme",
    "chrGerm.dcm": "Äneas^Rüdiger",
    "chrGreek.dcm": "Διονυσιος",
    "chrH31.dcm": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "chrI2.dcm": "Hong^Gildong=洪^吉洞=홍^길동",
    "chrX2.dcm": "Wang^XiaoDong=王^小东",
}


def outcome(data: bytes, **kwargs: int) -> str:
    try:
        parse_instance(data, **kwargs)
    except MedLedgerError as err:
        return err.code
    return "accept"


def _listing(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*.dcm")}


def _phi_of(path: Path) -> list[str]:
    """PatientName/PatientID of a file, read leniently (test only) to check messages."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except Exception:
        return []
    values = [str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")]
    return [v for v in values if len(v.strip()) >= 3]


# ---- the real files --------------------------------------------------------------------------
def test_table_lists_every_file() -> None:
    assert get_testdata_file("CT_small.dcm") == str(TEST_FILES_DIR / "CT_small.dcm")
    found = _listing(TEST_FILES_DIR)
    assert found, "pydicom test files not found"
    assert sorted(found - TEST_FILES.keys()) == [], "new test files: decide their outcome"
    assert sorted(TEST_FILES.keys() - found) == [], "table lists files that no longer exist"
    charset_found = _listing(CHARSET_DIR)
    assert sorted(charset_found ^ CHARSET_FILES.keys()) == []


def test_table_uses_known_codes() -> None:
    for expected in [*TEST_FILES.values(), *CHARSET_FILES.values()]:
        assert expected == "accept" or expected in REASON_CODES


@pytest.mark.parametrize(
    ("directory", "name", "expected"),
    [(TEST_FILES_DIR, n, e) for n, e in TEST_FILES.items()]
    + [(CHARSET_DIR, n, e) for n, e in CHARSET_FILES.items()],
    ids=[*TEST_FILES, *(f"charset/{n}" for n in CHARSET_FILES)],
)
def test_real_file(directory: Path, name: str, expected: str) -> None:
    path = directory / name
    data = path.read_bytes()
    try:
        inst = parse_instance(data)
    except NotDicom as err:
        assert err.code == expected, f"{name}: {err.code} ({err})"
        assert err.code in REASON_CODES
        message = str(err)
        for phi in _phi_of(path):
            assert phi not in message
        return
    assert expected == "accept", f"{name} was accepted, expected {expected}"
    assert isinstance(inst, DicomInstance)
    assert inst.size == len(data)
    assert inst.sha256 == hashlib.sha256(data).hexdigest()
    ds = pydicom.dcmread(path)
    assert inst.sop_instance_uid == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert inst.sop_class_uid == ds.SOPClassUID
    assert inst.study_instance_uid == ds.StudyInstanceUID
    assert inst.series_instance_uid == ds.SeriesInstanceUID
    assert inst.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert inst.patient_id == str(ds.PatientID).strip() != ""
    assert inst.patient_name == (str(ds.PatientName) if "PatientName" in ds else "")
    assert inst.qido["SOPInstanceUID"] == inst.sop_instance_uid
    assert inst.qido["PatientID"] == str(ds.PatientID)
    text = repr(inst)
    for phi in _phi_of(path):
        assert phi not in text


@pytest.mark.parametrize(("name", "patient_name"), sorted(CHARSET_NAMES.items()))
def test_charset_decoding(name: str, patient_name: str) -> None:
    inst = parse_instance((CHARSET_DIR / name).read_bytes())
    assert inst.patient_name == patient_name
    assert inst.qido["PatientName"] == patient_name


def test_accept_count_is_what_the_table_says() -> None:
    accepted = [n for n, e in TEST_FILES.items() if e == "accept"]
    assert len(accepted) == 44 and len(TEST_FILES) == 79


# ---- synthetic defects from CT_small.dcm ----------------------------------------------------
CT = Path(get_testdata_file("CT_small.dcm") or "")


@pytest.fixture(scope="module")
def ct() -> bytes:
    return CT.read_bytes()


def _ct_ds() -> pydicom.FileDataset:
    return pydicom.dcmread(CT)


def _save(ds: pydicom.Dataset) -> bytes:
    # enforce_file_format=False: keep the file meta as set (True would rewrite the
    # MediaStorage UIDs from the data set); CT_small has a preamble and meta already.
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when a test sets an invalid value
        ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def test_ct_small_facts(ct: bytes) -> None:
    inst = parse_instance(ct)
    ds = _ct_ds()
    assert inst.transfer_syntax_uid == ExplicitVRLittleEndian
    assert inst.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert inst.patient_id == "1CT1"
    assert inst.issuer_of_patient_id == ""
    assert inst.patient_name == "CompressedSamples^CT1"
    assert inst.modality == "CT"
    assert inst.study_date == ds.StudyDate
    assert (inst.rows, inst.columns, inst.number_of_frames) == (128, 128, None)
    assert inst.series_number == int(ds.SeriesNumber)
    assert inst.instance_number == int(ds.InstanceNumber)
    assert inst.value_warnings == ()
    assert inst.qido["Modality"] == "CT"
    assert inst.qido["StudyInstanceUID"] == inst.study_instance_uid
    assert inst.qido["Rows"] == "128"
    assert "PatientName" in inst.qido
    assert "CompressedSamples" not in repr(inst) and "1CT1" not in repr(inst)
    with pytest.raises(AttributeError):
        inst.sop_instance_uid = "1.2.3"  # type: ignore[misc]  # frozen


# Truncation by N bytes: CT_small ends with Pixel Data (32768 bytes) and 126 bytes of
# (FFFC,FFFC) trailing padding (138 bytes with its header), after a 336-byte meta.
TRUNCATIONS: dict[int, str] = {
    1: "dicom_truncated",
    2: "dicom_truncated",
    137: "dicom_truncated",
    138: "accept",  # exactly the trailing padding element: still a complete object
    139: "dicom_truncated",
    1000: "dicom_truncated",
    32906: "dicom_truncated",  # cuts into the Pixel Data header
    32918: "dicom_missing_pixel_data",  # drops Pixel Data at an element boundary
    38000: "dicom_truncated",
    39006: "dicom_truncated",  # inside the file meta
    39075: "dicom_not_part10",  # 131 bytes left
    39205: "dicom_not_part10",
}


@pytest.mark.parametrize(("n", "expected"), sorted(TRUNCATIONS.items()))
def test_truncated_by_n(ct: bytes, n: int, expected: str) -> None:
    assert outcome(ct[:-n]) == expected


def test_every_truncation_of_a_small_file_is_refused() -> None:
    data = (TEST_FILES_DIR / "MR_small_implicit.dcm").read_bytes()  # ends with Pixel Data
    outcomes = {outcome(data[:-n]) for n in range(1, len(data), 7)}
    assert "accept" not in outcomes
    assert outcomes <= REASON_CODES


def test_pydicom_reads_a_truncated_file_silently(ct: bytes) -> None:
    # Why the structural walk exists: pydicom returns short Pixel Data without complaint.
    ds = pydicom.dcmread(io.BytesIO(ct[:-1000]))
    assert len(ds.PixelData) < 32768


def test_pixel_data_shortened_by_two_bytes() -> None:
    ds = _ct_ds()
    ds.PixelData = ds.PixelData[:-2]
    assert outcome(_save(ds)) == "dicom_pixel_length"


def test_pixel_data_one_pad_byte_is_fine_but_not_two() -> None:
    ds = _ct_ds()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 3, 8, 8, 7
    ds.PixelData = b"\x01\x02\x03\x00"  # 3 bytes + pad
    assert outcome(_save(ds)) == "accept"
    ds.PixelData = b"\x01\x02\x03\x00\x00\x00"
    assert outcome(_save(ds)) == "dicom_pixel_length"


def test_bits_allocated_one_is_counted_in_bits() -> None:
    ds = _ct_ds()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 4, 1, 1, 0
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 3  # 48 bits = 6 bytes
    ds.PixelData = b"\xff" * 6
    assert outcome(_save(ds)) == "accept"
    ds.PixelData = b"\xff" * 8
    assert outcome(_save(ds)) == "dicom_pixel_length"
    ds.NumberOfFrames = 0
    ds.PixelData = b""
    assert outcome(_save(ds)) == "dicom_pixel_attrs"


def test_pixel_attributes_missing() -> None:
    ds = _ct_ds()
    del ds.Rows
    assert outcome(_save(ds)) == "dicom_pixel_attrs"


def test_meta_sop_instance_uid_changed() -> None:
    ds = _ct_ds()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".1"
    assert outcome(_save(ds)) == "dicom_meta_mismatch"


def test_meta_sop_class_uid_changed() -> None:
    ds = _ct_ds()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR
    assert outcome(_save(ds)) == "dicom_meta_mismatch"


@pytest.mark.parametrize(
    ("uid", "expected"),
    [
        ("1.2.840.113619.2.1", "accept"),
        ("0.1.2", "accept"),
        ("1.2.03.4", "dicom_invalid_uid"),  # leading zero
        ("1.2..3", "dicom_invalid_uid"),  # empty component
        ("1.2.3.", "dicom_invalid_uid"),
        ("1.2.a", "dicom_invalid_uid"),
        ("1." + "2" * 62, "accept"),  # 64 characters
        ("1." + "2" * 63, "dicom_invalid_uid"),  # 65 characters
    ],
)
def test_sop_instance_uid_syntax(uid: str, expected: str) -> None:
    ds = _ct_ds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on setting an invalid UI value
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    assert outcome(_save(ds)) == expected


@pytest.mark.parametrize(
    "keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
def test_required_uid_missing(keyword: str) -> None:
    ds = _ct_ds()
    delattr(ds, keyword)
    assert outcome(_save(ds)) == "dicom_missing_uid"


def test_patient_id_missing_or_blank() -> None:
    ds = _ct_ds()
    ds.PatientID = "   "
    err = _err(_save(ds))
    assert err.code == "dicom_missing_patient_id"
    del ds.PatientID
    assert outcome(_save(ds)) == "dicom_missing_patient_id"


def test_messages_never_carry_phi() -> None:
    ds = _ct_ds()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-445566"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
    err = _err(_save(ds))
    assert "Doe" not in str(err) and "445566" not in str(err)


def test_issuer_of_patient_id() -> None:
    ds = _ct_ds()
    ds.IssuerOfPatientID = "HOSP-A"
    inst = parse_instance(_save(ds))
    assert inst.issuer_of_patient_id == "HOSP-A"
    assert inst.qido["IssuerOfPatientID"] == "HOSP-A"


def test_no_preamble(ct: bytes) -> None:
    assert outcome(ct[128:]) == "dicom_not_part10"  # starts at "DICM"
    assert outcome(ct[132:]) == "dicom_not_part10"  # starts at the meta group
    assert outcome(ct[:128] + b"DICX" + ct[132:]) == "dicom_not_part10"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(io.BytesIO(ct[128:]))  # sanity: only force=True would read it


def test_random_bytes() -> None:
    rnd = random.Random(20240601)
    for size in (1, 131, 132, 4096):
        assert outcome(rnd.randbytes(size)) == "dicom_not_part10"
    # random bytes behind a valid preamble are still refused
    for _ in range(50):
        data = b"\0" * 128 + b"DICM" + rnd.randbytes(rnd.randint(0, 2048))
        assert outcome(data) in REASON_CODES


def test_empty_file() -> None:
    assert outcome(b"") == "dicom_empty"


def test_png_header() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 200
    assert outcome(png) == "dicom_not_part10"


def test_oversize_with_small_cap(ct: bytes) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        parse_instance(ct, max_size=1000)
    assert info.value.code == "payload_too_large" and info.value.http_status == 413
    assert outcome(ct, max_size=len(ct)) == "accept"


def test_implicit_vr_round_trip() -> None:
    # explicit/implicit VR LE from one source; big endian is covered by the real files
    ds = _ct_ds()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    inst = parse_instance(buf.getvalue())
    assert inst.transfer_syntax_uid == ImplicitVRLittleEndian
    assert inst.sop_instance_uid == ds.SOPInstanceUID


def test_big_endian_files_are_accepted() -> None:
    for name in ("MR_small_bigendian.dcm", "MR_small_expb.dcm", "liver_expb_1frame.dcm"):
        inst = parse_instance((TEST_FILES_DIR / name).read_bytes())
        assert inst.transfer_syntax_uid == ExplicitVRBigEndian


def _deflated_ct() -> bytes:
    ds = _ct_ds()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _save(ds)


def test_deflated_is_valid() -> None:
    data = _deflated_ct()
    inst = parse_instance(data)
    assert inst.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert (inst.rows, inst.columns) == (128, 128)


def _split_meta(data: bytes) -> tuple[bytes, bytes]:
    (group_length,) = struct.unpack_from("<L", data, 140)
    end = 144 + group_length
    return data[:end], data[end:]


def test_deflate_defects() -> None:
    meta, deflated = _split_meta(_deflated_ct())
    inflated = zlib.decompressobj(-15).decompress(deflated)
    # a gzip trailer that matches is tolerated (pydicom's image_dfl.dcm has one)
    trailer = struct.pack("<LL", zlib.crc32(inflated), len(inflated))
    body = deflated.rstrip(b"\0")
    assert outcome(meta + body + trailer) == "accept"
    assert outcome(meta + body + b"\x01" * 8) == "dicom_deflate_error"
    assert outcome(meta + body[: len(body) // 2]) == "dicom_deflate_error"
    assert outcome(meta + b"\xff" * 64) == "dicom_deflate_error"
    with pytest.raises(PayloadTooLarge):
        parse_instance(meta + deflated, max_inflated_size=1024)


def test_deflate_bomb_is_bounded() -> None:
    meta, _ = _split_meta(_deflated_ct())
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"\0" * (64 * 1024 * 1024)) + compressor.flush()
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLarge):
        parse_instance(meta + bomb, max_inflated_size=1024 * 1024)


# ---- hand-built objects: defects pydicom reads silently -------------------------------------
_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEF = 0xFFFFFFFF
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR (no Pixel Data)
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
INSTANCE = "1.2.826.0.1.3680043.2.1125.1"


def el(tag: int, vr: str, value: bytes | str, *, length: int | None = None) -> bytes:
    raw = value.encode("latin-1") if isinstance(value, str) else value
    if len(raw) % 2 and length is None:
        raw += b"\0" if vr in ("UI", "OB", "UN") else b" "
    n = len(raw) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr.encode(), 0, n) + raw
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), n) + raw


def implicit_el(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def item(body: bytes | None = None, *, length: int | None = None) -> bytes:
    if body is None:
        return struct.pack("<HHL", 0xFFFE, 0xE000, UNDEF if length is None else length)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body) if length is None else length) + body


ITEM_DELIM = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQ_DELIM = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def part10(
    dataset: bytes,
    *,
    ts: str = ExplicitVRLittleEndian,
    sop_class: str = SR_CLASS,
    sop_instance: str = INSTANCE,
    group_length: int | str | None = "auto",
) -> bytes:
    meta = (
        el(0x00020001, "OB", b"\x00\x01")
        + el(0x00020002, "UI", sop_class)
        + el(0x00020003, "UI", sop_instance)
        + el(0x00020010, "UI", ts)
        + el(0x00020012, "UI", "1.2.826.0.1.3680043.2.1125.99")
    )
    if group_length == "auto":
        meta = el(0x00020000, "UL", struct.pack("<L", len(meta))) + meta
    elif isinstance(group_length, int):
        meta = el(0x00020000, "UL", struct.pack("<L", group_length)) + meta
    return b"\0" * 128 + b"DICM" + meta + dataset


def head(*, charset: str | None = None, sop_class: str = SR_CLASS) -> bytes:
    out = el(0x00080005, "CS", charset) if charset is not None else b""
    return out + el(0x00080016, "UI", sop_class) + el(0x00080018, "UI", INSTANCE)


def patient(name: bytes | str = "Doe^Jane", pid: str = "PID-7") -> bytes:
    return el(0x00100010, "PN", name) + el(0x00100020, "LO", pid)


def study() -> bytes:
    return el(0x0020000D, "UI", "1.2.826.0.1.3680043.2.1125.2") + el(
        0x0020000E, "UI", "1.2.826.0.1.3680043.2.1125.3"
    )


def valid_sr(content: bytes = b"") -> bytes:
    return head() + el(0x00080060, "CS", "SR") + patient() + study() + content


def _err(data: bytes) -> NotDicom:
    with pytest.raises(NotDicom) as info:
        parse_instance(data)
    return info.value


def test_hand_built_baseline_is_accepted() -> None:
    seq = el(0x0040A730, "SQ", item(el(0x0040A040, "CS", "TEXT")))  # ContentSequence
    inst = parse_instance(part10(valid_sr(seq)))
    assert inst.sop_class_uid == SR_CLASS and inst.modality == "SR"
    assert inst.patient_name == "Doe^Jane"
    assert outcome(part10(valid_sr(), group_length=None)) == "accept"  # group length optional


def test_wrong_meta_group_length() -> None:
    assert outcome(part10(valid_sr(), group_length=10)) == "dicom_meta_group_length"


def test_meta_missing_after_dicm() -> None:
    assert outcome(b"\0" * 128 + b"DICM" + valid_sr()) == "dicom_meta_missing"


def test_unknown_transfer_syntax() -> None:
    assert outcome(part10(valid_sr(), ts="1.2.3.4.5")) == "dicom_unknown_transfer_syntax"


def test_stray_item_delimiter_ends_pydicom_read_early() -> None:
    data = part10(head() + ITEM_DELIM + patient() + study())
    ds = pydicom.dcmread(io.BytesIO(data))
    assert "PatientID" not in ds  # pydicom stops silently at the delimiter
    assert _err(data).code == "dicom_bad_structure"


def test_duplicate_tag() -> None:
    data = part10(head() + patient() + el(0x00100020, "LO", "OTHER") + study())
    assert _err(data).code == "dicom_tag_order"
    data = part10(head() + study() + patient())
    assert _err(data).code == "dicom_tag_order"


def test_sequence_without_delimiter() -> None:
    seq = el(0x0040A730, "SQ", b"", length=UNDEF) + item(el(0x0040A040, "CS", "TEXT"))
    assert outcome(part10(valid_sr(seq))) == "dicom_missing_delimiter"
    undefined_item = item() + el(0x0040A040, "CS", "TEXT")  # no item delimiter either
    seq = el(0x0040A730, "SQ", b"", length=UNDEF) + undefined_item
    assert outcome(part10(valid_sr(seq))) == "dicom_missing_delimiter"
    closed = el(0x0040A730, "SQ", b"", length=UNDEF) + undefined_item + ITEM_DELIM + SEQ_DELIM
    assert outcome(part10(valid_sr(closed))) == "accept"


def test_item_longer_than_its_sequence() -> None:
    body = el(0x0040A040, "CS", "TEXT")
    seq = el(0x0040A730, "SQ", item(body, length=len(body) + 8))  # item claims 8 more bytes
    assert outcome(part10(valid_sr(seq))) == "dicom_truncated"


def test_non_item_inside_sequence() -> None:
    seq = el(0x0040A730, "SQ", el(0x0040A040, "CS", "TEXT"))
    assert outcome(part10(valid_sr(seq))) == "dicom_bad_structure"


def test_nested_item_truncation_is_seen() -> None:
    inner = el(0x0040A040, "CS", "TEXT", length=200)  # element runs past its item
    seq = el(0x0040A730, "SQ", item(inner))
    assert outcome(part10(valid_sr(seq))) == "dicom_truncated"


def test_deep_nesting_is_bounded() -> None:
    nested = el(0x0040A040, "CS", "TEXT")
    for _ in range(40):
        nested = el(0x0040A730, "SQ", item(nested))
    assert outcome(part10(valid_sr(nested))) == "dicom_nesting_too_deep"


def test_implicit_vr_under_explicit_syntax() -> None:
    dataset = (
        implicit_el(0x00080016, SR_CLASS.encode() + b"\0")
        + implicit_el(0x00080018, INSTANCE.encode() + b"\0")
        + implicit_el(0x00100020, b"PID-7 ")
    )
    assert outcome(part10(dataset)) == "dicom_bad_vr"


def test_command_group_in_data_set() -> None:
    data = part10(el(0x00000002, "UI", SR_CLASS) + valid_sr())
    assert outcome(data) == "dicom_bad_structure"


@pytest.mark.parametrize(
    ("charset", "name", "expected"),
    [
        ("ISO_IR 100", "Müller^Jörg".encode("latin-1"), "accept"),
        ("ISO_IR 192", "Müller^Jörg".encode(), "accept"),
        ("", b"Doe^Jane", "accept"),
        ("ISO_IR 999", b"Doe^Jane", "dicom_bad_charset"),  # not a defined term
        ("ISO_IR 192", b"M\xc3\x28ller", "dicom_bad_charset"),  # not UTF-8
        ("ISO_IR 100\\ISO 2022 IR 87", b"Doe^Jane", "dicom_bad_charset"),  # no extensions
    ],
)
def test_specific_character_set(charset: str, name: bytes, expected: str) -> None:
    data = part10(head(charset=charset) + el(0x00080060, "CS", "SR") + patient(name) + study())
    assert outcome(data) == expected
    if expected == "accept":
        assert parse_instance(data).patient_name == name.decode("utf-8" if "192" in charset else "latin-1")


def _image(pixel: bytes, *, ts: str = ExplicitVRLittleEndian, photometric: str = "MONOCHROME2",
           samples: int = 1, rows: int = 2, columns: int = 2, bits: int = 8,
           frames: str | None = None) -> bytes:  # fmt: skip
    pix = (
        el(0x00280002, "US", struct.pack("<H", samples))
        + el(0x00280004, "CS", photometric)
        + (el(0x00280008, "IS", frames) if frames is not None else b"")
        + el(0x00280010, "US", struct.pack("<H", rows))
        + el(0x00280011, "US", struct.pack("<H", columns))
        + el(0x00280100, "US", struct.pack("<H", bits))
        + el(0x00280101, "US", struct.pack("<H", bits))
        + el(0x00280102, "US", struct.pack("<H", bits - 1))
        + el(0x00280103, "US", struct.pack("<H", 0))
    )
    dataset = head(sop_class=SC_CLASS) + el(0x00080060, "CS", "OT") + patient() + study()
    return part10(dataset + pix + pixel, ts=ts, sop_class=SC_CLASS)


def test_hand_built_pixel_data() -> None:
    assert outcome(_image(el(0x7FE00010, "OB", b"\1" * 4))) == "accept"
    assert outcome(_image(el(0x7FE00010, "OB", b"\1" * 6))) == "dicom_pixel_length"
    assert outcome(_image(el(0x7FE00010, "OW", b"\1" * 8), bits=16)) == "accept"
    assert outcome(_image(el(0x7FE00010, "OB", b"\1" * 4), bits=12)) == "dicom_pixel_attrs"
    assert outcome(_image(b"")) == "dicom_missing_pixel_data"
    # YBR_FULL_422: chroma subsampled, 2 samples per pixel
    ybr8 = _image(el(0x7FE00010, "OB", b"\1" * 8), photometric="YBR_FULL_422", samples=3)
    ybr12 = _image(el(0x7FE00010, "OB", b"\1" * 12), photometric="YBR_FULL_422", samples=3)
    assert outcome(ybr8) == "accept"
    assert outcome(ybr12) == "dicom_pixel_length"  # RGB-sized: not 4:2:2
    # two frames
    assert outcome(_image(el(0x7FE00010, "OB", b"\1" * 8), frames="2")) == "accept"
    assert outcome(_image(el(0x7FE00010, "OB", b"\1" * 8), frames="2A")) == "dicom_pixel_attrs"


def test_encapsulated_pixel_data_framing() -> None:
    frag = item(b"\xff\xd8\xff\xd9")
    bot = item(b"")
    encapsulated = el(0x7FE00010, "OB", b"", length=UNDEF) + bot + frag + SEQ_DELIM
    assert outcome(_image(encapsulated, ts=JPEGBaseline8Bit)) == "accept"
    # native syntax with encapsulated pixel data, and the reverse
    assert outcome(_image(encapsulated)) == "dicom_pixel_encoding"
    native = el(0x7FE00010, "OB", b"\1" * 4)
    assert outcome(_image(native, ts=JPEGBaseline8Bit)) == "dicom_pixel_encoding"
    # offset table only, fewer fragments than frames, no delimiter
    only_bot = el(0x7FE00010, "OB", b"", length=UNDEF) + bot + SEQ_DELIM
    assert outcome(_image(only_bot, ts=JPEGBaseline8Bit)) == "dicom_pixel_encoding"
    assert outcome(_image(encapsulated, ts=JPEGBaseline8Bit, frames="2")) == "dicom_pixel_encoding"
    unclosed = el(0x7FE00010, "OB", b"", length=UNDEF) + bot + frag
    assert outcome(_image(unclosed, ts=JPEGBaseline8Bit)) == "dicom_missing_delimiter"


def test_pydicom_value_warnings_are_redacted_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    data = (TEST_FILES_DIR / "rtdose_rle.dcm").read_bytes()
    with caplog.at_level(logging.WARNING, logger="pydicom"):
        inst = parse_instance(data)
    assert inst.value_warnings == ("UI",)
    assert caplog.records, "pydicom logged no value warning"
    for record in caplog.records:
        assert "0123.4567" not in record.getMessage()
