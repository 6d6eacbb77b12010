"""The verifiable audit export (JSON lines): the log with an inclusion proof per event and a
consistency proof per anchor. The format is specified in docs/audit.md ("Export format").

    line 1      {"type": "header", "format": "medledger-audit-export", "version": 2, ...}
    then        {"type": "anchor", "index", "first_seq", "tree_size", "root", "single",
                 "block_number", "consistency": {"from_index", "from_size", "path"} | null}
                one per on-chain anchor, in index order
    then        {"type": "event", "event": {...}, "leaf": "0x..", "proof": {...} | null}
                one per event, in sequence order

Only on-chain anchors are used (the caller reads them from the chain), and by default only the
anchored prefix of the log is written, so an export verifies with a chain endpoint alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ledger import merkle
from ledger.anchorer import ChainAnchor
from ledger.audit_log import AuditLog
from ledger.errors import InvalidInput
from ledger.events import AuditEvent, leaf_hash

FORMAT = "medledger-audit-export"
VERSION = 2


def hex0x(b: bytes) -> str:
    return "0x" + b.hex()


def unhex(s: str) -> bytes:
    return bytes.fromhex(s.removeprefix("0x"))


class TreeLevels:
    """Every node of the RFC 9162 tree over ``leaves`` (levels bottom up, an odd last node carried
    up unchanged), so each inclusion path costs O(log n) instead of O(n) hashes."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        level = list(leaves)
        self.size = len(level)
        self.levels: list[list[bytes]] = [level]
        while len(level) > 1:
            nxt = [merkle.node_hash(a, b) for a, b in zip(level[0::2], level[1::2], strict=False)]
            if len(level) & 1:
                nxt.append(level[-1])
            self.levels.append(nxt)
            level = nxt

    def root(self) -> bytes:
        return self.levels[-1][0] if self.size else merkle.EMPTY_ROOT

    def path(self, index: int) -> list[bytes]:
        """``PATH(index, D[n])`` (RFC 9162 2.1.3.1), leaf first."""
        if not 0 <= index < self.size:
            raise ValueError(f"leaf index {index} out of range for tree size {self.size}")
        out: list[bytes] = []
        i = index
        for level in self.levels[:-1]:
            sibling = i ^ 1
            if sibling < len(level):
                out.append(level[sibling])
            i >>= 1
        return out


def export_lines(
    audit: AuditLog,
    anchors: Sequence[ChainAnchor],
    *,
    chain_id: int,
    access_ledger: str,
    consent: str,
    include_unanchored: bool = False,
) -> Iterator[dict[str, Any]]:
    """The export's lines (as dicts), for the on-chain ``anchors``."""
    size = anchors[-1].tree_size if anchors else 0
    log_size = audit.size()
    if size > log_size:
        raise InvalidInput(f"the chain anchors {size} events but the log holds {log_size}")
    leaves = audit.leaf_hashes(0, size)
    head = next((a for a in reversed(anchors) if not a.single), None)
    tree = TreeLevels(leaves[: head.tree_size] if head else [])
    yield {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "encoding": 1,
        "chain_id": chain_id,
        "access_ledger": access_ledger,
        "consent": consent,
        "tree_size": size,
        "root": hex0x(tree.root() if head and head.tree_size == size else merkle.root(leaves))
        if size
        else None,
        "anchors": len(anchors),
        "log_size": log_size,
        "events": log_size if include_unanchored else size,
        "exported_ms": int(time.time() * 1000),
    }
    prev: ChainAnchor | None = None
    for a in anchors:
        consistency = None
        if not a.single and prev is not None:
            consistency = {
                "from_index": prev.index,
                "from_size": prev.tree_size,
                "path": [hex0x(p) for p in merkle.consistency_proof(leaves[: a.tree_size], prev.tree_size)],
            }
        yield {
            "type": "anchor",
            "index": a.index,
            "first_seq": a.first_seq,
            "tree_size": a.tree_size,
            "root": hex0x(a.root),
            "single": a.single,
            "block_number": a.block_number,
            "consistency": consistency,
        }
        if not a.single:
            prev = a
    singles = {a.first_seq: a for a in anchors if a.single}
    stop = log_size if include_unanchored else size
    pos = 0
    for ev in audit.iter_all():
        if ev.seq >= stop:
            break
        if ev.seq != pos:
            raise InvalidInput(f"the log has a gap at seq {pos}")
        pos += 1
        proof: dict[str, Any] | None = None
        if head is not None and ev.seq < head.tree_size:
            proof = {
                "anchor_index": head.index,
                "tree_size": head.tree_size,
                "path": [hex0x(p) for p in tree.path(ev.seq)],
            }
        elif ev.seq in singles:
            s = singles[ev.seq]
            proof = {"anchor_index": s.index, "tree_size": s.tree_size, "single": True, "path": []}
        yield {"type": "event", "event": ev.to_dict(), "leaf": hex0x(leaf_hash(ev)), "proof": proof}


def write_export(lines: Iterator[dict[str, Any]], out: Path) -> int:
    """Write ``lines`` atomically to ``out``; returns the number of event lines."""
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(dumps_line(line))
            count += line["type"] == "event"
    tmp.replace(out)
    return count


def dumps_line(line: dict[str, Any]) -> str:
    return json.dumps(line, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_export(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, the other lines) of an export file; raises InvalidInput if it is not one."""
    try:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read the export {path.name}: {type(exc).__name__}") from None
    if (
        not lines
        or not isinstance(lines[0], dict)
        or lines[0].get("type") != "header"
        or lines[0].get("format") != FORMAT
    ):
        raise InvalidInput(f"{path.name} is not a MedLedger audit export (no header line)")
    return lines[0], lines[1:]


def events_of(rows: Sequence[dict[str, Any]]) -> list[AuditEvent]:
    """The events of an export's lines (malformed ones skipped)."""
    out = []
    for row in rows:
        if isinstance(row, dict) and row.get("type") == "event":
            try:
                out.append(AuditEvent.from_dict(row["event"]))
            except (KeyError, TypeError, ValueError):
                continue
    return out
