"""Audit log exports: the verifiable JSON-lines export (with inclusion and consistency proofs),
FHIR R4 AuditEvent (IHE BALP), DICOM PS3.15 A.5 audit messages and CSV. See docs/audit.md."""

FORMATS = ("jsonl", "fhir", "dicom-xml", "csv")
