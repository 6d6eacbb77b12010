"""Tests for ledger.deid (PS3.15 Annex E de-identification)."""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ledger.deid import (
    BurnedInAnnotationError,
    CompoundPolicy,
    DeidContext,
    DeidOption,
    UnsupportedOptionError,
    deidentify,
    deidentify_file,
    deidentify_tree,
    load_table,
)
from ledger.deid.engine import clean_text, shift_da, shift_dt
from ledger.deid.files import write_file
from ledger.deid.profile import EXPECTED_ROW_COUNT, SafePrivate, resolve

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


# --- helpers -------------------------------------------------------------------


def walk(ds: Dataset) -> Iterator[tuple[Dataset, int]]:
    for elem in ds:
        yield ds, int(elem.tag)
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


def all_tags(ds: Dataset) -> set[int]:
    return {tag for _, tag in walk(ds)}


def all_uids(ds: Dataset) -> set[str]:
    found: set[str] = set()
    for parent, tag in walk(ds):
        elem = parent[tag]
        if elem.VR == "UI" and elem.value:
            values = (
                elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) else [elem.value]
            )
            found.update(str(v) for v in values)
    return found


def make_ds(
    *,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    name: str = "Doe^John",
    pid: str = "MRN-0042-SECRET",
    study_date: str = "20200315",
    charset: str | None = None,
) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = MR_STORAGE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.PatientAge = "050Y"
    ds.PatientWeight = "80"
    ds.AccessionNumber = "ACC-99887766"
    ds.StudyDate = study_date
    ds.StudyTime = "101500.123"
    ds.SeriesDate = study_date
    ds.AcquisitionDate = study_date
    ds.AcquisitionDateTime = f"{study_date}101600.5+0100"
    ds.ContentDate = study_date
    ds.InstitutionName = "St. Example Hospital"
    ds.StationName = "MRSTATION7"
    ds.DeviceSerialNumber = "SN-5551234"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDescription = "MR BRAIN WITH CONTRAST for John Doe 20200315"
    ds.ProtocolName = "t1_mprage_sag"
    ds.Rows = 2
    ds.Columns = 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def nested(depth: int, leaf: Dataset) -> Dataset:
    """``depth`` levels of Referenced Series Sequence (not in Table E.1-1) around ``leaf``."""
    item = leaf
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedSeriesSequence = Sequence([item])
        item = outer
    return item


def identifying_item(ref_uid: str) -> Dataset:
    item = Dataset()
    item.PatientName = "Nested^Person"
    item.PatientID = "NESTED-ID-777"
    item.PatientBirthDate = "19650505"
    item.ReferencedSOPClassUID = MR_STORAGE
    item.ReferencedSOPInstanceUID = ref_uid
    item.OperatorsName = "Operator^Olga"
    return item


def deepest(ds: Dataset, depth: int) -> Dataset:
    item = ds
    for _ in range(depth):
        item = item.ReferencedSeriesSequence[0]
    return item


# --- the table -----------------------------------------------------------------


