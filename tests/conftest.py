"""Shared fixtures: a real devnet (Anvil + Kubo + deployed contracts) and a real gateway process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.kubo_fixture import kubo_api  # noqa: F401  (session Kubo for IPFS tests)


@dataclass
class Stack:
    workdir: Path
    url: str
    devnet: object
    pid: int


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One devnet and one detached gateway (`medledger serve`) for the integration tests."""
    from devnet import manager
    from ledger.service import start_detached, stop_service

    workdir = tmp_path_factory.mktemp("medledger")
    net = manager.up(workdir)
    pid, url = start_detached(workdir)
    try:
        yield Stack(workdir=workdir, url=url, devnet=net, pid=pid)
    finally:
        stop_service(workdir, pid)
        manager.down(workdir)
