"""`medledger devnet up|down|status`: a local chain and IPFS node in a workdir.

`up` starts Anvil and Kubo detached, deploys the contracts (compiled by the real solc-js),
and writes `WORKDIR/devnet.json`. `down` stops exactly the processes it started (by pid, after
checking each pid is still that program). Running `up` again on a workdir whose processes are
stopped restarts them on the same state (chain state file, IPFS repo) and keeps the deployment.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devnet.anvil import pid_is, start_anvil, stop_pid
from devnet.compile import compile_contracts_cached
from devnet.kubo import KuboNode, ensure_kubo_binary
from ledger.chain import CONTRACT_NAMES, ChainClient
from ledger.errors import DevnetError
from ledger.keyfiles import create_key, read_key

ROLE_IDS = {"none": 0, "hospital": 1, "auditor": 2, "gateway": 3, "admin": 4}
ADMIN_COUNT = 3
ADMIN_THRESHOLD = 2
GATEWAY_NAME = "MedLedger Gateway"


@dataclass(frozen=True)
class Devnet:
    """The contents of devnet.json."""

    workdir: Path
    data: dict[str, Any]

    @property
    def rpc_url(self) -> str:
        return str(self.data["rpc_url"])

    @property
    def ipfs_api(self) -> str:
        return str(self.data["ipfs_api"])

    @property
    def chain_id(self) -> int:
        return int(self.data["chain_id"])

    @property
    def contracts(self) -> dict[str, str]:
        return dict(self.data["contracts"])

    def abis(self) -> dict[str, list[dict[str, Any]]]:
        build = json.loads(Path(self.data["artifacts"]).read_text())
        return {name: build["contracts"][name]["abi"] for name in CONTRACT_NAMES}


def devnet_file(workdir: Path) -> Path:
    return workdir / "devnet.json"


def load(workdir: Path) -> Devnet:
    path = devnet_file(workdir)
    if not path.exists():
        raise DevnetError(
            f"no devnet in {workdir} (no devnet.json); run `medledger devnet up --workdir {workdir}`"
        )
    return Devnet(workdir=workdir, data=json.loads(path.read_text()))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def status(workdir: Path) -> dict[str, Any]:
    """What runs: each process with its pid and whether it is alive and answering."""
    path = devnet_file(workdir)
    if not path.exists():
        return {"workdir": str(workdir), "deployed": False, "anvil": None, "ipfs": None, "gateway": None}
    data = json.loads(path.read_text())
    pids: dict[str, int] = data.get("pids", {})
    out: dict[str, Any] = {"workdir": str(workdir), "deployed": bool(data.get("contracts"))}
    out["anvil"] = {
        "pid": pids.get("anvil"),
        "running": bool(pids.get("anvil")) and pid_is(int(pids["anvil"]), "anvil"),
        "rpc_url": data.get("rpc_url"),
    }
    out["ipfs"] = {
        "pid": pids.get("ipfs"),
        "running": bool(pids.get("ipfs")) and pid_is(int(pids["ipfs"]), "ipfs"),
        "api": data.get("ipfs_api"),
    }
    gw = data.get("gateway_service") or {}
    out["gateway"] = {
        "pid": gw.get("pid"),
        "running": bool(gw.get("pid")) and pid_is(int(gw["pid"]), "medledger"),
        "url": gw.get("url"),
    }
    return out


def is_running(workdir: Path) -> bool:
    st = status(workdir)
    return bool(st["deployed"] and st["anvil"]["running"] and st["ipfs"]["running"])


def up(workdir: Path) -> Devnet:
    """Start (or restart) the devnet in `workdir` and deploy if not yet deployed."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    path = devnet_file(workdir)
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    pids: dict[str, int] = dict(data.get("pids", {}))

    kubo_bin = ensure_kubo_binary()
    if not (pids.get("anvil") and pid_is(int(pids["anvil"]), "anvil")):
        pids["anvil"], data["rpc_url"] = start_anvil(workdir)
    node = KuboNode(workdir / "ipfs", kubo_bin)
    if not (pids.get("ipfs") and pid_is(int(pids["ipfs"]), "ipfs")):
        node.init()
        pids["ipfs"] = node.start(workdir / "ipfs.log")
    data["ipfs_api"] = node.api_url
    data["ipfs_repo"] = str(workdir / "ipfs")
    data["pids"] = pids
    _write_json(path, data)  # record pids at once, so `down` can stop them even if deploy fails

    if not data.get("contracts") or not _deployed(data):
        data.update(_deploy(workdir, data["rpc_url"]))
        _write_json(path, data)
    return Devnet(workdir=workdir, data=data)


