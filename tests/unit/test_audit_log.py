"""AuditLog on a real SQLite file: seqs, group commit, durability, proofs, anchors, integrity."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger import merkle
from ledger.audit_log import Anchor, AuditLog, AuditLogCorrupt, _prepare
from ledger.errors import Conflict, InvalidInput, NotFound, StoreUnavailable
from ledger.events import Action, AuditEvent, EventDraft, Outcome, canonical_bytes, leaf_hash

REPO = Path(__file__).resolve().parents[2]
P1 = "0x" + "11" * 32
P2 = "0x" + "22" * 32
S1 = "0x" + "aa" * 32
S2 = "0x" + "bb" * 32


def draft(i: int = 0, **kw: object) -> EventDraft:
    base: dict[str, object] = {
        "action": "VIEW",
        "outcome": "ok",
        "actor": "0x" + "ab" * 32,
        "actor_role": "hospital",
        "purpose": "TREAT",
        "patient_ref": P1 if i % 2 == 0 else P2,
        "study_ref": S1 if i % 3 == 0 else S2,
        "request_id": f"req-{i}",
    }
    base.update(kw)
    return EventDraft(**base)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture
def log(path: Path) -> Iterator[AuditLog]:
    with AuditLog(path) as lg:
        yield lg


# ---- encoding ---------------------------------------------------------------------------------
TRICKY = [
    draft(0),
    EventDraft(action="VIEW", outcome="ok"),  # every optional field empty
    draft(1, reason='quote " and backslash \\ and ,"seq":0, and ,"time_ms":0,'),
    draft(2, counterparty="naïve – 東京 – 😀 – \u2028 – \x00\x1f\x7f"),
    draft(3, request_id='\\",\\"seq\\":0,', consent_id="12", consent_version=3, break_glass=True),
    draft(4, action=Action.SHARE, outcome=Outcome.DENIED, patient_ref="", study_ref=""),
    draft(5, justification_commitment="0x" + "cd" * 32, object_ref="}{", purpose="ETREAT"),
]


@pytest.mark.parametrize("d", TRICKY)
def test_splice_encoding_is_canonical(log: AuditLog, d: EventDraft) -> None:
    prepared = _prepare(d)
    for seq, t in [(0, 0), (7, 1_700_000_000_123), (10**12, 2**53)]:
        event = prepared.event(seq, t)
        assert prepared.body(seq, t) == canonical_bytes(event)
        assert event == AuditEvent.from_draft(d, seq=seq, time_ms=t)
    appended = log.append(d)
    stored = log.get(appended.seq)
    assert stored == appended
    assert canonical_bytes(stored) == canonical_bytes(appended)
    assert log.leaf_hashes(appended.seq, appended.seq + 1) == [leaf_hash(appended)]


def test_bad_drafts_are_refused_in_the_caller(log: AuditLog) -> None:
    for bad in [
        draft(0, consent_version=-1),
        draft(0, consent_version=True),
        draft(0, break_glass=1),
        draft(0, reason=3),
        draft(0, reason="\ud800"),  # lone surrogate: not UTF-8 encodable
    ]:
        with pytest.raises(InvalidInput):
            log.append(bad)
        with pytest.raises(InvalidInput):
            log.append_many([draft(1), bad])
    with pytest.raises(InvalidInput):
        log.append("not a draft")  # type: ignore[arg-type]
    assert log.size() == 0
    assert log.append(draft(0)).seq == 0  # the writer is unharmed


# ---- sequencing and group commit -----------------------------------------------------------
def test_gap_free_seqs_and_group_commit_under_16_threads(log: AuditLog) -> None:
    threads, per = 16, 200
    results: list[list[AuditEvent]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(per):
            results[t].append(log.append(draft(i, request_id=f"t{t}-{i}")))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()

    seqs = sorted(e.seq for r in results for e in r)
    assert seqs == list(range(threads * per))
    for t, r in enumerate(results):
        assert [e.seq for e in r] == sorted(e.seq for e in r)  # each caller's order is kept
        for i, e in enumerate(r):
            assert log.get(e.seq) == e and e.request_id == f"t{t}-{i}"
    assert log.size() == threads * per
    # Group commit: fewer transactions than events, at least one holding several callers.
    assert log.commit_count < threads * per
    assert log.largest_commit > 1
    times = [e.time_ms for e in log.iter_all()]
    assert times == sorted(times)
    assert log.check_integrity() == threads * per


def test_append_many_is_one_transaction_with_consecutive_seqs(log: AuditLog) -> None:
    log.append(draft(0))
    before = log.commit_count
    events = log.append_many([draft(i) for i in range(1, 1001)])
    assert log.commit_count == before + 1
    assert [e.seq for e in events] == list(range(1, 1001))
    assert len({e.time_ms for e in events}) == 1
    assert log.range(1, 1001) == events
    assert log.append_many([]) == []
    assert log.commit_count == before + 1


def test_time_is_monotone_even_if_the_clock_goes_back(path: Path) -> None:
    ticks = iter([5_000, 4_000, 6_000, 1_000, 1_000, 7_000])
    with AuditLog(path, clock=lambda: next(ticks)) as lg:
        times = [lg.append(draft(i)).time_ms for i in range(6)]
    assert times == [5_000, 5_000, 6_000, 6_000, 6_000, 7_000]
    with AuditLog(path, clock=lambda: 10) as lg:  # also across a reopen
        assert lg.append(draft(9)).time_ms == 7_000


# ---- reads ------------------------------------------------------------------------------------
def test_reads(log: AuditLog) -> None:
    events = log.append_many([draft(i) for i in range(4500)])  # more than one read page
    assert log.size() == len(log) == 4500
    assert list(log.iter_all()) == events
    assert log.range(10, 20) == events[10:20]
    assert log.range(4490, 10_000) == events[4490:]
    assert log.range(5000, 6000) == []
    assert log.leaf_hashes(0, 3) == [leaf_hash(e) for e in events[:3]]
    assert log.by_patient(P1) == [e for e in events if e.patient_ref == P1]
    assert log.by_study(S2) == [e for e in events if e.study_ref == S2]
    assert log.by_patient("0x" + "99" * 32) == []
    assert log.by_patient("") == [] and log.by_study("") == []
    with pytest.raises(NotFound):
        log.get(4500)
    with pytest.raises(ValueError):
        log.range(5, 4)


def test_lookups_use_the_indexes(log: AuditLog, path: Path) -> None:
    log.append(draft(0))
    with sqlite3.connect(path) as conn:
        for col in ("patient", "study"):
            plan = conn.execute(
                f"EXPLAIN QUERY PLAN SELECT body FROM events WHERE {col}_key = ? AND {col}_ref = ? "
                "ORDER BY seq",
                (1, "x"),
            ).fetchall()
            assert any(f"events_by_{col}" in str(row) for row in plan), plan


# ---- durability -------------------------------------------------------------------------------
def test_close_and_reopen_keeps_everything(path: Path) -> None:
    with AuditLog(path) as lg:
        events = [lg.append(draft(0)), *lg.append_many([draft(i) for i in range(1, 50)])]
        root = lg.root()
        idx = lg.record_anchor(50, root, "tree", "0x" + "ee" * 32)
    with AuditLog(path, verify=True) as lg:
        assert list(lg.iter_all()) == events
        assert lg.root() == root == lg.root(50)
        assert lg.anchors()[0].idx == idx
        assert lg.append(draft(50)).seq == 50
        assert lg.root() == merkle.root(lg.leaf_hashes(0, 51))


CHILD = textwrap.dedent(
    """
    import sys, threading
    sys.path.insert(0, sys.argv[2])
    from ledger.audit_log import AuditLog
    from ledger.events import EventDraft
    log = AuditLog(sys.argv[1])
    lock = threading.Lock()
    def work(t):
        i = 0
        while True:
            if i % 5 == 4:
                events = log.append_many(
                    [EventDraft(action="VIEW", outcome="ok", request_id=f"{t}-{i}-{k}") for k in range(3)]
                )
            else:
                events = [log.append(EventDraft(action="VIEW", outcome="ok", request_id=f"{t}-{i}-0"))]
            with lock:
                for e in events:
                    sys.stdout.write(f"{e.seq} {e.request_id}\\n")
                sys.stdout.flush()
            i += 1
    for t in range(4):
        threading.Thread(target=work, args=(t,), daemon=True).start()
    threading.Event().wait()
    """
)


def test_events_whose_append_returned_survive_sigkill(path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.endswith("\n"):
                break
            seq_text, request_id = line.split()
            acknowledged[int(seq_text)] = request_id
            if len(acknowledged) >= 400:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert len(acknowledged) >= 400

    with AuditLog(path, verify=True) as lg:
        size = lg.size()
        assert size >= len(acknowledged)
        for seq, request_id in acknowledged.items():
            assert lg.get(seq).request_id == request_id
        assert lg.check_integrity() == size
        assert lg.append(draft(0)).seq == size  # and the log carries on, gap-free


# ---- proofs -----------------------------------------------------------------------------------
def test_proofs_from_the_log_verify_against_its_roots(log: AuditLog) -> None:
    events = [log.append(draft(i)) for i in range(5)] + log.append_many([draft(i) for i in range(5, 37)])
    n = log.size()
    assert n == 37
    assert log.root() == log.root(n) == merkle.root([leaf_hash(e) for e in events])
    assert log.tree_head() == (n, log.root())
    assert log.root(0) == merkle.EMPTY_ROOT
    roots = [log.root(k) for k in range(n + 1)]
    for size in range(1, n + 1):
        for seq in range(size):
            proof = log.inclusion_proof(seq, size)
            assert merkle.verify_inclusion(leaf_hash(log.get(seq)), seq, size, proof, roots[size])
        for old in range(1, size + 1):
            proof = log.consistency_proof(old, size)
            assert merkle.verify_consistency(old, size, roots[old], roots[size], proof)
    with pytest.raises(ValueError):
        log.root(n + 1)
    with pytest.raises(ValueError):
        log.inclusion_proof(n, n)
    with pytest.raises(ValueError):
        log.inclusion_proof(0, n + 1)
    with pytest.raises(ValueError):
        log.consistency_proof(5, 4)


def test_two_instances_on_one_file_stay_gap_free(path: Path) -> None:
    with AuditLog(path) as a, AuditLog(path) as b:
        seqs = []
        for i in range(10):
            seqs.append((a if i % 3 else b).append(draft(i)).seq)
        assert seqs == list(range(10))
        leaves = a.leaf_hashes(0, 10)
        b.append(draft(10))
        a.append(draft(11))  # a catches up on b's event before committing its own
        assert a.root() == merkle.root(a.leaf_hashes(0, 12))
        assert a.leaf_hashes(0, 10) == leaves
        assert a.check_integrity() == 12


# ---- anchors ----------------------------------------------------------------------------------
def test_anchor_lifecycle(path: Path) -> None:
    with AuditLog(path, clock=lambda: 1234) as lg:
        lg.append_many([draft(i) for i in range(10)])
        assert lg.anchors() == [] and lg.last_confirmed_anchor() is None
        a1 = lg.record_anchor(5, lg.root(5), "tree", "0x01")
        a2 = lg.record_anchor(10, lg.root(10), "tree", "0x02")
        a3 = lg.record_anchor(10, lg.root(10), "event", "0x03")
        assert [a.status for a in lg.pending_anchors()] == ["pending"] * 3
        assert lg.get_anchor(a1) == Anchor(a1, 5, lg.root(5), "tree", "0x01", None, "pending", 1234)

        lg.confirm_anchor(a1, 100)
        assert lg.last_confirmed_anchor() == lg.get_anchor(a1)
        lg.confirm_anchor(a2, 101)
        last = lg.last_confirmed_anchor()
        assert last is not None and (last.idx, last.tree_size, last.block_number) == (a2, 10, 101)
        assert last.status == "confirmed" and last.root == lg.root(10)
        assert [a.idx for a in lg.pending_anchors()] == [a3]

        lg.drop_anchor(a3)  # its transaction failed
        assert [a.idx for a in lg.anchors()] == [a1, a2]
        with pytest.raises(Conflict):
            lg.drop_anchor(a2)  # a confirmed anchor stays
        with pytest.raises(NotFound):
            lg.drop_anchor(a3)
        with pytest.raises(NotFound):
            lg.confirm_anchor(999, 1)
        with pytest.raises(NotFound):
            lg.get_anchor(999)
        for bad in [
            (5, lg.root(5), "branch", "0x04"),
            (5, b"short", "tree", "0x04"),
            (11, lg.root(10), "tree", "0x04"),
            (-1, lg.root(10), "tree", "0x04"),
            (5, lg.root(5), "tree", ""),
        ]:
            with pytest.raises(InvalidInput):
                lg.record_anchor(*bad)
        with pytest.raises(InvalidInput):
            lg.confirm_anchor(a1, -5)
        assert lg.last_confirmed_anchor(kind="event") is None
    with AuditLog(path) as lg:
        assert [(a.idx, a.status) for a in lg.anchors()] == [(a1, "confirmed"), (a2, "confirmed")]


# ---- integrity --------------------------------------------------------------------------------
def _tamper(path: Path, sql: str, params: tuple[object, ...] = ()) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TRIGGER IF EXISTS events_no_update")
        conn.execute("DROP TRIGGER IF EXISTS events_no_delete")
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def test_the_events_table_refuses_updates_and_deletes(log: AuditLog, path: Path) -> None:
    log.append(draft(0))
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET time_ms = 0")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
    finally:
        conn.close()


def test_check_integrity_detects_a_tampered_body(path: Path) -> None:
    with AuditLog(path) as lg:
        lg.append_many([draft(i) for i in range(20)])
        assert lg.check_integrity() == 20
    with AuditLog(path) as lg:
        body = canonical_bytes(lg.get(7)).replace(b'"VIEW"', b'"EXPORT"')
    _tamper(path, "UPDATE events SET body = ? WHERE seq = 7", (body,))
    with AuditLog(path) as lg:
        with pytest.raises(AuditLogCorrupt, match="event 7"):
            lg.check_integrity()
    with pytest.raises(AuditLogCorrupt):
        AuditLog(path, verify=True)


def test_check_integrity_detects_a_consistent_rewrite_against_the_committed_root(path: Path) -> None:
    with AuditLog(path) as lg:
        lg.append_many([draft(i) for i in range(20)])
        forged = AuditEvent.from_dict({**lg.get(3).to_dict(), "action": "EXPORT"})
        _tamper(
            path,
            "UPDATE events SET body = ?, leaf = ? WHERE seq = 3",
            (canonical_bytes(forged), leaf_hash(forged)),
        )
        with pytest.raises(AuditLogCorrupt, match="committed root"):
            lg.check_integrity()


def test_gaps_and_bad_columns_are_detected(path: Path) -> None:
    with AuditLog(path) as lg:
        lg.append_many([draft(i) for i in range(10)])
    _tamper(path, "UPDATE events SET study_ref = ? WHERE seq = 2", (S1 + "0",))
    with AuditLog(path) as lg, pytest.raises(AuditLogCorrupt, match="row columns"):
        lg.check_integrity()
    _tamper(path, "DELETE FROM events WHERE seq = 4")
    with pytest.raises(AuditLogCorrupt, match="gap"):
        AuditLog(path)  # the cheap gap check runs on every open


# ---- lifecycle --------------------------------------------------------------------------------
def test_closed_log_refuses_work(path: Path) -> None:
    lg = AuditLog(path)
    lg.append(draft(0))
    lg.close()
    lg.close()  # idempotent
    assert lg.closed
    with pytest.raises(StoreUnavailable):
        lg.append(draft(1))
    with pytest.raises(StoreUnavailable):
        lg.size()


def test_close_finishes_appends_in_flight(path: Path) -> None:
    lg = AuditLog(path)
    done: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        for i in range(50):
            try:
                done.append(lg.append(draft(i)).seq)
            except StoreUnavailable as exc:
                errors.append(exc)
                return

    pool = [threading.Thread(target=work) for _ in range(4)]
    for th in pool:
        th.start()
    lg.close()
    for th in pool:
        th.join()
    with AuditLog(path, verify=True) as again:
        assert again.size() == len(done)
        assert sorted(done) == list(range(len(done)))
