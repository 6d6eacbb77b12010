"""QIDO-RS (PS3.18 section 10.6) as pure logic: query parsing, attribute matching, results.

Nothing here knows about consent, audit or storage: the gateway hands in the instance records
a caller may see (:class:`Record`, one per SOP instance, attributes as stored at upload) and
gets back the matched entities of the query level as DICOM JSON (PS3.18 Annex F).

Matching (PS3.4 C.2.2.2, as QIDO-RS uses it):

- universal: an empty value (``PatientName=``), or ``*`` on a VR that allows wildcards, matches
  every entity and asks for the attribute to be returned;
- single value: exact match; PN is matched case-insensitively (PS3.4 C.2.2.2.1 allows literal
  matching that ignores case for PN), on the whole name or on any of its component groups;
  other text VRs are case-sensitive; numbers (IS, DS, US, ...) compare as numbers;
- wildcards ``*`` (any run, also empty) and ``?`` (one character) on AE, CS, LO, LT, PN, SH,
  ST, UC, UR, UT (not on DA, TM, DT, UI or numbers);
- ranges on DA, TM and DT: ``D1-D2``, ``-D2``, ``D1-`` (inclusive; times and date-times are
  compared at the precision given, a shorter upper bound includes its whole last unit);
- UID lists on UI: values separated by ``,`` or ``\\``;
- a multi-valued attribute matches when one of its values does; an entity without a value for
  a non-universal key does not match.

``fuzzymatching=true`` is not supported: literal matching is done and a ``Warning: 299``
header says so (PS3.18 8.3.4.1). Matching keys at a lower level than the query level (e.g.
SOPInstanceUID on /studies), unknown attributes and attributes the gateway does not store are
refused with :class:`~ledger.errors.InvalidInput` (400), rather than silently ignored.

Results (PS3.18 10.6.3.3, Tables 10.6.3-3/4/5): each entity gets its level's default
attributes, the attributes of the matching keys, and the ``includefield`` ones (``all`` =
every stored attribute of the level). A series query without a study in the path also
returns the study attributes; an instance query returns the study attributes without a study
in the path and the series attributes without a series in the path. Computed attributes:
ModalitiesInStudy, NumberOfStudyRelatedSeries/Instances, NumberOfSeriesRelatedInstances,
InstanceAvailability (ONLINE) and RetrieveURL (0008,1190). Entities are ordered by their
UIDs, so ``offset``/``limit`` paging is stable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from ledger.errors import InvalidInput

__all__ = [
    "LEVELS",
    "QidoQuery",
    "Record",
    "match_value",
    "matches",
    "parse_query",
    "search",
    "to_json",
]

LEVELS: Final = ("study", "series", "instance")

_STUDY_ATTRS: Final = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "TimezoneOffsetFromUTC",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
_SERIES_ATTRS: Final = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence.ScheduledProcedureStepID",
    "RequestAttributesSequence.RequestedProcedureID",
)
_INSTANCE_ATTRS: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
#: Every attribute QIDO-RS matches on that is stored per instance (the computed ones aside);
#: "A.B" names B inside sequence A. ledger.dicom extracts exactly these at upload.
STORED_ATTRIBUTES: Final = (*_STUDY_ATTRS, *_SERIES_ATTRS, *_INSTANCE_ATTRS)
_COMPUTED: Final = {
    "study": ("ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "series": ("NumberOfSeriesRelatedInstances",),
    "instance": (),
}
# Defaults per level (PS3.18 Tables 10.6.3-3, -4, -5), without the computed ones.
_DEFAULTS: Final = {
    "study": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "TimezoneOffsetFromUTC",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
    ),
    "series": (
        "Modality",
        "TimezoneOffsetFromUTC",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "RequestAttributesSequence.ScheduledProcedureStepID",
        "RequestAttributesSequence.RequestedProcedureID",
    ),
    "instance": (
        "SOPClassUID",
        "SOPInstanceUID",
        "TimezoneOffsetFromUTC",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
_OWN: Final = {"study": _STUDY_ATTRS, "series": _SERIES_ATTRS, "instance": _INSTANCE_ATTRS}
_ABOVE: Final = {"study": (), "series": ("study",), "instance": ("study", "series")}

_WILDCARD_VRS: Final = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS: Final = frozenset({"DA", "TM", "DT"})
_NUMERIC_VRS: Final = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})
_INT_VRS: Final = frozenset({"IS", "US", "UL", "SS", "SL", "UV", "SV"})
_RESERVED_PARAMS: Final = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_HEX_TAG: Final = re.compile(r"^[0-9A-Fa-f]{8}$")


@dataclass(frozen=True)
class Record:
    """One SOP instance a caller may see: its stored QIDO attributes and where to retrieve it.

    ``attrs`` maps keywords (nested ones as ``Sequence.Keyword``) to the stored text value,
    values of a multi-valued attribute separated by ``\\``.
    """

    attrs: Mapping[str, str]

    def get(self, key: str) -> str:
        return self.attrs.get(key, "")


@dataclass(frozen=True)
class QidoQuery:
    level: str
    keys: dict[str, str]  # keyword -> match value (as given)
    includefields: tuple[str, ...] = ()
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy_requested: bool = False
    warnings: tuple[str, ...] = field(default=())


# ---- attribute names --------------------------------------------------------------------
def _vr(key: str) -> str:
    if key in ("ModalitiesInStudy",):
        return "CS"
    leaf = key.rsplit(".", 1)[-1]
    vr = str(dictionary_VR(tag_for_keyword(leaf) or 0)) if tag_for_keyword(leaf) else "UN"
    return "US" if vr == "US or SS" else vr.split(" or ")[0]


def _known_at(level: str) -> set[str]:
    keys = set(_OWN[level]) | set(_COMPUTED[level])
    for above in _ABOVE[level]:
        keys |= set(_OWN[above])
    return keys | {"SpecificCharacterSet"}


def _normalize_key(raw: str) -> str:
    """A query attribute ID (keyword, tag, or dotted path of either) -> dotted keywords."""
    parts = []
    for piece in raw.split("."):
        piece = piece.strip()
        if _HEX_TAG.fullmatch(piece):
            kw = keyword_for_tag(int(piece, 16))
            if not kw:
                raise InvalidInput(f"query attribute {piece} is not a known DICOM tag")
            parts.append(kw)
        elif tag_for_keyword(piece) is not None:
            parts.append(piece)
        else:
            raise InvalidInput(f"query attribute {piece[:64]!r} is not a DICOM keyword or tag")
    return ".".join(parts)


def _int_param(name: str, value: str) -> int:
    if not value.isdigit():
        raise InvalidInput(f"{name} must be a non-negative integer")
    return int(value)


def parse_query(level: str, params: Iterable[tuple[str, str]]) -> QidoQuery:
    """Parse the query parameters of a search at ``level`` (study, series or instance)."""
    if level not in LEVELS:
        raise ValueError(level)
    keys: dict[str, str] = {}
    includes: list[str] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    warnings: list[str] = []
    allowed = _known_at(level)
    for name, value in params:
        lname = name.lower()
        if lname == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower() == "all":
                    include_all = True
                else:
                    includes.append(_normalize_key(item))
            continue
        if lname == "limit":
            limit = _int_param("limit", value)
            continue
        if lname == "offset":
            offset = _int_param("offset", value)
            continue
        if lname == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise InvalidInput("fuzzymatching must be true or false")
            fuzzy = value.lower() == "true"
            continue
        key = _normalize_key(name)
        if key not in allowed:
            raise InvalidInput(f"{key} is not supported for matching in a {level} query")
        if key in keys:
            raise InvalidInput(f"{key} is given more than once")
        _check_value(key, value)
        keys[key] = value
    if fuzzy:
        warnings.append(
            '299 medledger: "The fuzzymatching parameter is not supported. Only literal matching has been performed."'
        )
    return QidoQuery(
        level=level,
        keys=keys,
        includefields=tuple(includes),
        include_all=include_all,
        limit=limit,
        offset=offset,
        fuzzy_requested=fuzzy,
        warnings=tuple(warnings),
    )


# ---- value matching ---------------------------------------------------------------------
_DA_RE: Final = re.compile(r"^\d{8}$")
_TM_RE: Final = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE: Final = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")


def _valid_temporal(vr: str, value: str) -> bool:
    if not {"DA": _DA_RE, "TM": _TM_RE, "DT": _DT_RE}[vr].fullmatch(value):
        return False
    if vr == "TM":
        hh, mm, ss = value[0:2], value[2:4] or "00", value[4:6] or "00"
        return int(hh) < 24 and int(mm) < 60 and int(ss) < 61
    digits = value if vr == "DA" else re.sub(r"[+-]\d{4}$", "", value) if len(value) > 5 else value
    month, day = digits[4:6] or "01", digits[6:8] or "01"
    return 1 <= int(month) <= 12 and 1 <= int(day) <= 31


def _check_value(key: str, value: str) -> None:
    vr = _vr(key)
    if value == "" or vr not in _RANGE_VRS:
        if vr in _NUMERIC_VRS and value not in ("", "*"):
            try:
                float(value)
            except ValueError:
                raise InvalidInput(f"{key} needs a number") from None
        return
    bounds = value.split("-") if vr != "DT" else _split_dt_range(value)
    if len(bounds) == 1:
        if not _valid_temporal(vr, value):
            raise InvalidInput(f"{key} is not a valid {vr} value or range")
        return
    if len(bounds) != 2:
        raise InvalidInput(f"{key} is not a valid {vr} value or range")
    lo, hi = bounds
    if (not lo and not hi) or (lo and not _valid_temporal(vr, lo)) or (hi and not _valid_temporal(vr, hi)):
        raise InvalidInput(f"{key} is not a valid {vr} value or range")


def _split_dt_range(value: str) -> list[str]:
    """Split a DT key into [value] or [lower, upper]; a DT may carry a "-hhmm" offset."""
    if _DT_RE.fullmatch(value):
        return [value]
    for i, ch in enumerate(value):
        if ch != "-":
            continue
        lo, hi = value[:i], value[i + 1 :]
        if (lo or hi) and (not lo or _DT_RE.fullmatch(lo)) and (not hi or _DT_RE.fullmatch(hi)):
            return [lo, hi]
    return [value, ""] if value.endswith("-") else ["", ""]


def _pad_temporal(vr: str, value: str, upper: bool) -> str:
    """Normalize a DA/TM/DT to full precision; an upper bound fills with maximum digits."""
    if vr == "DA":
        return value
    tz = ""
    if vr == "DT":
        m = re.search(r"[+-]\d{4}$", value)
        if m and len(value) > 5:
            tz, value = m.group(0), value[: m.start()]
        full_len, fill_low, fill_high = 21, "00010100000000.000000", "99991231235959.999999"
    else:
        full_len, fill_low, fill_high = 13, "000000.000000", "235959.999999"
    value = value.replace(":", "")
    filler = fill_high if upper else fill_low
    if len(value) < len(filler):
        value = value + filler[len(value) :]
    return value[:full_len] + tz


def _wild_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    out = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(out, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _pn_forms(value: str) -> list[str]:
    groups = value.split("=")
    return [value, *[g for g in groups if g]]


def match_value(vr: str, key_value: str, stored: list[str]) -> bool:
    """Whether one stored attribute (its values) matches a query key value of VR ``vr``."""
    if key_value == "" or (key_value == "*" and vr in _WILDCARD_VRS):
        return True
    values = [v.strip() for v in stored if v.strip() != ""]
    if not values:
        return False
    if vr == "UI":
        wanted = {u.strip() for u in re.split(r"[,\\]", key_value) if u.strip()}
        return any(v in wanted for v in values)
    if vr in _RANGE_VRS:
        bounds = key_value.split("-") if vr != "DT" else _split_dt_range(key_value)
        if len(bounds) == 1:
            want = _pad_temporal(vr, key_value, upper=False)
            return any(_pad_temporal(vr, v, upper=False) == want for v in values)
        lo, hi = bounds
        lo_n = _pad_temporal(vr, lo, upper=False) if lo else None
        hi_n = _pad_temporal(vr, hi, upper=True) if hi else None
        for v in values:
            vn = _pad_temporal(vr, v, upper=False)
            if (lo_n is None or vn >= lo_n) and (hi_n is None or vn <= hi_n):
                return True
        return False
    if vr in _NUMERIC_VRS:
        try:
            want_n = float(key_value)
            return any(float(v) == want_n for v in values)
        except ValueError:
            return False
    pn = vr == "PN"
    if vr in _WILDCARD_VRS and ("*" in key_value or "?" in key_value):
        rx = _wild_regex(key_value, ignore_case=pn)
        candidates = [f for v in values for f in (_pn_forms(v) if pn else [v])]
        return any(rx.fullmatch(c) for c in candidates)
    if pn:
        want = key_value.casefold()
        return any(f.casefold() == want for v in values for f in _pn_forms(v))
    return any(v == key_value for v in values)


def _values(text: str | list[str]) -> list[str]:
    if isinstance(text, list):
        return text
    return text.split("\\") if text != "" else []


def matches(entity: Mapping[str, str | list[str]], keys: Mapping[str, str]) -> bool:
    """Whether an entity (attribute -> value(s)) matches every query key."""
    for key, want in keys.items():
        if key == "SpecificCharacterSet":
            continue
        if not match_value(_vr(key), want, _values(entity.get(key, ""))):
            return False
    return True


# ---- entities and results ---------------------------------------------------------------
def _entities(level: str, records: list[Record]) -> list[dict[str, str | list[str]]]:
    uid_key = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}[
        level
    ]
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.get(uid_key), []).append(r)
    out: list[dict[str, str | list[str]]] = []
    for uid in sorted(
        groups, key=lambda u: (groups[u][0].get("StudyInstanceUID"), groups[u][0].get("SeriesInstanceUID"), u)
    ):
        members = groups[uid]
        first = members[0]
        ent: dict[str, str | list[str]] = {}
        for lv in (*_ABOVE[level], level):
            for k in _OWN[lv]:
                if k in first.attrs:
                    ent[k] = first.attrs[k]
        if "SpecificCharacterSet" in first.attrs:
            ent["SpecificCharacterSet"] = first.attrs["SpecificCharacterSet"]
        if level == "study":
            ent["ModalitiesInStudy"] = sorted({m.get("Modality") for m in members if m.get("Modality")})
            ent["NumberOfStudyRelatedSeries"] = str(len({m.get("SeriesInstanceUID") for m in members}))
            ent["NumberOfStudyRelatedInstances"] = str(len(members))
        elif level == "series":
            ent["NumberOfSeriesRelatedInstances"] = str(len(members))
        out.append(ent)
    return out


def _retrieve_url(base: str, level: str, ent: Mapping[str, Any]) -> str:
    url = f"{base}/studies/{ent.get('StudyInstanceUID', '')}"
    if level in ("series", "instance"):
        url += f"/series/{ent.get('SeriesInstanceUID', '')}"
    if level == "instance":
        url += f"/instances/{ent.get('SOPInstanceUID', '')}"
    return url


def _tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


_NO_VALUE_VRS: Final = frozenset({"SQ"})


def _json_value(vr: str, values: list[str]) -> list[Any]:
    if vr == "PN":
        out = []
        for v in values:
            comps = v.split("=")
            item = {"Alphabetic": comps[0]}
            if len(comps) > 1 and comps[1]:
                item["Ideographic"] = comps[1]
            if len(comps) > 2 and comps[2]:
                item["Phonetic"] = comps[2]
            out.append(item)
        return out
    if vr in _INT_VRS:
        res: list[Any] = []
        for v in values:
            try:
                res.append(int(v))
            except ValueError:
                res.append(v)
        return res
    if vr in ("DS", "FL", "FD"):
        res = []
        for v in values:
            try:
                f = float(v)
                res.append(int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f)
            except ValueError:
                res.append(v)
        return res
    return values


def _element(key: str, value: str | list[str]) -> dict[str, Any]:
    vr = _vr(key)
    values = _values(value)
    elem: dict[str, Any] = {"vr": vr}
    if values:
        elem["Value"] = _json_value(vr, values)
    return elem


def to_json(
    level: str, ent: Mapping[str, str | list[str]], wanted: Iterable[str], base: str
) -> dict[str, Any]:
    """One result entity as a DICOM JSON object with the ``wanted`` attributes."""
    out: dict[str, Any] = {}
    seqs: dict[str, dict[str, Any]] = {}
    texts: list[str] = []
    for key in wanted:
        if key == "SpecificCharacterSet":
            continue
        if key not in ent and key not in _COMPUTED[level] and key != "InstanceAvailability":
            if "." in key:
                continue
            out[_tag_hex(key)] = {"vr": _vr(key)}
            continue
        value = ent.get(key, "")
        texts.extend(_values(value))
        if "." in key:
            seq_kw, leaf = key.split(".", 1)
            item = seqs.setdefault(seq_kw, {})
            item[_tag_hex(leaf)] = _element(leaf, value)
            continue
        out[_tag_hex(key)] = _element(key, value)
    for seq_kw, item in seqs.items():
        # one item per stored value position (the stored form joins items' values)
        n = max((len(e.get("Value", [])) for e in item.values()), default=0)
        items = []
        for i in range(max(n, 1)):
            it: dict[str, Any] = {}
            for tag, e in item.items():
                vals = e.get("Value", [])
                it[tag] = {"vr": e["vr"], **({"Value": [vals[i]]} if i < len(vals) else {})}
            items.append(it)
        out[_tag_hex(seq_kw)] = {"vr": "SQ", "Value": items}
    out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}  # InstanceAvailability
    out["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, level, ent)]}
    if any(not t.isascii() for t in texts):
        out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}  # DICOM JSON is UTF-8
    return dict(sorted(out.items()))


def _wanted(query: QidoQuery, study_in_path: bool, series_in_path: bool) -> list[str]:
    level = query.level
    wanted: list[str] = list(_DEFAULTS[level]) + list(_COMPUTED[level])
    if level == "series" and not study_in_path:
        wanted += list(_DEFAULTS["study"])
    if level == "instance":
        if not study_in_path:
            wanted += list(_DEFAULTS["study"])
        if not series_in_path:
            wanted += list(_DEFAULTS["series"])
    if query.include_all:
        for lv in (*_ABOVE[level], level):
            wanted += list(_OWN[lv])
    wanted += [k for k in query.keys if k != "SpecificCharacterSet"]
    wanted += [k for k in query.includefields if k in _known_at(level)]
    seen: set[str] = set()
    return [k for k in wanted if not (k in seen or seen.add(k))]  # type: ignore[func-returns-value]


def search(
    query: QidoQuery,
    records: list[Record],
    base: str,
    *,
    study_in_path: bool = False,
    series_in_path: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """Match ``records`` against ``query``; returns (page of DICOM JSON results, total matches)."""
    ents = [e for e in _entities(query.level, records) if matches(e, query.keys)]
    total = len(ents)
    page = ents[query.offset :]
    if query.limit is not None:
        page = page[: query.limit]
    wanted = _wanted(query, study_in_path, series_in_path)
    return [to_json(query.level, e, wanted, base) for e in page], total
