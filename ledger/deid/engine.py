"""Apply PS3.15 Annex E (Table E.1-1, from :mod:`ledger.deid.profile`) to a pydicom Dataset.

What happens to each data element, at every nesting depth:

* Listed in Table E.1-1 (including the ``(50xx,xxxx)`` curve and ``(60xx,3000)`` /
  ``(60xx,4000)`` overlay rows): the effective action from :func:`profile.resolve`.

  - ``X`` remove; ``Z`` empty (a sequence becomes zero items); ``D`` dummy of the
    element's VR (a UI gets a new UID from the study map; a sequence becomes one
    empty item, so nothing of its content survives); ``U`` new UID from the study
    map; ``U*`` (``X/Z/U*`` under ``CompoundPolicy.PRESERVE``) keep the sequence and
    de-identify its items.
  - ``K`` keep (a sequence is kept and its items are de-identified).
  - ``C`` clean, by the option that asked for it: Modified Dates shifts DA/DT by
    the patient's day offset and keeps TM (validated); Clean Descriptors / Retain
    Patient Characteristics keep only vocabulary words, short numbers and
    measurements of free text (:func:`clean_text`) and fall back to the Basic
    Profile action (usually removal) when nothing is left; Retain Device Identity
    replaces AE titles with a keyed pseudonym.  A sequence marked C is kept and its
    items are de-identified.  Anything else marked C gets the Basic Profile action.

* Private (odd group): removed, creators included, unless Retain Safe Private is
  selected and (creator, group, element offset) is in the allow-list; a creator is
  kept only while one of its elements is.
* Not listed: kept, except group lengths (removed), UIDs that are not DICOM
  registry UIDs (remapped, unless Retain UIDs), and -- with Modified Dates -- DA/DT
  values (shifted, so that all intervals stay consistent).

Overlays: the table removes Overlay Data and Overlay Comments; the engine then
also removes the rest of that overlay group (Overlay Description, Label, ...),
because an Overlay Plane without its data is invalid and its free text is
uncontrolled.

After the table: a residual scan removes any remaining string element that still
contains the source patient name, ID or accession number, then the markers are set
(Patient Identity Removed, De-identification Method and its code sequence,
Longitudinal Temporal Information Modified) and the file meta is made consistent.
Pixel data is NOT cleaned: input with Burned In Annotation = YES is refused unless
``DeidContext.allow_burned_in_annotation`` is set.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary, generate_uid

from . import profile
from .profile import (
    BASIC_PROFILE_CODE,
    OPTION_CODES,
    CompoundPolicy,
    DeidOption,
    Resolved,
    SafePrivate,
    TableRow,
)

IMPLEMENTATION_VERSION_NAME = "MEDLEDGER_DEID"
METHOD_NAME = "MedLedger ledger.deid PS3.15 E.1-1 (2025)"

#: Default secret for date shifts and pseudonyms: random per process, so the same
#: patient key gives the same shift within one run.  Pass ``secret`` to make it
#: stable across runs (and keep that secret away from the recipients).
_PROCESS_SECRET = secrets.token_bytes(32)

MIN_SHIFT_DAYS = 366
MAX_SHIFT_DAYS = 3652

_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "CS"})
_SCAN_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_MAX_LEN = {"SH": 16, "CS": 16, "LO": 64, "ST": 1024, "LT": 10240}
_DATE_VRS = frozenset({"DA", "DT"})

_DEID_TAGS = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})


class DeidError(ValueError):
    """The dataset cannot be de-identified as asked."""


class BurnedInAnnotationError(DeidError):
    """Burned In Annotation is YES and pixel data cleaning is not implemented."""


@dataclass
class DeidContext:
    """State shared by all instances of one study (one context per study).

    * ``uid_map``: the study's UID map (same input UID -> same output UID, at every
      depth, in references and in the file meta).
    * date shift: ``date_shift_days`` if given; else derived from ``patient_key`` with
      HMAC-SHA256 under ``secret`` (deterministic: two studies of one patient with the
      same key and secret get the same shift); else random, fixed for the context.
      Shifts are negative, between 1 and 10 years.
    * ``patient_pseudonym``: if set, written to Patient's Name and Patient ID (the
      table's Z/D allows a dummy); otherwise they are emptied.
    * ``safe_private``: allow-list for Retain Safe Private (default: safe_private.tsv).
    """

    patient_key: str | None = None
    date_shift_days: int | None = None
    secret: bytes = _PROCESS_SECRET
    uid_prefix: str | None = None
    patient_pseudonym: str | None = None
    safe_private: frozenset[SafePrivate] | None = None
    compound_policy: CompoundPolicy = CompoundPolicy.REMOVE
    allow_burned_in_annotation: bool = False
    uid_map: dict[str, str] = field(default_factory=dict)
    _random_shift: int | None = field(default=None, init=False, repr=False)

    def map_uid(self, uid: str) -> str:
        """New UID for ``uid`` (2.25.<uuid> form, or under ``uid_prefix``); stable within the context."""
        uid = str(uid).strip("\x00 ")
        if not uid:
            return uid
        new = self.uid_map.get(uid)
        if new is None:
            new = str(generate_uid(prefix=self.uid_prefix))
            self.uid_map[uid] = new
            self.uid_map[new] = new  # re-mapping an output UID is a no-op
        return new

    @property
    def shift_days(self) -> int:
        if self.date_shift_days is not None:
            return self.date_shift_days
        span = MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1
        if self.patient_key is not None:
            digest = hmac.new(self.secret, b"date-shift\x00" + self.patient_key.encode(), hashlib.sha256)
            return -(MIN_SHIFT_DAYS + int.from_bytes(digest.digest()[:8], "big") % span)
        if self._random_shift is None:
            self._random_shift = -(MIN_SHIFT_DAYS + secrets.randbelow(span))
        return self._random_shift

    def pseudonym(self, kind: str, value: str, length: int = 8) -> str:
        digest = hmac.new(self.secret, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
        return digest[:length].upper()


# --- dates --------------------------------------------------------------------

_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DT_RE = re.compile(
    r"^(?P<y>\d{4})(?P<m>\d{2})?(?P<d>\d{2})?"
    r"(?P<time>(?P<H>\d{2})(?P<M>\d{2})?(?P<S>\d{2})?(?P<f>\.\d{1,6})?)?"
    r"(?P<tz>[+-]\d{4})?$"
)
_TM_RE = re.compile(r"^(?P<H>\d{2})(?:(?P<M>\d{2})(?:(?P<S>\d{2})(?P<f>\.\d{1,6})?)?)?$")


def _valid_time(h: str | None, m: str | None, s: str | None) -> bool:
    return (h is None or int(h) <= 23) and (m is None or int(m) <= 59) and (s is None or int(s) <= 60)


def shift_da(value: str, days: int) -> str | None:
    """Shift a DA value (also 'YYYY.MM.DD' and ranges); None if it is not a valid date."""
    value = value.strip()
    if "-" in value:
        parts = value.split("-")
        if len(parts) != 2:
            return None
        shifted = [shift_da(p, days) if p else "" for p in parts]
        return None if any(s is None for s in shifted) else "-".join(s or "" for s in shifted)
    match = _DA_RE.match(value.replace(".", "")) if len(value) in (8, 10) else None
    if not match:
        return None
    try:
        date = dt.date(int(match[1]), int(match[2]), int(match[3]))
        return (date + dt.timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return None


def shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of a DT value; time, fraction and UTC offset are kept."""
    match = _DT_RE.match(value.strip())
    if not match:
        return None
    if not _valid_time(match["H"], match["M"], match["S"]):
        return None
    if match["tz"]:
        offset = int(match["tz"][1:3]) * 60 + int(match["tz"][3:5])
        if match["tz"][3:5] > "59" or offset > 14 * 60:
            return None
    try:
        date = dt.date(int(match["y"]), int(match["m"] or 1), int(match["d"] or 1))
        new = date + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    fmt = "%Y%m%d" if match["d"] else ("%Y%m" if match["m"] else "%Y")
    return f"{new.year:04d}" + new.strftime(fmt)[4:] + (match["time"] or "") + (match["tz"] or "")


