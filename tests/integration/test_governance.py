"""Membership governance through the gateway: M-of-N admin approvals, removal, role change, key rotation.

Admins sign EIP-712 proposals and approvals; the gateway relays them to the Membership contract
and updates its local index from the receipt, so the effect shows on the very next request.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from devnet.manager import ROLE_IDS
from ledger.chain import ChainClient
from ledger.client import GatewayClient, GatewayError
from ledger.keyfiles import read_key
from ledger.typed_data import sign_typed
from tests.integration.actors import add_member, admin_clients, fresh_instances, jbody
from tests.integration.audit_support import own_stack

pytestmark = pytest.mark.integration

ISSUER = "GOVERNANCE-TEST-ISSUER"
ACTIONS = {"add": 0, "remove": 1, "change_role": 2, "rotate_key": 3, "set_threshold": 4}


@pytest.fixture(scope="module")
def admins(stack) -> list[GatewayClient]:  # type: ignore[no-untyped-def]
    return admin_clients(stack)


@pytest.fixture(scope="module")
def auditor(stack, admins) -> GatewayClient:  # type: ignore[no-untyped-def]
    key = Account.create()
    add_member(admins, key.address, "auditor", "Gov Auditor")
    return GatewayClient(stack.url, key.key)


@pytest.fixture(scope="module")
def chain(stack) -> ChainClient:  # type: ignore[no-untyped-def]
    """A read-only view of the chain, to check the contract's events."""
    return ChainClient(stack.devnet.rpc_url, stack.devnet.abis(), stack.devnet.contracts)


def _lookup(client: GatewayClient) -> Any:
    return client.lookup_patient(f"GOV-{secrets.token_hex(4)}", ISSUER)


def _refused(call: Any, status: int, code: str) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        call()
    assert (info.value.status, info.value.code) == (status, code), str(info.value)
    return info.value


def _events(chain: ChainClient, name: str, block: int, **match: Any) -> list[Any]:
    ev = getattr(chain.contract("Membership").events, name)()
    logs = ev.get_logs(from_block=block)
    return [log for log in logs if all(log["args"][k] == v for k, v in match.items())]


def _propose_body(admin: GatewayClient, signer_key: bytes, action: str, member_id: str, **kw: Any) -> bytes:
    """A Propose body signed by `signer_key` (not necessarily the sending client's key)."""
    nonce = int(admin._json("GET", f"/governance/nonces/{Account.from_key(signer_key).address}")["nonce"])
    deadline = int(time.time()) + 600
    key = kw.get("key") or "0x" + "00" * 20
    role = kw.get("role", "none")
    msg = {
        "action": ACTIONS[action],
        "memberId": member_id,
        "key": key,
        "role": ROLE_IDS[role],
        "name": kw.get("name", ""),
        "value": 0,
        "deadline": deadline,
        "nonce": nonce,
    }
    sig = sign_typed(signer_key, "Propose", msg, admin.chain_id, admin.contracts)
    return jbody(
        {
            "action": action,
            "member_id": member_id,
            "key": kw.get("key"),
            "role": role,
            "name": kw.get("name", ""),
            "value": 0,
            "deadline": deadline,
            "nonce": nonce,
            "signature": sig,
        }
    )


def _post(client: GatewayClient, path: str, body: bytes) -> Any:
    r = client.http.post(path, content=body, headers={"Content-Type": "application/json"})
    return client._check(r).json()


def test_two_of_three_approvals_add_a_member(stack, admins, chain) -> None:  # type: ignore[no-untyped-def]
    key = Account.create()
    newcomer = GatewayClient(stack.url, key.key)
    member_id = "0x" + secrets.token_bytes(32).hex()
    block = int(chain.w3.eth.block_number)

    proposal = admins[0].propose("add", member_id, key=key.address, role="hospital", name="Gov Hospital")
    pid = int(proposal["proposal_id"])
    assert proposal["executed"] is False
    # one approval (the proposer's) is not enough: still not a member
    _refused(lambda: _lookup(newcomer), 403, "not_a_member")
    assert not any(m["member_id"] == member_id for m in admins[0].members())
    # the proposer cannot approve twice
    _refused(lambda: admins[0].approve(pid), 409, "chain:AlreadyApproved")

    assert admins[1].approve(pid)["executed"] is True
    assert _lookup(newcomer).startswith("0x")  # the very next request is accepted
    (m,) = [m for m in admins[0].members() if m["member_id"] == member_id]
    assert (m["role"], m["active"], m["key"], m["name"]) == ("hospital", True, key.address, "Gov Hospital")
    # a third approval is refused: the proposal was carried out
    _refused(lambda: admins[2].approve(pid), 409, "chain:ProposalAlreadyExecuted")

    # the contract emitted an event for each step
    assert len(_events(chain, "ProposalCreated", block, proposalId=pid)) == 1
    approvals = _events(chain, "ProposalApproved", block, proposalId=pid)
    assert [a["args"]["approvals"] for a in approvals] == [1, 2]
    assert len(_events(chain, "ProposalExecuted", block, proposalId=pid)) == 1
    assert len(_events(chain, "MemberAdded", block, key=key.address)) == 1


