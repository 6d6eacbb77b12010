"""Patients own their keys: rotation, and a delegate (guardian) acting for the patient until removed.

POST /patients/{ref}/key-rotation and POST /patients/{ref}/delegates carry EIP-712 messages
signed by the patient's current key; the gateway relays them to the Consent contract and
applies the receipt to its index, so the next request already sees the change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account

from ledger.chain import ChainClient
from ledger.client import GatewayClient, GatewayError
from tests.integration.actors import Instance, add_member, admin_clients, fresh_instances, wait_until

pytestmark = pytest.mark.integration

ISSUER = "PATIENT-KEYS-ISSUER"


@dataclass
class Setup:
    url: str
    hospital: GatewayClient
    reader: GatewayClient
    reader_id: str
    ref: str
    inst: Instance
    patient_key: Any
    consent: Any  # read-only Consent contract, to compare with the chain


@pytest.fixture(scope="module")
def setup(stack) -> Setup:  # type: ignore[no-untyped-def]
    admins = admin_clients(stack)
    h, r = Account.create(), Account.create()
    add_member(admins, h.address, "hospital", "Keys Hospital (custodian)")
    reader_id = add_member(admins, r.address, "hospital", "Keys Hospital (reader)")
    hospital = GatewayClient(stack.url, h.key)
    patient_id = f"KEYS-{time.time_ns()}"
    (inst,) = fresh_instances(patient_id, ISSUER, ("MR_small.dcm",))
    assert hospital.stow([inst.data])[0] == 200
    ref = hospital.lookup_patient(patient_id, ISSUER)
    patient_key = Account.create()
    hospital.enroll(ref, patient_key.address)
    chain = ChainClient(stack.devnet.rpc_url, stack.devnet.abis(), stack.devnet.contracts)
    return Setup(
        stack.url,
        hospital,
        GatewayClient(stack.url, r.key),
        reader_id,
        ref,
        inst,
        patient_key,
        chain.contract("Consent"),
    )


def _refused(call: Any, status: int, code: str) -> None:
    with pytest.raises(GatewayError) as info:
        call()
    assert (info.value.status, info.value.code) == (status, code), str(info.value)


def _chain_nonce(s: Setup) -> int:
    return int(s.consent.functions.patientNonces(bytes.fromhex(s.ref[2:])).call())


def _read(s: Setup) -> bytes:
    return s.reader.retrieve(s.inst.study, s.inst.series, s.inst.sop, purpose="TREAT")


def test_patient_key_rotation_and_delegates(setup: Setup) -> None:
    s = setup
    old = GatewayClient(s.url, s.patient_key.key)
    new_key = Account.create()
    delegate_key, short_key = Account.create(), Account.create()
    assert old.patient(s.ref)["nonce"] == _chain_nonce(s) == 0

    # ---- rotation: signed with the current key; the old key is refused at once ------------------
    before = old.patient(s.ref)["nonce"]
    rotated = old.rotate_patient_key(s.ref, new_key.address)
    assert rotated["patient_key"] == new_key.address
    _refused(lambda: old.patient(s.ref), 403, "not_patient")
    _refused(lambda: old.grant(s.ref, s.reader_id, ["TREAT"], nonce=before + 1), 403, "not_patient")
    new = GatewayClient(s.url, new_key.key)
    info = new.patient(s.ref)
    assert info["key"] == new_key.address
    assert info["nonce"] == _chain_nonce(s) == before + 1  # the index tracks the contract's nonce
    # the old key's signature, relayed in the new key's request: the contract refuses the signer
    n = info["nonce"]
    stale = old.sign("Delegate", {"patientRef": s.ref, "delegate": old.address, "until": 2**40, "nonce": n})
    body = {"delegate": old.address, "until": 2**40, "nonce": n, "signature": stale}
    _refused(
        lambda: new._json("POST", f"/patients/{s.ref}/delegates", body), 403, "chain:NotPatientOrDelegate"
    )
    # the rotation signature again: refused (its signer is no longer the patient's key) ...
    replay_sig = old.sign(
        "RotatePatientKey", {"patientRef": s.ref, "newKey": new_key.address, "nonce": before}
    )
    replay = {"new_key": new_key.address, "nonce": before, "signature": replay_sig}
    _refused(
        lambda: new._json("POST", f"/patients/{s.ref}/key-rotation", replay),
        403,
        "chain:NotPatientOrDelegate",
    )
    # ... and a signature by the current key with the used nonce: refused as a replay (BadNonce)
    fake = new.sign("RotatePatientKey", {"patientRef": s.ref, "newKey": new_key.address, "nonce": before})
    replay["signature"] = fake
    _refused(lambda: new._json("POST", f"/patients/{s.ref}/key-rotation", replay), 409, "chain:BadNonce")

    # ---- delegates: one until a few seconds from now, one until removed ---------------------------
    until = int(time.time()) + 5
    new.set_delegate(s.ref, short_key.address, until)
    short = GatewayClient(s.url, short_key.key)
    assert short.patient(s.ref)["key"] == new_key.address  # works until `until`
    new.set_delegate(s.ref, delegate_key.address, int(time.time()) + 3600)
    assert set(new.patient(s.ref)["delegates"]) == {short_key.address, delegate_key.address}
    delegate = GatewayClient(s.url, delegate_key.key)

    # the delegate acts for the patient: reads the record and grants consent
    _refused(lambda: _read(s), 403, "no_consent")
    grant = delegate.grant(s.ref, s.reader_id, ["TREAT"])
    assert _read(s) == s.inst.data
    # but cannot rotate the patient's key or appoint delegates (the contract: patient's key only)
    _refused(
        lambda: delegate.rotate_patient_key(s.ref, delegate_key.address), 403, "chain:NotPatientOrDelegate"
    )
    hist = new.history(s.ref)["events"]
    (g,) = [e for e in hist if e["action"] == "CONSENT_GRANT" and e["consent_id"] == str(grant["consent_id"])]
    assert g["who"] == "your delegate"
    assert any(e["action"] == "PATIENT_KEY_ROTATE" and e["who"] == "you" for e in hist)
    assert any(e["action"] == "DELEGATE_SET" for e in hist)

    # removal: refused on the very next request
    new.remove_delegate(s.ref, delegate_key.address)
    _refused(lambda: delegate.patient(s.ref), 403, "not_patient")
    _refused(
        lambda: delegate.revoke(s.ref, int(grant["consent_id"]), nonce=_chain_nonce(s)), 403, "not_patient"
    )
    assert _read(s) == s.inst.data  # the delegate's grant stands until the patient revokes it

    # expiry: the short-lived delegate is refused once `until` has passed
    wait_until(until + 1.5)
    _refused(lambda: short.patient(s.ref), 403, "not_patient")
    _refused(lambda: short.grant(s.ref, s.reader_id, ["COC"], nonce=_chain_nonce(s)), 403, "not_patient")
    _refused(lambda: short.members(), 403, "not_a_member")
    # a grant the expired delegate signed, relayed by the patient's own request: the contract refuses it
    n = _chain_nonce(s)
    now = int(time.time())
    from ledger.purposes import purposes_mask

    msg = {
        "patientRef": s.ref,
        "grantee": s.reader_id,
        "studyRef": "0x" + "00" * 32,
        "purposes": purposes_mask(["COC"]),
        "notBefore": now - 60,
        "notAfter": now + 600,
        "nonce": n,
    }
    body = {
        "grantee": s.reader_id,
        "purposes": ["COC"],
        "not_before": now - 60,
        "not_after": now + 600,
        "nonce": n,
        "signature": short.sign("Grant", msg),
    }
    _refused(
        lambda: new._json("POST", f"/patients/{s.ref}/consents", body), 403, "chain:NotPatientOrDelegate"
    )

    # the patient (new key) is still in control
    new.revoke(s.ref, int(grant["consent_id"]))
    _refused(lambda: _read(s), 403, "consent_revoked")
    assert new.patient(s.ref)["nonce"] == _chain_nonce(s)