def clean_tm(value: str) -> str | None:
    """A valid TM for ``value`` (legacy 'HH:MM:SS' converted); None if not a time."""
    value = value.strip()
    if ":" in value:
        value = value.replace(":", "")
    match = _TM_RE.match(value)
    if not match or not _valid_time(match["H"], match["M"], match["S"]):
        return None
    return value


# --- free text ----------------------------------------------------------------

_WORD_RE = re.compile(r"[^\W_]+(?:[.,]\d+)?")
_MEASURE_RE = re.compile(r"^\d{1,3}(?:[.,]\d{1,3})?(?:MM|CM|ML|MG|KV|KVP|MAS|MS|S|T|D|X)?$", re.IGNORECASE)


def clean_text(value: str, identifiers: Iterable[str] = (), max_len: int | None = None) -> str:
    """Clean Descriptors: keep only vocabulary words and short numbers/measurements.

    The result is known to contain nothing but words of ``descriptor_vocabulary.tsv``
    and numbers of at most 3 digits (plus a unit), so IDs, dates and names cannot
    survive; ``identifiers`` are dropped even if they happen to be vocabulary words.
    """
    vocabulary = profile.descriptor_vocabulary()
    banned = {i.upper() for i in identifiers}
    kept: list[str] = []
    for word in _WORD_RE.findall(value):
        upper = word.upper()
        if upper in banned:
            continue
        if upper in vocabulary or _MEASURE_RE.match(word):
            kept.append(upper)
    text = " ".join(kept)
    if max_len is not None and len(text) > max_len:
        text = text[:max_len].rsplit(" ", 1)[0] if " " in text[:max_len] else ""
    return text


