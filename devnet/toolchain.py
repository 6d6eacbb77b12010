"""The pinned chain toolchain: npm packages (Anvil, solc-js, OpenZeppelin) and their paths.

Everything comes from the repository's `package.json` + `package-lock.json`; `ensure_npm()`
runs `npm ci` once when `node_modules` is missing or older than the lockfile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ledger.errors import DevnetError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = PROJECT_ROOT / "node_modules"
CONTRACTS_DIR = PROJECT_ROOT / "contracts"
SOLC_WRAPPER = Path(__file__).resolve().parent / "solc.js"
_STAMP = NODE_MODULES / ".medledger-npm-ci"


def cache_dir() -> Path:
    """Where built tools are cached, outside the repository."""
    explicit = os.environ.get("MEDLEDGER_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medledger"


def ensure_npm() -> None:
    """Install the pinned npm packages if they are missing or stale."""
    lock = PROJECT_ROOT / "package-lock.json"
    if _STAMP.exists() and _STAMP.stat().st_mtime >= lock.stat().st_mtime and anvil_binary().exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise DevnetError("npm is not on PATH; install Node.js 20+ with npm")
    print("medledger: installing pinned npm packages (npm ci)...", file=sys.stderr)
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise DevnetError(f"npm ci failed ({proc.returncode}): {proc.stderr[-2000:]}")
    _STAMP.touch()


def anvil_binary() -> Path:
    """The Anvil binary shipped by the npm package @foundry-rs/anvil (platform package)."""
    return NODE_MODULES / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
