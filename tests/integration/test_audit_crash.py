"""Crash safety of the audit log and the anchorer on real parts.

A gateway under load (a thread of signed requests) is SIGKILLed mid-way; then, while it is down,
an anchor transaction is sent from the gateway's own key exactly as the anchorer would have sent
it just before dying, but never recorded locally (the crash window between sending an anchor
and recording it). The gateway is restarted on the same workdir. Every event whose response came
back must be in the log, everything gets anchored, the chain's anchors cover each sequence
number exactly once, and the export verifies against the chain.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account

from devnet import manager
from ledger.anchorer import ChainAnchor, read_chain_anchors
from ledger.audit_log import AuditLog
from ledger.chain import ChainClient
from ledger.client import GatewayClient
from ledger.keyfiles import read_key
from ledger.service import start_detached, stop_service
from tests.integration.actors import add_member
from tests.integration.audit_support import OwnStack, export, own_stack, read_lines, verify, wait_anchored

pytestmark = pytest.mark.integration


@dataclass
class Crash:
    st: OwnStack
    key: str
    chain: ChainClient
    tmp: Path


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crash]:
    tmp = tmp_path_factory.mktemp("crash")
    with own_stack(tmp / "net") as st:
        admins = [GatewayClient(st.url, read_key(Path(a["key_file"])).key) for a in st.data["admins"]]
        account = Account.create()
        add_member(admins, account.address, "hospital", "Crash Test Hospital")
        for c in admins:
            c.close()
        net = manager.load(st.workdir)
        gateway_key = read_key(Path(net.data["gateway"]["key_file"]))
        yield Crash(
            st, account.key.hex(), ChainClient(net.rpc_url, net.abis(), net.contracts, gateway_key), tmp
        )


def _load_and_kill(c: Crash, tag: str, count: int = 150) -> list[str]:
    """Signed requests from a thread until `count` responses came back, then SIGKILL the
    gateway. Returns the patientRefs of every request whose response came back.

    The gateway under load runs with a long anchor delay, so events are certainly pending
    (unanchored) when it is killed: the crash hits the window this test is about.
    """
    stop_service(c.st.workdir, c.st.pid)
    c.st.pid, c.st.url = start_detached(c.st.workdir, extra_args=["--anchor-delay", "120"])
    acknowledged: list[str] = []

    def load() -> None:
        client = GatewayClient(c.st.url, c.key, timeout=10)
        i = 0
        while True:
            try:
                acknowledged.append(client.lookup_patient(f"CRASH-{tag}-{i}", "CRASH-ISSUER"))
            except Exception:
                return  # the gateway died under us
            i += 1

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(c.st.pid, signal.SIGKILL)  # mid-load, mid-batch
    worker.join(timeout=30)
    assert len(acknowledged) >= count
    return list(acknowledged)


def _restart_and_check(c: Crash, acknowledged: list[str], name: str) -> list[ChainAnchor]:
    c.st.pid, c.st.url = start_detached(c.st.workdir)  # same workdir
    h = wait_anchored(c.st.url)
    anchors = read_chain_anchors(c.chain)
    assert anchors[0].first_seq == 0
    for prev, nxt in itertools.pairwise(anchors):
        assert nxt.first_seq == prev.tree_size  # contiguous and disjoint: no seq anchored twice
        assert nxt.tree_size > nxt.first_seq
    assert anchors[-1].tree_size == h["log_size"] == h["anchored"]
    out = c.tmp / f"{name}.jsonl"
    export(c.st, out)
    rc, report = verify(out, c.st)
    assert rc == 0, report["problems"]
    logged = {
        line["event"]["patient_ref"]
        for line in read_lines(out)
        if line["type"] == "event" and line["event"]["action"] == "QUERY" and line["event"]["outcome"] == "ok"
    }
    assert [ref for ref in acknowledged if ref not in logged] == []  # every acknowledged request
    return anchors


def test_sigkill_mid_load_then_restart(crash: Crash) -> None:
    acknowledged = _load_and_kill(crash, "a")
    with AuditLog(crash.st.workdir / "gateway" / "audit.sqlite") as log:
        size = log.size()
    before = read_chain_anchors(crash.chain)
    assert size >= len(acknowledged) and (before[-1].tree_size if before else 0) < size  # pending at the kill
    _restart_and_check(crash, acknowledged, "after-kill")


def test_crash_between_sending_and_recording_an_anchor(crash: Crash) -> None:
    acknowledged = _load_and_kill(crash, "b")
    # The window made real: the anchor tx for part of the pending events is sent with the
    # gateway's own key, as the anchorer does right before recording it, and never recorded.
    anchored = read_chain_anchors(crash.chain)[-1].tree_size
    with AuditLog(crash.st.workdir / "gateway" / "audit.sqlite") as log:
        size = log.size()
        assert size > anchored + 2, (size, anchored)
        half = (anchored + size) // 2
        crash.chain.transact("AccessLedger", "anchorTree", half, log.root(half))
        assert half not in {a.tree_size for a in log.anchors()}
    anchors = _restart_and_check(crash, acknowledged, "after-window")
    assert [a.tree_size for a in anchors].count(half) == 1  # adopted from the chain, not redone
    with AuditLog(crash.st.workdir / "gateway" / "audit.sqlite") as log:
        assert half in {a.tree_size for a in log.anchors() if a.status == "confirmed"}