# --- identifiers for the residual scan -------------------------------------------

_ID_SOURCES = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "AccessionNumber",
    "MedicalRecordLocator",
)


def _values(value: Any) -> list[Any]:
    if isinstance(value, (list, MultiValue, tuple)):
        return list(value)
    return [value]


def collect_identifiers(ds: Dataset) -> set[str]:
    """Strings (length >= 3) from the source that must not appear in the output."""
    found: set[str] = set()

    def add(text: str) -> None:
        text = text.strip().strip("\x00").strip()
        if len(text) >= 3:
            found.add(text)

    def visit(item: Dataset) -> None:
        for keyword in _ID_SOURCES:
            if keyword not in item:
                continue
            try:
                value = item[keyword].value
            except (ValueError, LookupError):  # undecodable source: nothing usable
                continue
            for v in _values(value):
                if v is None:
                    continue
                text = v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v)
                add(text)
                for part in re.split(r"[\^=]", text):
                    add(part)
        for seq_kw in ("OtherPatientIDsSequence",):
            if seq_kw in item:
                for sub in item[seq_kw].value or []:
                    visit(sub)

    visit(ds)
    return found


def _contains_identifier(text: str, identifiers: set[str]) -> bool:
    lowered = text.lower()
    for ident in identifiers:
        low = ident.lower()
        if len(low) >= 4:
            if low in lowered:
                return True
        elif re.search(rf"(?<![^\W_]){re.escape(low)}(?![^\W_])", lowered):
            return True
    return False


# --- the walker -----------------------------------------------------------------


def _is_registry_uid(uid: str) -> bool:
    return uid in UID_dictionary or uid.startswith("1.2.840.10008.")


