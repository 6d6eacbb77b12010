"""WADO-RS (PS3.18 section 10.4) representation logic: Accept negotiation, transcoding, metadata.

Accept negotiation (PS3.18 8.7.3, RFC 9110 12.5.1). Each media range of the Accept header
(with its ``q``, default 1; ``q=0`` means "not acceptable") names a representation:

=================================================  ============================================
media range                                        transfer syntax it accepts
=================================================  ============================================
``multipart/related; type="application/dicom"``    its ``transfer-syntax`` parameter; absent:
(also without ``type``)                            Explicit VR Little Endian, the default of
                                                   application/dicom (Table 8.7.3-2); ``*``:
                                                   any, so the stored one
``application/dicom`` (single part, one instance   as above
only)
``*/*``, ``multipart/*``, ``application/*``        any (no preference), so the stored one
=================================================  ============================================

For each instance the most preferred (highest ``q``; at equal ``q`` the range that needs no
conversion, then the earlier one) range whose syntax can be produced is used: the stored
syntax is always producible; a conversion is possible between the uncompressed little endian
syntaxes (Implicit VR LE, Explicit VR LE, Deflated Explicit VR LE), done with pydicom; nothing
is ever decompressed or compressed. When no range can be served for some instance the request
is refused with 406 (:class:`~ledger.errors.NotAcceptable`). The response is
``multipart/related; type="application/dicom"`` with each part's Content-Type naming its
``transfer-syntax``; a bare application/dicom body only when that range was chosen for a
single instance.

Metadata (PS3.18 10.4.1.1.2, Annex F): the DICOM JSON of each instance's data set (pydicom's
``Dataset.to_json_dict``, without the file meta group), with top-level binary values longer
than :data:`BULK_THRESHOLD` bytes (base64) replaced by a ``BulkDataURI`` to this service's
bulkdata resource; binary values nested in sequences and longer than that are left out.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from ledger.errors import NotAcceptable

__all__ = [
    "BULK_THRESHOLD",
    "DEFAULT_TS",
    "UNCOMPRESSED_LE",
    "MediaRange",
    "Plan",
    "metadata_json",
    "negotiate",
    "negotiate_json",
    "parse_accept",
    "transcode",
]

IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
DEFAULT_TS: Final = EXPLICIT_LE
UNCOMPRESSED_LE: Final = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE})
BULK_THRESHOLD: Final = 1024
ANY: Final = "*"


@dataclass(frozen=True)
class MediaRange:
    mime: str  # lower-case type/subtype
    params: dict[str, str]
    q: float
    order: int


_TOKEN_SPLIT: Final = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_PARAM: Final = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*')


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, in the order given (absent header: ``*/*``)."""
    if header is None or not header.strip():
        return [MediaRange("*/*", {}, 1.0, 0)]
    out: list[MediaRange] = []
    for order, m in enumerate(_TOKEN_SPLIT.finditer(header)):
        item = m.group(0).strip()
        if not item:
            continue
        pieces = _split_params(item)
        mime = pieces[0].strip().lower()
        if "/" not in mime:
            raise NotAcceptable("the Accept header has a malformed media range")
        params: dict[str, str] = {}
        q = 1.0
        for p in pieces[1:]:
            pm = _PARAM.fullmatch(p)
            if pm is None:
                raise NotAcceptable("the Accept header has a malformed parameter")
            name, value = pm.group(1).lower(), pm.group(2).strip()
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    raise NotAcceptable("the Accept header has a malformed q value") from None
                if not 0.0 <= q <= 1.0:
                    raise NotAcceptable("the Accept header has a q value outside 0..1")
            else:
                params[name] = value
        out.append(MediaRange(mime, params, q, order))
    return out


def _split_params(item: str) -> list[str]:
    parts, cur, quoted, esc = [], "", False, False
    for ch in item:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\" and quoted:
            cur += ch
            esc = True
        elif ch == '"':
            cur += ch
            quoted = not quoted
        elif ch == ";" and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


@dataclass(frozen=True)
class Plan:
    multipart: bool
    targets: list[str]  # per instance, the transfer syntax to send


def _range_ts(r: MediaRange) -> str | None:
    """The syntax a DICOM media range asks for (ANY for no preference); None if not DICOM."""
    if r.mime in ("*/*", "multipart/*", "application/*"):
        return ANY
    if r.mime == "multipart/related":
        inner = r.params.get("type", "application/dicom").lower()
        if inner in ("application/*", "*/*"):
            return r.params.get("transfer-syntax", ANY)
        if inner != "application/dicom":
            return None
        return r.params.get("transfer-syntax", DEFAULT_TS)
    if r.mime == "application/dicom":
        return r.params.get("transfer-syntax", DEFAULT_TS)
    return None


