"""Start and stop a real Anvil node (from the npm package @foundry-rs/anvil).

Anvil listens on 127.0.0.1 with ``--port 0``; the chosen port is read from its
``Listening on`` line (so it must not run with ``--silent``). Its state (blocks, receipts,
accounts) is persisted with ``--state`` in the workdir and dumped every second, so a restart
keeps the chain.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx

from devnet.toolchain import anvil_binary, ensure_npm
from ledger.errors import DevnetError

_LISTENING = re.compile(rb"Listening on (127\.0\.0\.1|0\.0\.0\.0|\[::1\]):(\d+)")
DEFAULT_CHAIN_ID = 31337


def start_anvil(workdir: Path, *, chain_id: int = DEFAULT_CHAIN_ID, timeout: float = 60.0) -> tuple[int, str]:
    """Start Anvil detached; return (pid, rpc_url)."""
    ensure_npm()
    binary = anvil_binary()
    if not binary.exists():
        raise DevnetError(f"the anvil binary is missing at {binary}; run `npm ci` in the repository")
    chain_dir = workdir / "chain"
    chain_dir.mkdir(parents=True, exist_ok=True)
    log_path = chain_dir / "anvil.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(binary),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--chain-id",
                str(chain_id),
                "--state",
                str(chain_dir / "state.json"),
                "--state-interval",
                "1",
                "--accounts",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_bytes())
        if match:
            url = f"http://127.0.0.1:{int(match.group(2))}"
            if _answers(url):
                return proc.pid, url
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise DevnetError(f"anvil exited with {proc.returncode}:\n{tail}")
        time.sleep(0.05)
    stop_pid(proc.pid, "anvil")
    raise DevnetError(f"anvil did not start listening within {timeout}s (log: {log_path})")


def _answers(url: str) -> bool:
    try:
        r = httpx.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=2
        )
        return r.status_code == 200 and "result" in r.json()
    except httpx.HTTPError:
        return False


def pid_is(pid: int, name: str) -> bool:
    """Whether `pid` is alive and its command line names `name` (so we never kill a stranger)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return name.encode() in cmdline


def stop_pid(pid: int, name: str, *, timeout: float = 15.0) -> bool:
    """SIGTERM `pid` if it is still a `name` process, SIGKILL after `timeout`. True if stopped."""
    if not pid_is(pid, name):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_is(pid, name) or _is_zombie(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"
