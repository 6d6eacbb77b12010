"""`medledger devnet up|down|status` on real processes, and the reproducible contract build."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from devnet import manager
from devnet.anvil import pid_is

pytestmark = pytest.mark.integration

MEDLEDGER = [sys.executable, "-m", "ledger.cli"]


def _rpc(url: str, method: str, params: list[object]) -> object:
    return httpx.post(
        url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=10
    ).json()["result"]


def test_up_status_down_restart_keeps_state(tmp_path: Path) -> None:
    wd = tmp_path / "net"
    up = subprocess.run(
        [*MEDLEDGER, "devnet", "up", "--workdir", str(wd)], capture_output=True, text=True, timeout=600
    )
    assert up.returncode == 0, up.stderr
    printed = json.loads(up.stdout)
    data = json.loads((wd / "devnet.json").read_text())
    for key in ("rpc_url", "chain_id", "ipfs_api", "contracts"):
        assert data[key] == printed[key]
    assert set(data["contracts"]) == {"Membership", "Consent", "AccessLedger"}
    assert (wd / "keys" / "gateway.key").stat().st_mode & 0o777 == 0o600

    st = subprocess.run(
        [*MEDLEDGER, "devnet", "status", "--workdir", str(wd)], capture_output=True, text=True
    )
    assert st.returncode == 0 and json.loads(st.stdout)["anvil"]["running"]

    # state that must survive a restart: a mined block, the deployment, an IPFS object
    code_before = _rpc(data["rpc_url"], "eth_getCode", [data["contracts"]["AccessLedger"], "latest"])
    logs_before = _rpc(data["rpc_url"], "eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest"}])
    assert isinstance(logs_before, list) and logs_before  # the deployment's MemberAdded events
    blocks_before = int(str(_rpc(data["rpc_url"], "eth_blockNumber", [])), 16)
    cid = httpx.post(
        data["ipfs_api"] + "/api/v0/add?cid-version=1&raw-leaves=true&pin=true&quieter=true",
        files={"file": ("x", b"ciphertext-like bytes " * 100)},
        timeout=10,
    ).json()["Hash"]
    time.sleep(1.5)  # Anvil dumps its state every second (--state-interval 1)

    # an unrelated process must survive `down`
    bystander = subprocess.Popen(["sleep", "60"])
    pids = dict(data["pids"])
    down = subprocess.run(
        [*MEDLEDGER, "devnet", "down", "--workdir", str(wd)], capture_output=True, text=True
    )
    assert down.returncode == 0
    assert json.loads(down.stdout)["stopped"] == {"ipfs": True, "anvil": True}
    assert not pid_is(pids["anvil"], "anvil") and not pid_is(pids["ipfs"], "ipfs")
    assert bystander.poll() is None
    bystander.kill()
    st = subprocess.run(
        [*MEDLEDGER, "devnet", "status", "--workdir", str(wd)], capture_output=True, text=True
    )
    assert st.returncode == 3 and not json.loads(st.stdout)["anvil"]["running"]

    net = manager.up(wd)
    try:
        assert net.contracts == data["contracts"]  # not redeployed
        assert _rpc(net.rpc_url, "eth_getCode", [data["contracts"]["AccessLedger"], "latest"]) == code_before
        assert int(str(_rpc(net.rpc_url, "eth_blockNumber", [])), 16) >= blocks_before
        # the event history the gateway's index is rebuilt from survives too
        assert _rpc(net.rpc_url, "eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest"}]) == logs_before
        got = httpx.post(net.ipfs_api + f"/api/v0/cat?arg={cid}", timeout=10)
        assert got.content == b"ciphertext-like bytes " * 100
    finally:
        manager.down(wd)


def test_down_without_devnet_and_status_exit_codes(tmp_path: Path) -> None:
    st = subprocess.run(
        [*MEDLEDGER, "devnet", "status", "--workdir", str(tmp_path)], capture_output=True, text=True
    )
    assert st.returncode == 3 and json.loads(st.stdout)["deployed"] is False
    demo = subprocess.run(
        [*MEDLEDGER, "serve", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert demo.returncode == 1 and "no devnet" in demo.stderr
    down = subprocess.run(
        [*MEDLEDGER, "devnet", "down", "--workdir", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert down.returncode == 1 and "no devnet" in down.stderr


def test_contract_build_is_reproducible() -> None:
    from devnet.compile import compile_contracts
    from ledger.audit_cli import bundled_abis

    first = compile_contracts()
    second = compile_contracts()
    assert first["solc"].startswith("0.8.37+commit.")
    for name in ("Membership", "Consent", "AccessLedger"):
        assert first["contracts"][name]["bytecode"] == second["contracts"][name]["bytecode"]
        assert len(first["contracts"][name]["bytecode"]) > 1000
    # the ABIs shipped with the package are exactly the compiler's
    assert bundled_abis() == {k: v["abi"] for k, v in first["contracts"].items()}
