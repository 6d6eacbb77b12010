"""DICOMweb multipart/related parsing and building (ledger.multipart)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable

import pytest

import ledger.multipart as mp
from ledger.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from ledger.multipart import (
    MultipartParser,
    Part,
    build_multipart_related,
    iter_multipart_related,
    parse_content_type,
    parse_multipart_related,
    parse_multipart_related_bytes,
    parse_related_content_type,
    validate_boundary,
)

DICOM = "application/dicom"


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def parse_split(body: bytes, boundary: str, size: int, **limits: int) -> list[Part]:
    async def run() -> list[Part]:
        return [p async for p in parse_multipart_related(_chunks(body, size), boundary, **limits)]

    return asyncio.run(run())


def _boundary_of(header: str) -> str:
    boundary, root = parse_related_content_type(header)
    assert root == DICOM
    return boundary


# ---- Content-Type -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "media_type", "params"),
    [
        (
            'multipart/related; type="application/dicom"; boundary=abc',
            "multipart/related",
            {"type": "application/dicom", "boundary": "abc"},
        ),
        (
            "Multipart/Related;TYPE=application/dicom;Boundary=abc",  # unquoted, any case
            "multipart/related",
            {"type": "application/dicom", "boundary": "abc"},
        ),
        (
            'multipart/related ; boundary = "a b\'()+_,-./:=?z" ; type="application/dicom"',
            "multipart/related",
            {"boundary": "a b'()+_,-./:=?z", "type": "application/dicom"},
        ),
        ('a/b; x="q\\"z\\\\"', "a/b", {"x": 'q"z\\'}),  # quoted-pairs unescaped
        ("application/dicom", "application/dicom", {}),
        ("a/b;", "a/b", {}),
        ("a/b;; c=d ;", "a/b", {"c": "d"}),
        ("a/b; boundary=====abc==", "a/b", {"boundary": "====abc=="}),
    ],
)
def test_parse_content_type(header: str, media_type: str, params: dict[str, str]) -> None:
    assert parse_content_type(header) == (media_type, params)


@pytest.mark.parametrize(
    "header",
    ["", "multipart", "a/b x", "a/b; c", 'a/b; c="x', "a/b; c=1; C=2", "a/b; c=x y", "/b"],
)
def test_parse_content_type_rejects(header: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_content_type(header)


def test_parse_related_content_type() -> None:
    header = 'multipart/related; type="application/DICOM"; boundary="x y"'
    assert parse_related_content_type(header) == ("x y", "application/dicom")
    assert parse_related_content_type("multipart/related; boundary=b") == ("b", None)
    for bad in (
        "multipart/mixed; boundary=b",
        "multipart/related; type=application/dicom",
        'multipart/related; boundary="ends with space "',
        "multipart/related; boundary=" + "b" * 201,
    ):
        with pytest.raises(UnsupportedMediaType):
            parse_related_content_type(bad)


@pytest.mark.parametrize(
    ("boundary", "ok"),
    [
        ("b", True),
        ("x" * 70, True),
        ("x" * 73, True),  # Orthanc 1.7's DICOMweb plugin sends 73
        ("x" * 200, True),
        ("x" * 201, False),
        ("", False),
        ("0123456789abcXYZ'()+_,-./:=? end", True),  # every bchar class, inner space
        ("trailing ", False),
        ("semi;colon", False),
        ('quo"te', False),
        ("tab\there", False),
        ("non-ascii-é", False),
    ],
)
def test_validate_boundary(boundary: str, ok: bool) -> None:
    if ok:
        assert validate_boundary(boundary) == boundary
    else:
        with pytest.raises(InvalidInput):
            validate_boundary(boundary)


# ---- round trips ----------------------------------------------------------------------------
PAYLOADS = [
    b"\x00\x01DICM\r\n--\r\n\r\n",
    b"",
    b"plain",
    bytes(range(256)),
    b"\r\n--Med\r\n--MedLedger-\r\n",
]


def _parts(n: int) -> list[tuple[dict[str, str], bytes]]:
    return [
        ({"Content-Location": f"/studies/1/instances/{i}"}, PAYLOADS[i % len(PAYLOADS)] * (i + 1))
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_round_trip_every_split(n: int) -> None:
    parts = _parts(n)
    body, header = build_multipart_related(parts, DICOM)
    boundary = _boundary_of(header)
    assert all(boundary.encode() not in data for _, data in parts)
    expected = [
        Part(
            headers={"content-type": DICOM, "content-location": h["Content-Location"]},
            data=d,
        )
        for h, d in parts
    ]
    assert parse_multipart_related_bytes(body, boundary) == expected
    for size in range(1, 18):
        assert parse_split(body, boundary, size) == expected, f"split {size}"


def test_streaming_builder_matches() -> None:
    parts = _parts(4)
    header, chunks = iter_multipart_related(iter(parts), DICOM)
    body = b"".join(chunks)
    got = parse_multipart_related_bytes(body, _boundary_of(header))
    assert [p.data for p in got] == [d for _, d in parts]
    # a given boundary is used as is
    header, chunks = iter_multipart_related(parts, DICOM, boundary="fixed")
    assert header.endswith("boundary=fixed")
    assert b"".join(chunks).startswith(b"--fixed\r\nContent-Type: application/dicom\r\n")


def test_streaming_builder_refuses_colliding_part() -> None:
    _, chunks = iter_multipart_related([({}, b"a--fixed-b")], DICOM, boundary="fixed")
    with pytest.raises(ValueError, match="boundary"):
        b"".join(chunks)


def test_builder_rerolls_a_colliding_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"\r\n--MedLedger-aaaa\r\n"
    rolls: Iterable[str] = iter(["MedLedger-aaaa", "MedLedger-bbbb"])
    monkeypatch.setattr(mp, "new_boundary", lambda: next(iter(rolls)))  # type: ignore[arg-type]
    body, header = build_multipart_related([({}, data)], DICOM)
    assert header.endswith("boundary=MedLedger-bbbb")
    assert parse_multipart_related_bytes(body, "MedLedger-bbbb")[0].data == data


def test_builder_refuses_header_injection() -> None:
    with pytest.raises(ValueError):
        build_multipart_related([({"Content-Location": "x\r\nX-Evil: 1"}, b"")], DICOM)
    with pytest.raises(ValueError):
        build_multipart_related([({"Bad Name": "x"}, b"")], DICOM)
    with pytest.raises(ValueError):
        build_multipart_related([], DICOM)


def test_builder_keeps_explicit_content_type() -> None:
    body, header = build_multipart_related(
        [({"Content-Type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"}, b"x")],
        DICOM,
    )
    part = parse_multipart_related_bytes(body, _boundary_of(header))[0]
    assert part.content_type == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"


# ---- hand-written bodies ---------------------------------------------------------------------
B = "boundary"


def parse_all_splits(body: bytes, boundary: str = B, **limits: int) -> list[Part]:
    """Parse with every split size 1..17 and as one piece; all must agree."""
    whole = parse_multipart_related_bytes(body, boundary, **limits)
    for size in range(1, 18):
        assert parse_split(body, boundary, size, **limits) == whole, f"split {size}"
    return whole


def test_preamble_epilogue_padding_and_optional_headers() -> None:
    body = (
        b"This is the preamble. --boundary is not at a line start here.\r\n"
        b"--boundary \t\r\n"  # transport padding
        b"Content-Type: application/dicom\r\n"
        b"Content-ID: <a@b>\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello\r\n"
        b"--boundary\r\n"
        b"\r\n"  # a part without headers
        b"no headers\r\n"
        b"--boundary--  \r\n"
        b"epilogue, ignored\r\n--boundary\r\n"
    )
    parts = parse_all_splits(body)
    assert parts == [
        Part(
            headers={
                "content-type": "application/dicom",
                "content-id": "<a@b>",
                "content-length": "5",
            },
            data=b"hello",
        ),
        Part(headers={}, data=b"no headers"),
    ]


def test_boundary_prefix_inside_data_is_not_a_split() -> None:
    data = b"A\r\n--boundar\r\n--boundar-y\r\n-boundary\r\n--boundar"
    body = b"--boundary\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--boundary--"
    assert [p.data for p in parse_all_splits(body)] == [data]


def test_boundary_inside_a_part_is_refused_not_guessed() -> None:
    body = b"--boundary\r\n\r\nA\r\n--boundaryX\r\nB\r\n--boundary--\r\n"
    with pytest.raises(InvalidInput):
        parse_multipart_related_bytes(body, B)


def test_folded_header_and_case() -> None:
    body = b"--boundary\r\nCONTENT-Location: /a\r\n  /b\r\n\r\nx\r\n--boundary--"
    assert parse_all_splits(body)[0].headers == {"content-location": "/a /b"}


def test_empty_final_part_and_no_epilogue() -> None:
    body = b"--boundary\r\n\r\n\r\n--boundary--"
    assert parse_all_splits(body) == [Part(headers={}, data=b"")]


@pytest.mark.parametrize(
    "body",
    [
        b"--boundary\r\n\r\ndata\r\n",  # no close delimiter
        b"--boundary\r\n\r\ndata",
        b"--boundary\r\nContent-Type: a/b\r\n",  # ends in the headers
        b"--boundary\r\n",
        b"--boundary",
        b"--boundary\r\n\r\ndata\r\n--boundary\r\n",  # a delimiter, not a close one
    ],
)
def test_missing_close_boundary(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="close delimiter"):
        parse_multipart_related_bytes(body, B)
    for size in (1, 3, 7):
        with pytest.raises(InvalidInput, match="close delimiter"):
            parse_split(body, B, size)


@pytest.mark.parametrize(
    "body",
    [b"", b"no boundary at all", b"-boundary\r\n\r\nx\r\n-boundary--", b"x--boundary\r\n\r\n"],
)
def test_missing_opening_boundary(body: bytes) -> None:
    with pytest.raises(InvalidInput, match="opening"):
        parse_multipart_related_bytes(body, B)


@pytest.mark.parametrize(
    "body",
    [
        b"--boundary\r\nNo colon here\r\n\r\nx\r\n--boundary--",
        b"--boundary\r\nBad Name: x\r\n\r\nx\r\n--boundary--",
        b"--boundary\r\n: empty name\r\n\r\nx\r\n--boundary--",
        b"--boundary\r\n folded-first: x\r\n\r\nx\r\n--boundary--",
        b"--boundary\r\nA: 1\nB: 2\r\n\r\nx\r\n--boundary--",  # bare LF
        b"--boundary\r\nA: 1\r\na: 2\r\n\r\nx\r\n--boundary--",  # repeated
        b"--boundary\r\nA: \xff\r\n\r\nx\r\n--boundary--",  # not UTF-8
        b"--boundary\nA: 1\n\nx\n--boundary--",  # LF line ends
        b"--boundary--\r\n",  # no body part at all
        b"preamble\r\n--boundary--",
        b"--boundary\r\nContent-Length: 3\r\n\r\nx\r\n--boundary--",  # wrong length
        b"--boundary\r\nContent-Length: x\r\n\r\nx\r\n--boundary--",
        b"--boundary\r\n\r\nx\r\n--boundary--garbage",
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_multipart_related_bytes(body, B)
    with pytest.raises(InvalidInput):
        parse_split(body, B, 1)


def test_part_too_big() -> None:
    body, header = build_multipart_related([({}, b"x" * 100), ({}, b"y" * 1000)], DICOM)
    boundary = _boundary_of(header)
    assert len(parse_multipart_related_bytes(body, boundary, max_part_size=1000)) == 2
    with pytest.raises(PayloadTooLarge):
        parse_multipart_related_bytes(body, boundary, max_part_size=999)
    for size in (1, 16, 4096):
        with pytest.raises(PayloadTooLarge):
            parse_split(body, boundary, size, max_part_size=999)


def test_part_too_big_stops_an_endless_stream() -> None:
    async def endless() -> AsyncIterator[bytes]:
        yield b"--boundary\r\n\r\n"
        for _ in itertools.count():
            yield b"z" * 4096

    async def run() -> None:
        async for _ in parse_multipart_related(endless(), B, max_part_size=100_000):
            pass

    with pytest.raises(PayloadTooLarge):
        asyncio.run(run())


def test_total_too_big() -> None:
    body, header = build_multipart_related([({}, b"x" * 500)] * 3, DICOM)
    boundary = _boundary_of(header)
    with pytest.raises(PayloadTooLarge):
        parse_split(body, boundary, 64, max_total=len(body) - 1)
    assert len(parse_split(body, boundary, 64, max_total=len(body))) == 3


def test_header_block_bounded() -> None:
    body = b"--boundary\r\nX: " + b"a" * 20_000 + b"\r\n\r\nx\r\n--boundary--"
    with pytest.raises(InvalidInput, match="headers exceed"):
        parse_multipart_related_bytes(body, B)


def test_parser_yields_parts_as_they_complete() -> None:
    parser = MultipartParser(B)
    assert parser.feed(b"--boundary\r\n\r\nfirst\r\n--bound") == []
    assert parser.feed(b"ary\r\n\r\nsecond") == [Part(headers={}, data=b"first")]
    assert parser.feed(b"\r\n--boundary--") == [Part(headers={}, data=b"second")]
    parser.close()
    assert parser.parts_seen == 2


def test_part_repr_hides_data() -> None:
    part = Part(headers={"content-type": DICOM}, data=b"Doe^Jane")
    assert "Doe" not in repr(part) and "8 bytes" in repr(part)
