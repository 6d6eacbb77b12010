"""Streamed authenticated encryption of stored objects, and wrapping of their data keys.

Every DICOM object gets a fresh 256-bit data key (:func:`new_data_key`) and is encrypted with
AES-256-GCM in the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár ("Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), the construction
used by age and Tink: the plaintext is cut into fixed-size segments and every segment is sealed
on its own, with its position and a last-segment flag in the nonce. Memory use is bounded by one
segment (plus the caller's input chunk) whatever the object size, and truncation, reordering,
duplication and extension of segments are all detected.

Encrypted object format, version 1 (all integers big-endian)::

    object  = header || segment_0 || segment_1 || ... || segment_{n-1}      (n >= 1)
    header  = magic || version || segment_size || nonce_prefix              (16 bytes)
        magic         4 bytes   b"MLE1"
        version       1 byte    0x01
        segment_size  4 bytes   u32, plaintext bytes per segment, 1 <= size <= 16 MiB
                                (default 65536)
        nonce_prefix  7 bytes   random, fresh per object
    segment_i = AES-256-GCM-Seal(key = data key,
                                 nonce = nonce_prefix || u32(i) || last_i,      (12 bytes)
                                 plaintext = P_i,
                                 aad = header || aad)
              = ciphertext(P_i) || tag                                       (|P_i| + 16 bytes)
        last_i        1 byte    0x01 if i = n - 1, else 0x00
        aad           the caller-supplied associated data (e.g. the object ref); it is not
                      stored in the object and must be supplied again to decrypt. The header is
                      fixed-length, so ``header || aad`` is unambiguous.

The plaintext P is split as P = P_0 || ... || P_{n-1}, where every segment but the last holds
exactly ``segment_size`` bytes and the last holds 1..``segment_size`` bytes, except when P is
empty: then n = 1 and P_0 is empty. The split is therefore a function of |P| alone, an object is
``16 + |P| + 16 * max(1, ceil(|P| / segment_size))`` bytes long (:func:`ciphertext_size`), and
at most 2**32 segments are allowed. A reader knows a segment is the last one because the stream
ends after it; it must then verify it with ``last = 0x01``, so a stream cut at a segment
boundary, a dropped or appended segment, or trailing bytes all fail the tag check.

Decryption yields each segment's plaintext only after that segment's tag has verified. An object
is valid only if the whole stream is consumed without error: a consumer that forwards plaintext
as it arrives must treat a :class:`~ledger.errors.CorruptObject` raised part way as failure of
the whole object (truncation is by construction detected only at the end).

Data-key wrapping (:func:`wrap_key`, version 1)::

    wrapped = 0x01 || nonce || AES-256-GCM-Seal(kek, nonce, data_key, b"MLKW\\x01" || aad)
        nonce   12 random bytes; wrapped is 1 + 12 + 32 + 16 = 61 bytes

Binding ``aad`` (the object ref, and the KEK id if wanted) means a wrapped key copied onto
another object's record does not unwrap.

All errors about the data (bad header, bad tag, truncation, trailing bytes) are
:class:`~ledger.errors.CorruptObject` with PHI-free messages; misuse by the caller (a key of the
wrong length, an invalid segment size) is ``ValueError``.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.errors import CorruptObject

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAGIC",
    "MAX_SEGMENT_SIZE",
    "TAG_SIZE",
    "WRAPPED_KEY_SIZE",
    "adecrypt_stream",
    "aencrypt_stream",
    "ciphertext_size",
    "decrypt_bytes",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_stream",
    "new_data_key",
    "unwrap_key",
    "wrap_key",
]

MAGIC = b"MLE1"
FORMAT_VERSION = 1
KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
DEFAULT_SEGMENT_SIZE = 64 * 1024
MIN_SEGMENT_SIZE = 1
MAX_SEGMENT_SIZE = 16 * 1024 * 1024
MAX_SEGMENTS = 2**32

_HEADER = struct.Struct(">4sBI7s")
HEADER_SIZE = _HEADER.size  # 16

_WRAP_VERSION = 1
_WRAP_AAD_PREFIX = b"MLKW\x01"
_WRAP_NONCE_SIZE = 12
WRAPPED_KEY_SIZE = 1 + _WRAP_NONCE_SIZE + KEY_SIZE + TAG_SIZE  # 61

_Chunk = bytes | bytearray | memoryview


# ---- keys -----------------------------------------------------------------------------------
def new_data_key() -> bytes:
    """A fresh random 256-bit data key (one per object; never reuse it for another object)."""
    return secrets.token_bytes(KEY_SIZE)


def _check_key(key: bytes, what: str = "key") -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes")


def _check_segment_size(segment_size: int) -> None:
    if not isinstance(segment_size, int) or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be an int in [{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}]")


def ciphertext_size(plain_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Exact size of the encrypted object for a plaintext of ``plain_size`` bytes."""
    if plain_size < 0:
        raise ValueError("plain_size must be >= 0")
    _check_segment_size(segment_size)
    segments = max(1, -(-plain_size // segment_size))
    return HEADER_SIZE + plain_size + segments * TAG_SIZE


# ---- framing --------------------------------------------------------------------------------
class _Framer:
    """Cuts a byte stream into frames of ``size`` bytes, holding the current frame back until at
    least one more byte is known to follow it; :meth:`finish` returns the rest (0..size bytes).

    Input chunks are sliced through a memoryview, so a large chunk is not copied into the buffer
    as a whole: at most ``size`` bytes are ever buffered.
    """

    __slots__ = ("_buf", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._buf = bytearray()

    def feed(self, data: _Chunk) -> Iterator[bytes]:
        size = self._size
        buf = self._buf
        with memoryview(data) as whole, whole.cast("B") as mv:
            n = len(mv)
            if n == 0:
                return
            pos = 0
            if buf:
                take = min(size - len(buf), n)
                buf += mv[:take]
                pos = take
                if len(buf) < size or pos == n:
                    return
                frame = bytes(buf)
                buf.clear()
                yield frame
            while n - pos > size:
                frame = bytes(mv[pos : pos + size])
                pos += size
                yield frame
            buf += mv[pos:]

    def finish(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


# ---- the STREAM state machines (sans I/O, shared by the sync and async APIs) ----------------
class _Encryptor:
    __slots__ = ("_aad", "_aead", "_counter", "_done", "_framer", "_prefix", "header")

    def __init__(self, key: bytes, aad: bytes, segment_size: int) -> None:
        _check_key(key)
        _check_segment_size(segment_size)
        self._aead = AESGCM(bytes(key))
        self._prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
        self.header = _HEADER.pack(MAGIC, FORMAT_VERSION, segment_size, self._prefix)
        self._aad = self.header + bytes(aad)
        self._counter = 0
        self._done = False
        self._framer = _Framer(segment_size)

    def _seal(self, segment: bytes, last: bool) -> bytes:
        if self._counter >= MAX_SEGMENTS:
            raise ValueError("object too large for the segment counter; use a larger segment_size")
        out = self._aead.encrypt(_nonce(self._prefix, self._counter, last), segment, self._aad)
        self._counter += 1
        return out

    def feed(self, chunk: _Chunk) -> Iterator[bytes]:
        for segment in self._framer.feed(chunk):
            yield self._seal(segment, last=False)

    def finish(self) -> bytes:
        if self._done:
            raise RuntimeError("encryptor already finished")
        self._done = True
        return self._seal(self._framer.finish(), last=True)


class _Decryptor:
    __slots__ = ("_aad", "_aead", "_counter", "_framer", "_header", "_prefix")

    def __init__(self, key: bytes, aad: bytes) -> None:
        _check_key(key)
        self._aead = AESGCM(bytes(key))
        self._aad = bytes(aad)
        self._header = bytearray()
        self._framer: _Framer | None = None
        self._prefix = b""
        self._counter = 0

    def _parse_header(self) -> None:
        magic, version, segment_size, prefix = _HEADER.unpack(bytes(self._header))
        if magic != MAGIC:
            raise CorruptObject("encrypted object has an unknown header (bad magic)")
        if version != FORMAT_VERSION:
            raise CorruptObject("encrypted object has an unsupported format version")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise CorruptObject("encrypted object header has an invalid segment size")
        self._prefix = prefix
        self._aad = bytes(self._header) + self._aad
        self._framer = _Framer(segment_size + TAG_SIZE)

    def _open(self, segment: bytes, last: bool) -> bytes:
        index = self._counter
        if index >= MAX_SEGMENTS:
            raise CorruptObject("encrypted object has too many segments")
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, index, last), segment, self._aad)
        except InvalidTag:
            raise CorruptObject(
                f"encrypted object failed authentication at segment {index} "
                "(tampered, truncated, reordered or extended, or wrong key or aad)"
            ) from None
        self._counter += 1
        return plain

    def _segments(self, data: _Chunk) -> Iterator[bytes]:
        assert self._framer is not None
        for segment in self._framer.feed(data):
            yield self._open(segment, last=False)

    def feed(self, chunk: _Chunk) -> Iterator[bytes]:
        if self._framer is not None:
            yield from self._segments(chunk)
            return
        with memoryview(chunk) as whole, whole.cast("B") as mv:
            need = HEADER_SIZE - len(self._header)
            self._header += mv[:need]
            if len(self._header) < HEADER_SIZE:
                return
            self._parse_header()
            yield from self._segments(mv[need:])

    def finish(self) -> bytes:
        if self._framer is None:
            raise CorruptObject("encrypted object is truncated (incomplete header)")
        final = self._framer.finish()
        if len(final) < TAG_SIZE:
            raise CorruptObject(f"encrypted object is truncated (segment {self._counter} incomplete)")
        if len(final) == TAG_SIZE and self._counter > 0:
            # Only an empty object has an empty final segment; anything else is not canonical.
            raise CorruptObject(f"encrypted object has an empty final segment {self._counter}")
        return self._open(final, last=True)


# ---- public streaming API -------------------------------------------------------------------
def encrypt_stream(
    plain: Iterable[bytes],
    key: bytes,
    aad: bytes = b"",
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> Iterator[bytes]:
    """Encrypt ``plain`` (chunks of any sizes) under the data ``key``; yields the header, then
    each sealed segment. ``aad`` (e.g. the object ref) is authenticated, not stored.

    Arguments are checked at call time (``ValueError``), before iteration starts.
    """
    enc = _Encryptor(key, aad, segment_size)

    def gen() -> Iterator[bytes]:
        yield enc.header
        for chunk in plain:
            yield from enc.feed(chunk)
        yield enc.finish()

    return gen()


def decrypt_stream(cipher: Iterable[bytes], key: bytes, aad: bytes = b"") -> Iterator[bytes]:
    """Decrypt an object produced by :func:`encrypt_stream`; yields each segment's plaintext
    after its tag verifies. Raises :class:`CorruptObject` on any tampering, truncation,
    reordering, extension, trailing bytes, bad header, or wrong key/aad. The plaintext is only
    valid if iteration completes without error.
    """
    dec = _Decryptor(key, aad)

    def gen() -> Iterator[bytes]:
        for chunk in cipher:
            yield from dec.feed(chunk)
        yield dec.finish()

    return gen()


def aencrypt_stream(
    plain: AsyncIterable[bytes],
    key: bytes,
    aad: bytes = b"",
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> AsyncIterator[bytes]:
    """Async :func:`encrypt_stream`. Each segment is sealed inline (AES-GCM of one 64 KiB
    segment takes microseconds, so the event loop is not held for long)."""
    enc = _Encryptor(key, aad, segment_size)

    async def gen() -> AsyncIterator[bytes]:
        yield enc.header
        async for chunk in plain:
            for out in enc.feed(chunk):
                yield out
        yield enc.finish()

    return gen()


def adecrypt_stream(cipher: AsyncIterable[bytes], key: bytes, aad: bytes = b"") -> AsyncIterator[bytes]:
    """Async :func:`decrypt_stream`, with the same guarantees."""
    dec = _Decryptor(key, aad)

    async def gen() -> AsyncIterator[bytes]:
        async for chunk in cipher:
            for out in dec.feed(chunk):
                yield out
        yield dec.finish()

    return gen()


def encrypt_bytes(
    plain: bytes, key: bytes, aad: bytes = b"", *, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> bytes:
    """Encrypt a whole in-memory object (same format as :func:`encrypt_stream`)."""
    return b"".join(encrypt_stream((plain,), key, aad, segment_size=segment_size))


def decrypt_bytes(cipher: bytes, key: bytes, aad: bytes = b"") -> bytes:
    """Decrypt a whole in-memory object; raises :class:`CorruptObject` like :func:`decrypt_stream`."""
    return b"".join(decrypt_stream((cipher,), key, aad))


# ---- data-key wrapping ----------------------------------------------------------------------
def wrap_key(kek: bytes, data_key: bytes, aad: bytes) -> bytes:
    """Wrap ``data_key`` under the key-encryption key ``kek``, bound to ``aad`` (the object ref,
    optionally with the KEK id). Returns :data:`WRAPPED_KEY_SIZE` bytes (format in the module
    docstring). Random nonces: rotate the KEK well before 2**32 wraps."""
    _check_key(kek, "kek")
    _check_key(data_key, "data_key")
    nonce = secrets.token_bytes(_WRAP_NONCE_SIZE)
    sealed = AESGCM(bytes(kek)).encrypt(nonce, bytes(data_key), _WRAP_AAD_PREFIX + bytes(aad))
    return bytes([_WRAP_VERSION]) + nonce + sealed


def unwrap_key(kek: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`wrap_key`; raises :class:`CorruptObject` if ``wrapped`` is malformed,
    tampered with, or was wrapped under another KEK or ``aad``."""
    _check_key(kek, "kek")
    if len(wrapped) != WRAPPED_KEY_SIZE:
        raise CorruptObject("wrapped key has the wrong length")
    if wrapped[0] != _WRAP_VERSION:
        raise CorruptObject("wrapped key has an unsupported version")
    nonce = bytes(wrapped[1 : 1 + _WRAP_NONCE_SIZE])
    try:
        key = AESGCM(bytes(kek)).decrypt(
            nonce, bytes(wrapped[1 + _WRAP_NONCE_SIZE :]), _WRAP_AAD_PREFIX + bytes(aad)
        )
    except InvalidTag:
        raise CorruptObject("wrapped key failed authentication (wrong KEK or aad, or tampered)") from None
    return key
