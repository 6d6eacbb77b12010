"""Secret key files: hex private keys, created with mode 0600 and refused when readable by others."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from eth_account.signers.local import LocalAccount

from ledger.chain import load_account


def create_key(path: Path) -> LocalAccount:
    """Create a fresh secp256k1 key at `path` (0600, atomic); refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = "0x" + secrets.token_bytes(32).hex()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.link(tmp, path)  # fails if `path` exists: never overwrite a key
    tmp.unlink()
    return load_account(key)


def read_key(path: Path) -> LocalAccount:
    """Load the key at `path`; refuse a file that group or others can read."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"key file {path} has mode {mode:o}; it must be 0600")
    return load_account(path.read_text().strip())


def load_or_create_key(path: Path) -> LocalAccount:
    return read_key(path) if path.exists() else create_key(path)
