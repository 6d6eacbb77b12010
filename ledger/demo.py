"""`medledger demo`: the whole story, end to end, through the HTTP API only.

Governance adds two hospitals and an auditor (2-of-3 admin approvals); hospital A uploads real
DICOM of one patient; hospital B's read is refused; the patient grants B consent for
treatment; B reads (bytes identical); the patient revokes; B is refused again; B reads once
under break-glass (ETREAT, with a justification), flagged; the patient lists who viewed their
images; the auditor verifies the whole history against the chain.
"""

from __future__ import annotations

import secrets
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.data import get_testdata_file

from devnet import manager
from ledger.client import GatewayClient, GatewayError
from ledger.keyfiles import load_or_create_key, read_key
from ledger.service import running_service, start_detached, stop_service

DEMO_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "waveform_ecg.dcm", "JPEG2000.dcm")
DEMO_PATIENT_ID = "MRN-4711-DEMO"
DEMO_PATIENT_NAME = "Doe^Jane^Q"
DEMO_ISSUER = "ST-ELSEWHERE-HOSPITAL-A"


def demo_instances() -> list[tuple[str, bytes, dict[str, str]]]:
    """The demo's DICOM: real pydicom test files, labelled as one patient of hospital A.

    Returns (file name, bytes to upload, original identifiers) per file.
    """
    out = []
    for name in DEMO_FILES:
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"pydicom test file {name} is missing")
        ds = pydicom.dcmread(path)
        original = {"PatientName": str(ds.get("PatientName", "")), "PatientID": str(ds.get("PatientID", ""))}
        ds.PatientName = DEMO_PATIENT_NAME
        ds.PatientID = DEMO_PATIENT_ID
        ds.IssuerOfPatientID = DEMO_ISSUER
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((name, buf.getvalue(), original))
    return out


def _uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _ensure_member(admins: list[GatewayClient], address: str, role: str, name: str) -> str:
    for m in admins[0].members():
        if m["key"] == address and m["active"]:
            return str(m["member_id"])
    member_id = "0x" + secrets.token_bytes(32).hex()
    proposal = admins[0].propose("add", member_id, key=address, role=role, name=name)
    if not proposal["executed"]:
        approval = admins[1].approve(int(proposal["proposal_id"]))
        if not approval["executed"]:
            raise RuntimeError(f"proposal {proposal['proposal_id']} did not execute after 2 approvals")
    return member_id


def run(workdir: Path, *, say: Any = print) -> dict[str, Any]:
    workdir = workdir.resolve()
    started_devnet = False
    if not manager.is_running(workdir):
        say("· starting the devnet (Anvil + Kubo) and deploying the contracts ...")
        manager.up(workdir)
        started_devnet = True
    devnet = manager.load(workdir)
    url = running_service(workdir)
    service_pid: int | None = None
    if url is None:
        say("· starting the gateway service ...")
        service_pid, url = start_detached(workdir)
    try:
        return _story(workdir, devnet, url, say)
    finally:
        if service_pid is not None:
            stop_service(workdir, service_pid)
        if started_devnet:
            manager.down(workdir)


