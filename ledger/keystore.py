"""The gateway's local secret store: key-encryption keys (KEKs) and the pseudonymization key.

The store is one JSON file, readable and writable by its owner only (mode 0600)::

    {
      "format": "medledger-keystore",
      "version": 1,
      "kek_id": "<id of the current KEK>",
      "keks": {"<kek id>": "<64 hex chars>", ...},     # current and all retired KEKs
      "pseudonym_key": "<64 hex chars>"
    }

KEK ids are 16 random hex characters. :meth:`KeyStore.rotate_kek` adds a new current KEK and
keeps every old one, so data keys wrapped earlier still unwrap via :meth:`KeyStore.kek_for`
(store the KEK id next to each wrapped key). The pseudonymization key is never rotated by this
module: rotating it would change every study/object ref and patient lookup key.

Durability and concurrency: every write goes to a fresh 0600 temp file in the same directory,
is fsynced, and is then moved into place (``link`` for the first creation, so two processes
racing to create the store cannot overwrite each other's keys; ``rename`` for rotation), and the
directory is fsynced. Creation and rotation hold an exclusive ``flock`` on a sidecar
``<name>.lock`` file, and rotation re-reads the file under that lock, so gateway workers that
share the store never drop one another's KEKs. :meth:`KeyStore.kek_for` re-reads the file once
on an unknown id, so a worker picks up a KEK another worker rotated in.

Security checks: a missing parent directory is created with mode 0700 (existing directories are
left alone); an existing store (or lock file) whose mode grants any permission to group or
others, or which is not a regular file, is refused with ``PermissionError``. Messages and
``repr`` never contain key material.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["KEYSTORE_FORMAT", "KEYSTORE_VERSION", "KeyStore"]

KEYSTORE_FORMAT = "medledger-keystore"
KEYSTORE_VERSION = 1
_KEY_SIZE = 32


def _new_kek_id() -> str:
    return secrets.token_hex(8)


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"key store {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"key store {path} has mode {mode:#o}, which lets group or others access it; "
            f"it must be 0600 (run: chmod 600 {path})"
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyStore:
    """The KEKs and the pseudonymization key, loaded from (and persisted to) one 0600 file."""

    __slots__ = ("_kek_id", "_keks", "_path", "_pseudonym_key")

    def __init__(self, path: Path, kek_id: str, keks: dict[str, bytes], pseudonym_key: bytes) -> None:
        if kek_id not in keks:
            raise ValueError("current KEK id is not among the KEKs")
        for key in (*keks.values(), pseudonym_key):
            if len(key) != _KEY_SIZE:
                raise ValueError(f"keys must be {_KEY_SIZE} bytes")
        self._path = Path(path)
        self._kek_id = kek_id
        self._keks = dict(keks)
        self._pseudonym_key = bytes(pseudonym_key)

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, path: Path) -> KeyStore:
        """Open the store at ``path``, creating it (with fresh random keys) if it does not exist.

        Raises ``PermissionError`` if the file is accessible by group/others or is not a regular
        file, and ``ValueError`` if it is not a valid key store.
        """
        path = Path(path)
        existing = cls._try_load(path)
        if existing is not None:
            return existing
        directory = path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        with cls._locked(path):
            existing = cls._try_load(path)
            if existing is not None:
                return existing
            kek_id = _new_kek_id()
            store = cls(
                path, kek_id, {kek_id: secrets.token_bytes(_KEY_SIZE)}, secrets.token_bytes(_KEY_SIZE)
            )
            store._write(replace=False)
            return store

    @classmethod
    def _try_load(cls, path: Path) -> KeyStore | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            _check_private(path, os.fstat(f.fileno()))
            raw = f.read()
        return cls._parse(path, raw)

    @classmethod
    def _parse(cls, path: Path, raw: bytes) -> KeyStore:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"key store {path} is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != KEYSTORE_FORMAT:
            raise ValueError(f"{path} is not a MedLedger key store")
        if doc.get("version") != KEYSTORE_VERSION:
            raise ValueError(f"key store {path} has unsupported version {doc.get('version')!r}")
        try:
            kek_id = doc["kek_id"]
            keks = {str(k): bytes.fromhex(v) for k, v in doc["keks"].items()}
            pseudonym_key = bytes.fromhex(doc["pseudonym_key"])
            if not isinstance(kek_id, str):
                raise TypeError
            return cls(path, kek_id, keks, pseudonym_key)
        except (KeyError, TypeError, ValueError, AttributeError):
            # Deliberately no detail: the offending value could be key material.
            raise ValueError(f"key store {path} is malformed") from None

    # ---- persistence ------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def _locked(path: Path) -> Iterator[None]:
        lock_path = path.with_name(path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _check_private(lock_path, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _document(self) -> dict[str, Any]:
        return {
            "format": KEYSTORE_FORMAT,
            "version": KEYSTORE_VERSION,
            "kek_id": self._kek_id,
            "keks": {kid: key.hex() for kid, key in self._keks.items()},
            "pseudonym_key": self._pseudonym_key.hex(),
        }

    def _write(self, *, replace: bool) -> None:
        """Write atomically: 0600 temp file, fsync, then link (create) or rename (replace)."""
        path = self._path
        data = json.dumps(self._document(), indent=2, sort_keys=True).encode() + b"\n"
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # in case of an unusual umask/ACL default
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if the store appeared meanwhile: never clobber keys
                os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)

    def reload(self) -> None:
        """Re-read the file (e.g. to see a KEK another process rotated in)."""
        fresh = self._try_load(self._path)
        if fresh is None:
            raise FileNotFoundError(f"key store {self._path} no longer exists")
        self._kek_id, self._keks, self._pseudonym_key = fresh._kek_id, fresh._keks, fresh._pseudonym_key

    # ---- keys -------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def kek(self) -> bytes:
        """The current key-encryption key (wrap new data keys with this)."""
        return self._keks[self._kek_id]

    @property
    def kek_id(self) -> str:
        """Id of :attr:`kek`; record it next to every key wrapped with it."""
        return self._kek_id

    @property
    def kek_ids(self) -> tuple[str, ...]:
        """Ids of all KEKs held, current and retired."""
        return tuple(self._keks)

    @property
    def pseudonym_key(self) -> bytes:
        """The HMAC key for :mod:`ledger.pseudonym`."""
        return self._pseudonym_key

    def kek_for(self, kek_id: str) -> bytes:
        """The KEK with id ``kek_id`` (current or retired). Re-reads the file once if the id is
        unknown; raises ``KeyError`` if it is still unknown."""
        key = self._keks.get(kek_id)
        if key is None:
            self.reload()
            key = self._keks.get(kek_id)
            if key is None:
                raise KeyError(f"unknown KEK id {kek_id!r}")
        return key

    def rotate_kek(self) -> str:
        """Make a fresh KEK current, keeping all old ones; persists before returning the new id.

        Re-reads the file under the lock first, so KEKs rotated in by other processes are kept.
        """
        with self._locked(self._path):
            self.reload()
            kek_id = _new_kek_id()
            while kek_id in self._keks:  # pragma: no cover - 64-bit ids
                kek_id = _new_kek_id()
            keks = {**self._keks, kek_id: secrets.token_bytes(_KEY_SIZE)}
            previous = (self._kek_id, self._keks)
            self._kek_id, self._keks = kek_id, keks
            try:
                self._write(replace=True)
            except BaseException:
                self._kek_id, self._keks = previous
                raise
        return kek_id

    def __repr__(self) -> str:
        return f"KeyStore(path={str(self._path)!r}, kek_id={self._kek_id!r}, keks={len(self._keks)})"
