"""DICOMweb ``multipart/related`` bodies (PS3.18 section 8.6, RFC 2387, RFC 2046 section 5.1).

Parsing is incremental: :class:`MultipartParser` is fed bytes in chunks of any size (a
delimiter may be split across chunks at any byte) and returns each body part once its closing
delimiter has been seen. :func:`parse_multipart_related` drives it from an async iterator of
chunks (the request body stream), :func:`parse_multipart_related_bytes` from one ``bytes``.

Grammar enforced (RFC 2046 5.1.1)::

    multipart-body := [preamble CRLF] dash-boundary transport-padding CRLF body-part
                      *encapsulation close-delimiter transport-padding [CRLF epilogue]
    encapsulation  := delimiter transport-padding CRLF body-part
    delimiter      := CRLF dash-boundary          dash-boundary := "--" boundary
    close-delimiter := delimiter "--"             transport-padding := *(SP / HTAB)
    body-part      := *(header-field CRLF) CRLF [octets]

So a delimiter is only recognised at the start of a line: ``CRLF--boundary`` followed by
``--`` or by optional padding and CRLF. Anything else after ``CRLF--boundary`` (the boundary
occurring inside a part, which RFC 2046 forbids) is rejected rather than guessed at, and a
shorter prefix such as ``--boundar`` inside the data is simply data. Bare LF line ends are not
accepted. Limits: each part's bytes are bounded by ``max_part_size`` and the whole body
(preamble and epilogue included) by ``max_total`` (:class:`~ledger.errors.PayloadTooLarge`);
each part's header block by ``max_header_size`` (:class:`~ledger.errors.InvalidInput`).

Errors: a malformed body (no opening delimiter, no close delimiter, bad header line, duplicate
header, Content-Length that disagrees with the part, no body part at all) raises
:class:`~ledger.errors.InvalidInput`; a malformed Content-Type header raises
:class:`~ledger.errors.UnsupportedMediaType`. Messages never quote part contents.

Building: :func:`build_multipart_related` and :func:`iter_multipart_related` use a random
128-bit boundary and check that it occurs in no part (headers or data).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from ledger.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_PART_SIZE",
    "DEFAULT_MAX_TOTAL",
    "MultipartParser",
    "Part",
    "aiter_multipart_related",
    "build_multipart_related",
    "iter_multipart_related",
    "new_boundary",
    "parse_content_type",
    "parse_multipart_related",
    "parse_multipart_related_bytes",
    "parse_related_content_type",
    "validate_boundary",
]

DEFAULT_MAX_PART_SIZE: Final = 512 * 1024 * 1024
DEFAULT_MAX_TOTAL: Final = 2 * 1024 * 1024 * 1024
DEFAULT_MAX_HEADER_SIZE: Final = 16 * 1024
_MAX_PADDING: Final = 1024

# ---- Content-Type (RFC 9110 8.3 / RFC 2045 5.1) -----------------------------------------
_TCHARS: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE_RE: Final = re.compile(rf"[ \t]*({_TCHARS})/({_TCHARS})[ \t]*")
# Unquoted values: a token, leniently extended with the other RFC 2046 bchars except space
# ("/", ":", "=", "?", "(", ")", ","), since clients send type=application/dicom unquoted.
_UNQUOTED: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z/:=?(),]+"
_PARAM_RE: Final = re.compile(
    rf"[ \t]*({_TCHARS})[ \t]*=[ \t]*(?:({_UNQUOTED})|\"((?:[^\"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*)\")[ \t]*"
)
_QUOTED_PAIR_RE: Final = re.compile(r"\\(.)")
# RFC 2046 5.1.1: bchars := bcharsnospace / " "
# RFC 2046 caps boundaries at 70 characters, but real senders exceed it (Orthanc 1.7's DICOMweb
# plugin sends 73); accept up to MAX_BOUNDARY so they interoperate, and never emit more than 70.
MAX_BOUNDARY: Final = 200
_BCHARS_RE: Final = re.compile(rf"[0-9A-Za-z'()+_,\-./:=? ]{{0,{MAX_BOUNDARY - 1}}}[0-9A-Za-z'()+_,\-./:=?]")


def parse_content_type(header: str) -> tuple[str, dict[str, str]]:
    """Parse a Content-Type value into (lowercased ``type/subtype``, parameters).

    Parameter names are lowercased; values are kept as sent (quoted-string unescaped).
    Accepts quoted and unquoted values, optional whitespace around ``;`` and ``=`` and empty
    parameters (``a/b;;c=d``). Raises :class:`UnsupportedMediaType` on a syntax error or a
    repeated parameter.
    """
    if not isinstance(header, str):
        raise UnsupportedMediaType("Content-Type must be a string")
    m = _MEDIA_TYPE_RE.match(header)
    if m is None:
        raise UnsupportedMediaType("malformed Content-Type: no type/subtype")
    media_type = f"{m.group(1)}/{m.group(2)}".lower()
    params: dict[str, str] = {}
    pos = m.end()
    while pos < len(header):
        if header[pos] != ";":
            raise UnsupportedMediaType(f"malformed Content-Type at character {pos}")
        pos += 1
        while pos < len(header) and header[pos] in " \t":
            pos += 1
        if pos == len(header) or header[pos] == ";":
            continue  # empty parameter, tolerated (RFC 9110 8.3.1 grammar allows it)
        pm = _PARAM_RE.match(header, pos)
        if pm is None:
            raise UnsupportedMediaType(f"malformed Content-Type parameter at character {pos}")
        name = pm.group(1).lower()
        value = pm.group(2) if pm.group(2) is not None else _QUOTED_PAIR_RE.sub(r"\1", pm.group(3))
        if name in params:
            raise UnsupportedMediaType(f"Content-Type parameter {name!r} repeated")
        params[name] = value
        pos = pm.end()
    return media_type, params


def validate_boundary(boundary: str) -> str:
    """Return ``boundary`` if it is an RFC 2046 boundary (bchars, not ending in a space; up to
    MAX_BOUNDARY long, more than RFC 2046's 70, for real senders), else raise :class:`InvalidInput`."""
    if not isinstance(boundary, str) or _BCHARS_RE.fullmatch(boundary) is None:
        raise InvalidInput(f"multipart boundary is not 1-{MAX_BOUNDARY} RFC 2046 characters")
    return boundary


def parse_related_content_type(header: str) -> tuple[str, str | None]:
    """For a request Content-Type: check it is ``multipart/related`` with a legal boundary and
    return (boundary, the ``type`` parameter lowercased or None)."""
    media_type, params = parse_content_type(header)
    if media_type != "multipart/related":
        raise UnsupportedMediaType("Content-Type must be multipart/related")
    boundary = params.get("boundary")
    if boundary is None:
        raise UnsupportedMediaType("multipart/related without a boundary parameter")
    try:
        validate_boundary(boundary)
    except InvalidInput:
        raise UnsupportedMediaType("multipart boundary is not 1-70 RFC 2046 characters") from None
    root_type = params.get("type")
    return boundary, root_type.lower() if root_type is not None else None


# ---- parsing --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Part:
    """One body part: header names lowercased, values as sent; ``data`` its bytes."""

    headers: dict[str, str]
    data: bytes

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    def __repr__(self) -> str:  # data may be PHI: show its size only
        return f"Part(headers={self.headers!r}, data=<{len(self.data)} bytes>)"


_HEADER_NAME_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_PREAMBLE, _AFTER_DELIM, _HEADERS, _BODY, _AFTER_CLOSE, _EPILOGUE = range(6)


class MultipartParser:
    """Incremental multipart/related parser; see the module docstring for the grammar.

    ``feed`` returns the parts completed by a chunk; ``close`` checks the body ended properly.
    Memory is bounded by the largest part plus the delimiter length (preamble and epilogue
    are discarded as they arrive).
    """

    def __init__(
        self,
        boundary: str,
        *,
        max_part_size: int = DEFAULT_MAX_PART_SIZE,
        max_total: int = DEFAULT_MAX_TOTAL,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    ) -> None:
        validate_boundary(boundary)
        self._delim = b"\r\n--" + boundary.encode("ascii")
        self._max_part_size = max_part_size
        self._max_total = max_total
        self._max_header_size = max_header_size
        # A virtual CRLF lets the first dash-boundary (at the very start, no preamble) match
        # the same "CRLF--boundary" pattern as every later delimiter.
        self._buf = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self._scan = 0
        self._total = 0
        self._parts = 0
        self._headers: dict[str, str] = {}
        self._closed = False

    @property
    def parts_seen(self) -> int:
        return self._parts

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Part]:
        if self._closed:
            raise RuntimeError("feed() after close()")
        self._total += len(chunk)
        if self._total > self._max_total:
            raise PayloadTooLarge(f"multipart body exceeds {self._max_total} bytes")
        if self._state == _EPILOGUE:
            return []
        self._buf += chunk
        out: list[Part] = []
        while self._step(out):
            pass
        return out

    def close(self) -> None:
        """Signal the end of the body; raise :class:`InvalidInput` if it was incomplete."""
        if self._closed:
            return
        self._closed = True
        if self._state == _EPILOGUE:
            return
        if self._state == _AFTER_CLOSE:
            if not self._buf.strip(b" \t"):
                return
            raise InvalidInput("malformed bytes after the close delimiter")
        if self._state == _PREAMBLE:
            raise InvalidInput("multipart body has no opening boundary delimiter")
        raise InvalidInput("multipart body ends without its close delimiter")

    # One state transition; True if progress was made (call again), False if more input is
    # needed.
    def _step(self, out: list[Part]) -> bool:
        buf = self._buf
        delim = self._delim
        if self._state == _PREAMBLE:
            idx = buf.find(delim, self._scan)
            if idx < 0:
                keep = len(delim) - 1
                if len(buf) > keep:
                    del buf[: len(buf) - keep]
                self._scan = 0
                return False
            del buf[: idx + len(delim)]
            self._state = _AFTER_DELIM
            return True

        if self._state == _AFTER_DELIM:
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                if self._parts == 0:
                    raise InvalidInput("multipart body has no body part")
                del buf[:2]
                self._state = _AFTER_CLOSE
                return True
            i = 0
            while i < len(buf) and buf[i] in b" \t":
                i += 1
            if i > _MAX_PADDING:
                raise InvalidInput("too much transport padding after a boundary delimiter")
            if len(buf) < i + 2:
                return False
            if buf[i : i + 2] != b"\r\n":
                raise InvalidInput(
                    "boundary delimiter followed by unexpected bytes (boundary inside a part?)"
                )
            del buf[: i + 2]
            self._state = _HEADERS
            return True

        if self._state == _HEADERS:
            if len(buf) < 2:
                return False
            if buf[:2] == b"\r\n":
                self._headers = {}
                del buf[:2]
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self._max_header_size:
                        raise InvalidInput(f"part headers exceed {self._max_header_size} bytes")
                    return False
                if end > self._max_header_size:
                    raise InvalidInput(f"part headers exceed {self._max_header_size} bytes")
                self._headers = _parse_headers(bytes(buf[:end]))
                del buf[: end + 4]
            self._state = _BODY
            self._scan = 0
            return True

        if self._state == _BODY:
            idx = buf.find(delim, self._scan)
            if idx < 0:
                self._scan = max(0, len(buf) - len(delim) + 1)
                if self._scan > self._max_part_size:
                    raise PayloadTooLarge(f"a multipart part exceeds {self._max_part_size} bytes")
                return False
            if idx > self._max_part_size:
                raise PayloadTooLarge(f"a multipart part exceeds {self._max_part_size} bytes")
            data = bytes(buf[:idx])
            del buf[: idx + len(delim)]
            headers = self._headers
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) != len(data)):
                raise InvalidInput("part Content-Length does not match the part's size")
            out.append(Part(headers=headers, data=data))
            self._parts += 1
            self._headers = {}
            self._state = _AFTER_DELIM
            return True

        if self._state == _AFTER_CLOSE:
            i = 0
            while i < len(buf) and buf[i] in b" \t":
                i += 1
            if i > _MAX_PADDING:
                raise InvalidInput("too much transport padding after the close delimiter")
            if len(buf) < i + 2:
                if len(buf) == i + 1 and buf[i : i + 1] != b"\r":
                    raise InvalidInput("malformed bytes after the close delimiter")
                return False
            if buf[i : i + 2] != b"\r\n":
                raise InvalidInput("malformed bytes after the close delimiter")
            buf.clear()
            self._state = _EPILOGUE
            return False

        buf.clear()  # _EPILOGUE: discarded
        return False


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for line in block.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            raise InvalidInput("bad part header line (stray CR, LF or NUL)")
        if line[:1] in (b" ", b"\t"):  # RFC 5322 folding: continuation of the previous field
            if last is None:
                raise InvalidInput("bad part header line (continuation without a field)")
            continuation = _decode_header(line.strip(b" \t"))
            headers[last] = f"{headers[last]} {continuation}".strip()
            continue
        name, sep, value = line.partition(b":")
        if not sep or _HEADER_NAME_RE.fullmatch(name) is None:
            raise InvalidInput("bad part header line (expected 'Name: value')")
        key = name.decode("ascii").lower()
        if key in headers:
            raise InvalidInput(f"part header {key!r} repeated")
        headers[key] = _decode_header(value.strip(b" \t"))
        last = key
    return headers


