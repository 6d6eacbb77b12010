"""Compile MedLedger's contracts with the pinned solc-js, through py-solc-x.

py-solc-x drives `devnet/solc.js`, a `solc`-compatible front end to solc-js. The build is
reproducible: fixed compiler, fixed settings, sources given by content under stable relative
names, so the same sources always give the same bytecode (tested).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import solcx

from devnet.toolchain import CONTRACTS_DIR, NODE_MODULES, SOLC_WRAPPER, ensure_npm
from ledger.errors import DevnetError

CONTRACT_FILES = ("Membership.sol", "Consent.sol", "AccessLedger.sol")
SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    "viaIR": True,
    "evmVersion": "cancun",
    "metadata": {"bytecodeHash": "ipfs"},
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}


def compiler_input(contracts_dir: Path = CONTRACTS_DIR) -> dict[str, Any]:
    """The standard-JSON input: every contract source by content under `contracts/<name>`."""
    sources = {
        f"contracts/{name}": {"content": (contracts_dir / name).read_text(encoding="utf-8")}
        for name in CONTRACT_FILES
    }
    return {"language": "Solidity", "sources": sources, "settings": SETTINGS}


def compile_contracts(contracts_dir: Path = CONTRACTS_DIR) -> dict[str, Any]:
    """Compile and return ``{"solc": version, "source_hash": hex, "contracts": {name: {abi, bytecode}}}``."""
    ensure_npm()
    data = compiler_input(contracts_dir)
    try:
        version = str(solcx.wrapper.get_solc_version(SOLC_WRAPPER, with_commit_hash=True))
        out = solcx.compile_standard(
            data,
            solc_binary=SOLC_WRAPPER,
            base_path=str(contracts_dir.parent),
            allow_paths=[str(NODE_MODULES)],
        )
    except solcx.exceptions.SolcError as exc:
        raise DevnetError(f"contract compilation failed:\n{exc.message}") from exc
    contracts: dict[str, Any] = {}
    for name in CONTRACT_FILES:
        stem = name.removesuffix(".sol")
        art = out["contracts"][f"contracts/{name}"][stem]
        contracts[stem] = {
            "abi": art["abi"],
            "bytecode": "0x" + art["evm"]["bytecode"]["object"],
            "deployed_bytecode": "0x" + art["evm"]["deployedBytecode"]["object"],
        }
    source_hash = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return {"solc": version, "source_hash": source_hash, "contracts": contracts}


def compile_contracts_cached() -> dict[str, Any]:
    """Like :func:`compile_contracts`, reusing an earlier output of the same sources and compiler.

    The cache key is the SHA-256 of the exact compiler input plus the solc-js version, so a
    changed source or setting always recompiles.
    """
    from devnet.toolchain import PROJECT_ROOT, cache_dir

    ensure_npm()
    data = compiler_input()
    lock = json.loads((PROJECT_ROOT / "package-lock.json").read_text())
    solc_pkg = lock["packages"]["node_modules/solc"]["version"]
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode() + solc_pkg.encode()).hexdigest()[:32]
    path = cache_dir() / "contracts" / f"{key}.json"
    if path.exists():
        cached: dict[str, Any] = json.loads(path.read_text())
        return cached
    out = compile_contracts()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out
