"""QIDO-RS matching and results (ledger.qido) as pure logic: PS3.4 C.2.2.2 semantics."""

from __future__ import annotations

import pytest

from ledger.errors import InvalidInput
from ledger.qido import Record, match_value, matches, parse_query, search


@pytest.mark.parametrize(
    ("vr", "key", "stored", "expected"),
    [
        # universal matching
        ("PN", "", ["Doe^Jane"], True),
        ("PN", "", [], True),
        ("LO", "*", [], True),
        # single value: case-sensitive except PN
        ("LO", "MRN-1", ["MRN-1"], True),
        ("LO", "mrn-1", ["MRN-1"], False),
        ("CS", "CT", ["MR"], False),
        ("PN", "doe^jane", ["Doe^Jane"], True),
        ("PN", "DOE^JANE", ["Doe^Jane=山田^太郎"], True),
        ("PN", "山田^太郎", ["Doe^Jane=山田^太郎"], True),
        ("PN", "Doe", ["Doe^Jane"], False),
        # wildcards
        ("PN", "doe*", ["Doe^Jane"], True),
        ("PN", "D?e^J*", ["Doe^Jane"], True),
        ("PN", "D?e", ["Doe^Jane"], False),
        ("LO", "MRN-*", ["MRN-4711"], True),
        ("LO", "mrn-*", ["MRN-4711"], False),
        ("SH", "A?C", ["ABC"], True),
        ("SH", "A?C", ["ABBC"], False),
        ("LO", "a.b*", ["axb"], False),  # regex metacharacters are literal
        ("LO", "*", ["anything"], True),
        # values absent: only universal matches
        ("LO", "X", [], False),
        ("DA", "20010101-", [], False),
        # multi-valued attribute: one value is enough
        ("CS", "MR", ["CT", "MR"], True),
        # UID single and list matching; no wildcards on UI
        ("UI", "1.2.3", ["1.2.3"], True),
        ("UI", "1.2.3", ["1.2.30"], False),
        ("UI", "1.2.4,1.2.3", ["1.2.3"], True),
        ("UI", "1.2.4\\1.2.3", ["1.2.3"], True),
        ("UI", "1.2.*", ["1.2.3"], False),
        # date ranges, inclusive and open
        ("DA", "20010101-20011231", ["20010615"], True),
        ("DA", "20010101-20011231", ["20011231"], True),
        ("DA", "20010101-20011231", ["20020101"], False),
        ("DA", "-20011231", ["19990101"], True),
        ("DA", "20010101-", ["20250101"], True),
        ("DA", "20010101-", ["20001231"], False),
        ("DA", "20010101", ["20010101"], True),
        ("DA", "20010101", ["20010102"], False),
        # time ranges, at the precision given
        ("TM", "0800-1200", ["103000"], True),
        ("TM", "0800-1200", ["120030"], True),  # 12:00 includes all of minute 12:00
        ("TM", "0800-1200", ["120100"], False),
        ("TM", "-0800", ["075959.999"], True),
        ("TM", "0800", ["080000"], True),
        # date-time ranges (with an offset in a bound)
        ("DT", "20010101-20011231", ["20010615120000"], True),
        ("DT", "20010101-20011231", ["20020101000000"], False),
        ("DT", "20010101120000-0500-", ["20010102"], True),
        # numbers compare as numbers
        ("IS", "1", ["01"], True),
        ("IS", "2", ["1"], False),
        ("US", "512", ["512"], True),
    ],
)
def test_match_value(vr: str, key: str, stored: list[str], expected: bool) -> None:
    assert match_value(vr, key, stored) is expected


def _rec(**attrs: str) -> Record:
    base = {
        "StudyInstanceUID": "1.2.1",
        "SeriesInstanceUID": "1.2.1.1",
        "SOPInstanceUID": "1.2.1.1.1",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "Modality": "CT",
        "PatientName": "Doe^Jane",
        "PatientID": "MRN-1",
        "StudyDate": "20010615",
    }
    base.update(attrs)
    return Record(base)


RECORDS = [
    _rec(),
    _rec(SOPInstanceUID="1.2.1.1.2", InstanceNumber="2"),
    _rec(SeriesInstanceUID="1.2.1.2", SOPInstanceUID="1.2.1.2.1", Modality="MR"),
    _rec(
        StudyInstanceUID="1.2.2",
        SeriesInstanceUID="1.2.2.1",
        SOPInstanceUID="1.2.2.1.1",
        PatientName="Roe^Richard",
        PatientID="MRN-2",
        StudyDate="20030101",
        Modality="MR",
    ),
]
BASE = "https://gw.example/dicomweb"


def _uids(results: list[dict], tag: str) -> list[str]:
    return [r[tag]["Value"][0] for r in results]