def _decode_header(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("part header value is not UTF-8") from None


async def parse_multipart_related(
    chunks: AsyncIterator[bytes] | AsyncIterable[bytes],
    boundary: str,
    *,
    max_part_size: int = DEFAULT_MAX_PART_SIZE,
    max_total: int = DEFAULT_MAX_TOTAL,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
) -> AsyncIterator[Part]:
    """Yield the parts of a multipart/related body arriving as ``chunks`` (any split)."""
    parser = MultipartParser(
        boundary,
        max_part_size=max_part_size,
        max_total=max_total,
        max_header_size=max_header_size,
    )
    async for chunk in chunks:
        for part in parser.feed(chunk):
            yield part
    parser.close()


def parse_multipart_related_bytes(
    body: bytes,
    boundary: str,
    *,
    max_part_size: int = DEFAULT_MAX_PART_SIZE,
    max_total: int = DEFAULT_MAX_TOTAL,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
) -> list[Part]:
    """All parts of a complete multipart/related body held in memory."""
    parser = MultipartParser(
        boundary,
        max_part_size=max_part_size,
        max_total=max_total,
        max_header_size=max_header_size,
    )
    parts = parser.feed(body)
    parser.close()
    return parts


# ---- building -------------------------------------------------------------------------------
def new_boundary() -> str:
    """A fresh random boundary (128 bits; token characters, so it needs no quoting)."""
    return f"MedLedger-{secrets.token_hex(16)}"


def _header_block(headers: Mapping[str, str], default_type: str) -> bytes:
    lines: list[bytes] = []
    names: set[str] = set()
    for name, value in headers.items():
        if _HEADER_NAME_RE.fullmatch(name.encode("ascii", errors="replace")) is None:
            raise ValueError("invalid part header name")
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"part header {name!r} contains CR, LF or NUL")
        if name.lower() in names:
            raise ValueError(f"part header {name!r} repeated")
        names.add(name.lower())
        lines.append(f"{name}: {value}".encode())
    if "content-type" not in names:
        lines.insert(0, f"Content-Type: {default_type}".encode())
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def _header_value(content_type: str, boundary: str) -> str:
    parse_content_type(content_type)  # a syntactically valid media type (raises otherwise)
    escaped = content_type.replace("\\", "\\\\").replace('"', '\\"')
    return f'multipart/related; type="{escaped}"; boundary={boundary}'