def test_table_row_count_and_spot_checks() -> None:
    table = load_table()
    assert len(table) == EXPECTED_ROW_COUNT == 647
    name = table.lookup(0x00100010)
    assert name is not None and name.basic == "Z" and name.name == "Patient's Name"
    pid = table.lookup(0x00100020)
    # The current edition says Z/D for Patient ID (older editions: Z).
    assert pid is not None and pid.basic == "Z/D"
    study = table.lookup(0x0020000D)
    assert study is not None and study.basic == "U" and study.options[DeidOption.RETAIN_UIDS] == "K"
    inst = table.lookup(0x00080080)
    assert inst is not None and inst.basic == "X/Z/D"
    assert inst.options == {DeidOption.RETAIN_INSTITUTION_IDENTITY: "K"}
    age = table.lookup(0x00101010)
    assert age is not None and age.basic == "X"
    assert age.options[DeidOption.RETAIN_PATIENT_CHARACTERISTICS] == "K"
    acq = table.lookup(0x00080022)
    assert acq is not None and acq.basic == "X/Z"
    assert acq.options[DeidOption.RETAIN_LONG_MODIFIED_DATES] == "C"
    assert acq.options[DeidOption.RETAIN_LONG_FULL_DATES] == "K"
    # repeating groups and the private row
    assert table.lookup(0x60003000) is table.lookup(0x601E3000) is table.by_key("(60xx,3000)")
    assert table.lookup(0x60020022) is None  # Overlay Description is not a row
    curve = table.lookup(0x50103000)
    assert curve is not None and curve.tag == "(50xx,xxxx)" and curve.retired
    assert table.private_row is not None
    assert table.private_row.options == {DeidOption.RETAIN_SAFE_PRIVATE: "C"}
    codes = {row.basic for row in table.rows}
    assert codes == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def test_resolution_precedence() -> None:
    table = load_table()
    acq = table.lookup(0x00080022)
    assert acq is not None
    assert resolve(acq, DeidOption.NONE).action == "X"
    assert resolve(acq, DeidOption.NONE, CompoundPolicy.PRESERVE).action == "Z"
    assert resolve(acq, DeidOption.RETAIN_LONG_MODIFIED_DATES).action == "C"
    assert resolve(acq, DeidOption.RETAIN_LONG_FULL_DATES | DeidOption.CLEAN_DESCRIPTORS).action == "K"


def test_unsupported_and_conflicting_options() -> None:
    with pytest.raises(UnsupportedOptionError):
        deidentify(make_ds(), DeidOption.CLEAN_GRAPHICS)
    with pytest.raises(ValueError):
        deidentify(make_ds(), DeidOption.RETAIN_LONG_FULL_DATES | DeidOption.RETAIN_LONG_MODIFIED_DATES)


# --- attributes at every depth ----------------------------------------------------


def test_basic_profile_top_level_and_nested() -> None:
    ds = make_ds()
    ref = ds.SOPInstanceUID
    ds.update(nested(3, identifying_item(ref)))
    out = deidentify(ds, DeidOption.NONE, DeidContext())
    assert ds.PatientName == "Doe^John"  # input untouched
    for item in (out, deepest(out, 3)):
        assert item.PatientName == ""
        assert item.PatientID == ""
        assert item.PatientBirthDate == ""
        assert "OperatorsName" not in item
    for kw in ("PatientAge", "PatientWeight", "InstitutionName", "StationName", "DeviceSerialNumber"):
        assert kw not in out
    assert out.PatientSex == "" and out.AccessionNumber == "" and out.ReferringPhysicianName == ""
    assert "StudyDescription" not in out
    assert out.Modality == "MR" and out.Rows == 2


def test_dummy_values_for_d_are_valid_per_vr() -> None:
    ds = make_ds()
    obs = Dataset()
    obs.VerifyingObserverName = "Watson^John"
    obs.VerifyingOrganization = "Baker Street Clinic"
    obs.VerificationDateTime = "20200101120000"
    ds.VerifyingObserverSequence = Sequence([obs])
    ds.PersonName = "Someone^Else"  # (0040,A123) D
    ds.add_new(0x0040A121, "DA", "20200101")  # Date, D
    out = deidentify(ds, DeidOption.NONE, DeidContext())
    assert out.PersonName == "ANONYMOUS"
    assert out[0x0040A121].value == "19000101"
    # D on a sequence: one empty item, nothing of the content survives
    assert len(out.VerifyingObserverSequence) == 1 and len(out.VerifyingObserverSequence[0]) == 0


def test_retain_patient_characteristics_and_device_identity() -> None:
    options = DeidOption.RETAIN_PATIENT_CHARACTERISTICS | DeidOption.RETAIN_DEVICE_IDENTITY
    out = deidentify(make_ds(), options, DeidContext())
    assert out.PatientAge == "050Y" and out.PatientSex == "M" and out.PatientWeight == "80"
    assert out.StationName == "MRSTATION7" and out.DeviceSerialNumber == "SN-5551234"
    assert "InstitutionName" not in out
    out = deidentify(make_ds(), DeidOption.RETAIN_INSTITUTION_IDENTITY, DeidContext())
    assert out.InstitutionName == "St. Example Hospital"