def _producible(target: str, stored: str) -> bool:
    return target in (ANY, stored) or (target in UNCOMPRESSED_LE and stored in UNCOMPRESSED_LE)


def negotiate(accept: str | None, stored: Sequence[str], *, single_allowed: bool) -> Plan:
    """Choose, per instance, the transfer syntax to send (see the module docstring)."""
    ranges = [r for r in parse_accept(accept) if r.q > 0]
    usable = [(r, ts) for r in ranges if (ts := _range_ts(r)) is not None]
    if not single_allowed or len(stored) != 1:
        usable = [(r, ts) for r, ts in usable if r.mime != "application/dicom"]
    targets: list[str] = []
    chosen_single = False
    for st in stored:
        options = [(r, ts) for r, ts in usable if _producible(ts, st)]
        if not options:
            raise NotAcceptable(
                f"no acceptable representation: the stored transfer syntax {st} cannot be sent as any "
                'acceptable one (ask for multipart/related; type="application/dicom"; transfer-syntax=*)'
            )
        r, ts = min(options, key=lambda o: (-o[0].q, o[1] not in (ANY, st), o[0].order))
        targets.append(st if ts == ANY else ts)
        chosen_single = r.mime == "application/dicom"
    return Plan(multipart=not (chosen_single and len(stored) == 1), targets=targets)


def negotiate_json(accept: str | None) -> str:
    """The media type for DICOM JSON results (QIDO-RS, metadata); 406 if none is acceptable."""
    for r in sorted(parse_accept(accept), key=lambda r: (-r.q, r.order)):
        if r.q <= 0:
            continue
        if r.mime in ("application/dicom+json", "application/*", "*/*"):
            return "application/dicom+json"
        if r.mime == "application/json":
            return "application/json"
    raise NotAcceptable("acceptable here: application/dicom+json or application/json")


def transcode(data: bytes, stored: str, target: str) -> bytes:
    """Re-encode a PS3.10 object in ``target`` (between uncompressed LE syntaxes only)."""
    if target == stored:
        return data
    if not _producible(target, stored):
        raise NotAcceptable(f"cannot convert {stored} to {target}")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(target)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def metadata_json(ds: Dataset, instance_url: str) -> dict[str, Any]:
    """The DICOM JSON of ``ds`` with bulk data as BulkDataURI (top level) or left out (nested)."""
    top: set[int] = set()
    for tag in list(ds.keys()):
        top.add(id(ds[tag]))  # converts raw elements once, so identities are stable

    def handler(elem: DataElement) -> str:
        if id(elem) in top:
            return f"{instance_url}/bulkdata/{int(elem.tag):08X}"
        return ""

    out = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=handler)
    return _drop_empty_bulk(out)


def _drop_empty_bulk(obj: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for tag, elem in obj.items():
        if elem.get("BulkDataURI") == "":
            continue
        if elem.get("vr") == "SQ" and "Value" in elem:
            elem = {**elem, "Value": [_drop_empty_bulk(item) for item in elem["Value"]]}
        result[tag] = elem
    return result


# ---- bulk data --------------------------------------------------------------------------
_FRAME_TYPES: Final = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def bulk_parts(data: bytes, tag: int) -> list[tuple[str, bytes]] | None:
    """The parts (Content-Type, bytes) of one top-level bulk data element; None if absent.

    Native values are one ``application/octet-stream`` part (little endian, as stored);
    encapsulated Pixel Data is one part per frame in its compressed media type.
    """
    ds = pydicom.dcmread(io.BytesIO(data))
    if tag not in ds:
        return None
    elem = ds[tag]
    if elem.VR not in ("OB", "OD", "OF", "OL", "OV", "OW", "UN") or not isinstance(elem.value, bytes):
        return None
    ts = str(ds.file_meta.TransferSyntaxUID)
    if tag == 0x7FE00010 and pydicom.uid.UID(ts).is_encapsulated:
        from pydicom.encaps import generate_frames

        frames = int(ds.get("NumberOfFrames", 1) or 1)
        mime = _FRAME_TYPES.get(ts, "application/octet-stream")
        return [
            (f"{mime}; transfer-syntax={ts}", bytes(f))
            for f in generate_frames(elem.value, number_of_frames=frames)
        ]
    if tag == 0x7FE00010:
        return [(f"application/octet-stream; transfer-syntax={EXPLICIT_LE}", bytes(elem.value))]
    return [("application/octet-stream", bytes(elem.value))]
