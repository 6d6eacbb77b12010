"""A real Kubo daemon for the integration tests.

Use it from ``tests/conftest.py`` (or a test module) as::

    from tests.integration.kubo_fixture import kubo_api  # noqa: F401

and take ``kubo_api`` (the RPC base URL, ``http://127.0.0.1:PORT``) as a test argument. One daemon
serves the whole session, in offline mode on a fresh repo under pytest's tmp dir. A test that
must stop or restart its daemon starts its own with :func:`running_kubo`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devnet.kubo import KuboNode, ensure_kubo_binary


@contextmanager
def running_kubo(workdir: Path) -> Iterator[tuple[KuboNode, int]]:
    """Init a repo in ``workdir/repo``, start its daemon (log in ``workdir``), stop it on exit."""
    node = KuboNode(workdir / "repo", binary=ensure_kubo_binary())
    node.init()
    pid = node.start(workdir / "kubo-daemon.log")
    try:
        yield node, pid
    finally:
        node.stop(pid)


@pytest.fixture(scope="session")
def kubo_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a session-wide Kubo v0.43.1 daemon (offline, loopback only)."""
    with running_kubo(tmp_path_factory.mktemp("kubo")) as (node, _pid):
        yield node.api_url