def test_clean_descriptors() -> None:
    out = deidentify(make_ds(), DeidOption.CLEAN_DESCRIPTORS, DeidContext())
    assert out.StudyDescription == "MR BRAIN WITH CONTRAST FOR"
    assert out.ProtocolName == "T1 MPRAGE SAG"
    assert clean_text("Dr Smith 12345 AXIAL 5mm") == "AXIAL 5MM"
    assert clean_text("HEAD", identifiers=["head"]) == ""


def test_compound_preserve_policy_keeps_references_with_new_uids() -> None:
    ds = make_ds()
    ref = Dataset()
    ref.ReferencedSOPClassUID = MR_STORAGE
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([ref])
    ctx = DeidContext(compound_policy=CompoundPolicy.PRESERVE)
    out = deidentify(ds, DeidOption.NONE, ctx)
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.AcquisitionDate == "" and out.SeriesDate == "19000101"  # X/Z -> Z, X/D -> D
    assert "ReferencedImageSequence" not in deidentify(ds, DeidOption.NONE, DeidContext())


# --- private, overlays -----------------------------------------------------------


@pytest.mark.parametrize("name", ["priv_SQ.dcm", "nested_priv_SQ.dcm"])
def test_private_elements_removed(name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))
    assert any(pydicom.tag.Tag(t).is_private for t in all_tags(ds))
    out = deidentify(ds, DeidOption.NONE, DeidContext())
    assert not any(pydicom.tag.Tag(t).is_private for t in all_tags(out))
    # Retain Safe Private with the default allow-list: these creators are not listed
    out = deidentify(ds, DeidOption.RETAIN_SAFE_PRIVATE, DeidContext())
    assert not any(pydicom.tag.Tag(t).is_private for t in all_tags(out))


def test_retain_safe_private_allow_list() -> None:
    ds = pydicom.dcmread(get_testdata_file("priv_SQ.dcm"))
    safe = frozenset({SafePrivate("aaabbbccc MEDICAL SYSTEMS", 0x3F03, 0x01)})
    out = deidentify(ds, DeidOption.RETAIN_SAFE_PRIVATE, DeidContext(safe_private=safe))
    assert 0x3F031001 in out and out[0x3F030010].value == "aaabbbccc MEDICAL SYSTEMS"
    out = deidentify(ds, DeidOption.NONE, DeidContext(safe_private=safe))
    assert 0x3F031001 not in out and 0x3F030010 not in out

    built = make_ds()
    block = built.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")  # B_value: in the shipped allow-list
    block.add_new(0x10, "LO", "Doe^John")  # not allow-listed
    out = deidentify(built, DeidOption.RETAIN_SAFE_PRIVATE, DeidContext())
    assert out[0x0019100C].value == 1000
    assert 0x00191010 not in out and out[0x00190010].value == "SIEMENS MR HEADER"


def test_overlays_removed_per_table() -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_overlay.dcm"))
    assert 0x60003000 in ds
    ds.add_new(0x60004000, "LT", "overlay comment Doe")
    ds.add_new(0x50000005, "US", 1)  # a curve element (50xx,xxxx)
    out = deidentify(ds, DeidOption.NONE, DeidContext())
    tags = all_tags(out)
    assert 0x60003000 not in tags and 0x60004000 not in tags and 0x50000005 not in tags
    assert not any(0x6000 <= t >> 16 <= 0x601E for t in tags)  # whole overlay group gone
    assert "PixelData" in out
    with pytest.raises(UnsupportedOptionError):
        deidentify(ds, DeidOption.CLEAN_GRAPHICS, DeidContext())


# --- dates -------------------------------------------------------------------------

DT_RE = re.compile(r"^\d{14}(\.\d{1,6})?([+-]\d{4})?$")


def _date(value: str) -> dt.date:
    return dt.datetime.strptime(value[:8], "%Y%m%d").date()


