"""Audit exports: FHIR R4 AuditEvent (validated with fhir.resources), DICOM audit XML, CSV, and
the verifiable JSON-lines export (proofs checked by ledger.verify.check_export, no chain)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from ledger import merkle
from ledger.anchorer import ChainAnchor
from ledger.audit_log import AuditLog
from ledger.errors import InvalidInput
from ledger.events import Action, AuditEvent, EventDraft, Outcome, leaf_hash
from ledger.exports import render
from ledger.exports.csv import export_csv, read_csv
from ledger.exports.dicom_audit import export_xml, to_message
from ledger.exports.fhir import to_audit_event
from ledger.exports.jsonl import TreeLevels, export_lines
from ledger.verify import check_export

P = "0x" + "11" * 32
S = "0x" + "aa" * 32
OBJ = "0x" + "bb" * 32
A = "0x" + "ab" * 32
B = "0x" + "cd" * 32
GW = "0x" + "ef" * 32
CONTRACTS = {"AccessLedger": "0x" + "01" * 20, "Consent": "0x" + "02" * 20, "Membership": "0x" + "03" * 20}


def every_kind() -> list[AuditEvent]:
    """One event per action and outcome, with every optional field exercised somewhere."""
    out = []
    seq = 0
    for action in Action:
        for outcome in Outcome:
            extra: dict[str, object] = {}
            if action == Action.VIEW and outcome == Outcome.OK:
                extra = {"consent_id": "3", "consent_version": 1}
            out.append(
                AuditEvent(
                    seq=seq,
                    time_ms=1_767_000_000_000 + seq,
                    action=str(action),
                    outcome=str(outcome),
                    actor=A if action != Action.HISTORY else P,
                    actor_key="0x" + "12" * 20,
                    actor_role="patient" if action == Action.HISTORY else "hospital",
                    reason="" if outcome == Outcome.OK else "no_consent",
                    purpose="TREAT" if action in (Action.VIEW, Action.SHARE) else "",
                    patient_ref=P if action != Action.GOVERNANCE else "",
                    study_ref=S if action in (Action.VIEW, Action.UPLOAD, Action.SHARE) else "",
                    object_ref=OBJ if action in (Action.VIEW, Action.UPLOAD) else "",
                    request_id=f"req-{seq}",
                    counterparty=B if action in (Action.SHARE, Action.CONSENT_GRANT) else "",
                    **extra,  # type: ignore[arg-type]
                )
            )
            seq += 1
    out.append(
        AuditEvent(
            seq=seq,
            time_ms=1_767_000_000_000 + seq,
            action="VIEW",
            outcome="ok",
            actor=B,
            actor_role="hospital",
            purpose="ETREAT",
            patient_ref=P,
            study_ref=S,
            object_ref=OBJ,
            break_glass=True,
            justification_commitment="0x" + "99" * 32,
        )
    )
    return out


# ---- FHIR ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ev", every_kind(), ids=lambda e: f"{e.action}-{e.outcome}-{e.seq}")
def test_fhir_audit_event_validates_for_every_event_type(ev: AuditEvent) -> None:
    resource = to_audit_event(ev, gateway_id=GW)
    model = FhirAuditEvent.model_validate(resource)  # raises on any structural error
    again = json.loads(model.model_dump_json())
    assert again["resourceType"] == "AuditEvent"
    assert again["outcome"] == {"ok": "0", "denied": "4", "rejected": "4", "failed": "8"}[ev.outcome]
    assert any(a["requestor"] for a in again["agent"])
    idents = {e["what"]["identifier"]["system"]: e["what"]["identifier"]["value"] for e in again["entity"]}
    assert idents["urn:medledger:audit-seq"] == str(ev.seq)
    if ev.patient_ref:
        assert idents["urn:medledger:patient-ref"] == ev.patient_ref
    if ev.action == "VIEW":
        assert again["meta"]["profile"] == [
            "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
        ]
        assert again["action"] == "R"
    if ev.break_glass:
        assert any(c["code"] == "110127" for c in again["subtype"])
    leaf = next(e for e in again["entity"] if e["what"]["identifier"]["system"] == "urn:medledger:audit-seq")
    assert {"type": "leaf", "valueString": "0x" + leaf_hash(ev).hex()} in leaf["detail"]


def test_fhir_model_rejects_a_broken_resource() -> None:
    """The validation above is real: a resource without its required agent fails."""
    resource = to_audit_event(every_kind()[0], gateway_id=GW)
    del resource["agent"]
    with pytest.raises(ValueError):
        FhirAuditEvent.model_validate(resource)


# ---- DICOM -----------------------------------------------------------------------------------
def _code(el: ET.Element | None) -> str:
    assert el is not None
    assert el.get("codeSystemName") and el.get("originalText")
    return str(el.get("csd-code"))


@pytest.mark.parametrize("ev", every_kind(), ids=lambda e: f"{e.action}-{e.outcome}-{e.seq}")
def test_dicom_audit_message_has_the_required_elements(ev: AuditEvent) -> None:
    msg = ET.fromstring(ET.tostring(to_message(ev, gateway_id=GW)))
    assert msg.tag == "AuditMessage"
    order = [child.tag for child in msg]
    assert order[0] == "EventIdentification" and order[1] == "ActiveParticipant"
    src = order.index("AuditSourceIdentification")
    assert all(t == "ActiveParticipant" for t in order[1:src])
    assert all(t == "ParticipantObjectIdentification" for t in order[src + 1 :])
    ident = msg.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") in {"C", "R", "U", "D", "E"}
    assert ident.get("EventDateTime", "").endswith("Z")
    expected_outcome = {"ok": "0", "denied": "4", "rejected": "4", "failed": "8"}[ev.outcome]
    assert ident.get("EventOutcomeIndicator") == expected_outcome
    event_id = _code(ident.find("EventID"))
    if ev.outcome == "denied":
        assert event_id == "110113"  # Security Alert for refusals
    elif ev.action == "VIEW":
        assert event_id == "110103"  # DICOM Instances Accessed
    elif ev.action == "SHARE":
        assert event_id == "110102"  # Begin Transferring DICOM Instances
    participants = msg.findall("ActiveParticipant")
    assert [p.get("UserIsRequestor") for p in participants].count("true") == 1
    for p in participants:
        assert p.get("UserID")
        _code(p.find("RoleIDCode"))
    source = msg.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == GW
    objects = msg.findall("ParticipantObjectIdentification")
    for o in objects:
        assert o.get("ParticipantObjectID") and o.get("ParticipantObjectTypeCode")
        _code(o.find("ParticipantObjectIDTypeCode"))
    ids = {o.get("ParticipantObjectID") for o in objects}
    if ev.patient_ref:
        patient = next(o for o in objects if o.get("ParticipantObjectTypeCodeRole") == "1")
        assert patient.get("ParticipantObjectID") == ev.patient_ref  # the pseudonymous ref only
        assert patient.find("ParticipantObjectName") is None
    assert str(ev.seq) in ids
    if ev.purpose:
        assert _code(ident.find("PurposeOfUse")) == ev.purpose


def test_dicom_export_is_one_document_of_messages() -> None:
    events = every_kind()
    root = ET.fromstring(export_xml(events, gateway_id=GW))
    assert root.tag == "AuditMessages" and len(root.findall("AuditMessage")) == len(events)


# ---- CSV -------------------------------------------------------------------------------------
def test_csv_round_trips_exactly() -> None:
    events = every_kind()
    events.append(
        AuditEvent(seq=len(events), time_ms=1, action="QUERY", outcome="ok", reason='a "quoted", \n line')
    )
    text = export_csv(events)
    assert read_csv(text) == events
    tampered = text.replace(",TREAT,", ",HRESCH,", 1)
    with pytest.raises(InvalidInput):
        read_csv(tampered)  # the row's leaf no longer matches


# ---- the verifiable export, without a chain --------------------------------------------------
@pytest.mark.parametrize("n", [*range(1, 34), 64, 100, 257])
def test_tree_levels_paths_equal_rfc9162_paths(n: int) -> None:
    leaves = [merkle.hash_leaf(str(i).encode()) for i in range(n)]
    tree = TreeLevels(leaves)
    assert tree.root() == merkle.root(leaves)
    for i in range(n):
        assert tree.path(i) == merkle.inclusion_proof(leaves, i)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[AuditLog]:
    with AuditLog(tmp_path / "audit.sqlite") as lg:
        yield lg


def _anchors(log: AuditLog, sizes: list[int]) -> list[ChainAnchor]:
    out, prev = [], 0
    for i, size in enumerate(sizes):
        out.append(ChainAnchor(i, prev, size, log.root(size), 0, i + 1, False))
        prev = size
    return out


def _export(log: AuditLog, anchors: list[ChainAnchor]) -> tuple[dict, list[dict]]:
    lines = list(export_lines(log, anchors, chain_id=1, access_ledger="0x1", consent="0x2"))
    return lines[0], lines[1:]


def test_export_proofs_verify_and_tampering_is_named(log: AuditLog) -> None:
    for i in range(23):
        log.append(EventDraft(action="QUERY", outcome="ok", actor=A, request_id=f"r{i}"))
    anchors = _anchors(log, [1, 2, 7, 16, 20])
    header, rows = _export(log, anchors)
    assert header["tree_size"] == 20 and header["log_size"] == 23
    assert [r["type"] for r in rows].count("event") == 20  # only the anchored prefix
    anchor_rows = [r for r in rows if r["type"] == "anchor"]
    assert anchor_rows[0]["consistency"] is None and all(r["consistency"] for r in anchor_rows[1:])
    report = check_export(header, rows, anchors, {})
    assert report.ok, report.problems

    # a forged consistency proof
    bad = json.loads(json.dumps(rows))
    anchor3 = next(r for r in bad if r["type"] == "anchor" and r["index"] == 3)
    anchor3["consistency"]["path"][0] = "0x" + "00" * 32
    codes = {(p.code, p.seq) for p in check_export(header, bad, anchors, {}).problems}
    assert codes == {("bad_consistency_proof", 7)}

    # an edited record whose proof still holds for the original
    bad = json.loads(json.dumps(rows))
    ev5 = next(r for r in bad if r["type"] == "event" and r["event"]["seq"] == 5)
    ev5["event"]["outcome"] = "denied"
    codes = {p.code for p in check_export(header, bad, anchors, {}).problems}
    assert {"edited", "anchor_mismatch"} <= codes

    # the same export against a chain that anchored nothing: every proof and anchor is foreign
    codes = {p.code for p in check_export(header, rows, [], {}).problems}
    assert {"unanchored", "bad_proof", "anchor_not_on_chain"} <= codes


def test_render_formats(log: AuditLog) -> None:
    for i in range(3):
        log.append(EventDraft(action="VIEW", outcome="denied", reason="no_consent", patient_ref=P, actor=B))
    anchors = _anchors(log, [3])
    kw = {"chain_id": 1, "contracts": CONTRACTS, "gateway_id": GW}
    jsonl = render("jsonl", log, anchors, **kw).decode().splitlines()
    assert json.loads(jsonl[0])["type"] == "header" and len(jsonl) == 1 + 1 + 3
    fhir = render("fhir", log, anchors, **kw).decode().splitlines()
    assert [FhirAuditEvent.model_validate_json(line).outcome for line in fhir] == ["4"] * 3
    assert ET.fromstring(render("dicom-xml", log, anchors, **kw)).tag == "AuditMessages"
    assert read_csv(render("csv", log, anchors, **kw).decode()) == list(log.iter_all())
    with pytest.raises(InvalidInput):
        render("pdf", log, anchors, **kw)
