"""De-identify DICOM files (PS3.10) and directory trees."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .engine import DeidContext, DeidError, deidentify
from .profile import CompoundPolicy, DeidOption


def _ensure_meta(ds: Dataset) -> FileMetaDataset:
    meta = getattr(ds, "file_meta", None)
    if not isinstance(meta, FileMetaDataset):
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "FileMetaInformationVersion" not in meta:
        meta.FileMetaInformationVersion = b"\x00\x01"
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return meta


def write_file(ds: Dataset, dst: Path) -> None:
    """Write ``ds`` as a PS3.10 file (preamble, DICM, consistent group 2) to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = _ensure_meta(ds)
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength  # recomputed by pydicom
    if not meta.get("MediaStorageSOPInstanceUID"):
        meta.MediaStorageSOPInstanceUID = generate_uid(prefix=None)
    if not isinstance(ds, FileDataset):
        ds = FileDataset(str(dst), ds, file_meta=meta, preamble=b"\x00" * 128)
    else:
        ds.preamble = b"\x00" * 128
    # A source without SOP Class UID cannot give a conformant (0002,0002); such a file
    # is still written with preamble, DICM prefix and group 2, but without enforcement.
    ds.save_as(dst, enforce_file_format=bool(meta.get("MediaStorageSOPClassUID")))


def deidentify_file(
    src: Path,
    dst: Path,
    options: DeidOption = DeidOption.NONE,
    context: DeidContext | None = None,
) -> Dataset:
    """Read ``src`` (a DICOM file), de-identify it and write it to ``dst``; returns the output dataset."""
    ds = pydicom.dcmread(src)
    out = deidentify(ds, options, context if context is not None else DeidContext())
    write_file(out, Path(dst))
    return out


@dataclass
class TreeReport:
    """What ``deidentify_tree`` did.  Holds no source identifiers or source UIDs."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    studies: int = 0
    patients: int = 0


def deidentify_tree(
    src_dir: Path,
    dst_dir: Path,
    options: DeidOption = DeidOption.NONE,
    *,
    secret: bytes | None = None,
    pseudonymize_patients: bool = False,
    compound_policy: CompoundPolicy = CompoundPolicy.REMOVE,
    validate: Callable[[Path], str | None] | None = None,
) -> TreeReport:
    """De-identify every DICOM file under ``src_dir`` into ``dst_dir``.

    One :class:`DeidContext` per study (Study Instance UID), so UIDs are remapped
    consistently within a study; all studies of one patient (Patient ID) get the
    same date shift.  Outputs are named ``<study>/<series>/<instance>.dcm`` after
    the *new* UIDs, so no source path or name leaks.  With ``pseudonymize_patients``
    each patient gets ``PATIENT-0001``-style Patient's Name / Patient ID.
    Non-DICOM files, DICOMDIRs and files that cannot be de-identified are skipped, as are
    files for which ``validate`` (if given) returns a reason (e.g. the gateway's strict ingest
    check, so a truncated or malformed file is never "de-identified" into a plausible one).
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    tree_secret = secret if secret is not None else secrets.token_bytes(32)
    report = TreeReport()
    headers: list[tuple[Path, str, str]] = []
    for path in sorted(p for p in src_dir.rglob("*") if p.is_file()):
        reason = validate(path) if validate is not None else None
        if reason is not None:
            report.skipped.append((path, reason))
            continue
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            report.skipped.append((path, f"not readable as DICOM: {type(exc).__name__}"))
            continue
        if "DirectoryRecordSequence" in head:
            report.skipped.append((path, "DICOMDIR"))
            continue
        headers.append((path, str(head.get("StudyInstanceUID", "")), str(head.get("PatientID", ""))))

    contexts: dict[str, DeidContext] = {}
    pseudonyms: dict[str, str] = {}
    for path, study_uid, patient_id in headers:
        context = contexts.get(study_uid)
        if context is None:
            if pseudonymize_patients and patient_id not in pseudonyms:
                pseudonyms[patient_id] = f"PATIENT-{len(pseudonyms) + 1:04d}"
            context = DeidContext(
                patient_key=patient_id,
                secret=tree_secret,
                patient_pseudonym=pseudonyms.get(patient_id),
                compound_policy=compound_policy,
            )
            contexts[study_uid] = context
        try:
            ds = pydicom.dcmread(path)
            out = deidentify(ds, options, context)
        except (DeidError, InvalidDicomError, OSError, ValueError, EOFError) as exc:
            report.skipped.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        parts = [str(out.get(k, "") or "unknown") for k in ("StudyInstanceUID", "SeriesInstanceUID")]
        name = str(out.get("SOPInstanceUID", "") or context.map_uid(str(path)))
        dst = dst_dir.joinpath(*parts, f"{name}.dcm")
        write_file(out, dst)
        report.written.append(dst)
    report.studies = len(contexts)
    report.patients = len({pid for _, _, pid in headers})
    return report