def _story(workdir: Path, devnet: manager.Devnet, url: str, say: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    keys = workdir / "keys"
    admins = [GatewayClient(url, read_key(Path(a["key_file"])).key) for a in devnet.data["admins"]]
    a_key = load_or_create_key(keys / "demo-hospital-a.key")
    b_key = load_or_create_key(keys / "demo-hospital-b.key")
    aud_key = load_or_create_key(keys / "demo-auditor.key")
    pat_key = load_or_create_key(keys / "demo-patient.key")

    say("· governance: adding Hospital A, Hospital B and an auditor (each 2-of-3 admin approvals)")
    _ensure_member(admins, a_key.address, "hospital", "St. Elsewhere Hospital (A)")
    b_id = _ensure_member(admins, b_key.address, "hospital", "County General Hospital (B)")
    _ensure_member(admins, aud_key.address, "auditor", "National Health Audit Office")
    hospital_a = GatewayClient(url, a_key.key)
    hospital_b = GatewayClient(url, b_key.key)
    auditor = GatewayClient(url, aud_key.key)
    patient = GatewayClient(url, pat_key.key)

    instances = demo_instances()
    say(
        f"· Hospital A uploads {len(instances)} real DICOM instances ({', '.join(n for n, _, _ in instances)})"
    )
    status, stow = hospital_a.stow([d for _, d, _ in instances])
    cids = list(hospital_a.last_cids)
    if status != 200:
        raise RuntimeError(f"upload failed with {status}: {stow}")
    stored = stow["00081199"]["Value"]

    patient_ref = hospital_a.lookup_patient(DEMO_PATIENT_ID, DEMO_ISSUER)
    try:
        hospital_a.enroll(patient_ref, pat_key.address)
    except GatewayError as err:
        if err.code != "chain:PatientAlreadyEnrolled":  # a re-run on the same workdir
            raise
    say(f"· patient enrolled as {patient_ref[:18]}… (an opaque random ref; no PHI on-chain)")

    reads_allowed = 0
    reads_denied = 0
    denials: list[str] = []
    study, series, sop = _uids(instances[0][1])

    def try_read(client: GatewayClient, expect_ok: bool, **kw: Any) -> bytes | None:
        nonlocal reads_allowed, reads_denied
        try:
            data = client.retrieve(study, series, sop, purpose=kw.pop("purpose", "TREAT"), **kw)
        except GatewayError as err:
            if err.status != 403 or expect_ok:
                raise
            reads_denied += 1
            denials.append(err.code)
            return None
        if not expect_ok:
            raise RuntimeError("a read that should have been refused was allowed")
        reads_allowed += 1
        return data

    say("· Hospital B asks for the CT without consent → refused (403), refusal recorded")
    try_read(hospital_b, False)

    say("· the patient grants Hospital B consent for treatment (TREAT), signed with their own key")
    consent = patient.grant(patient_ref, b_id, ["TREAT"])
    say(f"  consent #{consent['consent_id']} recorded on-chain")

    say("· Hospital B reads every instance → allowed, bytes identical to the upload")
    identical = 0
    for _name, data, _ in instances:
        st, se, so = _uids(data)
        got = hospital_b.retrieve(st, se, so, purpose="TREAT")
        reads_allowed += 1
        if got != data:
            raise RuntimeError(f"retrieved bytes differ from the upload for {_name}")
        identical += 1

    say("· Hospital B asks for research use (HRESCH) → refused: wrong purpose")
    try_read(hospital_b, False, purpose="HRESCH")

    say("· the patient revokes the consent")
    patient.revoke(patient_ref, int(consent["consent_id"]))
    say("· Hospital B asks again → refused (consent revoked)")
    try_read(hospital_b, False)

    say("· emergency: Hospital B reads under break-glass (ETREAT, written justification) → allowed, flagged")
    try_read(
        hospital_b,
        True,
        purpose="ETREAT",
        break_glass="Unconscious patient in ED, suspected intracranial bleed; prior CT needed now.",
    )

    # Give the anchorer its batch delay (≤ 0.5 s by default) so every entry has its proof.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health", timeout=5).json()
        if h["anchored"] >= h["log_size"]:
            break
        time.sleep(0.1)
    history = patient.history(patient_ref)
    say("· the patient's history (who viewed my images, when, why):")
    for e in history["events"]:
        if e["action"] in ("VIEW", "SHARE") or e["outcome"] != "ok":
            flag = "  ⚠ BREAK-GLASS" if e["break_glass"] else ""
            why = e["purpose"] or "-"
            result = e["outcome"] + (f" ({e['reason']})" if e["reason"] else "")
            proof = e["proof"]["status"]
            say(
                f"    {e['time']}  {e['who'] or 'unknown'}: {e['action']} for {why} → {result}{flag}  [proof: {proof}]"
            )

    say("· the auditor verifies the whole history against the chain")
    report = auditor.verify()
    events = auditor.events()
    elapsed = time.monotonic() - t0
    say(
        f"· verify: ok={report['ok']}, {report['events_checked']} events in {report['anchors_checked']} anchors, "
        f"{len(report['problems'])} problems, break-glass events {report['break_glass_events']}  ({elapsed:.1f}s)"
    )
    for c in (*admins, hospital_a, hospital_b, auditor, patient):
        c.close()
    return {
        "rpc_url": devnet.rpc_url,
        "chain_id": devnet.chain_id,
        "ipfs_api": devnet.ipfs_api,
        "contracts": devnet.contracts,
        "gateway_url": url,
        "uploaded": [
            {"file": name, "sop_instance_uid": s["00081155"]["Value"][0]}
            for (name, _, _), s in zip(instances, stored, strict=True)
        ],
        "cids": cids,
        "patient_ref": patient_ref,
        "consent_id": consent["consent_id"],
        "reads_allowed": reads_allowed,
        "reads_denied": reads_denied,
        "denial_reasons": denials,
        "bytes_identical": identical,
        "events": report["events_checked"],
        "events_exported": len(events),
        "anchors": report["anchors_checked"],
        "verify": {
            "ok": report["ok"],
            "events_checked": report["events_checked"],
            "problems": report["problems"],
            "break_glass_events": report["break_glass_events"],
        },
        "history_entries": len(history["events"]),
        "seconds": round(elapsed, 2),
    }
