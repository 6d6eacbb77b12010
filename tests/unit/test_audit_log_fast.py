"""The AuditLog hot path: template encoding, append_batch, batched frontier, bucketed lookup keys,
the schema 1 -> 2 migration and anchor bookkeeping under load. Real SQLite files, no timing."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

import pytest

from ledger import merkle
from ledger.audit_log import _BUCKET_BITS, AppendedBatch, AuditLog, _extended, _prepare
from ledger.errors import InvalidInput
from ledger.events import Action, AuditEvent, EventDraft, Outcome, canonical_bytes, leaf_hash

P1 = "0x" + "11" * 32
P2 = "0x" + "22" * 32
S1 = "0x" + "aa" * 32

ALPHABET = [
    '"',
    "\\",
    "\x00",
    "\x1f",
    "\x7f",
    "\n",
    "\t",
    "é",
    "東",
    "😀",
    "\u2028",
    ",",
    ":",
    "{",
    "}",
    "a",
    "0",
]


CLEAN = [c for c in ALPHABET if c not in '"\\\x00\x1f\n\t']
ESCAPED = set('"\\\x00\x1f\n\t')


def _text(rng: random.Random, alphabet: list[str]) -> str:
    if rng.random() < 0.3:
        return ""
    if rng.random() < 0.4:
        return "0x" + rng.randbytes(32).hex()
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))


def random_draft(rng: random.Random) -> EventDraft:
    alphabet = CLEAN if rng.random() < 0.5 else ALPHABET

    def random_text(rng: random.Random) -> str:
        return _text(rng, alphabet)

    return EventDraft(
        action=rng.choice([Action.VIEW, "VIEW", "UPLOAD", random_text(rng)]),
        outcome=rng.choice([Outcome.OK, "denied", random_text(rng)]),
        actor=random_text(rng),
        actor_key=random_text(rng),
        actor_role=random_text(rng),
        reason=random_text(rng),
        purpose=random_text(rng),
        patient_ref=random_text(rng),
        study_ref=random_text(rng),
        object_ref=random_text(rng),
        request_id=random_text(rng),
        consent_id=random_text(rng),
        consent_version=rng.choice([0, 1, 7, 2**40]),
        break_glass=rng.random() < 0.5,
        justification_commitment=random_text(rng),
        counterparty=random_text(rng),
    )


def test_template_encoding_is_byte_identical_to_canonical_bytes() -> None:
    rng = random.Random(4)
    escaped_seen = raw_seen = 0
    for _ in range(3_000):
        d = random_draft(rng)
        prepared = _prepare(d)
        seq, t = rng.choice([0, 1, 65_535, 10**12]), rng.choice([0, 1_700_000_000_123])
        expected = AuditEvent.from_draft(d, seq=seq, time_ms=t)
        assert prepared.body(seq, t) == canonical_bytes(expected)
        event = prepared.event(seq, t)
        assert event == expected
        assert all(type(v) in (str, int, bool) for v in event.to_dict().values())  # no StrEnum left
        needs_escape = any(isinstance(v, str) and ESCAPED & set(v) for v in expected.to_dict().values())
        escaped_seen += needs_escape
        raw_seen += not needs_escape
    assert escaped_seen > 100 and raw_seen > 100  # both paths were exercised


def test_bad_drafts_are_refused_by_append_batch(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        for bad in [
            EventDraft(action="VIEW", outcome="ok", reason=3),  # type: ignore[arg-type]
            EventDraft(action="VIEW", outcome="ok", study_ref="\ud800"),
            EventDraft(action="VIEW", outcome="ok", consent_version=-1),
        ]:
            with pytest.raises(InvalidInput):
                log.append_batch([EventDraft(action="VIEW", outcome="ok"), bad])
        assert log.size() == 0
        assert log.append_batch([]) == AppendedBatch(0, 0, 0)


def test_extended_frontier_equals_leaf_by_leaf() -> None:
    rng = random.Random(9)
    leaves = [rng.randbytes(32) for _ in range(300)]
    for start in [0, 1, 2, 3, 5, 8, 13, 64, 100]:
        for count in [0, 1, 2, 3, 7, 16, 31, 64, 100, 200]:
            base = merkle.MerkleFrontier.from_leaves(leaves[:start])
            got = _extended(base, leaves[start : start + count])
            want = merkle.MerkleFrontier.from_leaves(leaves[: start + count])
            assert (got.size, got.hashes) == (want.size, want.hashes)
            assert got.root() == merkle.root(leaves[: start + count])
            assert base.size == start  # the input is not changed


def test_mixed_appends_from_threads_are_gap_free_and_hash_right(tmp_path: Path) -> None:
    rng = random.Random(1)
    drafts = [random_draft(rng) for _ in range(2_400)]
    got: list[tuple[int, EventDraft]] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        mine = drafts[t * 400 : (t + 1) * 400]
        i = 0
        while i < len(mine):
            kind = (t + i) % 3
            if kind == 0:
                pairs = [(log.append(mine[i]).seq, mine[i])]
                i += 1
            elif kind == 1:
                chunk = mine[i : i + 7]
                pairs = [(e.seq, d) for e, d in zip(log.append_many(chunk), chunk, strict=True)]
                i += 7
            else:
                chunk = mine[i : i + 50]
                done = log.append_batch(chunk)
                assert done.size == len(chunk)
                pairs = list(zip(done.seqs, chunk, strict=True))
                i += 50
            with lock:
                got.extend(pairs)

    with AuditLog(tmp_path / "a.db") as log:
        pool = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        assert sorted(seq for seq, _ in got) == list(range(len(drafts)))
        for seq, d in got:
            stored = log.get(seq)
            assert stored == AuditEvent.from_draft(d, seq=seq, time_ms=stored.time_ms)
        events = list(log.iter_all())
        assert log.leaf_hashes(0, len(events)) == [leaf_hash(e) for e in events]
        assert log.root() == merkle.root([leaf_hash(e) for e in events])
        assert log.check_integrity() == len(drafts)


def _lookup_buckets(path: Path, column: str) -> set[int]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT DISTINCT {column}_key >> 40 FROM events WHERE {column}_key IS NOT NULL")
        return {r[0] for r in rows}


def test_lookups_span_key_buckets(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    n = (1 << _BUCKET_BITS) + 3_000  # into the second bucket
    drafts = [
        EventDraft(
            action="VIEW",
            outcome="ok",
            patient_ref=P1 if i % 1_000 == 0 else P2,
            study_ref=S1 if i % 4_000 == 0 else "",
            request_id=f"r{i}",
        )
        for i in range(n)
    ]
    with AuditLog(path) as log:
        for lo in range(0, n, 10_000):
            log.append_batch(drafts[lo : lo + 10_000])
        hits = log.by_patient(P1)
        assert [e.seq for e in hits] == [i for i in range(n) if i % 1_000 == 0]
        assert [e.seq for e in log.by_study(S1)] == [i for i in range(n) if i % 4_000 == 0]
        assert hits[-1].seq >= 1 << _BUCKET_BITS
        assert _lookup_buckets(path, "patient") == {0, 1}
        assert _lookup_buckets(path, "study") == {0, 1}
    with AuditLog(path, verify=True) as log:
        assert log.by_patient(P1) == hits


def test_schema_1_files_are_migrated(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    drafts = [
        EventDraft(action="VIEW", outcome="ok", patient_ref=P1, study_ref=S1, request_id=f"{i}")
        for i in range(5)
    ]
    with AuditLog(path) as log:
        log.append_many(drafts)
        root = log.root()
    # Rewrite it the way schema 1 stored it: the signed 64-bit BLAKE2b of the ref as the key.
    import hashlib

    def v1_key(ref: str) -> int:
        return int.from_bytes(hashlib.blake2b(ref.encode(), digest_size=8).digest(), "big", signed=True)

    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET patient_key = ?, study_key = ?", (v1_key(P1), v1_key(S1)))
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    finally:
        conn.close()
    with AuditLog(path, verify=True) as log:  # migrated on open; verify re-checks every key
        assert [e.seq for e in log.by_patient(P1)] == [0, 1, 2, 3, 4]
        assert log.root() == root
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            log._writer_conn.execute("UPDATE events SET time_ms = 0")  # the trigger is back
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_anchor_bookkeeping_gets_turns_while_appends_stream(tmp_path: Path) -> None:
    stop = threading.Event()
    with AuditLog(tmp_path / "a.db") as log:
        log.append_batch([EventDraft(action="VIEW", outcome="ok")] * 10)

        def stream() -> None:
            while not stop.is_set():
                log.append_batch([EventDraft(action="VIEW", outcome="ok")] * 500)

        pool = [threading.Thread(target=stream) for _ in range(3)]
        for th in pool:
            th.start()
        try:
            idxs = []
            for k in range(1, 11):
                idxs += log.add_confirmed_anchors([(k, log.root(k), "tree", f"0x{k:02x}", 100 + k)])
        finally:
            stop.set()
            for th in pool:
                th.join()
        anchors = log.anchors()
        assert [a.idx for a in anchors] == idxs
        assert [(a.tree_size, a.status, a.block_number) for a in anchors] == [
            (k, "confirmed", 100 + k) for k in range(1, 11)
        ]
        assert log.last_confirmed_anchor() == anchors[-1]
        assert log.add_confirmed_anchors([(1, log.root(1), "event", "", 5)])  # tx hash may be unknown
        with pytest.raises(InvalidInput):
            log.add_confirmed_anchors([(log.size() + 1, log.root(), "tree", "0x01", 1)])
        assert log.check_integrity() == log.size()