def test_removed_member_is_refused_on_its_very_next_request(stack, admins, chain) -> None:  # type: ignore[no-untyped-def]
    key = Account.create()
    member_id = add_member(admins, key.address, "hospital", "Gov Hospital To Remove")
    hospital = GatewayClient(stack.url, key.key)
    assert _lookup(hospital).startswith("0x")
    # a request signed before the removal, sent after it
    req = hospital.http.build_request(
        "POST",
        "/patients/lookup",
        content=b'{"patient_id":"GOV-PRESIGNED"}',
        headers={"Content-Type": "application/json"},
    )
    presigned = next(hospital.auth.auth_flow(req))
    block = int(chain.w3.eth.block_number)

    proposal = admins[0].propose("remove", member_id)
    assert _lookup(hospital).startswith("0x")  # 1 of 2 approvals: still a member
    assert admins[1].approve(int(proposal["proposal_id"]))["executed"] is True

    _refused(lambda: _lookup(hospital), 403, "not_a_member")
    r = hospital.http.send(presigned, auth=None)  # type: ignore[arg-type]
    assert r.status_code == 403 and r.json()["error"] == "not_a_member"
    (m,) = [m for m in admins[0].members() if m["member_id"] == member_id]
    assert m["active"] is False
    assert len(_events(chain, "MemberRemoved", block, memberId=bytes.fromhex(member_id[2:]))) == 1


def test_role_change(stack, admins) -> None:  # type: ignore[no-untyped-def]
    key = Account.create()
    member_id = add_member(admins, key.address, "hospital", "Gov Hospital Becoming Auditor")
    client = GatewayClient(stack.url, key.key)
    _refused(client.events, 403, "wrong_role")

    proposal = admins[1].propose("change_role", member_id, role="auditor")
    assert admins[2].approve(int(proposal["proposal_id"]))["executed"] is True

    assert isinstance(client.events(), list)  # now an auditor
    _refused(lambda: _lookup(client), 403, "wrong_role")  # and no longer a hospital
    (m,) = [m for m in admins[0].members() if m["member_id"] == member_id]
    assert m["role"] == "auditor"


def test_key_rotation_keeps_the_member_and_its_history(stack, admins, auditor) -> None:  # type: ignore[no-untyped-def]
    old, new = Account.create(), Account.create()
    member_id = add_member(admins, old.address, "hospital", "Gov Rotating Hospital")
    before = GatewayClient(stack.url, old.key)
    patient_key = Account.create()
    patient_id = f"GOV-ROT-{time.time_ns()}"
    (inst,) = fresh_instances(patient_id, ISSUER, ("CT_small.dcm",))
    assert before.stow([inst.data])[0] == 200
    ref = before.lookup_patient(patient_id, ISSUER)
    before.enroll(ref, patient_key.address)

    proposal = admins[0].propose("rotate_key", member_id, key=new.address)
    assert admins[2].approve(int(proposal["proposal_id"]))["executed"] is True

    _refused(lambda: _lookup(before), 403, "not_a_member")  # the old key authorizes nothing
    after = GatewayClient(stack.url, new.key)
    # same member: still the custodian of the study it uploaded under the old key
    assert after.retrieve(inst.study, inst.series, inst.sop, purpose="TREAT") == inst.data
    (m,) = [m for m in admins[0].members() if m["member_id"] == member_id]
    assert (m["key"], m["active"], m["name"]) == (new.address, True, "Gov Rotating Hospital")

    patient = GatewayClient(stack.url, patient_key.key)
    events = patient.history(ref)["events"]
    by_key: dict[str, set[str]] = {}
    for e in events:
        if e["who_id"] == member_id:
            by_key.setdefault(e["action"], set()).add(e["who"])
    # the upload and enrollment (old key) and the read (new key) are all under the same institution
    assert {"UPLOAD", "ENROLL", "VIEW"} <= set(by_key)
    assert set().union(*by_key.values()) == {"Gov Rotating Hospital"}
    # the audit log says which key signed each: both, under the one member id
    keys_used = {e["actor_key"] for e in auditor.events() if e["actor"] == member_id and e["outcome"] == "ok"}
    assert keys_used == {old.address, new.address}