def test_modified_dates_consistent_per_patient() -> None:
    secret = b"k" * 32
    a = make_ds(study_date="20200315")
    b = make_ds(study_date="20210701")
    out_a = deidentify(a, DeidOption.RETAIN_LONG_MODIFIED_DATES, DeidContext(patient_key="P1", secret=secret))
    out_b = deidentify(b, DeidOption.RETAIN_LONG_MODIFIED_DATES, DeidContext(patient_key="P1", secret=secret))
    assert out_a.StudyDate != a.StudyDate
    assert (_date(out_b.StudyDate) - _date(out_a.StudyDate)) == (_date(b.StudyDate) - _date(a.StudyDate))
    for out in (out_a, out_b):
        assert out.StudyDate == out.SeriesDate == out.AcquisitionDate == out.ContentDate
        _date(out.StudyDate)  # valid DA
        assert DT_RE.match(out.AcquisitionDateTime) and out.AcquisitionDateTime.endswith("+0100")
        assert out.AcquisitionDateTime[:8] == out.StudyDate
        assert out.StudyTime == "101500.123"
        assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    same = DeidContext(patient_key="P1", secret=secret).shift_days
    assert same == DeidContext(patient_key="P1", secret=secret).shift_days  # deterministic per key
    other = DeidContext(patient_key="P2", secret=secret).shift_days
    assert other != same and -3652 <= other <= -366 and -3652 <= same <= -366
    assert DeidContext(date_shift_days=-10).shift_days == -10


def test_dates_removed_or_emptied_without_option_and_kept_with_full_dates() -> None:
    out = deidentify(make_ds(), DeidOption.NONE, DeidContext())
    assert out.StudyDate == "" and out.ContentDate == "" and out.StudyTime == ""
    assert "AcquisitionDate" not in out and "SeriesDate" not in out and "AcquisitionDateTime" not in out
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    out = deidentify(make_ds(), DeidOption.RETAIN_LONG_FULL_DATES, DeidContext())
    assert out.StudyDate == "20200315" and out.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_shift_helpers() -> None:
    assert shift_da("20200301", -1) == "20200229"
    assert shift_da("2020.03.01", -1) == "20200229"
    assert shift_da("20200101-20200110", 1) == "20200102-20200111"
    assert shift_da("garbage", 5) is None
    assert shift_dt("20200301235959.123456-0500", -1) == "20200229235959.123456-0500"
    assert shift_dt("202003", -1) == "202002"
    assert shift_dt("20200301256000", 1) is None


# --- character sets --------------------------------------------------------------

CHARSET_NAMES = [
    ("ISO_IR 100", "Müller^Jürgen"),
    ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ISO_IR 192", "Wang^XiaoDong=王^小東="),
]


@pytest.mark.parametrize(("charset", "name"), CHARSET_NAMES)
def test_person_names_in_character_sets(tmp_path: Path, charset: str, name: str) -> None:
    ds = make_ds(name=name, charset=charset)
    ds.OperatorsName = name
    ds.PerformingPhysicianName = name
    ds.update(nested(3, identifying_item(ds.SOPInstanceUID)))
    deepest(ds, 3).PatientName = name
    src = tmp_path / "src.dcm"
    write_file(ds, src)
    original = pydicom.dcmread(src)
    encoded = original[0x00100010].value.encode(
        pydicom.charset.convert_encodings(original.SpecificCharacterSet)
    )
    assert encoded in src.read_bytes()
    dst = tmp_path / "dst.dcm"
    deidentify_file(src, dst, DeidOption.NONE, DeidContext())
    raw = dst.read_bytes()
    assert encoded not in raw
    for part in re.split(r"[\^=]", name):
        for codec in ("utf-8", "latin-1", "iso2022_jp", "euc_jp", "shift_jis"):
            try:
                needle = part.encode(codec)
            except UnicodeEncodeError:
                continue
            if len(needle) >= 3:
                assert needle not in raw, (part, codec)
    back = pydicom.dcmread(dst)
    assert back.PatientName == "" and deepest(back, 3).PatientName == ""


