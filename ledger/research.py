"""The research share: de-identified copies for purpose HRESCH (PS3.15 Annex E).

A read or a query with purpose HRESCH never returns an original. Each instance is
de-identified with the Basic Application Level Confidentiality Profile plus the Retain
Longitudinal Temporal Information with Modified Dates option (:mod:`ledger.deid`, the whole
of Table E.1-1), with a :class:`ResearchContext` per (reader, study):

- UIDs are remapped consistently within the study, deterministically: the new UID is
  ``2.25.<128 bits of HMAC-SHA256(k_study, old UID)>`` with ``k_study`` derived from the
  gateway's pseudonym key, the reader and the study. So the copy a reader gets today and the
  one it gets tomorrow (and the QIDO results) agree, another reader gets other UIDs, and
  nothing in the copy is computable back to the source without the gateway's key;
- dates are shifted by a per-(reader, patient) number of days (1 to 10 years back), so the
  intervals between a patient's studies are kept;
- Patient's Name and Patient ID become a per-(reader, patient) pseudonym, so a reader can tell
  that two studies are of one patient but not who the patient is.

The copy is linked to its source only by the DEIDENTIFY audit event (its ``object_ref`` is the
source's), never by anything inside the copy.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Mapping
from dataclasses import dataclass

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from ledger.deid import DeidContext, DeidOption, deidentify

RESEARCH_PURPOSE = "HRESCH"
RESEARCH_OPTIONS = DeidOption.RETAIN_LONG_MODIFIED_DATES

_INT_VRS = frozenset({"US", "UL", "SS", "SL"})


def _mac(key: bytes, *parts: str) -> bytes:
    return hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).digest()


@dataclass
class ResearchContext(DeidContext):
    """A DeidContext whose UID map is a keyed function (stable across requests)."""

    uid_key: bytes = b""

    def map_uid(self, uid: str) -> str:
        uid = str(uid).strip("\x00 ")
        if not uid:
            return uid
        new = self.uid_map.get(uid)
        if new is None:
            new = "2.25." + str(
                int.from_bytes(hmac.new(self.uid_key, uid.encode(), hashlib.sha256).digest()[:16])
            )
            self.uid_map[uid] = new
            self.uid_map[new] = new
        return new


def research_base_key(pseudonym_key: bytes) -> bytes:
    return _mac(pseudonym_key, "medledger/research/v1")


def research_context(base_key: bytes, reader: str, study_uid: str, patient_ref: str) -> ResearchContext:
    """The de-identification context of one study for one reader."""
    reader_key = _mac(base_key, "reader", reader)
    return ResearchContext(
        patient_key=patient_ref,
        secret=reader_key,
        patient_pseudonym="RS" + _mac(reader_key, "patient", patient_ref).hex()[:14].upper(),
        uid_key=_mac(reader_key, "study", study_uid),
    )


def mapped_uid(ctx: ResearchContext, uid: str) -> str:
    return ctx.map_uid(uid)


def deidentify_bytes(data: bytes, ctx: ResearchContext) -> bytes:
    """A de-identified PS3.10 copy of ``data``, in the source's transfer syntax."""
    ds = pydicom.dcmread(io.BytesIO(data))
    out = deidentify(ds, RESEARCH_OPTIONS, ctx)
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dataset_from_attrs(attrs: Mapping[str, str]) -> Dataset:
    ds = Dataset()
    seqs: dict[str, dict[str, list[str]]] = {}
    for key, text in attrs.items():
        if "." in key:
            seq_kw, leaf = key.split(".", 1)
            seqs.setdefault(seq_kw, {})[leaf] = text.split("\\")
            continue
        tag = tag_for_keyword(key)
        if tag is None:
            continue
        vr = str(dictionary_VR(tag)).split(" or ")[0]
        values: list[str] = text.split("\\") if text != "" else []
        value: object
        if vr in _INT_VRS:
            try:
                ints = [int(v) for v in values]
            except ValueError:
                continue
            value = ints[0] if len(ints) == 1 else (ints or None)
        else:
            value = values[0] if len(values) == 1 else (values or "")
        ds.add_new(tag, vr, value)
    for seq_kw, leaves in seqs.items():
        n = max(len(v) for v in leaves.values())
        items = []
        for i in range(n):
            item = Dataset()
            for leaf, vals in leaves.items():
                tag = tag_for_keyword(leaf)
                if tag is not None and i < len(vals):
                    item.add_new(tag, str(dictionary_VR(tag)), vals[i])
            items.append(item)
        seq_tag = tag_for_keyword(seq_kw)
        if seq_tag is not None:
            ds.add_new(seq_tag, "SQ", Sequence(items))
    return ds


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def deidentify_attrs(attrs: Mapping[str, str], ctx: ResearchContext) -> dict[str, str]:
    """The QIDO attributes of an instance as its de-identified copy would have them."""
    out = deidentify(_dataset_from_attrs(attrs), RESEARCH_OPTIONS, ctx)
    result: dict[str, str] = {}
    for elem in out:
        if elem.VR == "SQ":
            for item in elem.value:
                for sub in item:
                    key = f"{elem.keyword}.{sub.keyword}"
                    prev = result.get(key)
                    result[key] = _text(sub.value) if prev is None else prev + "\\" + _text(sub.value)
            continue
        if elem.keyword:
            result[elem.keyword] = _text(elem.value)
    return result
