"""Strict parsing and validation of an uploaded DICOM PS3.10 object.

:func:`parse_instance` is the only way a :class:`DicomInstance` comes into being. It takes the
uploaded bytes exactly as they will be stored (byte-identical; nothing here rewrites them) and
either returns the facts the gateway needs (UIDs, patient identity for internal matching, QIDO
attributes, size and SHA-256) or raises a :class:`~ledger.errors.NotDicom` whose ``code`` is a
stable, specific reason code and whose message is PHI-free (it names attributes, tags, byte
offsets and lengths, never values of patient attributes).

pydicom reads many defects silently (a short read of the last element, a stray delimiter that
ends the data set early, a duplicate tag, an explicit-VR file that is really implicit VR,
``force=True`` reads of non-DICOM bytes). So validation runs in two passes:

1. An independent structural walk over the encoded bytes (PS3.5 chapter 7): every data element
   of the file meta group, the data set and every nested sequence item and pixel data
   fragment is visited; each declared length must fit inside its container, undefined lengths
   must be closed by their delimiter, tags must ascend, explicit VRs must be real VRs. A
   deflated data set is inflated first (bounded, so a deflate bomb cannot exhaust memory).
2. pydicom (``dcmread`` with ``force=False``, so a forced read is impossible) decodes the data
   set; every element, including those in nested sequences, is converted and every person
   name decoded, with pydicom's warnings escalated to errors (``warnings.catch_warnings`` with
   an ``"error"`` filter scoped to pydicom's modules) except the two tolerated kinds listed
   below. Then the semantic checks run.

Outcome table (defect -> outcome -> reason code, the ``code`` of the raised error; every
reject is :class:`~ledger.errors.NotDicom` unless noted):

==============================================================  =======  ===================================
defect                                                          outcome  reason code
==============================================================  =======  ===================================
object larger than max_size, or a deflated data set inflating   reject   payload_too_large (PayloadTooLarge)
past max_inflated_size
zero bytes                                                      reject   dicom_empty
no 128-byte preamble + DICM prefix (raw data set without meta,  reject   dicom_not_part10
PNG, random bytes); force=True reads are never made
no file meta group (0002,xxxx) after the prefix                 reject   dicom_meta_missing
meta lacks TransferSyntaxUID, MediaStorageSOPClassUID or        reject   dicom_meta_incomplete
MediaStorageSOPInstanceUID (message names which)
(0002,0000) group length present but wrong, or not a 4-byte UL  reject   dicom_meta_group_length
(0002,0000) group length absent                                 accept   (tolerated: meta framed by its
                                                                         group)
transfer syntax unknown to the standard, or private             reject   dicom_unknown_transfer_syntax
deflated, explicit VR big endian (retired), implicit VR LE,     accept   (transfer_syntax_uid records it)
encapsulated (JPEG, JPEG-LS, J2K, HTJ2K, RLE, MPEG, ...)
deflate stream followed by a gzip trailer that matches          accept   (tolerated: verified, not garbage)
(CRC-32, size) or a pad byte
deflated data set does not inflate, ends early, or other bytes  reject   dicom_deflate_error
follow it
an element's declared length runs past the end of its           reject   dicom_truncated
container (file, item, sequence), or a header is cut short
undefined-length sequence, item or encapsulated pixel data      reject   dicom_missing_delimiter
without its delimiter
stray item/delimiter tag, non-item inside a sequence,           reject   dicom_bad_structure
undefined length on a VR that cannot have it, group
0000/0001/0002/0003/0005/0007/FFFF in the data set
duplicate or descending tag (pydicom silently keeps one)        reject   dicom_tag_order
explicit VR bytes that are no PS3.5 VR (e.g. data set written   reject   dicom_bad_vr
implicit VR under an explicit VR syntax; pydicom guesses)
sequences nested deeper than MAX_SEQUENCE_DEPTH                 reject   dicom_nesting_too_deep
pydicom raises while decoding any element                       reject   dicom_unparseable
pydicom warns of anything not listed as tolerated here          reject   dicom_parse_warning
pydicom per-value VR check fails (IS '1A', a reference UID      accept   (VR kept in value_warnings)
with a '0123' component) outside the key attributes
implicit VR, public tag missing from pydicom's dictionary       accept   ("UN" in value_warnings)
(read as UN, framing checked)
SpecificCharacterSet term not a defined term, or code           reject   dicom_bad_charset
extensions on a term that allows none, or a text value not
decodable in it (no silent fallback)
SpecificCharacterSet absent or empty                            accept   (default repertoire)
SOPClassUID, SOPInstanceUID, StudyInstanceUID or                reject   dicom_missing_uid
SeriesInstanceUID absent or empty
one of those four or a meta UID not PS3.5 9.1 (digits and       reject   dicom_invalid_uid
dots, <= 64 chars, no empty or leading-zero component, one
value)
MediaStorageSOPInstanceUID != SOPInstanceUID, or                reject   dicom_meta_mismatch
MediaStorageSOPClassUID != SOPClassUID
PatientID absent or empty (an instance must belong to a         reject   dicom_missing_patient_id
patient)
SOP class is an '... Image Storage' but no Pixel Data (Type 1;  reject   dicom_missing_pixel_data
also what a file cut at an element boundary looks like)
Pixel Data but Rows, Columns, SamplesPerPixel, BitsAllocated,   reject   dicom_pixel_attrs
NumberOfFrames or (native) PhotometricInterpretation missing
or invalid
native Pixel Data length != Rows x Columns x SamplesPerPixel x  reject   dicom_pixel_length
BitsAllocated/8 x NumberOfFrames; one pad byte to even length
allowed; BitsAllocated 1 counted in bits; YBR_*_422 at 2
samples a pixel; excess padding rejected too
undefined-length Pixel Data in a native syntax, defined-length  reject   dicom_pixel_encoding
top-level Pixel Data in an encapsulated one, no fragment after
the offset table, or fewer fragments than frames (non-video
syntaxes)
odd value lengths, non-zero reserved bytes in explicit VR       accept   (tolerated: framing intact)
headers
==============================================================  =======  ===================================

Character sets: pydicom decodes text with (0008,0005) Specific Character Set; this module checks
every term of it (top level and in every sequence item) against pydicom's table of defined
terms first and decodes every text element and every Person Name with warnings as errors, so
an invalid value is rejected (``dicom_bad_charset``) rather than silently replaced;
``patient_name`` is ``str(ds.PatientName)`` after that decoding.

PHI: ``patient_name``, ``patient_id``, ``issuer_of_patient_id`` and ``qido`` are excluded from
``repr`` so that logging an instance does not leak them. pydicom itself logs its value-check
warnings (which quote the offending value) to the ``pydicom`` logger; a filter installed on
that logger by this module strips the quoted value from those records.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import pydicom
import pydicom.charset
import pydicom.uid
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from ledger.errors import NotDicom, PayloadTooLarge
from ledger.qido import STORED_ATTRIBUTES

__all__ = [
    "DEFAULT_MAX_INFLATED_SIZE",
    "DEFAULT_MAX_SIZE",
    "MAX_SEQUENCE_DEPTH",
    "QIDO_KEYWORDS",
    "REASON_CODES",
    "DicomInstance",
    "parse_instance",
]

DEFAULT_MAX_SIZE: Final = 512 * 1024 * 1024
"""Default cap on the size of one uploaded object (bytes)."""
DEFAULT_MAX_INFLATED_SIZE: Final = 1024 * 1024 * 1024
"""Default cap on the inflated size of a deflated data set (bytes)."""
MAX_SEQUENCE_DEPTH: Final = 32
"""Deepest sequence nesting accepted (real objects, even SR trees, stay far below)."""

REASON_CODES: Final = frozenset(
    {
        "dicom_empty",
        "dicom_not_part10",
        "dicom_meta_missing",
        "dicom_meta_incomplete",
        "dicom_meta_group_length",
        "dicom_unknown_transfer_syntax",
        "dicom_truncated",
        "dicom_missing_delimiter",
        "dicom_bad_structure",
        "dicom_tag_order",
        "dicom_bad_vr",
        "dicom_nesting_too_deep",
        "dicom_deflate_error",
        "dicom_unparseable",
        "dicom_parse_warning",
        "dicom_bad_charset",
        "dicom_missing_uid",
        "dicom_invalid_uid",
        "dicom_meta_mismatch",
        "dicom_missing_patient_id",
        "dicom_missing_pixel_data",
        "dicom_pixel_attrs",
        "dicom_pixel_length",
        "dicom_pixel_encoding",
    }
)
"""Every ``NotDicom.code`` :func:`parse_instance` can raise."""

# The QIDO-RS attributes stored per instance: the table is ledger.qido's (one place), plus the
# character set needed to decode them. Nested ones ("A.B") are read as B inside sequence A.
QIDO_KEYWORDS: Final[tuple[str, ...]] = (
    "SpecificCharacterSet",
    *(k for k in STORED_ATTRIBUTES if "." not in k),
)
_QIDO_NESTED: Final = tuple(tuple(k.split(".", 1)) for k in STORED_ATTRIBUTES if "." in k)


@dataclass(frozen=True, slots=True)
class DicomInstance:
    """The validated facts of one DICOM PS3.10 object. Built only by :func:`parse_instance`.

    ``patient_name``, ``patient_id``, ``issuer_of_patient_id`` and ``qido`` hold PHI: they are
    for internal matching and querying only, never for logs or error messages (they are left
    out of ``repr``).
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str = field(repr=False)
    issuer_of_patient_id: str = field(repr=False)
    patient_name: str = field(repr=False)
    modality: str
    study_date: str
    study_description: str = field(repr=False)
    series_number: int | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    size: int
    sha256: str
    qido: dict[str, str] = field(repr=False, compare=False)
    value_warnings: tuple[str, ...] = ()
    """VRs of values that failed pydicom's per-value check (tolerated, PHI-free)."""


