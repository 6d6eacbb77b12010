from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator

import pytest

from ledger.crypto import (
    DEFAULT_SEGMENT_SIZE,
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    WRAPPED_KEY_SIZE,
    adecrypt_stream,
    aencrypt_stream,
    ciphertext_size,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    new_data_key,
    unwrap_key,
    wrap_key,
)
from ledger.errors import CorruptObject

SEG = DEFAULT_SEGMENT_SIZE
ENC_SEG = SEG + TAG_SIZE
AAD = b"0x" + b"ab" * 32  # an object ref
SIZES = [0, 1, SEG - 1, SEG, SEG + 1, SEG * 7 // 2]


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def odd_chunks(data: bytes) -> Iterator[bytes]:
    """Irregular chunk sizes, including empty chunks."""
    sizes = [0, 1, 7, 0, 4096, 65535, 3, 100_000, 65537]
    i = k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        k += 1
        yield data[i : i + n]
        i += n


def segments_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split an encrypted object into header and encrypted segments (test helper)."""
    seg_size = struct.unpack(">I", blob[5:9])[0]
    enc = seg_size + TAG_SIZE
    body = blob[HEADER_SIZE:]
    return blob[:HEADER_SIZE], [body[i : i + enc] for i in range(0, len(body), enc)]


@pytest.fixture
def key() -> bytes:
    return new_data_key()


def payload(n: int) -> bytes:
    return os.urandom(n)


# ---- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_bytes(key: bytes, size: int) -> None:
    plain = payload(size)
    blob = encrypt_bytes(plain, key, AAD)
    assert len(blob) == ciphertext_size(size)
    assert blob[:4] == MAGIC
    assert decrypt_bytes(blob, key, AAD) == plain


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("chunk", [1, 100_000])
def test_round_trip_stream_chunked(key: bytes, size: int, chunk: int) -> None:
    plain = payload(size)
    blob = b"".join(encrypt_stream(chunked(plain, chunk), key, AAD))
    assert len(blob) == ciphertext_size(size)
    out = b"".join(decrypt_stream(chunked(blob, chunk), key, AAD))
    assert out == plain


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_irregular_chunks(key: bytes, size: int) -> None:
    plain = payload(size)
    blob = b"".join(encrypt_stream(odd_chunks(plain), key, AAD))
    assert b"".join(decrypt_stream(odd_chunks(blob), key, AAD)) == plain


def test_segment_layout(key: bytes) -> None:
    plain = payload(SEG * 7 // 2)
    header, segs = segments_of(encrypt_bytes(plain, key, AAD))
    assert header[:5] == MAGIC + b"\x01"
    assert struct.unpack(">I", header[5:9])[0] == SEG
    assert [len(s) for s in segs] == [ENC_SEG, ENC_SEG, ENC_SEG, SEG // 2 + TAG_SIZE]
    # exact multiple: the last segment is full, no empty trailer
    _, segs = segments_of(encrypt_bytes(payload(2 * SEG), key, AAD))
    assert [len(s) for s in segs] == [ENC_SEG, ENC_SEG]
    # empty input: one final empty segment
    _, segs = segments_of(encrypt_bytes(b"", key, AAD))
    assert [len(s) for s in segs] == [TAG_SIZE]


def test_encrypt_stream_empty_iterable(key: bytes) -> None:
    blob = b"".join(encrypt_stream([], key, AAD))
    assert len(blob) == HEADER_SIZE + TAG_SIZE
    assert b"".join(decrypt_stream([blob], key, AAD)) == b""


@pytest.mark.parametrize("seg", [1, 5, 1000])
def test_custom_segment_size(key: bytes, seg: int) -> None:
    plain = payload(2345)
    blob = encrypt_bytes(plain, key, AAD, segment_size=seg)
    assert len(blob) == ciphertext_size(len(plain), seg)
    assert b"".join(decrypt_stream(chunked(blob, 3), key, AAD)) == plain


def test_decrypt_yields_per_segment(key: bytes) -> None:
    plain = payload(SEG * 3)
    outs = list(decrypt_stream([encrypt_bytes(plain, key)], key))
    assert [len(o) for o in outs] == [SEG, SEG, SEG]


def test_same_plaintext_encrypts_differently(key: bytes) -> None:
    plain = payload(100)
    assert encrypt_bytes(plain, key) != encrypt_bytes(plain, key)


def test_ciphertext_does_not_contain_plaintext(key: bytes) -> None:
    marker = b"PatientName=DOE^JANE;PatientID=123-45-6789;"
    plain = marker * 5000
    blob = encrypt_bytes(plain, key, AAD)
    assert marker not in blob
    assert b"DOE^JANE" not in blob
    assert b"123-45-6789" not in blob


def test_ciphertext_size_helper() -> None:
    assert ciphertext_size(0) == HEADER_SIZE + TAG_SIZE
    assert ciphertext_size(SEG) == HEADER_SIZE + SEG + TAG_SIZE
    assert ciphertext_size(SEG + 1) == HEADER_SIZE + SEG + 1 + 2 * TAG_SIZE
    assert ciphertext_size(10, 3) == HEADER_SIZE + 10 + 4 * TAG_SIZE
    with pytest.raises(ValueError):
        ciphertext_size(-1)
    with pytest.raises(ValueError):
        ciphertext_size(1, 0)


def test_bad_arguments_raise_at_call_time() -> None:
    with pytest.raises(ValueError):
        encrypt_stream([b"x"], b"short")
    with pytest.raises(ValueError):
        decrypt_stream([b"x"], b"short")
    with pytest.raises(ValueError):
        encrypt_stream([b"x"], new_data_key(), segment_size=0)
    with pytest.raises(ValueError):
        encrypt_stream([b"x"], new_data_key(), segment_size=2**31)


# ---- tampering ------------------------------------------------------------------------------
def flip(blob: bytes, index: int) -> bytes:
    b = bytearray(blob)
    b[index] ^= 0x01
    return bytes(b)


def assert_corrupt(blob: bytes, key: bytes, aad: bytes = AAD) -> CorruptObject:
    with pytest.raises(CorruptObject) as info:
        b"".join(decrypt_stream(chunked(blob, 4096), key, aad))
    assert info.value.code == "corrupt_object"
    return info.value


@pytest.fixture
def blob(key: bytes) -> bytes:
    return encrypt_bytes(payload(SEG * 7 // 2), key, AAD)


@pytest.mark.parametrize("index", range(HEADER_SIZE))
def test_tamper_header_byte(key: bytes, blob: bytes, index: int) -> None:
    assert_corrupt(flip(blob, index), key)


@pytest.mark.parametrize(
    "index",
    [
        HEADER_SIZE,  # first byte of segment 0
        HEADER_SIZE + 1000,  # inside segment 0
        HEADER_SIZE + ENC_SEG + 5,  # inside segment 1
        HEADER_SIZE + 3 * ENC_SEG + 1,  # inside the final segment
    ],
)
def test_tamper_segment_byte(key: bytes, blob: bytes, index: int) -> None:
    assert_corrupt(flip(blob, index), key)


@pytest.mark.parametrize("seg_index", [0, 1, 3])
def test_tamper_tag_byte(key: bytes, blob: bytes, seg_index: int) -> None:
    _, segs = segments_of(blob)
    end_of_seg = HEADER_SIZE + sum(len(s) for s in segs[: seg_index + 1])
    assert_corrupt(flip(blob, end_of_seg - 1), key)  # last byte of that segment's tag
    assert_corrupt(flip(blob, end_of_seg - TAG_SIZE), key)  # first byte of the tag


def test_drop_last_segment(key: bytes, blob: bytes) -> None:
    header, segs = segments_of(blob)
    assert_corrupt(header + b"".join(segs[:-1]), key)


def test_drop_last_segment_of_exact_multiple(key: bytes) -> None:
    header, segs = segments_of(encrypt_bytes(payload(3 * SEG), key, AAD))
    assert len(segs) == 3
    assert_corrupt(header + b"".join(segs[:-1]), key)


def test_drop_first_segment(key: bytes, blob: bytes) -> None:
    header, segs = segments_of(blob)
    assert_corrupt(header + b"".join(segs[1:]), key)


def test_swap_segments(key: bytes, blob: bytes) -> None:
    header, segs = segments_of(blob)
    segs[0], segs[1] = segs[1], segs[0]
    assert_corrupt(header + b"".join(segs), key)


def test_duplicate_segment(key: bytes, blob: bytes) -> None:
    header, segs = segments_of(blob)
    assert_corrupt(header + segs[0] + b"".join(segs), key)


def test_append_segment(key: bytes, blob: bytes) -> None:
    _, segs = segments_of(blob)
    assert_corrupt(blob + segs[1], key)
    assert_corrupt(blob + segs[-1], key)
    # a segment from another object under the same key
    _, other = segments_of(encrypt_bytes(payload(SEG), key, AAD))
    assert_corrupt(blob + other[0], key)


def test_append_empty_final_segment(key: bytes) -> None:
    # even a validly sealed empty final segment (forged with the key) is rejected as non-canonical
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = encrypt_bytes(payload(2 * SEG), key, AAD)
    header, segs = segments_of(blob)
    prefix = header[9:16]
    nonce_last = prefix + (1).to_bytes(4, "big") + b"\x01"
    nonce_mid = prefix + (1).to_bytes(4, "big") + b"\x00"
    aead = AESGCM(key)
    plain1 = aead.decrypt(nonce_last, segs[1], header + AAD)
    forged = header + segs[0] + aead.encrypt(nonce_mid, plain1, header + AAD)
    forged += aead.encrypt(prefix + (2).to_bytes(4, "big") + b"\x01", b"", header + AAD)
    err = assert_corrupt(forged, key)
    assert "empty final segment" in str(err)


@pytest.mark.parametrize("extra", [b"\x00", b"trailing bytes", b"\x00" * TAG_SIZE, b"\x00" * (ENC_SEG + 3)])
def test_trailing_bytes(key: bytes, blob: bytes, extra: bytes) -> None:
    assert_corrupt(blob + extra, key)


@pytest.mark.parametrize("cut", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, HEADER_SIZE + ENC_SEG])
def test_truncated(key: bytes, blob: bytes, cut: int) -> None:
    assert_corrupt(blob[:cut], key)


def test_truncate_inside_final_segment(key: bytes, blob: bytes) -> None:
    assert_corrupt(blob[:-1], key)
    assert_corrupt(blob[: -(TAG_SIZE - 1)], key)


def test_truncate_empty_object(key: bytes) -> None:
    empty = encrypt_bytes(b"", key, AAD)
    assert_corrupt(empty[:-1], key)
    assert_corrupt(empty[:HEADER_SIZE], key)


def test_wrong_key(blob: bytes) -> None:
    assert_corrupt(blob, new_data_key())


def test_wrong_aad(key: bytes, blob: bytes) -> None:
    assert_corrupt(blob, key, aad=b"0x" + b"cd" * 32)
    assert_corrupt(blob, key, aad=b"")


def test_header_swapped_between_objects(key: bytes) -> None:
    a = encrypt_bytes(payload(SEG + 10), key, AAD)
    b = encrypt_bytes(payload(SEG + 10), key, AAD)
    assert_corrupt(b[:HEADER_SIZE] + a[HEADER_SIZE:], key)


def test_bad_magic_and_version(key: bytes, blob: bytes) -> None:
    assert "magic" in str(assert_corrupt(b"XXXX" + blob[4:], key))
    assert "version" in str(assert_corrupt(blob[:4] + b"\x02" + blob[5:], key))
    huge = blob[:5] + struct.pack(">I", 2**31) + blob[9:]
    assert "segment size" in str(assert_corrupt(huge, key))
    zero = blob[:5] + struct.pack(">I", 0) + blob[9:]
    assert_corrupt(zero, key)


def test_error_messages_are_phi_free(key: bytes) -> None:
    secret = b"DOE^JANE 123-45-6789"
    blob = encrypt_bytes(secret * 10, key, secret)
    err = assert_corrupt(flip(blob, HEADER_SIZE + 3), key, aad=secret)
    assert "DOE" not in str(err) and "6789" not in str(err)
    assert err.__cause__ is None


def test_plaintext_released_only_after_verification(key: bytes) -> None:
    plain = payload(3 * SEG)
    blob = flip(encrypt_bytes(plain, key, AAD), HEADER_SIZE + ENC_SEG + 7)  # corrupt segment 1
    gen = decrypt_stream(chunked(blob, 1000), key, AAD)
    assert next(gen) == plain[:SEG]
    with pytest.raises(CorruptObject):
        next(gen)


# ---- memory ---------------------------------------------------------------------------------
def test_decrypt_200mb_bounded_memory(key: bytes) -> None:
    total = 200 * 1024 * 1024
    block = os.urandom(1024 * 1024)

    def source() -> Iterable[bytes]:
        for _ in range(total // len(block)):
            yield block

    expected = hashlib.sha256()
    for b in source():
        expected.update(b)

    tracemalloc.start()
    try:
        seen = 0
        digest = hashlib.sha256()
        for piece in decrypt_stream(encrypt_stream(source(), key, AAD), key, AAD):
            seen += len(piece)
            digest.update(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == total
    assert digest.digest() == expected.digest()
    assert peak < 4 * 1024 * 1024, f"peak traced memory {peak} bytes"


# ---- async ----------------------------------------------------------------------------------
async def _aiter(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        await asyncio.sleep(0)
        yield c


async def _ajoin(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


@pytest.mark.parametrize("size", SIZES)
def test_async_round_trip(key: bytes, size: int) -> None:
    plain = payload(size)

    async def main() -> bytes:
        blob = await _ajoin(aencrypt_stream(_aiter(odd_chunks(plain)), key, AAD))
        assert len(blob) == ciphertext_size(size)
        # interoperable with the sync API both ways
        assert decrypt_bytes(blob, key, AAD) == plain
        return await _ajoin(adecrypt_stream(_aiter(chunked(blob, 777)), key, AAD))

    assert asyncio.run(main()) == plain


def test_async_detects_tampering(key: bytes, blob: bytes) -> None:
    async def main() -> None:
        await _ajoin(adecrypt_stream(_aiter(chunked(blob[:-1], 5000)), key, AAD))

    with pytest.raises(CorruptObject):
        asyncio.run(main())

    async def main2() -> bytes:
        return await _ajoin(adecrypt_stream(_aiter([blob]), key, b"other"))

    with pytest.raises(CorruptObject):
        asyncio.run(main2())


def test_async_decrypt_of_sync_ciphertext(key: bytes) -> None:
    plain = payload(SEG * 2 + 3)
    blob = encrypt_bytes(plain, key, AAD)
    assert asyncio.run(_ajoin(adecrypt_stream(_aiter(chunked(blob, 1)), key, AAD))) == plain


# ---- key wrapping ---------------------------------------------------------------------------
def test_wrap_unwrap_round_trip() -> None:
    kek, dk = new_data_key(), new_data_key()
    wrapped = wrap_key(kek, dk, AAD)
    assert len(wrapped) == WRAPPED_KEY_SIZE
    assert wrapped[0] == 1
    assert dk not in wrapped
    assert unwrap_key(kek, wrapped, AAD) == dk
    assert wrap_key(kek, dk, AAD) != wrapped  # random nonce


def test_unwrap_failures() -> None:
    kek, dk = new_data_key(), new_data_key()
    wrapped = wrap_key(kek, dk, AAD)
    with pytest.raises(CorruptObject):
        unwrap_key(kek, wrapped, b"0x" + b"cd" * 32)  # wrong aad: bound to another object
    with pytest.raises(CorruptObject):
        unwrap_key(new_data_key(), wrapped, AAD)  # wrong KEK
    for i in range(len(wrapped)):
        with pytest.raises(CorruptObject):
            unwrap_key(kek, flip(wrapped, i), AAD)
    with pytest.raises(CorruptObject):
        unwrap_key(kek, wrapped[:-1], AAD)
    with pytest.raises(CorruptObject):
        unwrap_key(kek, wrapped + b"\x00", AAD)


def test_wrap_rejects_bad_key_sizes() -> None:
    with pytest.raises(ValueError):
        wrap_key(b"k" * 16, new_data_key(), AAD)
    with pytest.raises(ValueError):
        wrap_key(new_data_key(), b"k" * 16, AAD)


def test_new_data_key() -> None:
    a, b = new_data_key(), new_data_key()
    assert len(a) == 32 and a != b
