"""Scans for PHI where none may be: every block, transaction and log of the chain, every IPFS
block, and files (chain state, logs). Used by the tests and by `medledger scan-phi`.

A needle is a byte string: a patient name or ID as bytes, its hex, and plain hashes of it
(a plain hash of a patient identifier is PHI too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx

from ledger.ipfs import KuboClient


def _rpc(client: httpx.Client, url: str, method: str, params: list[object]) -> object:
    r = client.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    r.raise_for_status()
    return r.json()["result"]


def _hits(blob: bytes, needles: Sequence[bytes], where: str) -> list[str]:
    lower = blob.lower()
    return [f"{where}: {n[:24]!r}" for n in needles if n in blob or n.lower() in lower]


def scan_chain(rpc_url: str, needles: Sequence[bytes]) -> tuple[list[str], int, int]:
    """(hits, transactions scanned, logs scanned) over every block of the chain."""
    hits: list[str] = []
    txs = logs = 0
    with httpx.Client(timeout=30) as client:
        head = int(str(_rpc(client, rpc_url, "eth_blockNumber", [])), 16)
        for n in range(head + 1):
            block = _rpc(client, rpc_url, "eth_getBlockByNumber", [hex(n), True])
            assert isinstance(block, dict)
            hits += _hits(
                bytes.fromhex(str(block.get("extraData", "0x"))[2:]), needles, f"block {n} extraData"
            )
            for tx in block["transactions"]:
                txs += 1
                hits += _hits(bytes.fromhex(tx["input"][2:]), needles, f"tx {tx['hash']} input")
                receipt = _rpc(client, rpc_url, "eth_getTransactionReceipt", [tx["hash"]])
                assert isinstance(receipt, dict)
                for entry in receipt["logs"]:
                    logs += 1
                    blob = bytes.fromhex(entry["data"][2:]) + b"".join(
                        bytes.fromhex(t[2:]) for t in entry["topics"]
                    )
                    hits += _hits(blob, needles, f"log of tx {tx['hash']}")
    return hits, txs, logs


async def scan_ipfs(api_url: str, needles: Sequence[bytes]) -> tuple[list[str], int]:
    """(hits, blocks scanned) over every block in the node's repo."""
    hits: list[str] = []
    async with KuboClient(api_url, offline=True) as ipfs:
        cids = await ipfs.refs_local()
        for cid in cids:
            hits += _hits(await ipfs.block_get(cid), needles, f"ipfs block {cid}")
    return hits, len(cids)


def scan_files(paths: Iterable[Path], needles: Sequence[bytes]) -> list[str]:
    """Hits in every regular file under `paths` (recursively)."""
    hits: list[str] = []
    for root in paths:
        files = (
            [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
        )
        for f in files:
            hits += _hits(f.read_bytes(), needles, str(f))
    return hits
