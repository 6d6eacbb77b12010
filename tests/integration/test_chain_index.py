"""The local index applies every contract log once and in chain order, whoever brings it first.

Regression: receipts of relayed changes used to be applied directly, so a poll that had read
the head before them re-applied older logs on top, e.g. re-created a consent just revoked or
re-activated a member just removed, until the next poll. Here the "late poll" is made
deterministic: the receipts are applied, then a sync up to an older block runs.
"""

from __future__ import annotations

import secrets
import time

import pytest
from eth_account import Account
from hexbytes import HexBytes

from ledger.chain import ChainClient
from ledger.chain_index import ChainIndex
from ledger.client import GatewayClient
from tests.integration.actors import add_member, admin_clients, fresh_instances

pytestmark = pytest.mark.integration


def test_a_late_poll_does_not_undo_a_revocation_or_a_removal(stack) -> None:  # type: ignore[no-untyped-def]
    admins = admin_clients(stack)
    chain = ChainClient(stack.devnet.rpc_url, stack.devnet.abis(), stack.devnet.contracts)
    index = ChainIndex(chain, from_block=int(stack.devnet.data["deploy_block"]), max_staleness=3600)

    h, reader, patient_key = Account.create(), Account.create(), Account.create()
    add_member(admins, h.address, "hospital", "Index Hospital")
    reader_id = add_member(admins, reader.address, "hospital", "Index Reader")
    hospital = GatewayClient(stack.url, h.key)
    patient_id = f"INDEX-{time.time_ns()}"
    (inst,) = fresh_instances(patient_id, "INDEX-ISSUER", ("CT_small.dcm",))
    assert hospital.stow([inst.data])[0] == 200
    ref = hospital.lookup_patient(patient_id, "INDEX-ISSUER")
    hospital.enroll(ref, patient_key.address)
    patient = GatewayClient(stack.url, patient_key.key)
    study_ref = patient.patient(ref)["studies"][0]["study_ref"]
    index.sync()  # the index is current up to here

    def receipt(tx: str) -> object:
        return chain.w3.eth.get_transaction_receipt(HexBytes(tx))

    grant = patient.grant(ref, reader_id, ["TREAT"])
    revoke = patient.revoke(ref, int(grant["consent_id"]))
    g, r = receipt(grant["tx"]), receipt(revoke["tx"])
    assert r["blockNumber"] > g["blockNumber"]  # type: ignore[index]

    index.apply_receipt(g)
    index.apply_receipt(r)
    index.sync(to_block=int(g["blockNumber"]))  # type: ignore[index]  # a poll that read the older head
    c = index.consents[int(grant["consent_id"])]
    assert c.revoked_at is not None
    assert index.decide(ref, reader_id, study_ref, "TREAT").reason == "consent_revoked"
    assert index.patient(ref).nonce == 2  # type: ignore[union-attr]  # each log counted once

    # the same for membership: added, then removed, then a late poll
    gone = Account.create()
    member_id = "0x" + secrets.token_bytes(32).hex()
    p1 = admins[0].propose("add", member_id, key=gone.address, role="hospital", name="Index Gone")
    admins[1].approve(int(p1["proposal_id"]))
    added_block = int(chain.w3.eth.block_number)
    p2 = admins[0].propose("remove", member_id)
    admins[1].approve(int(p2["proposal_id"]))
    head = int(chain.w3.eth.block_number)
    index.sync(to_block=head)  # as a receipt of the removal would
    index.sync(to_block=added_block)  # a late poll
    assert index.member_by_key(gone.address) is None
    assert index.members[member_id].active is False
    # and a full sync from scratch agrees with the incremental one
    fresh = ChainIndex(chain, from_block=int(stack.devnet.data["deploy_block"]), max_staleness=3600)
    fresh.sync(to_block=head)
    assert fresh.consents[c.consent_id].revoked_at == c.revoked_at
    assert fresh.patients[ref].nonce == 2 and not fresh.members[member_id].active
