"""`medledger audit export|verify|prove|check`: the audit log, verifiable with a chain endpoint alone.

Export format (JSON lines, UTF-8):
  line 1: {"type": "header", "format": "medledger-audit-export", "version": 1, "chain_id",
           "access_ledger", "consent", "tree_size", "root", "exported_ms"}
  then one line per event, in sequence order:
          {"type": "event", "event": {...canonical fields...}, "leaf": "0x..",
           "proof": {"tree_size": N, "path": ["0x..", ...]}}
  where `proof` is the RFC 9162 inclusion proof of the event in the tree of the last anchor
  (or null when the event is not yet anchored).

`verify` trusts none of it: it recomputes every leaf from the event fields, reads every anchor
and the consent history from the chain (`--rpc`, `--contract` = AccessLedger address; the
Consent contract is taken from the header and must share the AccessLedger's Membership), and
runs `ledger.verify.verify_log`. `prove SEQ` writes one event with its proof; `check` verifies
that one record against the chain: the leaf from the fields, the path to an anchored root.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ledger.anchorer import ChainAnchor, read_chain_anchors
from ledger.chain import ChainClient
from ledger.errors import InvalidInput
from ledger.events import AuditEvent, leaf_hash
from ledger.merkle import verify_inclusion

FORMAT = "medledger-audit-export"


def bundled_abis() -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = json.loads(
        resources.files("ledger").joinpath("abi.json").read_text()
    )
    return data


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def export(workdir: Path, out: Path) -> dict[str, Any]:
    from devnet.manager import load
    from ledger.audit_log import AuditLog

    devnet = load(workdir)
    chain = ChainClient(devnet.rpc_url, bundled_abis(), devnet.contracts)
    anchors = read_chain_anchors(chain)
    head = anchors[-1] if anchors else None
    audit = AuditLog(workdir / "gateway" / "audit.sqlite")
    try:
        size = head.tree_size if head else 0
        header = {
            "type": "header",
            "format": FORMAT,
            "version": 1,
            "chain_id": devnet.chain_id,
            "access_ledger": devnet.contracts["AccessLedger"],
            "consent": devnet.contracts["Consent"],
            "tree_size": size,
            "root": _hex(audit.root(size)) if size else None,
            "exported_ms": int(time.time() * 1000),
        }
        tmp = out.with_name(out.name + ".tmp")
        count = 0
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps(header, sort_keys=True) + "\n")
            for ev in audit.iter_all():
                proof = None
                if ev.seq < size:
                    proof = {
                        "tree_size": size,
                        "path": [_hex(p) for p in audit.inclusion_proof(ev.seq, size)],
                    }
                line = {"type": "event", "event": ev.to_dict(), "leaf": _hex(leaf_hash(ev)), "proof": proof}
                fh.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(out)
    finally:
        audit.close()
    return {"events": count, "tree_size": size, "out": str(out)}


def read_export(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read the export {path}: {exc}") from exc
    if not lines or lines[0].get("type") != "header" or lines[0].get("format") != FORMAT:
        raise InvalidInput(f"{path} is not a MedLedger audit export (no header line)")
    return lines[0], lines[1:]


def verify_export(path: Path, rpc: str, contract: str) -> dict[str, Any]:
    from ledger.verify import Problem, read_chain_consents, verify_log

    header, rows = read_export(path)
    events = []
    extra: list[Problem] = []
    for i, row in enumerate(rows):
        try:
            events.append(AuditEvent.from_dict(row["event"]))
        except (KeyError, TypeError, ValueError) as exc:
            extra.append(Problem("malformed_event", None, f"line {i + 2}: {exc}"))
    chain = ChainClient(rpc, bundled_abis(), {"AccessLedger": contract, "Consent": header["consent"]})
    ledger_membership = chain.contract("AccessLedger").functions.membership().call()
    consent_membership = chain.contract("Consent").functions.membership().call()
    if ledger_membership != consent_membership:
        extra.append(
            Problem(
                "consent_contract_mismatch", None, "the export names a Consent contract of another deployment"
            )
        )
    chain.addresses["Membership"] = ledger_membership
    anchors: list[ChainAnchor] = read_chain_anchors(chain)
    consents = read_chain_consents(chain)
    report = verify_log(events, anchors, consents)
    # proofs in the export must verify too (they are what a patient would be handed)
    roots = {a.tree_size: a.root for a in anchors if not a.single}
    for row, ev in zip(rows, events, strict=False):
        proof = row.get("proof")
        if not proof:
            continue
        root = roots.get(int(proof["tree_size"]))
        path_ = [bytes.fromhex(p.removeprefix("0x")) for p in proof["path"]]
        if root is None or not verify_inclusion(leaf_hash(ev), ev.seq, int(proof["tree_size"]), path_, root):
            extra.append(
                Problem("bad_proof", ev.seq, "the exported inclusion proof does not verify against the chain")
            )
    if header.get("tree_size", 0) and anchors and header["tree_size"] < anchors[-1].tree_size:
        extra.append(
            Problem(
                "stale_export",
                header["tree_size"],
                f"the chain has anchored {anchors[-1].tree_size} events since this export",
            )
        )
    report.problems.extend(extra)
    report.ok = not report.problems
    return report.to_dict()


def prove(workdir: Path, seq: int) -> dict[str, Any]:
    from devnet.manager import load
    from ledger.audit_log import AuditLog

    devnet = load(workdir)
    chain = ChainClient(devnet.rpc_url, bundled_abis(), devnet.contracts)
    anchors = [a for a in read_chain_anchors(chain) if not a.single]
    audit = AuditLog(workdir / "gateway" / "audit.sqlite")
    try:
        if not 0 <= seq < audit.size():
            raise InvalidInput(f"no event with sequence number {seq}")
        ev = audit.get(seq)
        covering = [a for a in anchors if a.tree_size > seq]
        if not covering:
            raise InvalidInput(f"event {seq} is not anchored yet")
        head = covering[-1]
        path_ = audit.inclusion_proof(seq, head.tree_size)
    finally:
        audit.close()
    return {
        "type": "proof",
        "chain_id": devnet.chain_id,
        "access_ledger": devnet.contracts["AccessLedger"],
        "event": ev.to_dict(),
        "leaf": _hex(leaf_hash(ev)),
        "anchor_index": head.index,
        "tree_size": head.tree_size,
        "root": _hex(head.root),
        "path": [_hex(p) for p in path_],
    }


def check(proof_file: Path, rpc: str, contract: str) -> dict[str, Any]:
    try:
        p = json.loads(proof_file.read_text())
        ev = AuditEvent.from_dict(p["event"])
        tree_size = int(p["tree_size"])
        path_ = [bytes.fromhex(x.removeprefix("0x")) for x in p["path"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{proof_file} is not a proof written by `medledger audit prove`: {exc}") from exc
    chain = ChainClient(rpc, bundled_abis(), {"AccessLedger": contract})
    anchor = next((a for a in read_chain_anchors(chain) if a.tree_size == tree_size and not a.single), None)
    problems = []
    if anchor is None:
        problems.append(f"no on-chain anchor has tree size {tree_size}")
    elif not verify_inclusion(leaf_hash(ev), ev.seq, tree_size, path_, anchor.root):
        problems.append("the proof does not lead from this event to the on-chain root")
    return {
        "ok": not problems,
        "seq": ev.seq,
        "tree_size": tree_size,
        "anchor_index": anchor.index if anchor else None,
        "problems": problems,
    }


def run(args: argparse.Namespace) -> int:
    cmd = args.audit_command
    if cmd == "export":
        print(json.dumps(export(Path(args.workdir).resolve(), Path(args.out))))
        return 0
    if cmd == "verify":
        report = verify_export(Path(args.events), args.rpc, args.contract)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(
                f"verify: {'OK' if report['ok'] else 'FAILED'}: {report['events_checked']} events, {report['anchors_checked']} anchors"
            )
            for pr in report["problems"]:
                print(f"  seq {pr['seq']}: {pr['code']}: {pr['detail']}")
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
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
