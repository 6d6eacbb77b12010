"""`medledger history --gateway URL --key KEYFILE --patient REF [--json]`: a patient's access
history through the SDK (a signed request with the patient's or a delegate's key).

Each entry carries its canonical record and inclusion proof; save one entry as a file and run
`medledger audit check FILE --rpc URL --contract ADDR` to verify that access against the chain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ledger.client import GatewayClient
from ledger.keyfiles import read_key


def history(gateway: str, key_file: Path, patient_ref: str) -> dict[str, Any]:
    account = read_key(key_file)
    with GatewayClient(gateway, account.key) as client:
        return client.history(patient_ref.lower())


def format_history(result: dict[str, Any]) -> str:
    lines = [f"access history of {result['patient_ref']} ({len(result['events'])} events)"]
    head = result.get("tree_head")
    if head:
        lines.append(f"anchored on-chain up to tree size {head['tree_size']}, root {head['root']}")
    for e in result["events"]:
        flags = "  BREAK-GLASS" if e.get("break_glass") else ""
        reason = f" ({e['reason']})" if e.get("reason") else ""
        purpose = f" for {e['purpose']}" if e.get("purpose") else ""
        who = e.get("who") or e.get("who_id") or "unknown"
        lines.append(
            f"  #{e['seq']:<6} {e['time']}  {who}: {e['action']}{purpose} -> {e['outcome']}{reason}"
            f"  [proof: {e['proof']['status']}]{flags}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = history(args.gateway, Path(args.key), args.patient)
    print(json.dumps(result, indent=2) if args.json else format_history(result))
    return 0