# --- UIDs ----------------------------------------------------------------------------


def test_uid_remap_consistent_in_study_references_and_meta(tmp_path: Path) -> None:
    study = generate_uid()
    first = make_ds(study_uid=study)
    second = make_ds(study_uid=study)
    second.FrameOfReferenceUID = first.FrameOfReferenceUID
    second.update(nested(3, identifying_item(first.SOPInstanceUID)))
    ctx = DeidContext()
    paths = []
    for i, ds in enumerate((first, second)):
        src = tmp_path / f"src{i}.dcm"
        write_file(ds, src)
        paths.append(src)
    outs = [deidentify_file(p, tmp_path / f"out{i}.dcm", DeidOption.NONE, ctx) for i, p in enumerate(paths)]
    backs = [pydicom.dcmread(tmp_path / f"out{i}.dcm") for i in range(2)]
    assert backs[0].StudyInstanceUID == backs[1].StudyInstanceUID != study
    assert backs[0].FrameOfReferenceUID == backs[1].FrameOfReferenceUID
    assert deepest(backs[1], 3).ReferencedSOPInstanceUID == backs[0].SOPInstanceUID
    assert deepest(backs[1], 3).ReferencedSOPClassUID == MR_STORAGE  # registry UID kept
    for back, out in zip(backs, outs, strict=True):
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID == out.SOPInstanceUID
        assert back.SOPInstanceUID.startswith("2.25.")
    source_uids = all_uids(first) | all_uids(second)
    source_uids.discard(MR_STORAGE)
    for back in backs:
        assert not (all_uids(back) & source_uids)
        assert not ({str(e.value) for e in back.file_meta} & source_uids)
    # another study context: different UIDs
    other = deidentify(first, DeidOption.NONE, DeidContext())
    assert other.StudyInstanceUID != backs[0].StudyInstanceUID
    assert other.SOPInstanceUID != backs[0].SOPInstanceUID
    # Retain UIDs
    kept = deidentify(first, DeidOption.RETAIN_UIDS, DeidContext())
    assert kept.StudyInstanceUID == study and kept.SOPInstanceUID == first.SOPInstanceUID
    assert kept.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID


def test_deidentify_tree(tmp_path: Path) -> None:
    src = tmp_path / "src" / "Doe_John"
    study_a, study_b = generate_uid(), generate_uid()
    dss = [
        make_ds(study_uid=study_a, study_date="20200101"),
        make_ds(study_uid=study_a, study_date="20200101"),
        make_ds(study_uid=study_b, study_date="20200201"),
    ]
    for i, ds in enumerate(dss):
        write_file(ds, src / f"{i}.dcm")
    (src / "notes.txt").write_text("not dicom")
    options = DeidOption.RETAIN_LONG_MODIFIED_DATES
    report = deidentify_tree(tmp_path / "src", tmp_path / "dst", options, pseudonymize_patients=True)
    assert len(report.written) == 3 and report.studies == 2 and report.patients == 1
    assert len(report.skipped) == 1
    outs = [pydicom.dcmread(p) for p in report.written]
    assert len({o.StudyInstanceUID for o in outs}) == 2
    assert not ({o.StudyInstanceUID for o in outs} & {study_a, study_b})
    dates = sorted(_date(o.StudyDate) for o in outs)
    assert dates[2] - dates[0] == dt.timedelta(days=31)
    assert {o.PatientID for o in outs} == {"PATIENT-0001"}
    for path in report.written:
        assert "Doe" not in str(path.relative_to(tmp_path / "dst"))


# --- markers -------------------------------------------------------------------------