def build_multipart_related(
    parts: Iterable[tuple[Mapping[str, str], bytes]], content_type: str
) -> tuple[bytes, str]:
    """Return (body, Content-Type header value) for ``parts`` of root type ``content_type``.

    Each part is (headers, data); a part without a Content-Type header gets ``content_type``.
    The boundary is random and checked to occur in no part's headers or data.
    """
    blocks = [(_header_block(headers, content_type), bytes(data)) for headers, data in parts]
    if not blocks:
        raise ValueError("a multipart/related body needs at least one part")
    while True:
        boundary = new_boundary()
        token = boundary.encode("ascii")
        if not any(token in head or token in data for head, data in blocks):
            break
    header = _header_value(content_type, boundary)
    dash = b"--" + token
    out = bytearray()
    for head, data in blocks:
        out += dash + b"\r\n" + head + data + b"\r\n"
    out += dash + b"--\r\n"
    return bytes(out), header


def iter_multipart_related(
    parts: Iterable[tuple[Mapping[str, str], bytes]],
    content_type: str,
    *,
    boundary: str | None = None,
) -> tuple[str, Iterator[bytes]]:
    """Streaming variant: return (Content-Type header value, iterator of body chunks).

    ``parts`` is consumed lazily (e.g. objects fetched one at a time). The boundary is chosen
    before the parts are seen, so each part is checked as it comes; one that contains the
    boundary (a 2**-128 chance for a random boundary) raises ``ValueError`` mid-stream rather
    than producing an ambiguous body.
    """
    chosen = validate_boundary(boundary) if boundary is not None else new_boundary()
    header = _header_value(content_type, chosen)
    token = chosen.encode("ascii")

    def chunks() -> Iterator[bytes]:
        dash = b"--" + token
        count = 0
        for headers, data in parts:
            head = _header_block(headers, content_type)
            if token in head or token in data:
                raise ValueError("multipart boundary occurs inside a part")
            yield dash + b"\r\n" + head
            yield bytes(data)
            yield b"\r\n"
            count += 1
        if count == 0:
            raise ValueError("a multipart/related body needs at least one part")
        yield dash + b"--\r\n"

    return header, chunks()