def test_study_search_computes_study_attributes() -> None:
    results, total = search(parse_query("study", []), RECORDS, BASE)
    assert total == 2
    first = results[0]
    assert first["0020000D"]["Value"] == ["1.2.1"]
    assert first["00080061"]["Value"] == ["CT", "MR"]  # ModalitiesInStudy
    assert first["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries
    assert first["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
    assert first["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert first["00081190"]["Value"] == [f"{BASE}/studies/1.2.1"]
    assert first["00080056"]["Value"] == ["ONLINE"]
    assert "00080005" not in first  # ASCII only: no Specific Character Set needed


@pytest.mark.parametrize(
    ("level", "params", "expected"),
    [
        ("study", [("PatientName", "doe*")], ["1.2.1"]),
        ("study", [("PatientName", "ROE^RICHARD")], ["1.2.2"]),
        ("study", [("00100020", "MRN-2")], ["1.2.2"]),
        ("study", [("StudyDate", "20030101-")], ["1.2.2"]),
        ("study", [("StudyDate", "-20021231")], ["1.2.1"]),
        ("study", [("ModalitiesInStudy", "CT")], ["1.2.1"]),
        ("study", [("ModalitiesInStudy", "MR")], ["1.2.1", "1.2.2"]),
        ("study", [("StudyInstanceUID", "1.2.2,1.2.1")], ["1.2.1", "1.2.2"]),
        ("study", [("StudyInstanceUID", "9.9")], []),
        ("series", [("Modality", "MR")], ["1.2.1.2", "1.2.2.1"]),
        ("series", [("Modality", "MR"), ("PatientID", "MRN-1")], ["1.2.1.2"]),
        ("instance", [("SOPInstanceUID", "1.2.1.1.2")], ["1.2.1.1.2"]),
        ("instance", [("InstanceNumber", "2")], ["1.2.1.1.2"]),
        ("instance", [("Modality", "CT")], ["1.2.1.1.1", "1.2.1.1.2"]),
    ],
)
def test_search_matching(level: str, params: list[tuple[str, str]], expected: list[str]) -> None:
    tag = {"study": "0020000D", "series": "0020000E", "instance": "00080018"}[level]
    results, total = search(parse_query(level, params), RECORDS, BASE)
    assert _uids(results, tag) == expected and total == len(expected)


def test_limit_offset_page_in_a_stable_order() -> None:
    q = parse_query("instance", [("limit", "2"), ("offset", "1")])
    results, total = search(q, RECORDS, BASE)
    assert total == 4
    assert _uids(results, "00080018") == ["1.2.1.1.2", "1.2.1.2.1"]
    results, _ = search(parse_query("instance", [("offset", "10")]), RECORDS, BASE)
    assert results == []


def test_levels_include_parent_attributes_only_without_them_in_the_path() -> None:
    top, _ = search(parse_query("series", []), RECORDS, BASE)
    assert "00100010" in top[0] and "0020000D" in top[0]  # study attributes
    scoped, _ = search(parse_query("series", []), RECORDS[:3], BASE, study_in_path=True)
    assert "00100010" not in scoped[0]
    assert scoped[0]["00201209"]["Value"] == [2]  # NumberOfSeriesRelatedInstances
    inst, _ = search(parse_query("instance", []), RECORDS, BASE)
    assert "00080060" in inst[0] and "00100020" in inst[0]
    assert inst[0]["00081190"]["Value"] == [f"{BASE}/studies/1.2.1/series/1.2.1.1/instances/1.2.1.1.1"]


def test_includefield_and_all() -> None:
    recs = [_rec(StudyDescription="Chest", InstanceNumber="1")]
    plain, _ = search(parse_query("study", []), recs, BASE)
    assert "00081030" not in plain[0]
    one, _ = search(parse_query("study", [("includefield", "StudyDescription")]), recs, BASE)
    assert one[0]["00081030"]["Value"] == ["Chest"]
    by_tag, _ = search(parse_query("study", [("includefield", "00081030,00100020")]), recs, BASE)
    assert by_tag[0]["00081030"]["Value"] == ["Chest"]
    everything, _ = search(parse_query("instance", [("includefield", "all")]), recs, BASE)
    assert everything[0]["00081030"]["Value"] == ["Chest"] and everything[0]["00200013"]["Value"] == [1]
    # an attribute asked for but not stored comes back empty (zero length), not invented
    missing, _ = search(parse_query("study", [("includefield", "AccessionNumber")]), recs, BASE)
    assert missing[0]["00080050"] == {"vr": "SH"}


def test_matching_keys_are_returned_and_non_ascii_gets_utf8_charset() -> None:
    recs = [_rec(PatientName="Müller^Jörg")]
    results, _ = search(parse_query("study", [("PatientName", "müller*")]), recs, BASE)
    assert results[0]["00100010"]["Value"] == [{"Alphabetic": "Müller^Jörg"}]
    assert results[0]["00080005"]["Value"] == ["ISO_IR 192"]


def test_fuzzymatching_true_gives_a_warning_false_none() -> None:
    assert parse_query("study", [("fuzzymatching", "false")]).warnings == ()
    (warning,) = parse_query("study", [("fuzzymatching", "true")]).warnings
    assert warning.startswith("299 ") and "fuzzymatching" in warning


@pytest.mark.parametrize(
    "params",
    [
        [("NotAKeyword", "x")],
        [("FFFFFFFF", "x")],
        [("SOPInstanceUID", "1.2")],  # below the study level
        [("PatientAge", "030Y")],  # a real attribute the gateway does not store
        [("StudyDate", "2001-01-01")],
        [("StudyDate", "-")],
        [("StudyTime", "25")],
        [("limit", "-1")],
        [("offset", "x")],
        [("fuzzymatching", "maybe")],
        [("PatientID", "a"), ("PatientID", "b")],
        [("SeriesNumber", "one")],
    ],
)
def test_bad_queries_are_refused(params: list[tuple[str, str]]) -> None:
    level = "series" if any(k == "SeriesNumber" for k, _ in params) else "study"
    with pytest.raises(InvalidInput):
        parse_query(level, params)


def test_matches_requires_every_key() -> None:
    ent = {"PatientName": "Doe^Jane", "Modality": "CT"}
    assert matches(ent, {"PatientName": "doe*", "Modality": "CT"})
    assert not matches(ent, {"PatientName": "doe*", "Modality": "MR"})
