"""Async client for the Kubo (go-ipfs) RPC API, where MedLedger keeps its encrypted DICOM objects.

Every Kubo RPC call is ``POST /api/v0/<command>?arg=...``. This module talks to it directly over
:class:`httpx.AsyncClient` instead of using ``ipfshttpclient``, because that library:

* is unmaintained since 2021;
* refuses to ``connect()`` to any Kubo newer than 0.8 (``VersionMismatch``);
* adds with ``raw-leaves=False`` by default (dag-pb leaves, CIDv0), not the CIDv1 raw leaves we
  want so that a leaf's CID is the hash of exactly its bytes;
* builds upload bodies in memory, where we stream multi-megabyte objects;
* is synchronous, where the gateway is asyncio.

Uploads are ``multipart/form-data`` bodies produced by :func:`multipart_body`, which streams the
object from an async iterator without buffering it. Reads (:meth:`KuboClient.cat`) stream too.

Errors: a connection failure or timeout is :class:`~ledger.errors.StoreUnavailable`; Kubo's error
JSON (``{"Message": ..., "Code": ...}``) becomes :class:`KuboNotFound` (a
:class:`~ledger.errors.NotFound`) for missing blocks/paths, else :class:`KuboError` (a
:class:`~ledger.errors.StoreUnavailable`), both carrying Kubo's message. A content check that
fails is :class:`~ledger.errors.CorruptObject`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import httpx

from ledger.errors import CorruptObject, NotFound, StoreUnavailable

__all__ = [
    "DEFAULT_TIMEOUT",
    "KuboClient",
    "KuboError",
    "KuboNotFound",
    "multipart_body",
    "multipart_content_type",
    "new_boundary",
]

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
DEFAULT_CHUNK = 256 * 1024

# The add parameters MedLedger always uses: CIDv1, raw leaves, sha2-256, pinned.
_ADD_PARAMS: dict[str, str] = {
    "cid-version": "1",
    "raw-leaves": "true",
    "hash": "sha2-256",
    "quieter": "true",
}
_NOT_FOUND_RE = re.compile(r"not found|could not find|no link named|does not exist", re.IGNORECASE)
_NOT_PINNED_RE = re.compile(r"not pinned", re.IGNORECASE)

Data = bytes | AsyncIterable[bytes]


class KuboError(StoreUnavailable):
    """Kubo answered with an error. ``kubo_message``/``kubo_code``/``status`` are Kubo's."""

    code = "store_error"

    def __init__(self, message: str, *, status: int = 0, kubo_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kubo_message = message
        self.kubo_code = kubo_code


class KuboNotFound(NotFound):
    """Kubo has no such block/path (in offline mode: not in the local blockstore)."""

    code = "object_not_found"

    def __init__(self, message: str, *, status: int = 0, kubo_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kubo_message = message
        self.kubo_code = kubo_code


# ---- streaming multipart/form-data ----------------------------------------------------------
def new_boundary() -> str:
    """A random multipart boundary (128 bits: a collision with the body is not a concern)."""
    return "medledger-" + secrets.token_hex(16)


def multipart_content_type(boundary: str) -> str:
    return f"multipart/form-data; boundary={boundary}"


async def _as_chunks(data: Data) -> AsyncIterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        if data:
            yield bytes(data)
        return
    async for chunk in data:
        if chunk:
            yield bytes(chunk)


async def multipart_body(
    data: Data,
    boundary: str,
    *,
    field: str = "file",
    filename: str = "blob",
    content_type: str = "application/octet-stream",
) -> AsyncIterator[bytes]:
    """Yield a one-part ``multipart/form-data`` body carrying ``data``, chunk by chunk.

    The object is passed through as it arrives from ``data``; nothing is buffered but the
    small part header and closing delimiter.
    """
    for name, value in (("field", field), ("filename", filename), ("content_type", content_type)):
        if any(c in value for c in '"\r\n'):
            raise ValueError(f"multipart {name} must not contain quotes or newlines")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n"
        "\r\n"
    )
    yield head.encode("ascii")
    async for chunk in _as_chunks(data):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode("ascii")


# ---- client ---------------------------------------------------------------------------------
def _raise_for_kubo(status: int, body: bytes) -> None:
    """Turn a Kubo error response into KuboNotFound / KuboError."""
    message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    kubo_code: int | None = None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "Message" in doc:
        message = str(doc["Message"])
        raw_code = doc.get("Code")
        kubo_code = raw_code if isinstance(raw_code, int) else None
        if _NOT_FOUND_RE.search(message):
            raise KuboNotFound(f"Kubo: {message}", status=status, kubo_code=kubo_code)
    raise KuboError(f"Kubo: {message}", status=status, kubo_code=kubo_code)


def _ndjson(body: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in body.splitlines():
        line = line.strip()
        if line:
            doc = json.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out


class KuboClient:
    """Async Kubo RPC client. ``async with KuboClient("http://127.0.0.1:5001") as kubo: ...``.

    ``offline=True`` adds Kubo's ``offline=true`` option to every call, so a block that is not in
    the local blockstore fails at once instead of being searched for on the network.
    """

    def __init__(
        self,
        api_url: str,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        offline: bool = False,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.offline = offline
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    # ---- plumbing -------------------------------------------------------------------------
    def _url(self, command: str) -> str:
        return f"{self.api_url}/api/v0/{command}"

    def _params(self, params: Mapping[str, str] | None) -> dict[str, str]:
        out = dict(params or {})
        if self.offline:
            out["offline"] = "true"
        return out

    @asynccontextmanager
    async def _stream(
        self,
        command: str,
        params: Mapping[str, str] | None = None,
        *,
        content: AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """POST ``command``; yield the (unread) 200 response; map every failure to our errors."""
        try:
            async with self._client.stream(
                "POST", self._url(command), params=self._params(params), content=content, headers=headers
            ) as resp:
                if resp.status_code != 200:
                    _raise_for_kubo(resp.status_code, await resp.aread())
                yield resp
        except httpx.TimeoutException as exc:
            raise StoreUnavailable(f"Kubo at {self.api_url} timed out ({command})") from exc
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise StoreUnavailable(f"Kubo at {self.api_url} is unreachable ({command}): {exc}") from exc

    async def _call(
        self,
        command: str,
        params: Mapping[str, str] | None = None,
        *,
        content: AsyncIterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        async with self._stream(command, params, content=content, headers=headers) as resp:
            return await resp.aread()

    async def _call_json(self, command: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        body = await self._call(command, params)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise KuboError(f"Kubo: {command} returned non-JSON") from exc
        if not isinstance(doc, dict):
            raise KuboError(f"Kubo: {command} returned unexpected JSON")
        return doc

    # ---- objects --------------------------------------------------------------------------
    async def _add(self, data: Data, extra: Mapping[str, str]) -> str:
        boundary = new_boundary()
        body = await self._call(
            "add",
            {**_ADD_PARAMS, **extra},
            content=multipart_body(data, boundary),
            headers={"Content-Type": multipart_content_type(boundary)},
        )
        try:
            docs = _ndjson(body)
        except ValueError as exc:
            raise KuboError("Kubo: add returned non-JSON") from exc
        for doc in reversed(docs):
            if doc.get("Hash"):
                return str(doc["Hash"])
            if doc.get("Message"):
                raise KuboError(f"Kubo: {doc['Message']}")
        raise KuboError("Kubo: add returned no CID (the upload may have been cut off)")

    async def add(self, data: Data) -> str:
        """Store ``data`` (bytes or an async iterator of chunks, streamed); pin it; return its CIDv1.

        The CID is base32 CIDv1 with raw leaves: ``bafk...`` (raw codec) for an object that fits
        in one chunk (<= 256 KiB), ``bafy...`` (dag-pb root over raw leaves) for a larger one.
        """
        return await self._add(data, {"pin": "true"})

    async def compute_cid(self, data: Data) -> str:
        """The CID :meth:`add` would give ``data``, without storing it (``only-hash``)."""
        return await self._add(data, {"only-hash": "true", "pin": "false"})

    async def cat(self, cid: str, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[bytes]:
        """Stream the object's bytes.

        Raises :class:`KuboNotFound` if the root is missing, and :class:`CorruptObject` if the
        stream ends before the size Kubo announced (a block is missing or unreadable).
        """
        async with self._stream("cat", {"arg": cid}) as resp:
            announced = resp.headers.get("X-Content-Length")
            seen = 0
            async for chunk in resp.aiter_bytes(chunk_size):
                seen += len(chunk)
                yield chunk
            if announced is not None and announced.isdigit() and seen != int(announced):
                raise CorruptObject(f"object {cid} was cut off at {seen} of {announced} bytes")

    async def cat_bytes(self, cid: str) -> bytes:
        return b"".join([chunk async for chunk in self.cat(cid)])

    async def verify(self, cid: str, expected_sha256: bytes) -> None:
        """Re-read the object (streaming) and check its SHA-256; :class:`CorruptObject` if it differs."""
        digest = hashlib.sha256()
        async for chunk in self.cat(cid):
            digest.update(chunk)
        if not hmac.compare_digest(digest.digest(), expected_sha256):
            raise CorruptObject(f"object {cid} failed its SHA-256 check")

    async def block_get(self, cid: str) -> bytes:
        """The raw bytes of one block."""
        return await self._call("block/get", {"arg": cid})

    async def refs(self, cid: str, *, recursive: bool = True) -> list[str]:
        """CIDs of the blocks below ``cid`` (for a raw-leaves file: its ``bafk...`` leaves)."""
        params = {"arg": cid, "recursive": "true" if recursive else "false", "unique": "true"}
        return self._refs_of(await self._call("refs", params))

    async def refs_local(self) -> list[str]:
        """CIDs of every block in the local blockstore (for PHI scans).

        Kubo keys blocks by multihash, so every block is listed as a CIDv1 *raw* (``bafk...``) CID,
        dag-pb roots included: compare by multihash, not by CID string, for non-raw blocks.
        """
        return self._refs_of(await self._call("refs/local"))

    @staticmethod
    def _refs_of(body: bytes) -> list[str]:
        out: list[str] = []
        for doc in _ndjson(body):
            if doc.get("Err"):
                raise KuboError(f"Kubo: {doc['Err']}")
            if doc.get("Ref"):
                out.append(str(doc["Ref"]))
        return out

    # ---- pins -----------------------------------------------------------------------------
    async def pin_ls(self, cid: str) -> bool:
        """True if ``cid`` is pinned recursively."""
        try:
            doc = await self._call_json("pin/ls", {"arg": cid, "type": "recursive"})
        except (KuboError, KuboNotFound) as exc:
            if _NOT_PINNED_RE.search(exc.kubo_message):
                return False
            raise
        keys = doc.get("Keys") or {}
        return isinstance(keys, dict) and len(keys) > 0

    async def pin_rm(self, cid: str) -> bool:
        """Unpin ``cid`` (its blocks go at the next :meth:`repo_gc`). False if it was not pinned."""
        try:
            await self._call("pin/rm", {"arg": cid})
        except (KuboError, KuboNotFound) as exc:
            if _NOT_PINNED_RE.search(exc.kubo_message):
                return False
            raise
        return True

    # ---- node -----------------------------------------------------------------------------
    async def version(self) -> str:
        doc = await self._call_json("version")
        return str(doc.get("Version", ""))

    async def repo_gc(self) -> list[str]:
        """Garbage-collect unpinned blocks; return the CIDs removed."""
        removed: list[str] = []
        for doc in _ndjson(await self._call("repo/gc")):
            if doc.get("Error"):
                raise KuboError(f"Kubo: {doc['Error']}")
            key = doc.get("Key")
            if isinstance(key, dict) and key.get("/"):
                removed.append(str(key["/"]))
        return removed
