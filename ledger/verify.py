"""Audit verification: an event log checked against the chain alone.

Inputs are the log's events (from the gateway's database or from an export), the
AccessLedger anchors, and the Consent contract's grant/revoke history, all read from the
chain. Nothing of the gateway's own state is trusted. Checks, each problem named with the
sequence number it concerns:

- ``gap`` / ``out_of_order`` / ``duplicate``: sequence numbers must be exactly 0..n-1 in order;
- ``time_backwards``: log times never decrease;
- ``anchor_mismatch``: every tree anchor's root equals the RFC 9162 root of events
  0..treeSize-1 (every event anchor's leaf equals that event's leaf hash); an edited, deleted,
  inserted or reordered event changes the root of every anchor that covers it;
- ``missing_events``: an anchor covers events the log does not have (the tail was dropped);
- ``anchor_without_events``: an anchor none of whose events are in the log;
- ``unanchored``: events after the last anchor;
- ``view_without_consent`` / ``consent_not_in_force`` / ``consent_granted_later``: every
  successful VIEW names a consent that, on-chain, granted this actor this study and purpose
  and was in force at the event's time — granted in a block no later than the event, not
  revoked before it, within its window — unless it is the custodian's own read or a flagged
  break-glass read (ETREAT with a justification commitment), which is listed instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ledger.anchorer import ChainAnchor
from ledger.chain_index import ZERO32, ConsentState
from ledger.events import Action, AuditEvent, Outcome, leaf_hash
from ledger.merkle import MerkleFrontier, verify_consistency, verify_inclusion
from ledger.purposes import BREAK_GLASS, PURPOSES


@dataclass(frozen=True)
class Problem:
    code: str
    seq: int | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "seq": self.seq, "detail": self.detail}


@dataclass
class Report:
    ok: bool
    events_checked: int
    anchors_checked: int
    tree_size: int
    problems: list[Problem] = field(default_factory=list)
    break_glass: list[int] = field(default_factory=list)
    views_checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events_checked": self.events_checked,
            "anchors_checked": self.anchors_checked,
            "tree_size": self.tree_size,
            "views_checked": self.views_checked,
            "break_glass_events": self.break_glass,
            "problems": [p.to_dict() for p in self.problems],
        }


# Time tolerance between the gateway's clock (event time) and block timestamps, in seconds.
CLOCK_TOLERANCE_S = 2


def verify_log(
    events: Sequence[AuditEvent],
    anchors: Sequence[ChainAnchor],
    consents: dict[int, ConsentState],
    *,
    max_problems: int = 1000,
) -> Report:
    problems: list[Problem] = []

    def problem(code: str, seq: int | None, detail: str) -> None:
        if len(problems) < max_problems:
            problems.append(Problem(code, seq, detail))

    # 1. sequence numbers and time
    seqs = [ev.seq for ev in events]
    present: set[int] = set()
    for s in seqs:
        if s in present:
            problem("duplicate", s, "sequence number appears twice (an inserted or replayed event)")
        present.add(s)
    for s in range(max(seqs) + 1 if seqs else 0):
        if s not in present:
            problem("gap", s, "no event has this sequence number (deleted)")
    last_time = -1
    for i, ev in enumerate(events):
        if i and ev.seq < events[i - 1].seq:
            problem("out_of_order", ev.seq, f"comes after sequence number {events[i - 1].seq}")
        if ev.time_ms < last_time:
            problem("time_backwards", ev.seq, "event time is earlier than the previous event's")
        last_time = max(last_time, ev.time_ms)

    # 2. anchors against the log
    frontier = MerkleFrontier()
    leaves = [leaf_hash(ev) for ev in events]
    prev_size = 0
    for a in anchors:
        if a.first_seq != prev_size:
            problem(
                "anchor_sequence", a.first_seq, f"anchor {a.index} starts at {a.first_seq}, not {prev_size}"
            )
        if a.tree_size > len(leaves):
            if a.first_seq >= len(leaves):
                problem(
                    "anchor_without_events",
                    a.first_seq,
                    f"anchor {a.index} commits to events {a.first_seq}..{a.tree_size - 1}, none of which "
                    "are in the log",
                )
            else:
                problem(
                    "missing_events",
                    len(leaves),
                    f"anchor {a.index} covers {a.tree_size} events but the log has {len(leaves)}",
                )
            prev_size = a.tree_size
            continue
        while frontier.size < a.tree_size:
            frontier.append(leaves[frontier.size])
        expected = leaves[a.tree_size - 1] if a.single else frontier.root()
        if expected != a.root:
            problem(
                "anchor_mismatch",
                a.first_seq,
                f"anchor {a.index} (events {a.first_seq}..{a.tree_size - 1}) does not match the log: "
                "an event in that range, or before it, was edited, deleted, inserted or reordered",
            )
        prev_size = a.tree_size
    anchored = anchors[-1].tree_size if anchors else 0
    if len(events) > anchored:
        problem("unanchored", anchored, f"{len(events) - anchored} events after the last anchor")

    # 3. every VIEW was permitted
    custodians: dict[str, set[str]] = {}
    break_glass: list[int] = []
    views = 0
    for ev in events:
        if ev.action == Action.UPLOAD and ev.outcome == Outcome.OK:
            custodians.setdefault(ev.study_ref, set()).add(ev.actor)
        if ev.action != Action.VIEW or ev.outcome != Outcome.OK:
            continue
        views += 1
        if ev.break_glass:
            if ev.purpose != BREAK_GLASS or not ev.justification_commitment:
                problem("break_glass_invalid", ev.seq, "break-glass read without ETREAT and a justification")
            break_glass.append(ev.seq)
            continue
        if not ev.consent_id:
            if ev.actor in custodians.get(ev.study_ref, set()):
                continue
            problem(
                "view_without_consent", ev.seq, "a VIEW names no consent and the reader is not the custodian"
            )
            continue
        c = consents.get(int(ev.consent_id)) if ev.consent_id.isdigit() else None
        t = ev.time_ms // 1000
        if c is None:
            problem("view_without_consent", ev.seq, f"consent {ev.consent_id} does not exist on-chain")
            continue
        if c.patient_ref != ev.patient_ref or c.grantee != ev.actor:
            problem(
                "consent_not_in_force", ev.seq, f"consent {c.consent_id} is for another patient or grantee"
            )
            continue
        if c.study_ref not in (ZERO32, ev.study_ref):
            problem("consent_not_in_force", ev.seq, f"consent {c.consent_id} covers another study")
            continue
        bit = PURPOSES.get(ev.purpose, (-1, ""))[0]
        if bit < 0 or not (c.purposes >> bit & 1):
            problem(
                "consent_not_in_force", ev.seq, f"consent {c.consent_id} does not cover purpose {ev.purpose}"
            )
            continue
        if c.granted_at > t + CLOCK_TOLERANCE_S:
            problem(
                "consent_granted_later",
                ev.seq,
                f"consent {c.consent_id} was recorded on-chain after this read (backdated)",
            )
            continue
        if not (c.not_before <= t + CLOCK_TOLERANCE_S and t < c.not_after + CLOCK_TOLERANCE_S):
            problem("consent_not_in_force", ev.seq, f"consent {c.consent_id} was outside its validity window")
            continue
        if c.revoked_at is not None and c.revoked_at + CLOCK_TOLERANCE_S <= t:
            problem("consent_not_in_force", ev.seq, f"consent {c.consent_id} was revoked before this read")
            continue
        if ev.consent_version and ev.consent_version != c.version:
            problem("consent_not_in_force", ev.seq, f"consent {c.consent_id} version differs")

    return Report(
        ok=not problems,
        events_checked=len(events),
        anchors_checked=len(anchors),
        tree_size=anchored,
        problems=problems,
        break_glass=break_glass,
        views_checked=views,
    )


def read_chain_consents(chain: Any, from_block: int = 0) -> dict[int, ConsentState]:
    """The Consent contract's full grant/revoke history, from its events (chain only)."""
    from ledger.chain_index import ChainIndex

    idx = ChainIndex(chain, from_block=from_block, max_staleness=1e9)
    idx.sync()
    return dict(idx.consents)


