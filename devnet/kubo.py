"""A real Kubo (go-ipfs) node for the devnet and the integration tests.

The binary is Kubo v0.43.1, built from the Go module proxy with the wrapper module in
``devnet/kubo/`` (an ``ipfs`` on ``PATH`` of exactly that version is used instead if there is
one). The build goes to a temp file that is renamed into place, under a file lock, so a
half-written binary is never run and two processes never build at once.

A :class:`KuboNode` owns one repo (``IPFS_PATH``): :meth:`KuboNode.init` creates and configures it
for loopback-only, offline use, :meth:`KuboNode.start` runs ``ipfs daemon --offline`` detached and
waits for its RPC, :meth:`KuboNode.stop` ends it. Restarting on the same repo keeps its blocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from ledger.errors import DevnetError

KUBO_VERSION = "0.43.1"
KUBO_PACKAGE = "github.com/ipfs/kubo/cmd/ipfs"
WRAPPER_DIR = Path(__file__).resolve().parent / "kubo"

_TAIL_CHARS = 2000
_API_RE = re.compile(r"^/(ip4|ip6|dns4|dns6|dns)/([^/]+)/tcp/(\d+)")


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-_TAIL_CHARS:].strip()


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> str:
    """Run ``cmd``; return its stdout. Any failure is a DevnetError naming the command and output tail."""
    shown = " ".join(str(c) for c in cmd)
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise DevnetError(f"`{shown}` failed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        out = _tail(exc.stdout) + "\n" + _tail(exc.stderr)
        raise DevnetError(f"`{shown}` timed out after {timeout:.0f}s:\n{out.strip()}") from exc
    if proc.returncode != 0:
        out = _tail(proc.stdout) + "\n" + _tail(proc.stderr)
        raise DevnetError(f"`{shown}` exited {proc.returncode}:\n{out.strip()}")
    return proc.stdout


def _ipfs_env(repo: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["IPFS_TELEMETRY"] = "off"  # never phone home (there is no network here anyway)
    if repo is not None:
        env["IPFS_PATH"] = str(repo)
    return env


def cache_dir() -> Path:
    """``$MEDLEDGER_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/medledger``."""
    explicit = os.environ.get("MEDLEDGER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "medledger"


def cached_binary_path() -> Path:
    return cache_dir() / f"kubo-v{KUBO_VERSION}" / "ipfs"


def binary_version(binary: Path | str) -> str | None:
    """The ``ipfs version --number`` of ``binary``, or None if it does not run."""
    try:
        proc = subprocess.run(
            [str(binary), "version", "--number"],
            env=_ipfs_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_kubo(dest: Path, *, timeout: float = 3600.0) -> Path:
    """Build Kubo into ``dest`` (temp file + atomic rename). Callers hold the build lock."""
    go = shutil.which("go")
    if go is None:
        raise DevnetError("cannot build Kubo: `go` is not on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        _run(
            [go, "build", "-trimpath", "-o", str(tmp), KUBO_PACKAGE],
            cwd=WRAPPER_DIR,
            env=dict(os.environ),
            timeout=timeout,
        )
        got = binary_version(tmp)
        if got != KUBO_VERSION:
            raise DevnetError(f"built Kubo at {tmp} reports version {got!r}, expected {KUBO_VERSION}")
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def ensure_kubo_binary() -> Path:
    """Path of a Kubo v0.43.1 ``ipfs``: from PATH, else the cache, else built into the cache."""
    on_path = shutil.which("ipfs")
    if on_path is not None and binary_version(on_path) == KUBO_VERSION:
        return Path(on_path)
    dest = cached_binary_path()
    if dest.is_file() and binary_version(dest) == KUBO_VERSION:
        return dest
    with _file_lock(dest.parent / ".build.lock"):
        # Another process may have built it while we waited for the lock.
        if dest.is_file() and binary_version(dest) == KUBO_VERSION:
            return dest
        print(
            f"medledger: building Kubo v{KUBO_VERSION} into {dest} (takes several minutes)...",
            file=sys.stderr,
            flush=True,
        )
        return build_kubo(dest)


def _read_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _read_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return env


def _is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaping it if it is our child; a zombie counts as gone)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    state = stat.rpartition(")")[2].split()[:1]
    return state in (["Z"], ["X"])


class KuboNode:
    """One Kubo repo and its daemon. ``KuboNode(repo).init()``, then ``start()`` / ``stop(pid)``."""

    def __init__(self, repo: Path, binary: Path | None = None) -> None:
        self.repo = Path(repo)
        self.binary = binary if binary is not None else ensure_kubo_binary()

    # ---- repo ------------------------------------------------------------------------------
    def _ipfs(self, *args: str, timeout: float = 60.0) -> str:
        return _run([self.binary, *args], env=_ipfs_env(self.repo), timeout=timeout)

    def init(self) -> None:
        """``ipfs init --profile test`` unless already initialized, then loopback/offline config."""
        if not (self.repo / "config").is_file():
            self.repo.mkdir(parents=True, exist_ok=True)
            self._ipfs("init", "--profile", "test", "--empty-repo")
        settings: dict[str, object] = {
            "Addresses.API": "/ip4/127.0.0.1/tcp/0",
            "Addresses.Gateway": "/ip4/127.0.0.1/tcp/0",
            "Addresses.Swarm": ["/ip4/127.0.0.1/tcp/0"],
            "Addresses.Announce": [],
            "Addresses.NoAnnounce": [],
            "Bootstrap": [],
            "Discovery.MDNS.Enabled": False,
        }
        for key, value in settings.items():
            self._ipfs("config", "--json", key, json.dumps(value))

    # ---- daemon ----------------------------------------------------------------------------
    @property
    def api_file(self) -> Path:
        return self.repo / "api"

    @property
    def api_url(self) -> str:
        """``http://HOST:PORT`` of the running daemon, from the multiaddr in ``$IPFS_PATH/api``."""
        try:
            maddr = self.api_file.read_text().strip()
        except OSError as exc:
            raise DevnetError(f"Kubo API file {self.api_file} is missing: is the daemon running?") from exc
        m = _API_RE.match(maddr)
        if m is None:
            raise DevnetError(f"cannot parse Kubo API multiaddr {maddr!r} in {self.api_file}")
        proto, host, port = m.groups()
        if proto == "ip6":
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def _rpc_answers(self, timeout: float = 2.0) -> bool:
        try:
            url = self.api_url
            resp = httpx.post(f"{url}/api/v0/version", timeout=timeout)
        except (DevnetError, httpx.HTTPError):
            return False
        return resp.status_code == 200

    def start(self, log_path: Path | None = None, *, timeout: float = 60.0) -> int:
        """Start ``ipfs daemon --offline`` detached; wait until its RPC answers; return its pid."""
        if self.api_file.exists():
            if self._rpc_answers():
                raise DevnetError(f"a Kubo daemon already serves {self.repo} at {self.api_url}")
            self.api_file.unlink(missing_ok=True)  # stale, from a daemon that was killed
        log_path = log_path if log_path is not None else self.repo / "daemon.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(self.binary), "daemon", "--offline"],
                env=_ipfs_env(self.repo),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise DevnetError(
                    f"`{self.binary} daemon --offline` exited {code}:\n{self._log_tail(log_path)}"
                )
            if self.api_file.exists() and self._rpc_answers():
                return proc.pid
            time.sleep(0.1)
        self.stop(proc.pid)
        raise DevnetError(f"Kubo daemon did not answer within {timeout:.0f}s:\n{self._log_tail(log_path)}")

    @staticmethod
    def _log_tail(log_path: Path) -> str:
        try:
            return _tail(log_path.read_bytes())
        except OSError:
            return ""

    def owns(self, pid: int) -> bool:
        """True if ``pid`` is an ``ipfs daemon`` (and, where readable, one of this repo)."""
        argv = _read_cmdline(pid)
        if len(argv) < 2 or Path(argv[0]).name != self.binary.name or "daemon" not in argv[1:]:
            return False
        env = _read_environ(pid)
        if env is not None and "IPFS_PATH" in env:
            return Path(env["IPFS_PATH"]).resolve() == self.repo.resolve()
        return True

    def stop(self, pid: int, *, timeout: float = 20.0) -> bool:
        """SIGTERM ``pid``, SIGKILL after ``timeout``. Only if it is this node's ``ipfs daemon``.

        Returns True if it was ours and is now gone, False if it was not ours (or already gone):
        an unrelated process is never signalled.
        """
        if not self.owns(pid):  # also false for a pid that is gone (or a zombie)
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _is_gone(pid):
                return True
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + 10.0
        while not _is_gone(pid):
            if time.monotonic() > deadline:
                raise DevnetError(f"Kubo daemon pid {pid} survived SIGKILL")
            time.sleep(0.05)
        return True
