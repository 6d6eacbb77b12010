"""`medledger audit export|verify|prove|check`: the audit log, verifiable with a chain endpoint alone.

* ``export --workdir W --out FILE [--format jsonl|fhir|dicom-xml|csv] [--all]`` writes the log.
  ``jsonl`` (default) is the verifiable export: a header, every on-chain anchor with its
  consistency proof against the previous one, and every anchored event with its inclusion proof
  (see ``ledger.exports.jsonl`` and docs/audit.md). The other formats are for reporting.
* ``verify --events FILE --rpc URL --contract ADDR [--json]`` trusts nothing in the file: it
  recomputes every leaf and anchor from the event fields, reads the anchors and the consent
  history from the chain (``--contract`` is the AccessLedger; the Consent contract named in the
  header must share its Membership), and runs ``ledger.verify.check_export``. Exit code 0 only
  when no problem is found; each problem is printed with its code and sequence number.
* ``prove SEQ --workdir W [--out FILE]`` writes one event with its inclusion proof; ``check FILE
  --rpc URL --contract ADDR`` verifies that one record against the chain alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from ledger.anchorer import ChainAnchor, read_chain_anchors
from ledger.chain import ChainClient
from ledger.errors import InvalidInput
from ledger.events import AuditEvent, leaf_hash
from ledger.exports.jsonl import FORMAT, hex0x, read_export, unhex
from ledger.merkle import verify_inclusion

__all__ = ["FORMAT", "check", "export", "prove", "run", "verify_export"]


def bundled_abis() -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = json.loads(
        resources.files("ledger").joinpath("abi.json").read_text()
    )
    return data


def _open(workdir: Path) -> tuple[Any, ChainClient, Any]:
    from devnet.manager import load
    from ledger.audit_log import AuditLog

    devnet = load(workdir)
    path = workdir / "gateway" / "audit.sqlite"
    if not path.exists():
        raise InvalidInput(f"no audit log in {workdir} (the gateway has not run there)")
    chain = ChainClient(devnet.rpc_url, bundled_abis(), devnet.contracts)
    return devnet, chain, AuditLog(path)


def export(workdir: Path, out: Path, fmt: str = "jsonl", include_unanchored: bool = False) -> dict[str, Any]:
    from ledger.exports import render

    devnet, chain, audit = _open(workdir)
    try:
        anchors = read_chain_anchors(chain)
        data = render(
            fmt,
            audit,
            anchors,
            chain_id=devnet.chain_id,
            contracts=devnet.contracts,
            gateway_id=str(devnet.data["gateway"]["member_id"]),
            include_unanchored=include_unanchored,
        )
        size = audit.size()
    finally:
        audit.close()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return {
        "format": fmt,
        "log_size": size,
        "tree_size": anchors[-1].tree_size if anchors else 0,
        "anchors": len(anchors),
        "out": str(out),
    }


def verify_export(path: Path, rpc: str, contract: str) -> dict[str, Any]:
    """Check an export against the chain at ``rpc`` alone; the report as a dict."""
    from ledger.verify import Problem, check_export, read_chain_consents

    header, rows = read_export(path)
    consent = header.get("consent")
    if not isinstance(consent, str):
        raise InvalidInput("the export header names no Consent contract")
    chain = ChainClient(rpc, bundled_abis(), {"AccessLedger": contract, "Consent": consent})
    ledger_membership = chain.contract("AccessLedger").functions.membership().call()
    consent_membership = chain.contract("Consent").functions.membership().call()
    chain.addresses["Membership"] = ledger_membership
    anchors: list[ChainAnchor] = read_chain_anchors(chain)
    consents = read_chain_consents(chain)
    report = check_export(header, rows, anchors, consents)
    if ledger_membership != consent_membership:
        report.problems.append(
            Problem(
                "consent_contract_mismatch", None, "the export names a Consent contract of another deployment"
            )
        )
    if str(header.get("access_ledger", "")).lower() != contract.lower():
        report.problems.append(
            Problem("contract_mismatch", None, "the export was made for another AccessLedger contract")
        )
    report.ok = not report.problems
    return report.to_dict()


def prove(workdir: Path, seq: int) -> dict[str, Any]:
    """One event's record and its inclusion proof in the latest on-chain tree anchor (or its own
    event anchor in per-event mode)."""
    devnet, chain, audit = _open(workdir)
    try:
        if not 0 <= seq < audit.size():
            raise InvalidInput(f"no event with sequence number {seq}")
        ev = audit.get(seq)
        anchors = read_chain_anchors(chain)
        head = next((a for a in reversed(anchors) if not a.single and a.tree_size > seq), None)
        single = next((a for a in anchors if a.single and a.first_seq == seq), None)
        if head is not None:
            anchor, path_ = head, audit.inclusion_proof(seq, head.tree_size)
        elif single is not None:
            anchor, path_ = single, []
        else:
            raise InvalidInput(f"event {seq} is not anchored yet")
    finally:
        audit.close()
    return {
        "type": "proof",
        "format": "medledger-audit-proof",
        "chain_id": devnet.chain_id,
        "access_ledger": devnet.contracts["AccessLedger"],
        "event": ev.to_dict(),
        "leaf": hex0x(leaf_hash(ev)),
        "anchor_index": anchor.index,
        "single": anchor.single,
        "tree_size": anchor.tree_size,
        "root": hex0x(anchor.root),
        "path": [hex0x(p) for p in path_],
    }


def check(proof_file: Path, rpc: str, contract: str) -> dict[str, Any]:
    """Check one record and its proof (from ``prove``, or a history entry with ``record`` and
    ``proof``) against the chain: leaf from the fields, path up to the on-chain root."""
    try:
        p = json.loads(proof_file.read_text(encoding="utf-8"))
        if "record" in p:  # an entry of `medledger history --json` / GET /patients/{ref}/history
            p = {"event": p["record"], **p["proof"]}
        ev = AuditEvent.from_dict(p["event"])
        tree_size = int(p["tree_size"])
        path_ = [unhex(x) for x in p["path"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(
            f"{proof_file.name} is not a proof written by `medledger audit prove` ({type(exc).__name__})"
        ) from None
    chain = ChainClient(rpc, bundled_abis(), {"AccessLedger": contract})
    anchors = read_chain_anchors(chain)
    want_single = bool(p.get("single"))
    anchor = next((a for a in anchors if a.tree_size == tree_size and a.single == want_single), None)
    leaf = leaf_hash(ev)
    problems = []
    if anchor is None:
        problems.append(f"no on-chain anchor has tree size {tree_size}")
    elif anchor.single:
        if path_ or ev.seq != anchor.first_seq or leaf != anchor.root:
            problems.append("this record's leaf hash is not the one anchored on-chain for its seq")
    elif not verify_inclusion(leaf, ev.seq, tree_size, path_, anchor.root):
        problems.append("the proof does not lead from this record to the on-chain root")
    return {
        "ok": not problems,
        "seq": ev.seq,
        "leaf": hex0x(leaf),
        "tree_size": tree_size,
        "anchor_index": anchor.index if anchor else None,
        "anchor_block": anchor.block_number if anchor else None,
        "root": hex0x(anchor.root) if anchor else None,
        "problems": problems,
    }


def run(args: argparse.Namespace) -> int:
    cmd = args.audit_command
    if cmd == "export":
        result = export(Path(args.workdir).resolve(), Path(args.out), args.format, args.all)
        print(json.dumps(result))
        return 0
    if cmd == "verify":
        report = verify_export(Path(args.events), args.rpc, args.contract)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(
                f"verify: {'OK' if report['ok'] else 'FAILED'}: {report['events_checked']} events, "
                f"{report['anchors_checked']} anchors, {report['views_checked']} views, "
                f"break-glass events {report['break_glass_events']}"
            )
            for pr in report["problems"]:
                where = f"seq {pr['seq']}" if pr["seq"] is not None else "export"
                print(f"  {where}: {pr['code']}: {pr['detail']}")
        return 0 if report["ok"] else 1
    if cmd == "prove":
        out = prove(Path(args.workdir).resolve(), args.seq)
        text = json.dumps(out, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
        return 0
    result = check(Path(args.proof), args.rpc, args.contract)
    if getattr(args, "json", False) or result["ok"] is False:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"check: OK: event {result['seq']} is included in on-chain anchor {result['anchor_index']} "
            f"(tree size {result['tree_size']}, block {result['anchor_block']})"
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