def _deployed(data: dict[str, Any]) -> bool:
    try:
        r = httpx.post(
            data["rpc_url"],
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_getCode",
                "params": [data["contracts"]["AccessLedger"], "latest"],
            },
            timeout=5,
        )
        return len(r.json().get("result", "0x")) > 2
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def _deploy(workdir: Path, rpc_url: str) -> dict[str, Any]:
    build = compile_contracts_cached()
    build_dir = workdir / "build"
    build_dir.mkdir(exist_ok=True)
    artifacts = build_dir / "contracts.json"
    artifacts.write_text(json.dumps(build))
    keys = workdir / "keys"
    gateway = (
        read_key(keys / "gateway.key")
        if (keys / "gateway.key").exists()
        else create_key(keys / "gateway.key")
    )
    admins = []
    for i in range(1, ADMIN_COUNT + 1):
        kp = keys / f"admin-{i}.key"
        admins.append(read_key(kp) if kp.exists() else create_key(kp))
    abis = {name: build["contracts"][name]["abi"] for name in CONTRACT_NAMES}
    # Devnet only: fund the gateway (the one account that sends transactions).
    httpx.post(
        rpc_url,
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "anvil_setBalance",
            "params": [gateway.address, hex(10**24)],
        },
        timeout=10,
    ).raise_for_status()
    chain = ChainClient(rpc_url, abis, account=gateway)
    gateway_id = "0x" + secrets.token_bytes(32).hex()
    admin_ids = ["0x" + secrets.token_bytes(32).hex() for _ in admins]
    ids = [gateway_id, *admin_ids]
    member_keys = [gateway.address, *(a.address for a in admins)]
    roles = [ROLE_IDS["gateway"], *([ROLE_IDS["admin"]] * len(admins))]
    names = [GATEWAY_NAME, *(f"Consortium Admin {i}" for i in range(1, len(admins) + 1))]
    deploy_block = int(chain.w3.eth.block_number)
    membership = chain.deploy(
        "Membership",
        build["contracts"]["Membership"]["bytecode"],
        [bytes.fromhex(i[2:]) for i in ids],
        member_keys,
        roles,
        names,
        ADMIN_THRESHOLD,
    )
    consent = chain.deploy("Consent", build["contracts"]["Consent"]["bytecode"], membership)
    ledger = chain.deploy("AccessLedger", build["contracts"]["AccessLedger"]["bytecode"], membership)
    return {
        "chain_id": chain.chain_id,
        "contracts": {"Membership": membership, "Consent": consent, "AccessLedger": ledger},
        "deploy_block": deploy_block,
        "artifacts": str(artifacts),
        "solc": build["solc"],
        "gateway": {
            "address": gateway.address,
            "member_id": gateway_id,
            "key_file": str(keys / "gateway.key"),
        },
        "admins": [
            {
                "address": a.address,
                "member_id": mid,
                "key_file": str(keys / f"admin-{i}.key"),
                "name": names[i],
            }
            for i, (a, mid) in enumerate(zip(admins, admin_ids, strict=True), start=1)
        ],
        "admin_threshold": ADMIN_THRESHOLD,
        "deployed_at": int(time.time()),
    }


def down(workdir: Path) -> dict[str, bool]:
    """Stop exactly the processes `up` (and `serve --detach`) started. Returns name -> stopped."""
    path = devnet_file(workdir)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    stopped: dict[str, bool] = {}
    gw = data.get("gateway_service") or {}
    if gw.get("pid"):
        stopped["gateway"] = stop_pid(int(gw["pid"]), "medledger")
    pids = data.get("pids", {})
    if pids.get("ipfs"):
        stopped["ipfs"] = stop_pid(int(pids["ipfs"]), "ipfs")
    if pids.get("anvil"):
        stopped["anvil"] = stop_pid(int(pids["anvil"]), "anvil")
    data["pids"] = {}
    data.pop("gateway_service", None)
    _write_json(path, data)
    return stopped
