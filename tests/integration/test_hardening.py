"""Regressions from a break-it pass: out-of-range input is a 4xx (never a 500), a 500 does not
drop the connection, unsigned bodies are not buffered, and one gateway runs per workdir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account

from ledger.client import GatewayClient, GatewayError
from ledger.demo import _ensure_member
from ledger.keyfiles import read_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(stack) -> GatewayClient:  # type: ignore[no-untyped-def]
    return GatewayClient(stack.url, read_key(Path(stack.devnet.data["admins"][0]["key_file"])).key)


@pytest.fixture(scope="module")
def auditor(stack) -> GatewayClient:  # type: ignore[no-untyped-def]
    admins = [
        GatewayClient(stack.url, read_key(Path(a["key_file"])).key) for a in stack.devnet.data["admins"]
    ]
    acct = Account.create()
    _ensure_member(admins, acct.address, "auditor", "Hardening Auditor")
    return GatewayClient(stack.url, acct.key)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/governance/proposals", {"value": 2**300}),
        ("/governance/proposals", {"nonce": 2**300}),
        ("/governance/proposals", {"deadline": -1}),
        ("/governance/proposals/-1/approvals", None),
    ],
)
def test_out_of_range_numbers_are_400(admin: GatewayClient, path: str, body: dict[str, int] | None) -> None:
    base = {
        "action": "add",
        "member_id": "0x" + "ab" * 32,
        "key": "0x" + "cd" * 20,
        "role": "hospital",
        "name": "X",
        "value": 0,
        "deadline": 2**40,
        "nonce": 0,
        "signature": "0x" + "11" * 65,
    }
    payload = {"signature": "0x" + "11" * 65} if body is None else {**base, **body}
    with pytest.raises(GatewayError) as err:
        admin._json("POST", path, payload)
    assert err.value.status == 400
    # the same keep-alive connection still works afterwards
    assert admin.members()


@pytest.mark.parametrize("address", ["notanaddress", "0x" + "zz" * 20, "0x" + "a" * 38])
def test_bad_address_is_400(admin: GatewayClient, address: str) -> None:
    with pytest.raises(GatewayError) as err:
        admin._json("GET", f"/governance/nonces/{address}")
    assert err.value.status == 400


def test_huge_sequence_number_is_400(auditor: GatewayClient) -> None:
    r = auditor.http.get("/audit/events", params={"from_seq": str(2**63)})
    assert r.status_code == 400 and r.json()["error"] == "invalid_input"


def test_unsigned_body_is_refused_before_it_is_read(stack) -> None:  # type: ignore[no-untyped-def]
    """Announce a 100 MB body and send none of it: the 401 must come without the body."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(stack.url)
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(
            b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; boundary=b\r\n"
            b"Content-Length: 104857600\r\n\r\n"
        )
        head = ""
        while "missing_signature" not in head:  # a timeout here means the gateway waited for the body
            chunk = sock.recv(65536).decode("latin-1")
            if not chunk:
                break
            head += chunk
    assert head.startswith("HTTP/1.1 401") and "missing_signature" in head


def test_json_endpoints_cap_their_body(admin: GatewayClient) -> None:
    r = admin.http.post("/patients/lookup", content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert r.status_code == 413


def test_second_gateway_on_a_workdir_is_refused(stack) -> None:  # type: ignore[no-untyped-def]
    before = json.loads((stack.workdir / "devnet.json").read_text())["gateway_service"]
    proc = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "serve", "--workdir", str(stack.workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "already runs" in proc.stderr
    assert json.loads((stack.workdir / "devnet.json").read_text())["gateway_service"] == before
