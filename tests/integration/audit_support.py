"""Helpers for the audit tests: an own devnet + gateway, the real CLI as a subprocess, waiting
for the anchorer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MEDLEDGER = [sys.executable, "-m", "ledger.cli"]


@dataclass
class OwnStack:
    workdir: Path
    url: str
    pid: int
    data: dict[str, Any]

    @property
    def rpc(self) -> str:
        return str(self.data["rpc_url"])

    @property
    def access_ledger(self) -> str:
        return str(self.data["contracts"]["AccessLedger"])


@contextmanager
def own_stack(workdir: Path) -> Iterator[OwnStack]:
    """A devnet and a detached gateway of this test module only (its log is not shared)."""
    from devnet import manager
    from ledger.service import start_detached, stop_service

    net = manager.up(workdir)
    pid, url = start_detached(workdir)
    st = OwnStack(workdir, url, pid, net.data)
    try:
        yield st
    finally:
        if st.pid:
            stop_service(workdir, st.pid)
        manager.down(workdir)


def health(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/health", timeout=10).json())


def wait_anchored(url: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the gateway has anchored its whole log; returns /health."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["anchored"] == h["log_size"]:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"not anchored within {timeout}s: {h}")
        time.sleep(0.1)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEDLEDGER, *args], capture_output=True, text=True, timeout=timeout)


def verify(events: Path, st: OwnStack) -> tuple[int, dict[str, Any]]:
    """`medledger audit verify --json` on `events`; (exit code, report)."""
    r = cli(
        "audit", "verify", "--events", str(events), "--rpc", st.rpc, "--contract", st.access_ledger, "--json"
    )
    assert r.stdout, r.stderr
    return r.returncode, json.loads(r.stdout)


def export(st: OwnStack, out: Path, *extra: str) -> dict[str, Any]:
    r = cli("audit", "export", "--workdir", str(st.workdir), "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    return path