def aiter_multipart_related(
    parts: Iterable[tuple[Mapping[str, str], int, AsyncIterable[bytes]]],
    content_type: str,
    *,
    boundary: str | None = None,
) -> tuple[str, int, AsyncIterator[bytes]]:
    """Async streaming variant for parts whose sizes are known in advance (e.g. stored objects).

    ``parts`` are (headers, size, async chunks). Returns (Content-Type header value, exact body
    length, async iterator of body chunks); the body is byte-for-byte the framing of
    :func:`build_multipart_related`. Each part's data is scanned for the boundary as it streams
    (across chunk edges too); a part that contains it, or whose data is not exactly ``size``
    bytes, raises ``ValueError`` mid-stream (the body is then cut short of its length).
    """
    chosen = validate_boundary(boundary) if boundary is not None else new_boundary()
    header = _header_value(content_type, chosen)
    token = chosen.encode("ascii")
    dash = b"--" + token
    framed = [(_header_block(headers, content_type), size, data) for headers, size, data in parts]
    if not framed:
        raise ValueError("a multipart/related body needs at least one part")
    for head, _, _ in framed:
        if token in head:
            raise ValueError("multipart boundary occurs inside a part")
    length = sum(len(dash) + 2 + len(head) + size + 2 for head, size, _ in framed) + len(dash) + 4

    async def chunks() -> AsyncIterator[bytes]:
        keep = len(token) - 1
        for head, size, data in framed:
            yield dash + b"\r\n" + head
            tail = b""
            seen = 0
            async for chunk in data:
                seen += len(chunk)
                if seen > size:
                    raise ValueError("a multipart part is longer than announced")
                if token in chunk or token in tail + chunk[:keep]:
                    raise ValueError("multipart boundary occurs inside a part")
                tail = (tail + chunk[-keep:])[-keep:]
                yield chunk
            if seen != size:
                raise ValueError("a multipart part is shorter than announced")
            yield b"\r\n"
        yield dash + b"--\r\n"

    return header, length, chunks()
