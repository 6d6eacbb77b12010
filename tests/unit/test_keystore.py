from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ledger.crypto import new_data_key, unwrap_key, wrap_key
from ledger.keystore import KeyStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_file_mode_and_contents(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "keys.json"
    ks = KeyStore.open_or_create(path)
    assert path.exists()
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert len(ks.kek) == 32
    assert len(ks.pseudonym_key) == 32
    assert ks.kek != ks.pseudonym_key
    doc = json.loads(path.read_text())
    assert doc["format"] == "medledger-keystore"
    assert doc["version"] == 1
    assert doc["kek_id"] == ks.kek_id
    assert bytes.fromhex(doc["keks"][ks.kek_id]) == ks.kek
    # no temp files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json", "keys.json.lock"]


def test_create_mode_under_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "d" / "keys.json"
        KeyStore.open_or_create(path)
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


def test_reopen_gives_same_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    a = KeyStore.open_or_create(path)
    b = KeyStore.open_or_create(path)
    assert (a.kek_id, a.kek, a.pseudonym_key) == (b.kek_id, b.kek, b.pseudonym_key)


def test_distinct_stores_have_distinct_keys(tmp_path: Path) -> None:
    a = KeyStore.open_or_create(tmp_path / "a.json")
    b = KeyStore.open_or_create(tmp_path / "b.json")
    assert a.kek != b.kek and a.pseudonym_key != b.pseudonym_key and a.kek_id != b.kek_id


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_refuses_group_or_other_accessible_file(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "keys.json"
    KeyStore.open_or_create(path)
    os.chmod(path, bad_mode)
    with pytest.raises(PermissionError) as info:
        KeyStore.open_or_create(path)
    assert "chmod 600" in str(info.value)
    assert oct(bad_mode)[2:] in str(info.value)


def test_refuses_non_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.mkdir(mode=0o700)
    with pytest.raises((PermissionError, IsADirectoryError)):
        KeyStore.open_or_create(path)


def test_malformed_store_rejected_without_leaking(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    secretish = "ab" * 31  # wrong length key
    body = {"format": "medledger-keystore", "version": 1, "kek_id": "x", "keks": {"x": secretish}}
    body["pseudonym_key"] = secretish
    os.write(fd, json.dumps(body).encode())
    os.close(fd)
    with pytest.raises(ValueError) as info:
        KeyStore.open_or_create(path)
    assert secretish not in str(info.value)

    path.write_text("not json")
    with pytest.raises(ValueError):
        KeyStore.open_or_create(path)
    path.write_text(json.dumps({"format": "medledger-keystore", "version": 99}))
    with pytest.raises(ValueError):
        KeyStore.open_or_create(path)


def test_rotation_keeps_old_kek(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ks = KeyStore.open_or_create(path)
    old_id, old_kek, pkey = ks.kek_id, ks.kek, ks.pseudonym_key
    dk = new_data_key()
    wrapped = wrap_key(ks.kek, dk, b"ref")

    new_id = ks.rotate_kek()
    assert new_id == ks.kek_id != old_id
    assert ks.kek != old_kek
    assert ks.kek_for(old_id) == old_kek
    assert ks.kek_for(new_id) == ks.kek
    assert ks.pseudonym_key == pkey
    assert set(ks.kek_ids) == {old_id, new_id}
    assert unwrap_key(ks.kek_for(old_id), wrapped, b"ref") == dk
    assert mode(path) == 0o600

    reopened = KeyStore.open_or_create(path)
    assert reopened.kek_id == new_id
    assert reopened.kek_for(old_id) == old_kek
    assert reopened.pseudonym_key == pkey
    assert unwrap_key(reopened.kek_for(old_id), wrapped, b"ref") == dk


def test_rotation_by_two_holders_keeps_all_keks(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    a = KeyStore.open_or_create(path)
    b = KeyStore.open_or_create(path)
    first = a.kek_id
    id_a = a.rotate_kek()
    id_b = b.rotate_kek()  # b's in-memory state is stale; it must not drop a's KEK
    final = KeyStore.open_or_create(path)
    assert set(final.kek_ids) == {first, id_a, id_b}
    assert final.kek_id == id_b
    # a learns about b's KEK on demand
    assert a.kek_for(id_b) == final.kek_for(id_b)


def test_unknown_kek_id(tmp_path: Path) -> None:
    ks = KeyStore.open_or_create(tmp_path / "keys.json")
    with pytest.raises(KeyError):
        ks.kek_for("nope")


def test_repr_has_no_key_material(tmp_path: Path) -> None:
    ks = KeyStore.open_or_create(tmp_path / "keys.json")
    r = repr(ks)
    assert ks.kek.hex() not in r and ks.pseudonym_key.hex() not in r
    assert ks.kek_id in r