class _Walker:
    def __init__(self, options: DeidOption, context: DeidContext, identifiers: set[str]) -> None:
        self.table = profile.load_table()
        self.options = options
        self.context = context
        self.identifiers = identifiers
        self.safe_private = (
            context.safe_private if context.safe_private is not None else profile.default_safe_private()
        )
        self.modified_dates = DeidOption.RETAIN_LONG_MODIFIED_DATES in options
        self.retain_uids = DeidOption.RETAIN_UIDS in options

    # datasets ---------------------------------------------------------------

    def walk(self, ds: Dataset) -> None:
        self._private(ds)
        removed_overlays: set[int] = set()
        for tag in list(ds.keys()):
            if tag not in ds:
                continue
            tag = Tag(tag)
            if tag.is_private:
                continue  # handled by _private
            if tag.element == 0 and tag.group != 0x0002:
                del ds[tag]
                continue
            row = self.table.lookup(int(tag))
            if row is None:
                self._unlisted(ds, tag)
                continue
            resolved = profile.resolve(row, self.options, self.context.compound_policy)
            self._apply(ds, tag, resolved, row)
            if 0x6000 <= tag.group <= 0x601E and tag.element == 0x3000 and tag not in ds:
                removed_overlays.add(tag.group)
        for group in removed_overlays:
            for tag in [t for t in ds.keys() if Tag(t).group == group]:
                del ds[tag]

    def _items(self, ds: Dataset, tag: BaseTag) -> None:
        value = ds[tag].value
        for item in value or []:
            if isinstance(item, Dataset):
                self.walk(item)

    # private ----------------------------------------------------------------

    def _private(self, ds: Dataset) -> None:
        private = [Tag(t) for t in ds.keys() if Tag(t).is_private]
        if not private:
            return
        keep: set[int] = set()
        if DeidOption.RETAIN_SAFE_PRIVATE in self.options:
            for tag in private:
                if tag.element < 0x1000:
                    continue
                block = tag.element >> 8
                creator_tag = Tag(tag.group, block)
                if creator_tag not in ds:
                    continue
                creator = ds[creator_tag].value
                if isinstance(creator, bytes):
                    creator = creator.decode("latin-1", "replace")
                entry = SafePrivate(str(creator).strip(" \x00"), tag.group, tag.element & 0xFF)
                if entry in self.safe_private:
                    keep.add(int(tag))
                    keep.add(int(creator_tag))
        for tag in private:
            if int(tag) not in keep:
                del ds[tag]
            elif ds[tag].VR == "SQ":
                self._items(ds, tag)

    # unlisted elements ------------------------------------------------------

    def _unlisted(self, ds: Dataset, tag: BaseTag) -> None:
        elem = ds[tag]
        if elem.VR == "SQ":
            self._items(ds, tag)
        elif elem.VR == "UI":
            if not self.retain_uids and elem.value:
                mapped = self.context.map_uid
                new = [v if _is_registry_uid(str(v)) else mapped(str(v)) for v in _values(elem.value)]
                elem.value = new if len(new) > 1 else new[0]
        elif self.modified_dates and elem.VR in _DATE_VRS:
            self._shift(ds, tag)

    # table actions ----------------------------------------------------------

    def _apply(self, ds: Dataset, tag: BaseTag, resolved: Resolved, row: TableRow) -> None:
        elem = ds[tag]
        action = resolved.action
        vr = elem.VR
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = [] if vr == "SQ" else empty_value_for_VR(vr)
        elif action == "D":
            if vr == "SQ":
                elem.value = [Dataset()]
            elif vr == "UI":
                self._map_uids(ds, tag)
            else:
                elem.value = profile.dummy_value(vr)
        elif action == "U":
            self._map_uids(ds, tag)
        elif action in ("K", "U*"):
            if vr == "SQ":
                self._items(ds, tag)
            elif action == "U*":
                self._map_uids(ds, tag)
        elif action == "C":
            self._clean(ds, tag, resolved.source, row)
        else:  # pragma: no cover - table validated on load
            raise DeidError(f"unknown action {action}")

    def _basic(self, ds: Dataset, tag: BaseTag, row: TableRow) -> None:
        self._apply(ds, tag, Resolved(profile.resolve_compound(row.basic, self.context.compound_policy)), row)

    def _map_uids(self, ds: Dataset, tag: BaseTag) -> None:
        elem = ds[tag]
        if self.retain_uids and elem.VR == "UI":
            return
        value = elem.value
        if isinstance(value, bytes):  # UN (implicit VR, tag unknown to the dictionary)
            value = value.decode("ascii", "replace").strip("\x00 ").split("\\")
        new = [self.context.map_uid(str(v)) for v in _values(value) if v is not None and str(v)]
        if elem.VR != "UI":
            ds[tag] = DataElement(tag, "UI", new if len(new) > 1 else (new[0] if new else ""))
        else:
            elem.value = new if len(new) > 1 else (new[0] if new else "")

    def _clean(self, ds: Dataset, tag: BaseTag, source: DeidOption | None, row: TableRow) -> None:
        elem = ds[tag]
        vr = elem.VR
        if vr == "SQ":
            self._items(ds, tag)
            return
        if source == DeidOption.RETAIN_LONG_MODIFIED_DATES:
            if vr in _DATE_VRS:
                self._shift(ds, tag)
            elif vr == "TM":
                self._tm(ds, tag)
            elif vr in _TEXT_VRS:
                pass  # e.g. Timezone Offset From UTC: unchanged by a whole-day shift
            else:
                self._basic(ds, tag, row)
            return
        if vr == "AE":
            values = [f"AE{self.context.pseudonym('AE', str(v))}" for v in _values(elem.value) if v]
            elem.value = values if len(values) > 1 else (values[0] if values else "")
            return
        if vr in _TEXT_VRS and elem.value:
            cleaned = [clean_text(str(v), self.identifiers, _MAX_LEN.get(vr)) for v in _values(elem.value)]
            cleaned = [c for c in cleaned if c]
            if cleaned:
                elem.value = cleaned if len(cleaned) > 1 else cleaned[0]
                return
        self._basic(ds, tag, row)

    def _shift(self, ds: Dataset, tag: BaseTag) -> None:
        elem = ds[tag]
        if not elem.value:
            return
        shift = shift_da if elem.VR == "DA" else shift_dt
        days = self.context.shift_days
        out = [shift(str(v), days) for v in _values(elem.value)]
        if any(v is None for v in out):
            elem.value = empty_value_for_VR(elem.VR)  # unparseable: cannot shift, so do not keep
            return
        elem.value = out if len(out) > 1 else out[0]

    def _tm(self, ds: Dataset, tag: BaseTag) -> None:
        elem = ds[tag]
        if not elem.value:
            return
        out = [clean_tm(str(v)) for v in _values(elem.value)]
        if any(v is None for v in out):
            elem.value = empty_value_for_VR("TM")
            return
        elem.value = out if len(out) > 1 else out[0]

    # file meta --------------------------------------------------------------

    def meta(self, meta: FileMetaDataset) -> None:
        for tag in (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102):
            if tag in meta:
                del meta[tag]
        if "MediaStorageSOPInstanceUID" in meta and not self.retain_uids:
            self._map_uids(meta, Tag(0x00020003))
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME


