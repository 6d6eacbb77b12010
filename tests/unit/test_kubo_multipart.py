"""The streaming multipart/form-data body that KuboClient.add sends."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import os
from collections.abc import AsyncIterator

import pytest

from ledger.ipfs import multipart_body, multipart_content_type, new_boundary


async def _collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


async def _agen(data: bytes, step: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), step):
        yield data[i : i + step]


def _parse(boundary: str, body: bytes) -> list[email.message.Message]:
    head = f"Content-Type: {multipart_content_type(boundary)}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    assert msg.is_multipart()
    return list(msg.iter_parts())


@pytest.mark.parametrize("size", [0, 1, 1000, 300_000])
def test_email_parser_splits_back_to_the_original_bytes(size: int) -> None:
    data = os.urandom(size) + b"\r\n--\r\n\r\n\n\r--"  # line breaks and dashes inside the payload
    boundary = new_boundary()
    body = b"".join(asyncio.run(_collect(multipart_body(_agen(data, 7777), boundary))))
    (part,) = _parse(boundary, body)
    assert part.get_payload(decode=True) == data
    assert part.get_filename() == "blob"
    assert part.get_param("name", header="content-disposition") == "file"
    assert part.get_content_type() == "application/octet-stream"


def test_simple_parse_and_bytes_input() -> None:
    data = os.urandom(50_000)
    boundary = new_boundary()
    body = b"".join(asyncio.run(_collect(multipart_body(data, boundary, filename="x.dcm.enc"))))
    delim = f"--{boundary}".encode()
    assert body.startswith(delim + b"\r\n")
    assert body.endswith(b"\r\n" + delim + b"--\r\n")
    head, sep, rest = body.partition(b"\r\n\r\n")
    assert sep and b'filename="x.dcm.enc"' in head
    assert rest[: -len(b"\r\n" + delim + b"--\r\n")] == data


def test_body_is_streamed_not_buffered() -> None:
    """Each source chunk is passed on before the next one is pulled from the source."""
    pulled: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        for i in range(5):
            pulled.append(i)
            yield bytes([i]) * 10

    async def run() -> list[tuple[int, bytes]]:
        seen: list[tuple[int, bytes]] = []
        async for chunk in multipart_body(source(), new_boundary()):
            seen.append((len(pulled), chunk))
        return seen

    seen = asyncio.run(run())
    assert seen[0][0] == 0  # the part header goes out before the source is touched
    assert [(n, c) for n, c in seen[1:-1]] == [(i + 1, bytes([i]) * 10) for i in range(5)]


def test_rejects_header_injection() -> None:
    with pytest.raises(ValueError):
        asyncio.run(_collect(multipart_body(b"x", new_boundary(), filename='a"\r\nX: y')))


def test_boundaries_are_random() -> None:
    assert new_boundary() != new_boundary()