def test_replayed_admin_signature_is_refused_by_the_contract(stack, admins) -> None:  # type: ignore[no-untyped-def]
    key = Account.create()
    member_id = "0x" + secrets.token_bytes(32).hex()
    body = _propose_body(admins[0], admins[0]._key, "add", member_id, key=key.address, role="hospital")
    pid = int(_post(admins[0], "/governance/proposals", body)["proposal_id"])

    # the same signed proposal again, in a new (freshly signed) request: the contract's nonce refuses it
    err = _refused(lambda: _post(admins[0], "/governance/proposals", body), 409, "chain:BadNonce")
    assert "BadNonce" in err.message
    # relayed by another admin's request: still the same admin signature, still refused
    _refused(lambda: _post(admins[1], "/governance/proposals", body), 409, "chain:BadNonce")

    approval = jbody({"signature": admins[1].sign("Approve", {"proposalId": pid})})
    assert _post(admins[1], f"/governance/proposals/{pid}/approvals", approval)["executed"] is True
    _refused(
        lambda: _post(admins[1], f"/governance/proposals/{pid}/approvals", approval),
        409,
        "chain:ProposalAlreadyExecuted",
    )
    # and the very same HTTP request twice is refused by the gateway before the chain sees it
    req = admins[2].http.build_request(
        "POST",
        f"/governance/proposals/{pid}/approvals",
        content=approval,
        headers={"Content-Type": "application/json"},
    )
    signed = next(admins[2].auth.auth_flow(req))
    first = admins[2].http.send(signed, auth=None)  # type: ignore[arg-type]
    again = admins[2].http.send(signed, auth=None)  # type: ignore[arg-type]
    assert first.json()["error"] == "chain:ProposalAlreadyExecuted"
    assert again.status_code == 401 and again.json()["error"] == "replay"


def test_non_admin_cannot_propose(stack, admins) -> None:  # type: ignore[no-untyped-def]
    key = Account.create()
    add_member(admins, key.address, "hospital", "Gov Ambitious Hospital")
    hospital = GatewayClient(stack.url, key.key)
    target = "0x" + secrets.token_bytes(32).hex()
    outsider = Account.create()

    # through its own request: the gateway refuses the role
    body = _propose_body(admins[0], key.key, "add", target, key=outsider.address, role="admin")
    _refused(lambda: _post(hospital, "/governance/proposals", body), 403, "wrong_role")
    _refused(lambda: hospital.approve(1), 403, "wrong_role")
    # its signature relayed in an admin's request: the contract refuses the signer
    _refused(lambda: _post(admins[0], "/governance/proposals", body), 403, "chain:NotAnAdmin")
    approval = jbody({"signature": hospital.sign("Approve", {"proposalId": 1})})
    _refused(lambda: _post(admins[0], "/governance/proposals/1/approvals", approval), 403, "chain:NotAnAdmin")
    assert not any(m["member_id"] == target for m in admins[0].members())


def test_a_removed_admins_approvals_stop_counting(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Own devnet: this test removes a founding admin, which the shared stack must keep."""

    with own_stack(tmp_path_factory.mktemp("gov") / "net") as st:
        a1, a2, a3 = (GatewayClient(st.url, read_key(Path(a["key_file"])).key) for a in st.data["admins"])
        a1_id = st.data["admins"][0]["member_id"]
        newcomer = Account.create()
        pending = a1.propose(
            "add", "0x" + secrets.token_bytes(32).hex(), key=newcomer.address, role="hospital", name="Pending"
        )
        assert not pending["executed"]  # 1 of 2
        removal = a2.propose("remove", a1_id)
        assert a3.approve(int(removal["proposal_id"]))["executed"]  # admin 1 is gone
        # admin 1's approval of the pending proposal no longer counts: a2's is only the first live one
        assert not a2.approve(int(pending["proposal_id"]))["executed"]
        assert a3.approve(int(pending["proposal_id"]))["executed"]
        assert any(m["key"] == newcomer.address and m["active"] for m in a2.members())
        for c in (a1, a2, a3):
            c.close()