def _scrub(ds: Dataset, identifiers: set[str]) -> None:
    """Remove any string (or UN) element, at any depth, that still contains a source identifier."""
    if not identifiers:
        return
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                _scrub(item, identifiers)
            continue
        if elem.VR in _SCAN_VRS:
            text = "\\".join(str(v) for v in _values(elem.value) if v is not None)
        elif elem.VR == "UN" and isinstance(elem.value, bytes):
            text = elem.value.decode("latin-1")
        else:
            continue
        if text and _contains_identifier(text, identifiers):
            del ds[tag]


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def applied_codes(options: DeidOption) -> list[tuple[str, str]]:
    """CID 7050 codes for the profile and the selected options (in code order)."""
    codes = [BASIC_PROFILE_CODE]
    codes += sorted(code for option, code in OPTION_CODES.items() if option in options)
    return codes


def _set_markers(ds: Dataset, options: DeidOption) -> None:
    codes = applied_codes(options)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [METHOD_NAME, *(meaning for _, meaning in codes)]
    ds.DeidentificationMethodCodeSequence = Sequence([_code_item(v, m) for v, m in codes])
    if DeidOption.RETAIN_LONG_FULL_DATES in options:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif DeidOption.RETAIN_LONG_MODIFIED_DATES in options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"


def deidentify(
    ds: Dataset,
    options: DeidOption = DeidOption.NONE,
    context: DeidContext | None = None,
) -> Dataset:
    """Return a de-identified copy of ``ds`` (the input is not modified).

    Use one ``context`` for all instances of a study: it holds the study's UID
    map and the patient's date shift.
    """
    profile.validate_options(options)
    if context is None:
        context = DeidContext()
    burned = ds.get("BurnedInAnnotation")
    if burned is not None and str(burned.value if hasattr(burned, "value") else burned).upper() == "YES":
        if not context.allow_burned_in_annotation:
            raise BurnedInAnnotationError("Burned In Annotation is YES; Clean Pixel Data is not implemented")
    identifiers = collect_identifiers(ds)
    out = copy.deepcopy(ds)
    for tag in _DEID_TAGS:
        if tag in out:
            del out[tag]
    walker = _Walker(options, context, identifiers)
    walker.walk(out)
    _scrub(out, identifiers)
    if context.patient_pseudonym is not None:
        out.PatientName = context.patient_pseudonym
        out.PatientID = context.patient_pseudonym
    _set_markers(out, options)
    meta = getattr(out, "file_meta", None)
    if isinstance(meta, FileMetaDataset) and len(meta):
        walker.meta(meta)
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        if "SOPClassUID" in out:
            meta.MediaStorageSOPClassUID = out.SOPClassUID
    return out
