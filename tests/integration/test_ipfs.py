"""KuboClient and KuboNode against a real Kubo v0.43.1 daemon (no mocks)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from devnet.kubo import KUBO_VERSION, KuboNode
from ledger.errors import CorruptObject, NotFound, StoreUnavailable
from ledger.ipfs import KuboClient, KuboNotFound
from tests.integration.kubo_fixture import running_kubo

pytestmark = pytest.mark.integration

CHUNK = 256 * 1024  # Kubo's default chunker: size-262144


async def _agen(data: bytes, step: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        await asyncio.sleep(0)
        yield data[i : i + step]


def test_version(kubo_api: str) -> None:
    async def run() -> str:
        async with KuboClient(kubo_api) as c:
            return await c.version()

    assert asyncio.run(run()) == KUBO_VERSION


def test_streamed_round_trip_5mb_raw_leaves_pins_and_checks(kubo_api: str) -> None:
    data = os.urandom(5 * 1024 * 1024 + 12345)

    async def run() -> None:
        async with KuboClient(kubo_api) as c:
            cid = await c.add(_agen(data))
            assert cid.startswith("bafy")  # CIDv1 base32, dag-pb root over the leaves
            got = bytearray()
            async for chunk in c.cat(cid, chunk_size=100_000):
                got += chunk
            assert bytes(got) == data
            assert await c.cat_bytes(cid) == data

            leaves = await c.refs(cid)
            assert len(leaves) == -(-len(data) // CHUNK)
            assert all(leaf.startswith("bafk") for leaf in leaves)  # raw leaves
            assert await c.block_get(leaves[0]) == data[:CHUNK]

            local = set(await c.refs_local())
            assert set(leaves) <= local

            assert await c.compute_cid(_agen(data, 10_000)) == cid
            assert await c.compute_cid(data) == cid

            await c.verify(cid, hashlib.sha256(data).digest())
            with pytest.raises(CorruptObject):
                await c.verify(cid, hashlib.sha256(data + b"x").digest())

            assert await c.pin_ls(cid) is True
            assert await c.pin_rm(cid) is True
            assert await c.pin_ls(cid) is False
            assert await c.pin_rm(cid) is False  # idempotent

    asyncio.run(run())


def test_small_object_is_a_single_raw_block(kubo_api: str) -> None:
    data = os.urandom(1000)

    async def run() -> None:
        async with KuboClient(kubo_api) as c:
            cid = await c.add(data)
            assert cid.startswith("bafk")  # CIDv1, raw codec: the block is the bytes themselves
            assert await c.block_get(cid) == data
            assert await c.compute_cid(data) == cid
            assert cid in await c.refs_local()
            assert await c.pin_ls(cid) is True

    asyncio.run(run())


def test_only_hash_stores_nothing_and_missing_is_not_found(kubo_api: str) -> None:
    data = os.urandom(2000)

    async def run() -> None:
        async with KuboClient(kubo_api, offline=True) as c:
            cid = await c.compute_cid(data)
            assert cid.startswith("bafk")
            assert cid not in await c.refs_local()
            with pytest.raises(KuboNotFound) as info:
                await c.cat_bytes(cid)
            assert isinstance(info.value, NotFound)
            assert "not found" in str(info.value)
            with pytest.raises(NotFound):
                await c.block_get(cid)
            assert await c.pin_ls(cid) is False

    asyncio.run(run())


def test_restart_keeps_objects_gc_drops_unpinned(tmp_path: Path) -> None:
    kept, dropped = os.urandom(400_000), os.urandom(3000)
    with running_kubo(tmp_path) as (node, pid):

        async def put() -> tuple[str, str]:
            async with KuboClient(node.api_url) as c:
                return await c.add(kept), await c.add(dropped)

        kept_cid, dropped_cid = asyncio.run(put())
        assert node.stop(pid) is True
        assert not Path(f"/proc/{pid}").exists()  # gone and reaped

        pid2 = node.start(tmp_path / "kubo-daemon-2.log")
        try:

            async def check() -> None:
                async with KuboClient(node.api_url) as c:
                    assert await c.cat_bytes(kept_cid) == kept
                    assert await c.pin_ls(kept_cid) is True
                    assert await c.pin_rm(dropped_cid) is True
                    removed = await c.repo_gc()
                    assert dropped_cid in removed
                    with pytest.raises(KuboNotFound):
                        await c.block_get(dropped_cid)
                    assert await c.cat_bytes(kept_cid) == kept

            asyncio.run(check())
        finally:
            node.stop(pid2)


def test_connection_refused_is_store_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the port is closed now: nothing listens there

    async def run() -> None:
        async with KuboClient(f"http://127.0.0.1:{port}", timeout=5) as c:
            with pytest.raises(StoreUnavailable):
                await c.version()
            with pytest.raises(StoreUnavailable):
                await c.add(b"x")
            with pytest.raises(StoreUnavailable):
                await c.cat_bytes("bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq")

    asyncio.run(run())


def test_stop_does_not_kill_unrelated_pids(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with running_kubo(tmp_path / "a") as (node, pid):
            assert node.stop(sleeper.pid) is False
            assert sleeper.poll() is None
            # another repo's node refuses to stop this daemon
            other = KuboNode(tmp_path / "b" / "repo", binary=node.binary)
            assert other.stop(pid) is False
            assert node.owns(pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert node.stop(pid) is False  # already gone


def test_cat_of_object_with_a_lost_block_is_corrupt(kubo_api: str) -> None:
    data = os.urandom(3 * CHUNK + 10)

    async def run() -> None:
        async with KuboClient(kubo_api) as c:
            cid = await c.add(data)
            leaves = await c.refs(cid)
            assert await c.pin_rm(cid) is True
            async with httpx.AsyncClient() as raw:  # KuboClient has no block/rm: drop a leaf by hand
                resp = await raw.post(f"{kubo_api}/api/v0/block/rm", params={"arg": leaves[1]})
                assert resp.status_code == 200
            with pytest.raises(CorruptObject):
                await c.cat_bytes(cid)
            with pytest.raises(CorruptObject):
                await c.verify(cid, hashlib.sha256(data).digest())

    asyncio.run(run())