def _reject(code: str, message: str) -> NotDicom:
    assert code in REASON_CODES, code
    return NotDicom(message, code=code)


# ---- PHI-safe pydicom logging -------------------------------------------------------------
# pydicom's per-value checks (pydicom.valuerep) quote the offending value, e.g.
# "Invalid value for VR LO: '<value>'" or 'Value "<value>" is not valid for ... VR of IS'.
_QUOTES_VALUE = re.compile(r"Invalid value for VR|is not valid for elements with a VR")
_VR_IN_MESSAGE = re.compile(r"\bVR (?:of )?(?P<vr>[A-Z]{2})\b")


def _vr_of(message: str) -> str:
    m = _VR_IN_MESSAGE.search(message)
    return m.group("vr") if m else "??"


class _RedactPydicomValues(logging.Filter):
    """Replace pydicom value-check log records that quote a value by a PHI-free one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        if _QUOTES_VALUE.search(text):
            record.msg = f"Invalid value for VR {_vr_of(text)} (value redacted)"
            record.args = None
        return True


_pydicom_logger = logging.getLogger("pydicom")
if not any(isinstance(f, _RedactPydicomValues) for f in _pydicom_logger.filters):
    _pydicom_logger.addFilter(_RedactPydicomValues())


# ---- pass 1: structural walk (PS3.5 chapter 7) --------------------------------------------
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_DELIM: Final = 0xFFFEE00D
_SEQ_DELIM: Final = 0xFFFEE0DD
_PIXEL_DATA: Final = 0x7FE00010
_VALID_VRS: Final = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_LONG_VRS: Final = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_RESERVED_GROUPS: Final = frozenset({0x0000, 0x0001, 0x0002, 0x0003, 0x0005, 0x0007, 0xFFFF})


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(slots=True)
class _PixelInfo:
    undefined_length: bool = False
    fragments: int = 0  # fragments after the basic offset table


class _Walker:
    """Visits every element of an encoded data set and checks its framing.

    ``buf`` is the whole encoded data set (or inflated data set); offsets in messages are
    relative to it.
    """

    def __init__(self, buf: bytes, *, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        self.little = little
        self.pixel: _PixelInfo | None = None

    def _u16(self, pos: int, little: bool) -> int:
        return int(struct.unpack_from("<H" if little else ">H", self.buf, pos)[0])

    def _u32(self, pos: int, little: bool) -> int:
        return int(struct.unpack_from("<L" if little else ">L", self.buf, pos)[0])

    def _tag(self, pos: int, little: bool) -> int:
        return (self._u16(pos, little) << 16) | self._u16(pos + 2, little)

    def walk_top(self, start: int) -> int:
        return self._dataset(start, len(self.buf), self.implicit, self.little, 0, item=None)

    def _dataset(
        self, pos: int, limit: int, implicit: bool, little: bool, depth: int, *, item: str | None
    ) -> int:
        """Walk the elements of a data set from ``pos`` up to ``limit``.

        ``item`` is None for the top-level data set, ``"defined"`` for a sequence item of
        defined length (ends exactly at ``limit``) and ``"undefined"`` for one that ends at its
        item delimiter (``limit`` is then its container's end). Returns the end position.
        """
        last = -1
        while True:
            if pos == limit:
                if item == "undefined":
                    raise _reject(
                        "dicom_missing_delimiter",
                        f"sequence item not closed by an item delimiter (at offset {pos})",
                    )
                return pos
            if limit - pos < 8:
                raise _reject("dicom_truncated", f"element header cut short at offset {pos}")
            tag = self._tag(pos, little)
            if tag == _ITEM_DELIM and item == "undefined":
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise _reject(
                    "dicom_bad_structure",
                    f"unexpected item or delimiter tag {_tag_str(tag)} at offset {pos}",
                )
            if (tag >> 16) in _RESERVED_GROUPS:
                raise _reject(
                    "dicom_bad_structure",
                    f"element {_tag_str(tag)} of a command, meta or reserved group in the data set",
                )
            if tag <= last:
                raise _reject(
                    "dicom_tag_order",
                    f"element {_tag_str(tag)} at offset {pos} duplicates or precedes {_tag_str(last)}",
                )
            last = tag
            vr: bytes | None
            if implicit:
                vr, length, head = None, self._u32(pos + 4, little), 8
            else:
                vr = self.buf[pos + 4 : pos + 6]
                if vr not in _VALID_VRS:
                    raise _reject(
                        "dicom_bad_vr",
                        f"element {_tag_str(tag)} at offset {pos} has no valid VR (data set not "
                        "encoded in its declared explicit VR transfer syntax?)",
                    )
                if vr in _LONG_VRS:
                    if limit - pos < 12:
                        raise _reject("dicom_truncated", f"element header cut short at offset {pos}")
                    length, head = self._u32(pos + 8, little), 12
                else:
                    length, head = self._u16(pos + 6, little), 8
            value = pos + head
            is_sq = vr == b"SQ" or (vr is None and _dictionary_is_sq(tag))
            if length == _UNDEFINED:
                if is_sq:
                    pos = self._sequence(value, None, limit, implicit, little, depth + 1)
                elif vr == b"UN":
                    # PS3.5 6.2.2: an undefined-length UN is a sequence in implicit VR LE
                    pos = self._sequence(value, None, limit, True, True, depth + 1)
                elif vr is None and limit - value >= 4 and self._tag(value, little) == _ITEM:
                    # implicit VR, tag not in the public dictionary (private): a sequence
                    pos = self._sequence(value, None, limit, implicit, little, depth + 1)
                elif tag == _PIXEL_DATA and vr in (b"OB", b"OW", None):
                    pos, fragments = self._fragments(value, limit, little)
                    if item is None:
                        self.pixel = _PixelInfo(undefined_length=True, fragments=fragments)
                else:
                    raise _reject(
                        "dicom_bad_structure",
                        f"element {_tag_str(tag)} at offset {pos} has an undefined length",
                    )
                continue
            if length > limit - value:
                raise _reject(
                    "dicom_truncated",
                    f"element {_tag_str(tag)} at offset {pos} declares {length} bytes, "
                    f"{limit - value} remain",
                )
            if is_sq:
                self._sequence(value, value + length, limit, implicit, little, depth + 1)
            elif tag == _PIXEL_DATA and item is None:
                self.pixel = _PixelInfo(undefined_length=False)
            pos = value + length

    def _sequence(
        self, pos: int, end: int | None, limit: int, implicit: bool, little: bool, depth: int
    ) -> int:
        """Walk the items of a sequence ending at ``end``, or at its delimiter if ``end`` is
        None (``limit`` is then the container's end). Returns the end position."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise _reject("dicom_nesting_too_deep", f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}")
        bound = limit if end is None else end
        while True:
            if end is not None and pos == end:
                return pos
            if bound - pos < 8:
                if end is None and pos == bound:
                    raise _reject("dicom_missing_delimiter", "sequence not closed by a sequence delimiter")
                raise _reject("dicom_truncated", f"sequence item header cut short at offset {pos}")
            tag = self._tag(pos, little)
            length = self._u32(pos + 4, little)
            if tag == _SEQ_DELIM and end is None:
                return pos + 8
            if tag != _ITEM:
                raise _reject(
                    "dicom_bad_structure",
                    f"expected a sequence item at offset {pos}, found {_tag_str(tag)}",
                )
            if length == _UNDEFINED:
                pos = self._dataset(pos + 8, bound, implicit, little, depth, item="undefined")
                continue
            if length > bound - (pos + 8):
                raise _reject(
                    "dicom_truncated",
                    f"sequence item at offset {pos} declares {length} bytes, {bound - pos - 8} remain",
                )
            pos = self._dataset(pos + 8, pos + 8 + length, implicit, little, depth, item="defined")

    def _fragments(self, pos: int, limit: int, little: bool) -> tuple[int, int]:
        """Walk encapsulated pixel data items up to the sequence delimiter (PS3.5 A.4)."""
        count = 0
        while True:
            if limit - pos < 8:
                if pos == limit:
                    raise _reject(
                        "dicom_missing_delimiter", "encapsulated pixel data not closed by a delimiter"
                    )
                raise _reject("dicom_truncated", f"pixel data fragment header cut short at {pos}")
            tag = self._tag(pos, little)
            length = self._u32(pos + 4, little)
            if tag == _SEQ_DELIM:
                return pos + 8, max(count - 1, 0)
            if tag != _ITEM or length == _UNDEFINED:
                raise _reject("dicom_bad_structure", f"malformed pixel data fragment at offset {pos}")
            if length > limit - (pos + 8):
                raise _reject(
                    "dicom_truncated",
                    f"pixel data fragment at offset {pos} declares {length} bytes, {limit - pos - 8} remain",
                )
            pos += 8 + length
            count += 1


def _dictionary_is_sq(tag: int) -> bool:
    if (tag >> 16) % 2 == 1:  # private: the public dictionary does not apply
        return False
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


@dataclass(slots=True)
class _Meta:
    end: int  # offset of the first data set byte
    elements: dict[int, bytes]


def _walk_meta(data: bytes) -> _Meta:
    """Walk the file meta group (always explicit VR little endian) starting after ``DICM``."""
    pos = 132
    elements: dict[int, bytes] = {}
    last = -1
    group_length: int | None = None
    while len(data) - pos >= 6:
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        tag = (group << 16) | elem
        if tag <= last:
            raise _reject("dicom_tag_order", f"file meta element {_tag_str(tag)} out of order")
        last = tag
        vr = data[pos + 4 : pos + 6]
        if vr not in _VALID_VRS:
            raise _reject("dicom_bad_vr", f"file meta element {_tag_str(tag)} has no valid VR")
        if vr in _LONG_VRS:
            if len(data) - pos < 12:
                raise _reject("dicom_truncated", "file meta element header cut short")
            (length,) = struct.unpack_from("<L", data, pos + 8)
            head = 12
        else:
            if len(data) - pos < 8:
                raise _reject("dicom_truncated", "file meta element header cut short")
            (length,) = struct.unpack_from("<H", data, pos + 6)
            head = 8
        if length == _UNDEFINED or length > len(data) - pos - head:
            raise _reject("dicom_truncated", f"file meta element {_tag_str(tag)} runs past the end of file")
        value = data[pos + head : pos + head + length]
        elements[tag] = value
        if tag == 0x00020000:
            if vr != b"UL" or length != 4:
                raise _reject("dicom_meta_group_length", "(0002,0000) is not a 4-byte UL")
            (group_length,) = struct.unpack_from("<L", value)
        pos += head + length
    if not elements:
        raise _reject("dicom_meta_missing", "no file meta information group after the DICM prefix")
    if group_length is not None and group_length != pos - (132 + 12):
        raise _reject(
            "dicom_meta_group_length",
            f"(0002,0000) says {group_length} bytes, the meta group has {pos - 144}",
        )
    return _Meta(end=pos, elements=elements)


def _ui(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


_UID_RE: Final = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def _is_valid_uid(value: str) -> bool:
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def _inflate(raw: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, cap + 1)
    except zlib.error:
        raise _reject("dicom_deflate_error", "deflated data set does not inflate") from None
    if len(out) > cap:
        raise PayloadTooLarge(f"inflated data set exceeds {cap} bytes")
    try:
        out += d.flush()
    except zlib.error:  # pragma: no cover - flush after a bounded decompress
        raise _reject("dicom_deflate_error", "deflated data set does not inflate") from None
    if len(out) > cap:
        raise PayloadTooLarge(f"inflated data set exceeds {cap} bytes")
    if not d.eof:
        raise _reject("dicom_deflate_error", "deflated data set ends before its final block")
    trailer = d.unused_data
    if trailer and trailer != b"\x00" and trailer != _gzip_trailer(out):
        raise _reject("dicom_deflate_error", "bytes after the end of the deflated data set")
    return out


def _gzip_trailer(inflated: bytes) -> bytes:
    """CRC-32 and ISIZE of ``inflated`` as a gzip trailer (RFC 1952): some writers append it
    to the raw deflate stream. It is accepted only if it matches the inflated bytes exactly."""
    return struct.pack("<LL", zlib.crc32(inflated), len(inflated) & 0xFFFFFFFF)


# ---- pass 2: pydicom decode ---------------------------------------------------------------
_CHARSET_WARNINGS: Final = (
    "Unknown encoding",
    "Incorrect value for Specific Character Set",
    "Failed to decode",
    "cannot be used as code extension",
    "does not allow code extensions",
)


def _iter_datasets(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _iter_datasets(item)


def _check_charsets(ds: Dataset) -> None:
    for item in _iter_datasets(ds):
        if "SpecificCharacterSet" not in item:
            continue
        value = item["SpecificCharacterSet"].value
        terms = [value] if isinstance(value, str) else list(value or [])
        for i, term in enumerate(terms):
            term = str(term).strip()
            if term == "" and i == 0:
                continue  # empty first value: default repertoire (PS3.3 C.12.1.1.2)
            if term not in pydicom.charset.python_encoding:
                raise _reject(
                    "dicom_bad_charset",
                    f"SpecificCharacterSet value {i + 1} is not a defined term",
                )
        if len(terms) > 1 and not all(
            t.strip() == "" or t.strip().startswith("ISO 2022") for t in map(str, terms)
        ):
            raise _reject(
                "dicom_bad_charset",
                "multi-valued SpecificCharacterSet with a term that allows no code extensions",
            )


_PYDICOM_DIR: Final = os.path.dirname(os.path.abspath(pydicom.__file__)) + os.sep
# warnings.catch_warnings swaps process-wide state (the filter list, showwarning): serialise
# our own uses of it so concurrent parses in a thread pool cannot restore each other's state.
_WARNINGS_LOCK: Final = threading.Lock()


@contextlib.contextmanager
def _pydicom_warnings() -> Iterator[list[str]]:
    """pydicom's UserWarnings become errors, except the tolerated ones, whose VRs are
    collected in the yielded list.

    The "error" filter is scoped to warnings attributed to pydicom's modules (the brief's
    ``simplefilter("error")``, narrowed so that an unrelated warning raised by another thread
    during the window is not turned into an exception). Tolerated, recorded: pydicom's
    per-value VR checks (module ``pydicom.valuerep``: a bad IS/DS string, a too-long value, a
    reference UID with a leading zero; the key attributes are validated separately) and, in
    implicit VR, a public tag missing from pydicom's dictionary (read as UN, kept as opaque
    bytes; its framing was checked by the walk).
    """
    vrs: list[str] = []
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("error", category=UserWarning, module=r"pydicom(\.|$)")
        warnings.filterwarnings("always", category=UserWarning, module=r"pydicom\.valuerep$")
        warnings.filterwarnings("always", category=UserWarning, message=r"VR lookup failed")
        yield vrs
        for w in caught:
            if not os.path.abspath(w.filename).startswith(_PYDICOM_DIR):
                continue  # recorded from elsewhere (another thread) while we held the hook
            text = str(w.message)
            vrs.append("UN" if text.startswith("VR lookup failed") else _vr_of(text))


def _decode_all(ds: FileDataset) -> None:
    """Convert every element (nested too) and decode every person name."""
    for elem in ds.file_meta:
        _touch(elem)
    _check_charsets(ds)
    for elem in ds.iterall():
        _touch(elem)


def _touch(elem: DataElement) -> None:
    value = elem.value
    if elem.VR == "PN":
        for name in value if isinstance(value, MultiValue) else [value]:
            if isinstance(name, PersonName):
                str(name)  # decodes with the data set's character set


def _read(data: bytes) -> tuple[FileDataset, list[str]]:
    try:
        with _pydicom_warnings() as vrs:
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
            _decode_all(ds)
    except NotDicom:
        raise
    except Warning as w:
        text = str(w)
        if any(marker in text for marker in _CHARSET_WARNINGS):
            raise _reject(
                "dicom_bad_charset", "a text value cannot be decoded in the declared character set"
            ) from None
        raise _reject(
            "dicom_parse_warning",
            f"pydicom reported a defect while decoding ({type(w).__name__})",
        ) from None
    except (LookupError, UnicodeError):
        raise _reject(
            "dicom_bad_charset", "a text value cannot be decoded in the declared character set"
        ) from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise _reject(
            "dicom_unparseable", f"pydicom cannot decode the data set ({type(exc).__name__})"
        ) from None
    if ds.preamble is None or not ds.file_meta:  # never from a forced read
        raise _reject("dicom_not_part10", "not a DICOM PS3.10 file")
    return ds, vrs


# ---- semantic checks ----------------------------------------------------------------------
def _text(ds: Dataset, keyword: str) -> str:
    if keyword not in ds:
        return ""
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value)


def _required_uid(ds: Dataset, keyword: str) -> str:
    if keyword not in ds or ds[keyword].value in (None, ""):
        raise _reject("dicom_missing_uid", f"{keyword} is missing or empty")
    value = ds[keyword].value
    if not isinstance(value, str) or not _is_valid_uid(value):
        raise _reject("dicom_invalid_uid", f"{keyword} is not a valid UID (PS3.5 9.1)")
    return value


def _opt_int(ds: Dataset, keyword: str) -> int | None:
    """An integer attribute if present and valid, else None (tolerated value defect)."""
    if keyword not in ds:
        return None
    value = ds[keyword].value
    if value is None or value == "" or isinstance(value, MultiValue | list):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _pixel_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    if keyword not in ds or ds[keyword].value in (None, ""):
        if default is not None:
            return default
        raise _reject("dicom_pixel_attrs", f"Pixel Data present but {keyword} missing")
    value = ds[keyword].value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _reject("dicom_pixel_attrs", f"{keyword} is not a valid integer") from None
    if number < 1:
        raise _reject("dicom_pixel_attrs", f"{keyword} must be at least 1")
    return number


_NATIVE_PIXEL_TAGS: Final = (
    ("PixelData", None),
    ("FloatPixelData", 32),
    ("DoubleFloatPixelData", 64),
)


_JPIP_REFERENCED: Final = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95"})


def _check_pixels(ds: FileDataset, ts: pydicom.uid.UID, sop_class: str, pixel: _PixelInfo | None) -> None:
    present = [(kw, bits) for kw, bits in _NATIVE_PIXEL_TAGS if kw in ds]
    if not present:
        # Image IODs have Pixel Data as Type 1; its absence is also what a file cut at an
        # element boundary before the pixels looks like.
        if "Image Storage" in pydicom.uid.UID(sop_class).name and ts not in _JPIP_REFERENCED:
            raise _reject("dicom_missing_pixel_data", "image SOP class without Pixel Data")
        return
    rows = _pixel_int(ds, "Rows")
    columns = _pixel_int(ds, "Columns")
    samples = _pixel_int(ds, "SamplesPerPixel")
    frames = _pixel_int(ds, "NumberOfFrames", default=1)
    if ts.is_encapsulated:
        if pixel is None or not pixel.undefined_length:
            raise _reject(
                "dicom_pixel_encoding",
                "encapsulated transfer syntax but Pixel Data is not encapsulated",
            )
        if pixel.fragments < 1:
            raise _reject("dicom_pixel_encoding", "encapsulated Pixel Data has no fragments")
        if ts not in pydicom.uid.MPEGTransferSyntaxes and pixel.fragments < frames:
            raise _reject(
                "dicom_pixel_encoding",
                f"encapsulated Pixel Data has {pixel.fragments} fragments for {frames} frames",
            )
        return
    if pixel is not None and pixel.undefined_length:
        raise _reject("dicom_pixel_encoding", "native transfer syntax but Pixel Data is encapsulated")
    photometric = _text(ds, "PhotometricInterpretation").strip()
    if not photometric:
        raise _reject("dicom_pixel_attrs", "Pixel Data present but PhotometricInterpretation missing")
    for keyword, fixed_bits in present:
        bits = fixed_bits or _pixel_int(ds, "BitsAllocated")
        if bits != 1 and bits % 8:
            raise _reject("dicom_pixel_attrs", f"BitsAllocated {bits} is neither 1 nor whole bytes")
        samples_per_pixel = samples
        if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
            samples_per_pixel = 2  # PS3.3 C.7.6.3.1.2: chroma subsampled horizontally
        total_bits = rows * columns * samples_per_pixel * frames * bits
        expected = (total_bits + 7) // 8
        actual = len(ds[keyword].value)
        if actual != expected and not (expected % 2 == 1 and actual == expected + 1):
            raise _reject(
                "dicom_pixel_length",
                f"{keyword} has {actual} bytes, Rows x Columns x Samples x Bits x Frames needs {expected}",
            )


def _qido(ds: Dataset) -> dict[str, str]:
    out: dict[str, str] = {}
    for keyword in QIDO_KEYWORDS:
        if keyword in ds:
            out[keyword] = _text(ds, keyword)
    for seq_kw, keyword in _QIDO_NESTED:
        if seq_kw in ds and ds[seq_kw].VR == "SQ":
            values = [_text(item, keyword) for item in ds[seq_kw].value if keyword in item]
            if values:
                out[f"{seq_kw}.{keyword}"] = "\\".join(values)
    return out


# ---- entry point --------------------------------------------------------------------------
def parse_instance(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_inflated_size: int = DEFAULT_MAX_INFLATED_SIZE,
) -> DicomInstance:
    """Validate ``data`` as one DICOM PS3.10 object and return its facts.

    Raises :class:`~ledger.errors.PayloadTooLarge` past ``max_size`` (or ``max_inflated_size``
    for the inflated data set of a deflated object) and :class:`~ledger.errors.NotDicom`
    (``code`` in :data:`REASON_CODES`) for anything else that is not a valid object; see the
    module docstring for the table of defects.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("data must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise PayloadTooLarge(f"DICOM object exceeds {max_size} bytes")
    if not data:
        raise _reject("dicom_empty", "empty object")
    if len(data) < 132 or data[128:132] != b"DICM":
        raise _reject("dicom_not_part10", "not a DICOM PS3.10 file (no 128-byte preamble and DICM prefix)")

    meta = _walk_meta(data)
    for tag, keyword in (
        (0x00020010, "TransferSyntaxUID"),
        (0x00020002, "MediaStorageSOPClassUID"),
        (0x00020003, "MediaStorageSOPInstanceUID"),
    ):
        raw = meta.elements.get(tag)
        if raw is None or not _ui(raw):
            raise _reject("dicom_meta_incomplete", f"file meta lacks {keyword}")
        if not _is_valid_uid(_ui(raw)):
            raise _reject("dicom_invalid_uid", f"{keyword} is not a valid UID (PS3.5 9.1)")
    ts = pydicom.uid.UID(_ui(meta.elements[0x00020010]))
    if not ts.is_transfer_syntax or ts.is_private:
        raise _reject("dicom_unknown_transfer_syntax", "transfer syntax is not a known DICOM one")

    if ts.is_deflated:
        body = _inflate(data[meta.end :], max_inflated_size)
        walker = _Walker(body, implicit=False, little=True)
        walker.walk_top(0)
    else:
        walker = _Walker(data, implicit=ts.is_implicit_VR, little=ts.is_little_endian)
        walker.walk_top(meta.end)

    ds, value_vrs = _read(data)

    sop_class = _required_uid(ds, "SOPClassUID")
    sop_instance = _required_uid(ds, "SOPInstanceUID")
    study = _required_uid(ds, "StudyInstanceUID")
    series = _required_uid(ds, "SeriesInstanceUID")
    if _ui(meta.elements[0x00020003]) != sop_instance:
        raise _reject("dicom_meta_mismatch", "MediaStorageSOPInstanceUID differs from SOPInstanceUID")
    if _ui(meta.elements[0x00020002]) != sop_class:
        raise _reject("dicom_meta_mismatch", "MediaStorageSOPClassUID differs from SOPClassUID")

    patient_id = _text(ds, "PatientID").strip()
    if not patient_id:
        raise _reject("dicom_missing_patient_id", "PatientID is missing or empty")

    _check_pixels(ds, ts, sop_class, walker.pixel)

    return DicomInstance(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=str(ts),
        patient_id=patient_id,
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID").strip(),
        patient_name=_text(ds, "PatientName"),  # str(PersonName), decoded per the charset
        modality=_text(ds, "Modality").strip(),
        study_date=_text(ds, "StudyDate").strip(),
        study_description=_text(ds, "StudyDescription").strip(),
        series_number=_opt_int(ds, "SeriesNumber"),
        instance_number=_opt_int(ds, "InstanceNumber"),
        rows=_opt_int(ds, "Rows"),
        columns=_opt_int(ds, "Columns"),
        number_of_frames=_opt_int(ds, "NumberOfFrames"),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        qido=_qido(ds),
        value_warnings=tuple(value_vrs),
    )
