"""Running the gateway service: in the foreground (`medledger serve`) or detached (for the demo)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from devnet.anvil import pid_is, stop_pid
from devnet.manager import devnet_file, load
from ledger.errors import DevnetError
from ledger.gateway import GatewayConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _record_service(workdir: Path, pid: int | None, url: str | None) -> None:
    path = devnet_file(workdir)
    data = json.loads(path.read_text())
    if pid is None:
        data.pop("gateway_service", None)
    else:
        data["gateway_service"] = {"pid": pid, "url": url}
    tmp = path.with_name(path.name + ".svc.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def serve(workdir: Path, host: str = "127.0.0.1", port: int = 0, config: GatewayConfig | None = None) -> None:
    """Run the gateway in the foreground until interrupted."""
    import uvicorn

    from api.app import create_app

    load(workdir)  # fail early with a clear message when there is no devnet
    os.umask(0o077)  # the catalog and the log hold PHI-adjacent data: owner only
    lock = _lock_workdir(workdir)  # held for the life of the process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = port or free_port(host)
    url = f"http://{host}:{chosen}"
    _record_service(workdir, os.getpid(), url)
    print(f"medledger gateway listening on {url}", flush=True)
    try:
        # access_log off: request paths carry DICOM UIDs, which are kept out of logs.
        uvicorn.run(
            create_app(workdir, config), host=host, port=chosen, log_level="warning", access_log=False
        )
    finally:
        lock.close()
        data = json.loads(devnet_file(workdir).read_text())
        if (data.get("gateway_service") or {}).get("pid") == os.getpid():
            _record_service(workdir, None, None)


def _lock_workdir(workdir: Path) -> IO[str]:
    """One gateway per workdir: two would share the gateway key (and its nonces) and the log."""
    import fcntl

    path = workdir / "gateway" / "serve.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise DevnetError(f"a gateway already runs on {workdir} (see `medledger devnet status`)") from None
    return fh


def running_service(workdir: Path) -> str | None:
    data = json.loads(devnet_file(workdir).read_text())
    svc = data.get("gateway_service") or {}
    if svc.get("pid") and pid_is(int(svc["pid"]), "medledger") and _healthy(str(svc["url"])):
        return str(svc["url"])
    return None


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_detached(
    workdir: Path, timeout: float = 120.0, extra_args: list[str] | None = None
) -> tuple[int, str]:
    """Start `medledger serve` detached; wait until healthy. Returns (pid, url).

    `extra_args` are further `serve` options, e.g. ``["--anchor-delay", "30"]``.
    """
    log_path = workdir / "gateway" / "service.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("medledger")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ledger.cli"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*cmd, "serve", "--workdir", str(workdir), *(extra_args or [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevnetError(f"the gateway exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        data = json.loads(devnet_file(workdir).read_text())
        svc = data.get("gateway_service") or {}
        if svc.get("pid") == proc.pid and _healthy(str(svc["url"])):
            return proc.pid, str(svc["url"])
        time.sleep(0.1)
    stop_pid(proc.pid, "medledger")
    raise DevnetError(f"the gateway did not become healthy within {timeout}s (log: {log_path})")


def stop_service(workdir: Path, pid: int) -> None:
    stop_pid(pid, "medledger", timeout=30)
    _record_service(workdir, None, None)