_EVENT_TYPES: dict[str, type] = {
    f.name: (bool if f.type in ("bool", bool) else int if f.type in ("int", int) else str)
    for f in fields(AuditEvent)
}


def _event_of(data: Any) -> AuditEvent:
    """An exported event, type-checked field by field (ValueError when malformed)."""
    if not isinstance(data, dict):
        raise ValueError("an event is a JSON object")
    ev = AuditEvent.from_dict(data)
    for name, want in _EVENT_TYPES.items():
        value: Any = getattr(ev, name)
        if type(value) is not want or (isinstance(value, int) and value < 0):
            raise ValueError(f"field {name} has the wrong type")
    return ev


def _hash_of(value: Any) -> bytes | None:
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        return None
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        return None


def _proves(leaf: bytes | None, seq: int, a: ChainAnchor, path: list[bytes]) -> bool:
    if leaf is None:
        return False
    if a.single:
        return not path and seq == a.first_seq and leaf == a.root
    return verify_inclusion(leaf, seq, a.tree_size, path, a.root)


def check_export(
    header: dict[str, Any],
    rows: Sequence[Any],
    anchors: Sequence[ChainAnchor],
    consents: dict[int, ConsentState],
    *,
    max_problems: int = 1000,
) -> Report:
    """Verify an export (``header`` and the other lines, see ``ledger.exports.jsonl``) against the
    on-chain ``anchors`` and ``consents``: :func:`verify_log` on its events, plus every exported
    anchor equal to the chain's, every consistency proof between consecutive tree anchors and
    every event's inclusion proof checked against the on-chain roots, and the export not stale.
    """
    extra: list[Problem] = []
    events: list[AuditEvent] = []
    event_rows: list[dict[str, Any]] = []
    anchor_rows: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        kind = row.get("type") if isinstance(row, dict) else None
        if kind == "event":
            try:
                events.append(_event_of(row.get("event")))
                event_rows.append(row)
            except (TypeError, ValueError) as exc:
                extra.append(Problem("malformed_event", None, f"line {i + 2}: {exc}"))
        elif kind == "anchor":
            anchor_rows.append(row)
        else:
            extra.append(Problem("malformed_line", None, f"line {i + 2} is neither an event nor an anchor"))
    report = verify_log(events, anchors, consents, max_problems=max_problems)

    # the export's anchors are the chain's, and each tree anchor extends the previous one
    by_index = {a.index: a for a in anchors}
    exported_anchor: dict[int, dict[str, Any]] = {}
    for row in anchor_rows:
        idx = row.get("index")
        a = by_index.get(idx) if isinstance(idx, int) else None
        if a is None or (
            row.get("first_seq"),
            row.get("tree_size"),
            _hash_of(row.get("root")),
            bool(row.get("single")),
        ) != (a.first_seq, a.tree_size, a.root, a.single):
            extra.append(
                Problem(
                    "anchor_not_on_chain",
                    row.get("first_seq") if isinstance(row.get("first_seq"), int) else None,
                    f"exported anchor {idx} differs from the chain's",
                )
            )
            continue
        exported_anchor[a.index] = row
    prev: ChainAnchor | None = None
    for a in anchors:
        if a.single:
            continue
        row_ = exported_anchor.get(a.index)
        if prev is not None and row_ is not None:
            c = row_.get("consistency")
            path = [_hash_of(p) for p in c.get("path", [])] if isinstance(c, dict) else None
            if c is None:
                extra.append(
                    Problem(
                        "missing_consistency_proof", a.first_seq, f"anchor {a.index} has no consistency proof"
                    )
                )
            elif (
                path is None
                or None in path
                or c.get("from_size") != prev.tree_size
                or not verify_consistency(
                    prev.tree_size, a.tree_size, prev.root, a.root, [p for p in path if p is not None]
                )
            ):
                extra.append(
                    Problem(
                        "bad_consistency_proof",
                        a.first_seq,
                        f"anchor {a.index} is not proven an extension of anchor {prev.index}",
                    )
                )
        prev = a
    exported_count = header.get("anchors")
    if isinstance(exported_count, int) and len(anchor_rows) < min(exported_count, len(anchors)):
        extra.append(
            Problem("anchor_missing_from_export", None, "the export lists fewer anchors than its header says")
        )

    # every event's inclusion proof leads to an on-chain root
    anchored = anchors[-1].tree_size if anchors else 0
    for row, ev in zip(event_rows, events, strict=True):
        proof = row.get("proof")
        leaf = leaf_hash(ev)
        if not isinstance(proof, dict):
            if ev.seq < anchored:
                extra.append(Problem("missing_proof", ev.seq, "an anchored event has no inclusion proof"))
            continue
        a = by_index.get(proof.get("anchor_index"))  # type: ignore[arg-type]
        size = proof.get("tree_size")
        raw = proof.get("path")
        path = [_hash_of(p) for p in raw] if isinstance(raw, list) else [None]
        ok = False
        exported_leaf = _hash_of(row.get("leaf"))
        if a is not None and size == a.tree_size and None not in path and isinstance(size, int):
            hashes = [p for p in path if p is not None]

            ok = _proves(leaf, ev.seq, a, hashes)
            if (
                not ok
                and exported_leaf is not None
                and exported_leaf != leaf
                and _proves(exported_leaf, ev.seq, a, hashes)
            ):
                extra.append(
                    Problem(
                        "edited",
                        ev.seq,
                        "the record's fields were changed: its proof holds for the original record only",
                    )
                )
                continue
        if not ok:
            extra.append(
                Problem("bad_proof", ev.seq, "the exported inclusion proof does not verify against the chain")
            )

    # the export is the chain's current view, and its header matches the chain
    size = header.get("tree_size")
    if isinstance(size, int) and anchors and size < anchors[-1].tree_size:
        extra.append(
            Problem(
                "stale_export",
                size,
                f"the chain has anchored {anchors[-1].tree_size} events, the export only {size}",
            )
        )
    head_root = (
        {a.tree_size: a.root for a in anchors if not a.single}.get(size) if isinstance(size, int) else None
    )
    if size and head_root is not None and _hash_of(header.get("root")) != head_root:
        extra.append(Problem("header_mismatch", None, "the header's root is not the chain's root"))

    report.problems.extend(extra[: max(0, max_problems - len(report.problems))])
    report.problems.sort(key=lambda p: (p.seq is None, p.seq if p.seq is not None else 0))
    report.ok = not report.problems
    return report
