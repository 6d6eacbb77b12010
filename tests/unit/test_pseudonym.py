from __future__ import annotations

import hashlib
import hmac
import re

import pytest

from ledger.pseudonym import (
    DOMAIN_OBJECT_REF,
    DOMAIN_PATIENT_LOOKUP,
    DOMAIN_STUDY_REF,
    new_patient_ref,
    object_ref,
    patient_lookup_key,
    pseudonym,
    study_ref,
)

K1 = bytes(range(32))
K2 = bytes(range(1, 33))
HEX66 = re.compile(r"^0x[0-9a-f]{64}$")
UID = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"


def test_format_and_determinism() -> None:
    p = pseudonym(K1, "test", "a", "b")
    assert HEX66.match(p)
    assert p == pseudonym(K1, "test", "a", "b")


def test_matches_specified_construction() -> None:
    msg = b"test\x00" + b"\x00\x00\x00\x02ab" + b"\x00\x00\x00\x01c"
    expected = "0x" + hmac.new(K1, msg, hashlib.sha256).hexdigest()
    assert pseudonym(K1, "test", "ab", "c") == expected
    # non-ASCII parts are length-prefixed by their UTF-8 byte length
    msg2 = b"test\x00" + b"\x00\x00\x00\x02" + "é".encode()
    assert pseudonym(K1, "test", "é") == "0x" + hmac.new(K1, msg2, hashlib.sha256).hexdigest()


def test_differs_across_keys_and_domains() -> None:
    assert pseudonym(K1, "d1", "x") != pseudonym(K2, "d1", "x")
    assert pseudonym(K1, "d1", "x") != pseudonym(K1, "d2", "x")
    assert study_ref(K1, UID) != object_ref(K1, UID)
    assert study_ref(K1, UID) != pseudonym(K1, DOMAIN_OBJECT_REF, UID)
    assert study_ref(K1, UID) == pseudonym(K1, DOMAIN_STUDY_REF, UID)
    assert study_ref(K1, UID) != study_ref(K2, UID)


def test_length_prefix_prevents_collisions() -> None:
    assert pseudonym(K1, "d", "ab", "c") != pseudonym(K1, "d", "a", "bc")
    assert pseudonym(K1, "d", "abc") != pseudonym(K1, "d", "ab", "c")
    assert pseudonym(K1, "d", "", "a") != pseudonym(K1, "d", "a", "")
    assert pseudonym(K1, "d", "a") != pseudonym(K1, "d", "a", "")
    assert pseudonym(K1, "d") != pseudonym(K1, "d", "")
    assert patient_lookup_key(K1, "HOSP", "A1") != patient_lookup_key(K1, "HOSPA", "1")


def test_domain_cannot_absorb_parts() -> None:
    with pytest.raises(ValueError):
        pseudonym(K1, "d\x00x")
    with pytest.raises(ValueError):
        pseudonym(K1, "")


def test_key_required() -> None:
    with pytest.raises(ValueError):
        pseudonym(b"", "d", "x")
    with pytest.raises(ValueError):
        pseudonym(b"short", "d", "x")


def test_not_a_plain_hash() -> None:
    pid = "123-45-6789"
    ref = patient_lookup_key(K1, "HOSP", pid)
    assert pid not in ref
    assert ref[2:] != hashlib.sha256(pid.encode()).hexdigest()
    assert ref == pseudonym(K1, DOMAIN_PATIENT_LOOKUP, "HOSP", pid)
    assert HEX66.match(ref)


def test_helpers_format() -> None:
    for ref in (study_ref(K1, UID), object_ref(K1, UID), patient_lookup_key(K1, "I", "P")):
        assert HEX66.match(ref)


def test_new_patient_ref_random() -> None:
    refs = {new_patient_ref() for _ in range(100)}
    assert len(refs) == 100
    assert all(HEX66.match(r) for r in refs)
