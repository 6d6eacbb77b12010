"""The gateway end to end on real parts: Anvil, Kubo, solc output, pydicom's DICOM files, HTTP.

Every test goes through the HTTP API with signed requests (the SDK), against one detached
`medledger serve` process; attacks on stored state are made directly on the files, as an
attacker with disk access would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_utils import keccak

from ledger.client import GatewayClient, GatewayError
from ledger.demo import DEMO_ISSUER, _ensure_member, demo_instances
from ledger.keyfiles import read_key

pytestmark = pytest.mark.integration


@dataclass
class Actors:
    a: GatewayClient
    b: GatewayClient
    auditor: GatewayClient
    patient: GatewayClient
    outsider: GatewayClient
    a_id: str
    b_id: str
    patient_ref: str
    instances: list[tuple[str, bytes, dict[str, str]]]


def _uids(data: bytes) -> tuple[str, str, str]:
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def actors(stack) -> Actors:  # type: ignore[no-untyped-def]
    url = stack.url
    admins = [GatewayClient(url, read_key(Path(a["key_file"])).key) for a in stack.devnet.data["admins"]]
    keys = {n: Account.create() for n in ("a", "b", "auditor", "patient", "outsider")}
    a_id = _ensure_member(admins, keys["a"].address, "hospital", "Test Hospital A")
    b_id = _ensure_member(admins, keys["b"].address, "hospital", "Test Hospital B")
    _ensure_member(admins, keys["auditor"].address, "auditor", "Test Auditor")
    clients = {n: GatewayClient(url, k.key) for n, k in keys.items()}
    instances = demo_instances()
    status, _ = clients["a"].stow([d for _, d, _ in instances])
    assert status == 200
    ref = clients["a"].lookup_patient("MRN-4711-DEMO", DEMO_ISSUER)
    clients["a"].enroll(ref, keys["patient"].address)
    return Actors(
        clients["a"],
        clients["b"],
        clients["auditor"],
        clients["patient"],
        clients["outsider"],
        a_id,
        b_id,
        ref,
        instances,
    )


def test_consent_lifecycle_refuse_allow_revoke(actors: Actors) -> None:
    _, data, _ = actors.instances[1]
    study, series, sop = _uids(data)
    with pytest.raises(GatewayError) as no_consent:
        actors.b.retrieve(study, series, sop, purpose="TREAT")
    assert no_consent.value.status == 403 and no_consent.value.code == "no_consent"

    grant = actors.patient.grant(actors.patient_ref, actors.b_id, ["TREAT"])
    assert actors.b.retrieve(study, series, sop, purpose="TREAT") == data  # byte-identical

    with pytest.raises(GatewayError) as wrong_purpose:
        actors.b.retrieve(study, series, sop, purpose="HRESCH")
    assert wrong_purpose.value.code == "wrong_purpose"

    actors.patient.revoke(actors.patient_ref, int(grant["consent_id"]))
    with pytest.raises(GatewayError) as revoked:
        actors.b.retrieve(study, series, sop, purpose="TREAT")
    assert revoked.value.status == 403 and revoked.value.code == "consent_revoked"

    # every refusal and the allowed read are in the patient's history, with reasons
    hist = actors.patient.history(actors.patient_ref)["events"]
    views = [
        (e["outcome"], e["reason"]) for e in hist if e["action"] == "VIEW" and e["who_id"] == actors.b_id
    ]
    assert (
        ("denied", "no_consent") in views and ("ok", "") in views and ("denied", "consent_revoked") in views
    )


def test_study_scoped_consent_and_expiry(actors: Actors) -> None:
    info = actors.patient.patient(actors.patient_ref)
    studies = {s["study_instance_uid"]: s["study_ref"] for s in info["studies"]}
    (_, d0, _), (_, d2, _) = actors.instances[0], actors.instances[2]
    s0, se0, o0 = _uids(d0)
    s2, se2, o2 = _uids(d2)
    g = actors.patient.grant(actors.patient_ref, actors.b_id, ["COC"], study_ref=studies[s0])
    assert actors.b.retrieve(s0, se0, o0, purpose="COC") == d0
    with pytest.raises(GatewayError) as other_study:
        actors.b.retrieve(s2, se2, o2, purpose="COC")
    assert other_study.value.code == "wrong_study"
    actors.patient.revoke(actors.patient_ref, int(g["consent_id"]))
    # a consent that ends in a few seconds: allowed now, refused as expired afterwards
    now = int(time.time())
    actors.patient.grant(actors.patient_ref, actors.b_id, ["PUBHLTH"], not_before=now - 10, not_after=now + 4)
    assert actors.b.retrieve(s2, se2, o2, purpose="PUBHLTH") == d2
    time.sleep(5.5)
    with pytest.raises(GatewayError) as expired:
        actors.b.retrieve(s2, se2, o2, purpose="PUBHLTH")
    assert expired.value.code == "consent_expired"


def test_break_glass_is_flagged(actors: Actors) -> None:
    _, data, _ = actors.instances[3]
    study, series, sop = _uids(data)
    with pytest.raises(GatewayError) as short:
        actors.b.retrieve(study, series, sop, purpose="ETREAT", break_glass="urgent")
    assert short.value.status == 400
    with pytest.raises(GatewayError) as not_etreat:
        actors.b.retrieve(
            study, series, sop, purpose="TREAT", break_glass="Unconscious patient, need priors now"
        )
    assert not_etreat.value.status == 403
    got = actors.b.retrieve(
        study, series, sop, purpose="ETREAT", break_glass="Unconscious patient, need priors now"
    )
    assert got == data
    hist = actors.patient.history(actors.patient_ref)["events"]
    assert any(e["break_glass"] and e["outcome"] == "ok" and e["purpose"] == "ETREAT" for e in hist)


def test_bad_inputs_get_clear_errors_and_store_nothing(actors: Actors, stack) -> None:  # type: ignore[no-untyped-def]
    catalog = stack.workdir / "gateway" / "catalog.sqlite"

    def count() -> int:
        db = sqlite3.connect(str(catalog))
        try:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
        finally:
            db.close()

    before = count()
    status, body = actors.a.stow([b"this is not DICOM at all" * 10])
    assert status == 409
    failure = body["00081198"]["Value"][0]
    assert "not_dicom" in failure["00000902"]["Value"][0] or failure["00081197"]["Value"][0] == 0xC000
    assert count() == before

    # unknown study -> 404
    with pytest.raises(GatewayError) as unknown:
        actors.b.retrieve("1.2.3.4.5", "1.2.3", "1.2.3.4", purpose="TREAT")
    assert unknown.value.status == 404

    # missing signature -> 401; bad signature -> 401; member with wrong role -> 403
    r = httpx.get(stack.url + "/audit/verify")
    assert r.status_code == 401 and r.json()["error"] == "missing_signature"
    r = httpx.get(
        stack.url + "/audit/verify",
        headers={
            "x-medledger-timestamp": str(int(time.time())),
            "x-medledger-nonce": "0x" + "00" * 32,
            "x-medledger-signature": "0x" + "11" * 65,
        },
    )
    assert r.status_code == 401
    with pytest.raises(GatewayError) as wrong_role:
        actors.b.verify()
    assert wrong_role.value.status == 403 and wrong_role.value.code == "wrong_role"
    with pytest.raises(GatewayError) as outsider:
        actors.outsider.stow([actors.instances[0][1]])
    assert outsider.value.status == 403 and outsider.value.code == "not_a_member"

    # a replayed request is refused
    req = actors.a.http.build_request(
        "POST",
        "/patients/lookup",
        content=b'{"patient_id":"P-REPLAY"}',
        headers={"Content-Type": "application/json"},
    )
    signed = next(actors.a.auth.auth_flow(req))
    first = httpx.post(stack.url + "/patients/lookup", content=signed.content, headers=dict(signed.headers))
    again = httpx.post(stack.url + "/patients/lookup", content=signed.content, headers=dict(signed.headers))
    assert first.status_code == 200 and again.status_code == 401 and again.json()["error"] == "replay"

    # malformed JSON -> 400 with the fields named
    with pytest.raises(GatewayError) as bad_json:
        actors.a._json("POST", "/patients/lookup", {"issuer": "x"})
    assert bad_json.value.status == 400 and "patient_id" in bad_json.value.message


def _phi_needles(instances: list[tuple[str, bytes, dict[str, str]]]) -> list[bytes]:
    needles: set[bytes] = set()
    values = {"Doe^Jane^Q", "MRN-4711-DEMO"}
    for _, _, orig in instances:
        values |= {v for v in orig.values() if len(v) >= 4}
    for v in values:
        b = v.encode()
        needles |= {b, b.hex().encode(), hashlib.sha256(b).hexdigest().encode(), keccak(b).hex().encode()}
        needles |= {hashlib.sha256(b).digest(), keccak(b)}
    return sorted(needles)


def test_no_phi_on_chain_or_in_ipfs(actors: Actors, stack) -> None:  # type: ignore[no-untyped-def]
    from ledger.phi_scan import scan_chain, scan_files, scan_ipfs

    needles = _phi_needles(actors.instances)
    chain_hits, txs, logs = scan_chain(stack.devnet.rpc_url, needles)
    assert txs > 10 and logs > 10  # the scan saw real traffic
    assert chain_hits == []
    ipfs_hits, blocks = asyncio.run(scan_ipfs(stack.devnet.ipfs_api, needles))
    assert blocks >= len(actors.instances)
    assert ipfs_hits == []
    file_hits = scan_files(
        [stack.workdir / "chain", stack.workdir / "ipfs.log", stack.workdir / "gateway" / "service.log"],
        needles,
    )
    assert file_hits == []


def test_ipfs_holds_ciphertext_of_each_instance(actors: Actors, stack) -> None:  # type: ignore[no-untyped-def]
    from ledger.ipfs import KuboClient

    db = sqlite3.connect(str(stack.workdir / "gateway" / "catalog.sqlite"))
    rows = db.execute("SELECT cid, sha256, cipher_sha256 FROM instances").fetchall()
    db.close()

    async def check() -> None:
        async with KuboClient(stack.devnet.ipfs_api) as ipfs:
            for cid, sha, csha in rows:
                blob = await ipfs.cat_bytes(cid)
                assert hashlib.sha256(blob).hexdigest() == csha != sha
                assert blob[:4] == b"MLE1" and b"DICM" not in blob[:200]
                assert await ipfs.pin_ls(cid)

    asyncio.run(check())


def test_audit_verifies_and_detects_a_changed_record(actors: Actors, stack) -> None:  # type: ignore[no-untyped-def]
    report = actors.auditor.verify()
    assert report["ok"], report["problems"]
    assert report["events_checked"] > 10 and report["anchors_checked"] >= 1

    db_path = stack.workdir / "gateway" / "audit.sqlite"
    db = sqlite3.connect(str(db_path))
    seq, body = db.execute(
        "SELECT seq, body FROM events WHERE CAST(body AS TEXT) LIKE '%\"denied\"%' ORDER BY seq LIMIT 1"
    ).fetchone()
    triggers = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
    for t in triggers:
        db.execute(f"DROP TRIGGER {t}")
    forged = json.loads(body)
    forged["outcome"] = "ok"
    forged["reason"] = ""
    db.execute(
        "UPDATE events SET body=? WHERE seq=?",
        (json.dumps(forged, sort_keys=True, separators=(",", ":")).encode(), seq),
    )
    db.commit()
    db.close()
    try:
        tampered = actors.auditor.verify()
        assert not tampered["ok"]
        assert any(p["code"] == "anchor_mismatch" for p in tampered["problems"])
    finally:
        db = sqlite3.connect(str(db_path))
        db.execute("UPDATE events SET body=? WHERE seq=?", (body, seq))
        db.commit()
        db.close()
    assert actors.auditor.verify()["ok"]