def test_markers_and_code_sequence() -> None:
    options = (
        DeidOption.RETAIN_LONG_MODIFIED_DATES
        | DeidOption.RETAIN_PATIENT_CHARACTERISTICS
        | DeidOption.RETAIN_DEVICE_IDENTITY
        | DeidOption.RETAIN_UIDS
        | DeidOption.RETAIN_SAFE_PRIVATE
        | DeidOption.RETAIN_INSTITUTION_IDENTITY
        | DeidOption.CLEAN_DESCRIPTORS
    )
    out = deidentify(make_ds(), options, DeidContext())
    assert out.PatientIdentityRemoved == "YES"
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence]
    values = [c for c, _ in codes]
    assert {s for _, s in codes} == {"DCM"}
    assert values == ["113100", "113105", "113107", "113108", "113109", "113110", "113111", "113112"]
    assert "113101" not in values  # pixel data not cleaned: not claimed
    assert "Basic Application Confidentiality Profile" in out.DeidentificationMethod
    assert all(len(v) <= 64 for v in out.DeidentificationMethod)
    basic = deidentify(make_ds(), DeidOption.NONE, DeidContext())
    assert [i.CodeValue for i in basic.DeidentificationMethodCodeSequence] == ["113100"]
    full = deidentify(make_ds(), DeidOption.RETAIN_LONG_FULL_DATES, DeidContext())
    assert [i.CodeValue for i in full.DeidentificationMethodCodeSequence] == ["113100", "113106"]


def test_burned_in_annotation_refused() -> None:
    ds = make_ds()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotationError):
        deidentify(ds, DeidOption.NONE, DeidContext())
    assert deidentify(ds, DeidOption.NONE, DeidContext(allow_burned_in_annotation=True)).PatientName == ""


# --- every pydicom test file ---------------------------------------------------------


def _readable_test_files() -> list[Path]:
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(TEST_FILES.rglob("*.dcm")):
            try:
                pydicom.dcmread(path)
            except Exception:
                continue
            paths.append(path)
    return paths


def _raw_value(ds: Dataset, keyword: str) -> bytes:
    if keyword not in ds:
        return b""
    elem = ds[keyword]
    value = elem.value
    if isinstance(value, bytes):
        return value.strip(b" \x00")
    encodings = pydicom.charset.convert_encodings(ds.get("SpecificCharacterSet", "ISO_IR 6"))
    if isinstance(value, pydicom.valuerep.PersonName):
        return value.encode(encodings).strip(b" \x00")
    return str(value).strip().encode(encodings[0] if encodings else "ascii", "replace")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("path", _readable_test_files(), ids=lambda p: p.name)
def test_every_pydicom_test_file(tmp_path: Path, path: Path) -> None:
    ds = pydicom.dcmread(path)
    dst = tmp_path / "out.dcm"
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        with pytest.raises(BurnedInAnnotationError):  # refused by design: pixels may carry PHI
            deidentify_file(path, dst, DeidOption.NONE, DeidContext())
        return
    deidentify_file(path, dst, DeidOption.NONE, DeidContext())
    raw = dst.read_bytes()
    assert raw[128:132] == b"DICM"
    back = pydicom.dcmread(dst)
    back.remove_private_tags()  # none expected; keeps the next line honest
    for _ in back.iterall():
        pass  # every element decodes
    assert back.PatientIdentityRemoved == "YES"
    if "SOPInstanceUID" in back:
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    pixel_free = bytearray(raw)
    if "PixelData" in back:  # a short ID could occur in pixel bytes by chance
        data = back.PixelData
        start = raw.find(data)
        if start >= 0:
            pixel_free[start : start + len(data)] = b""
    # New UIDs are random decimals ("2.25.<128-bit int>") and may contain a short numeric ID by
    # chance: take their values out of the haystack too (UID remapping is tested on its own).
    for elem in [*back.file_meta.iterall(), *back.iterall()]:
        if elem.VR == "UI" and elem.value:
            for uid in elem.value if elem.VM > 1 else [elem.value]:
                pixel_free = bytearray(bytes(pixel_free).replace(str(uid).encode(), b""))
    for keyword in ("PatientName", "PatientID"):
        needle = _raw_value(ds, keyword)
        if len(needle) >= 2:
            assert needle not in bytes(pixel_free), keyword
    assert not any(pydicom.tag.Tag(t).is_private for t in all_tags(back))
