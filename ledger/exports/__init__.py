"""Audit log exports: the verifiable JSON-lines export (with inclusion and consistency proofs),
FHIR R4 AuditEvent (IHE BALP) as NDJSON, DICOM PS3.15 A.5 audit messages (XML) and CSV.
See docs/audit.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ledger.errors import InvalidInput

if TYPE_CHECKING:
    from ledger.anchorer import ChainAnchor
    from ledger.audit_log import AuditLog

FORMATS = ("jsonl", "fhir", "dicom-xml", "csv")
MEDIA_TYPES = {
    "jsonl": "application/x-ndjson",
    "fhir": "application/fhir+ndjson",
    "dicom-xml": "application/xml",
    "csv": "text/csv",
}


def render(
    fmt: str,
    audit: AuditLog,
    anchors: Sequence[ChainAnchor],
    *,
    chain_id: int,
    contracts: dict[str, str],
    gateway_id: str,
    include_unanchored: bool = False,
) -> bytes:
    """The whole export in format ``fmt`` (one of :data:`FORMATS`) as bytes.

    ``jsonl`` holds the anchored prefix of the log with its proofs (all events with
    ``include_unanchored``); the reporting formats hold every event.
    """
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        from ledger.exports.jsonl import dumps_line, export_lines

        lines = export_lines(
            audit,
            anchors,
            chain_id=chain_id,
            access_ledger=contracts["AccessLedger"],
            consent=contracts["Consent"],
            include_unanchored=include_unanchored,
        )
        return "".join(dumps_line(line) for line in lines).encode("utf-8")
    events = audit.iter_all()
    if fmt == "fhir":
        from ledger.exports.fhir import export_ndjson

        return "".join(export_ndjson(events, gateway_id=gateway_id)).encode("utf-8")
    if fmt == "dicom-xml":
        from ledger.exports.dicom_audit import export_xml

        return export_xml(events, gateway_id=gateway_id)
    from ledger.exports.csv import export_csv

    return export_csv(events).encode("utf-8")
