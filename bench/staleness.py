"""How stale can the gateway's membership/consent decisions be? Measured, against a per-request chain call.

The gateway decides every request from a local index of contract events (ledger/chain_index.py):
changes it relays itself apply at once from the receipt; changes made elsewhere (another
gateway of the consortium) are picked up by the poller every `poll_interval`, and no decision
is made on an index older than `max_staleness` (it syncs first, or refuses with 503).

This script makes changes on-chain WITHOUT going through the gateway under test: a second
funded account, registered by governance as another gateway member, relays patient-signed
consent grants/revocations and admin-signed membership proposals/approvals straight to the
contracts. For each change it measures the time from the change's block being available
(receipt seen) until the gateway's decision flips, polling a real endpoint:
  consent grant   -> hospital B's WADO-RS read goes 403 -> 200
  consent revoke  -> 200 -> 403 (consent_revoked)
  member added    -> the new member's GET /members goes 403 -> 200
  member removed  -> 200 -> 403 (not_a_member)
Baseline: "ask the chain per request", i.e. one eth_call of Consent.isAllowed (+ one of
Membership.memberOf) per request, compared with the local index's decision cost.

    .venv/bin/python bench/staleness.py [--trials 30] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devnet import manager
from devnet.manager import ROLE_IDS
from ledger.chain import ChainClient
from ledger.chain_index import ChainIndex
from ledger.client import GatewayClient, GatewayError
from ledger.keyfiles import read_key
from ledger.purposes import purpose_bit, purposes_mask
from ledger.service import start_detached, stop_service
from ledger.typed_data import sign_typed
from tests.integration.actors import add_member, fresh_instances

ZERO32 = b"\x00" * 32


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def summary(name: str, xs: list[float]) -> str:
    return (
        f"{name:<16} n={len(xs):<3} p50={pct(xs, 50) * 1000:7.1f} ms  p99={pct(xs, 99) * 1000:7.1f} ms  "
        f"max={max(xs) * 1000:7.1f} ms  mean={statistics.fmean(xs) * 1000:7.1f} ms"
    )


class OutOfBand:
    """A second gateway member sending transactions itself (not through the gateway under test)."""

    def __init__(self, devnet: manager.Devnet, admins: list[GatewayClient]) -> None:
        acct = Account.create()
        add_member(admins, acct.address, "gateway", "Bench Second Gateway")
        # devnet only: fund it (the deploy funds the first gateway the same way)
        httpx.post(
            devnet.rpc_url,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "anvil_setBalance",
                "params": [acct.address, hex(10**22)],
            },
            timeout=10,
        ).raise_for_status()
        self.chain = ChainClient(devnet.rpc_url, devnet.abis(), devnet.contracts, acct)
        self.chain_id = devnet.chain_id
        self.contracts = devnet.contracts

    def mined(self, contract: str, function: str, *args: Any) -> float:
        """Send; return the monotonic time at which its receipt was first seen."""
        sent = self.chain.send(contract, function, *args)
        while True:
            try:
                receipt = self.chain.w3.eth.get_transaction_receipt(sent.tx_hash)
            except Exception:  # not yet mined
                receipt = None
            if receipt is not None:
                seen = time.monotonic()
                if receipt["status"] != 1:
                    raise RuntimeError(f"{function} reverted")
                return seen
            time.sleep(0.001)

    def sign(self, key: bytes, primary: str, msg: dict[str, Any]) -> bytes:
        return bytes.fromhex(sign_typed(key, primary, msg, self.chain_id, self.contracts)[2:])


def until_flips(probe: Any, want: bool, start: float, timeout: float = 10.0) -> float:
    """Seconds from `start` until probe() == want (probe: one real request to the gateway)."""
    while True:
        ok = probe()
        now = time.monotonic()
        if ok == want:
            return now - start
        if now - start > timeout:
            raise RuntimeError("the gateway's decision did not change within the timeout")


def run(workdir: Path, trials: int) -> None:
    devnet = manager.load(workdir)
    pid, url = start_detached(workdir)
    try:
        _bench(devnet, url, trials)
    finally:
        stop_service(workdir, pid)


def _bench(devnet: manager.Devnet, url: str, trials: int) -> None:
    admin_keys = [bytes(read_key(Path(a["key_file"])).key) for a in devnet.data["admins"]]
    admins = [GatewayClient(url, k) for k in admin_keys]
    info = admins[0].info["consent_index"]
    a_key, b_key, patient_key = Account.create(), Account.create(), Account.create()
    add_member(admins, a_key.address, "hospital", "Bench Hospital A")
    b_id = add_member(admins, b_key.address, "hospital", "Bench Hospital B")
    oob = OutOfBand(devnet, admins)
    a, b = GatewayClient(url, a_key.key), GatewayClient(url, b_key.key)
    patient_id = f"BENCH-{time.time_ns()}"
    (inst,) = fresh_instances(patient_id, "BENCH-ISSUER", ("CT_small.dcm",))
    assert a.stow([inst.data])[0] == 200
    ref = a.lookup_patient(patient_id, "BENCH-ISSUER")
    a.enroll(ref, patient_key.address)
    study_ref = GatewayClient(url, patient_key.key).patient(ref)["studies"][0]["study_ref"]
    ref_b, b_b, study_b = bytes.fromhex(ref[2:]), bytes.fromhex(b_id[2:]), bytes.fromhex(study_ref[2:])
    consent = oob.chain.contract("Consent")

    def b_reads() -> bool:
        try:
            b.retrieve(inst.study, inst.series, inst.sop, purpose="TREAT")
            return True
        except GatewayError as err:
            if err.code not in ("no_consent", "consent_revoked"):
                raise
            return False

    print(
        f"gateway index: poll_interval={info['poll_interval_seconds']} s, "
        f"max_staleness={info['max_staleness_seconds']} s (the stated bound)"
    )
    print(
        f"trials: {trials} per kind; changes sent by a second gateway member, not by the gateway under test"
    )

    # ---- consent grant / revoke ---------------------------------------------------------------
    grant_lat: list[float] = []
    revoke_lat: list[float] = []
    for _ in range(trials):
        time.sleep(secrets.randbelow(250) / 1000)  # de-phase from the poller
        nonce = int(consent.functions.patientNonces(ref_b).call())
        now = int(time.time())
        g = (ref_b, b_b, ZERO32, purposes_mask(["TREAT"]), now - 60, now + 3600, nonce)
        msg = {
            "patientRef": ref,
            "grantee": b_id,
            "studyRef": "0x" + "00" * 32,
            "purposes": g[3],
            "notBefore": g[4],
            "notAfter": g[5],
            "nonce": nonce,
        }
        sig = oob.sign(patient_key.key, "Grant", msg)
        assert not b_reads()
        t0 = oob.mined("Consent", "grant", g, sig)
        grant_lat.append(until_flips(b_reads, True, t0))
        cid = int(consent.functions.consentCount().call())
        time.sleep(secrets.randbelow(250) / 1000)
        rsig = oob.sign(patient_key.key, "Revoke", {"consentId": cid, "nonce": nonce + 1})
        t0 = oob.mined("Consent", "revoke", cid, nonce + 1, rsig)
        revoke_lat.append(until_flips(b_reads, False, t0))

    # ---- membership add / remove (2-of-3 admin signatures, relayed by the second gateway) ------
    add_lat: list[float] = []
    remove_lat: list[float] = []
    membership = oob.chain.contract("Membership")

    def governance(action: str, member_id: bytes, key: str, role: str) -> float:
        deadline = int(time.time()) + 600
        signer = Account.from_key(admin_keys[0]).address
        nonce = int(membership.functions.nonces(signer).call())
        msg = {
            "action": {"add": 0, "remove": 1}[action],
            "memberId": "0x" + member_id.hex(),
            "key": key,
            "role": ROLE_IDS[role],
            "name": "Bench Member" if action == "add" else "",
            "value": 0,
            "deadline": deadline,
            "nonce": nonce,
        }
        psig = oob.sign(admin_keys[0], "Propose", msg)
        args = (msg["action"], member_id, key, ROLE_IDS[role], msg["name"], 0, deadline, nonce, psig)
        oob.mined("Membership", "propose", *args)
        pid = int(membership.functions.proposalCount().call())
        asig = oob.sign(admin_keys[1], "Approve", {"proposalId": pid})
        return oob.mined("Membership", "approve", pid, asig)  # the approval executes the change

    for _ in range(trials):
        key = Account.create()
        member = GatewayClient(url, key.key)

        def member_accepted(m: GatewayClient = member) -> bool:
            try:
                m.members()
                return True
            except GatewayError as err:
                if err.code != "not_a_member":
                    raise
                return False

        mid = secrets.token_bytes(32)
        assert not member_accepted()
        time.sleep(secrets.randbelow(250) / 1000)
        t0 = governance("add", mid, key.address, "hospital")
        add_lat.append(until_flips(member_accepted, True, t0))
        time.sleep(secrets.randbelow(250) / 1000)
        t0 = governance("remove", mid, "0x" + "00" * 20, "none")
        remove_lat.append(until_flips(member_accepted, False, t0))
        member.close()

    print("\ntime from the change's block until the gateway's decision changed (polling a real endpoint):")
    for name, xs in (
        ("consent grant", grant_lat),
        ("consent revoke", revoke_lat),
        ("member added", add_lat),
        ("member removed", remove_lat),
    ):
        print("  " + summary(name, xs))
    allx = grant_lat + revoke_lat + add_lat + remove_lat
    print("  " + summary("all", allx))
    bound = float(info["max_staleness_seconds"])
    print(f"  within the stated bound of {bound:.2f} s: {sum(x <= bound for x in allx)}/{len(allx)}")

    # ---- per-request decision cost: local index vs asking the chain --------------------------
    index = ChainIndex(
        ChainClient(devnet.rpc_url, devnet.abis(), devnet.contracts),
        from_block=int(devnet.data.get("deploy_block", 0)),
        max_staleness=3600,
    )
    index.sync()
    nonce = int(consent.functions.patientNonces(ref_b).call())
    now = int(time.time())
    g = (ref_b, b_b, ZERO32, purposes_mask(["TREAT"]), now - 60, now + 3600, nonce)
    msg = {
        "patientRef": ref,
        "grantee": b_id,
        "studyRef": "0x" + "00" * 32,
        "purposes": g[3],
        "notBefore": g[4],
        "notAfter": g[5],
        "nonce": nonce,
    }
    oob.mined("Consent", "grant", g, oob.sign(patient_key.key, "Grant", msg))
    index.sync()
    bit = purpose_bit("TREAT")
    is_allowed = consent.functions.isAllowed(ref_b, b_b, study_b, bit)
    member_of = membership.functions.memberOf(b_key.address)
    assert is_allowed.call()[0] and index.decide(ref, b_id, study_ref, "TREAT").allowed

    def timed(fn: Any, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out

    # the cheapest way to ask the chain: one raw JSON-RPC eth_call on a kept-alive connection
    rpc = httpx.Client(timeout=30)
    call_data = consent.encode_abi("isAllowed", args=[ref_b, b_b, study_b, bit])
    payload = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "eth_call",
        "params": [{"to": consent.address, "data": call_data}, "latest"],
    }

    def raw_is_allowed() -> None:
        r = rpc.post(devnet.rpc_url, json=payload)
        assert r.json()["result"][:66] == "0x" + "00" * 31 + "01"  # allowed == true

    raw_consent = timed(raw_is_allowed, 300)
    chain_consent = timed(is_allowed.call, 300)
    chain_both = timed(lambda: (member_of.call(), is_allowed.call()), 300)
    local = timed(
        lambda: (index.member_by_key(b_key.address), index.decide(ref, b_id, study_ref, "TREAT")), 20000
    )
    r50, c50, cb50, l50 = pct(raw_consent, 50), pct(chain_consent, 50), pct(chain_both, 50), pct(local, 50)
    print("\nper-request decision cost (same machine, same run):")
    for label, xs in (
        ("baseline, ask the chain: raw eth_call isAllowed", raw_consent),
        ("baseline, ask the chain: web3 isAllowed.call()", chain_consent),
        ("baseline, ask the chain: memberOf + isAllowed", chain_both),
        ("local index: member_by_key + decide", local),
    ):
        print(f"  {label:<50} p50={pct(xs, 50) * 1e6:9.1f} us  p99={pct(xs, 99) * 1e6:9.1f} us")
    print(
        f"  ratio (ask the chain per request / local index, p50): raw eth_call isAllowed {r50 / l50:.0f}x, "
        f"web3 isAllowed {c50 / l50:.0f}x, membership + consent {cb50 / l50:.0f}x"
    )
    print(
        f"  price: decisions may lag the chain by p50 {pct(allx, 50) * 1000:.0f} ms / "
        f"max {max(allx) * 1000:.0f} ms for changes made elsewhere (0 for changes this gateway relays)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--workdir", type=Path, help="an existing devnet workdir (default: a fresh one)")
    args = ap.parse_args()
    if args.workdir:
        if not manager.is_running(args.workdir):
            manager.up(args.workdir)
        run(args.workdir, args.trials)
        return
    with tempfile.TemporaryDirectory(prefix="medledger-staleness-") as tmp:
        wd = Path(tmp)
        manager.up(wd)
        try:
            run(wd, args.trials)
        finally:
            manager.down(wd)


if __name__ == "__main__":
    main()
