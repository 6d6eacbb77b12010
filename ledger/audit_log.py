"""The gateway's durable, append-only audit event log (SQLite, WAL, ``synchronous=FULL``).

Writes go through one writer thread that does group commit: every caller of :meth:`AuditLog.append`
or :meth:`AuditLog.append_many` enqueues its prepared drafts and waits; the writer drains the
queue, assigns gap-free sequence numbers and monotone times inside one ``BEGIN IMMEDIATE``
transaction for everything it drained, commits (one fsync for the whole batch) and wakes the
callers. A call returns only after its transaction has committed, so a returned event survives a
crash. Each ``append_many`` call is atomic: its events are consecutive and in one transaction.

The costly per-event work is done in the caller's thread: validating the draft and JSON-encoding
every field except ``seq`` and ``time_ms``. The canonical encoding has sorted keys, so the
writer only splices the two numbers into fixed places (``_Prepared.body``), hashes and inserts.
``_Prepared.body`` is checked against :func:`ledger.events.canonical_bytes` by the tests.

The in-memory :class:`~ledger.merkle.MerkleFrontier` tracks the committed tree, so the root of
the current log is O(log n); roots of older sizes and proofs read the leaf hashes from the table
(O(n) hashing). The log also defends against a second writer on the same file (another process):
the writer reads the last row inside its transaction instead of trusting its counters.

Anchors (roots posted on chain by the anchorer) are kept in the ``anchors`` table of the same
database file.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from ledger import merkle
from ledger.errors import Conflict, InvalidInput, MedLedgerError, NotFound, StoreUnavailable
from ledger.events import ENCODING_VERSION, AuditEvent, EventDraft, canonical_bytes

__all__ = ["Anchor", "AuditLog", "AuditLogCorrupt"]

SCHEMA_VERSION: Final = 1
ANCHOR_KINDS: Final = frozenset({"tree", "event"})
_MAX_BATCH_EVENTS: Final = 20_000  # stop draining the queue beyond this many events per commit
_PAGE: Final = 2_000  # rows per query when streaming

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    patient_ref TEXT,     -- NULL when the event has none
    study_ref   TEXT,
    patient_key INTEGER,  -- _ref_key(patient_ref): a compact index key, see _ref_key
    study_key   INTEGER,
    body        BLOB NOT NULL,
    leaf        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_patient ON events(patient_key) WHERE patient_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_study ON events(study_key) WHERE study_key IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS anchors (
    idx          INTEGER PRIMARY KEY,
    tree_size    INTEGER NOT NULL,
    root         BLOB NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('tree', 'event')),
    tx_hash      TEXT NOT NULL,
    block_number INTEGER,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'confirmed')),
    created_ms   INTEGER NOT NULL
);
"""


_INSERT_EVENT: Final = (
    "INSERT INTO events(seq, time_ms, patient_ref, study_ref, patient_key, study_key, body, leaf) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


class AuditLogCorrupt(MedLedgerError):
    """The stored log failed a consistency check (tampered row, gap, bad encoding)."""

    code = "audit_log_corrupt"
    http_status = 500


@dataclass(frozen=True, slots=True)
class Anchor:
    idx: int
    tree_size: int
    root: bytes
    kind: str  # 'tree' | 'event'
    tx_hash: str
    block_number: int | None
    status: str  # 'pending' | 'confirmed'
    created_ms: int


# ---- canonical encoding, split around the two numbers the writer assigns ---------------------
_DRAFT_FIELDS: Final = tuple(f.name for f in fields(EventDraft))
_FIELD_TYPES: Final[dict[str, type]] = {
    name: bool if name == "break_glass" else int if name == "consent_version" else str
    for name in _DRAFT_FIELDS
}
_EVENT_KEYS: Final = sorted(f.name for f in fields(AuditEvent))
assert set(_EVENT_KEYS) == {*_DRAFT_FIELDS, "seq", "time_ms", "v"}
# Every splice point needs a key on each side (so a comma before and after the number).
assert _EVENT_KEYS[0] < "seq" < _EVENT_KEYS[-1] and any("seq" < k < "time_ms" for k in _EVENT_KEYS)
assert "time_ms" < _EVENT_KEYS[-1]


_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
_STR_FIELDS: Final = tuple(name for name, kind in _FIELD_TYPES.items() if kind is str)
# With placeholders 0 for seq and time_ms these occur exactly once in an encoded event: inside a
# JSON string every '"' is escaped as '\\"', so ',"' can only start a key, and keys are unique.
_SEQ_MARK: Final = b',"seq":0,'
_TIME_MARK: Final = b',"time_ms":0,'


def _ref_key(ref: str) -> int | None:
    """The index key of a patient/study ref: 64 bits of BLAKE2b (None for ""). SQLite indexes an
    INTEGER about twice as fast as the 66-character text; lookups re-check the text column."""
    if not ref:
        return None
    return int.from_bytes(hashlib.blake2b(ref.encode("utf-8"), digest_size=8).digest(), "big", signed=True)


class _Prepared:
    """A validated draft with everything but ``seq`` and ``time_ms`` already encoded."""

    __slots__ = ("head", "mid", "patient_key", "patient_ref", "study_key", "study_ref", "tail", "values")

    def __init__(self, values: dict[str, Any], head: bytes, mid: bytes, tail: bytes) -> None:
        self.values = values
        self.head = head  # b'{"action":...,"request_id":...,"seq":'
        self.mid = mid  # b',"study_ref":"...","time_ms":'
        self.tail = tail  # b',"v":1}'
        self.patient_ref: str | None = values["patient_ref"] or None
        self.study_ref: str | None = values["study_ref"] or None
        self.patient_key = _ref_key(values["patient_ref"])
        self.study_key = _ref_key(values["study_ref"])

    def body(self, seq: int, time_ms: int) -> bytes:
        return b"".join((self.head, str(seq).encode(), self.mid, str(time_ms).encode(), self.tail))

    def event(self, seq: int, time_ms: int) -> AuditEvent:
        return AuditEvent(seq=seq, time_ms=time_ms, **self.values)


def _validate(values: dict[str, Any]) -> None:
    for name, want in _FIELD_TYPES.items():
        value = values[name]
        if want is int:
            if type(value) is not int or value < 0:
                raise InvalidInput(f"audit event field {name} must be a non-negative integer")
        elif want is bool:
            if type(value) is not bool:
                raise InvalidInput(f"audit event field {name} must be a boolean")
        elif not isinstance(value, str):
            raise InvalidInput(f"audit event field {name} must be a string")
        elif type(value) is not str:
            values[name] = str.__str__(value)  # a plain str (e.g. from a StrEnum), as it reads back


def _prepare(draft: EventDraft) -> _Prepared:
    if not isinstance(draft, EventDraft):
        raise InvalidInput("an audit event draft must be an EventDraft")
    values = {name: getattr(draft, name) for name in _DRAFT_FIELDS}
    if (
        type(values["consent_version"]) is not int
        or values["consent_version"] < 0
        or type(values["break_glass"]) is not bool
        or not all(type(values[name]) is str for name in _STR_FIELDS)
    ):
        _validate(values)
    try:
        body = _ENCODER.encode({**values, "seq": 0, "time_ms": 0, "v": ENCODING_VERSION}).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("audit event fields must be valid Unicode text") from None
    i = body.index(_SEQ_MARK) + len(_SEQ_MARK) - 2  # the placeholder "0" of seq
    j = body.index(_TIME_MARK, i) + len(_TIME_MARK) - 2  # the placeholder "0" of time_ms
    return _Prepared(values, head=body[:i], mid=body[i + 1 : j], tail=body[j + 1 :])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event_from_body(body: bytes) -> AuditEvent:
    return AuditEvent.from_dict(json.loads(body))


class _Request:
    __slots__ = ("future", "items")

    def __init__(self, items: list[_Prepared]) -> None:
        self.items = items
        self.future: Future[tuple[int, int]] = Future()  # (first seq, time_ms)


_STOP: Final = object()


class AuditLog:
    """Durable append-only audit log; see the module docstring.

    ``verify=True`` runs :meth:`check_integrity` on open. A cheap gap check (row count against the
    largest seq) always runs on open. ``clock`` returns epoch milliseconds (tests inject one).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        verify: bool = False,
        clock: Callable[[], int] = _now_ms,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._timeout = busy_timeout_s
        self._closed = False
        self._close_lock = threading.Lock()  # guards _closed together with enqueueing
        self._state_lock = threading.Lock()  # guards _frontier and the stats
        self._readers_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._commits = 0
        self._largest_commit = 0

        self._aux = self._connect()  # schema, anchors, integrity checks
        self._aux_lock = threading.Lock()
        self._aux.execute("PRAGMA journal_mode=WAL")
        with self._aux_lock:
            self._aux.execute("BEGIN IMMEDIATE")
            try:
                version = self._aux.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise AuditLogCorrupt(f"unsupported audit log schema version {version}")
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        self._aux.execute(statement)
                self._aux.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._aux.execute("COMMIT")
            except BaseException:
                if self._aux.in_transaction:
                    self._aux.execute("ROLLBACK")
                self._aux.close()
                raise

        self._frontier = merkle.MerkleFrontier()
        try:
            self._check_gaps()
            if verify:
                self.check_integrity()
            self._catch_up(self._aux)
        except BaseException:
            self._aux.close()
            raise

        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._writer_conn = self._connect()
        self._writer = threading.Thread(target=self._writer_loop, name="audit-log-writer", daemon=True)
        self._writer.start()

    # ---- connections ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreUnavailable("the audit log is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            with self._readers_lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- stats (for tests and metrics) -----------------------------------------------------------
    @property
    def commit_count(self) -> int:
        """Write transactions of events committed by this instance."""
        with self._state_lock:
            return self._commits

    @property
    def largest_commit(self) -> int:
        """The most events committed in one transaction by this instance."""
        with self._state_lock:
            return self._largest_commit

    # ---- writing ---------------------------------------------------------------------------------
    def append(self, draft: EventDraft) -> AuditEvent:
        """Log one event; returns it once its transaction has committed."""
        item = _prepare(draft)
        seq, time_ms = self._submit([item])
        return item.event(seq, time_ms)

    def append_many(self, drafts: Sequence[EventDraft]) -> list[AuditEvent]:
        """Log events atomically (one transaction, consecutive seqs), in order."""
        items = [_prepare(d) for d in drafts]
        if not items:
            return []
        first, time_ms = self._submit(items)
        return [item.event(first + i, time_ms) for i, item in enumerate(items)]

    def _submit(self, items: list[_Prepared]) -> tuple[int, int]:
        request = _Request(items)
        with self._close_lock:
            if self._closed:
                raise StoreUnavailable("the audit log is closed")
            self._queue.put(request)
        return request.future.result()

    def _writer_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            assert isinstance(first, _Request)
            batch = [first]
            count = len(first.items)
            while count < _MAX_BATCH_EVENTS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                assert isinstance(nxt, _Request)
                batch.append(nxt)
                count += len(nxt.items)
            try:
                results = self._commit_batch(batch, count)
            except Exception as exc:  # every waiter of the batch must hear about it
                for request in batch:
                    error: Exception = exc
                    if isinstance(exc, sqlite3.Error):
                        error = StoreUnavailable(f"audit log write failed ({type(exc).__name__})")
                        error.__cause__ = exc
                    request.future.set_exception(error)
                continue
            for request, result in zip(batch, results, strict=True):
                request.future.set_result(result)

    def _commit_batch(self, batch: list[_Request], count: int) -> list[tuple[int, int]]:
        conn = self._writer_conn
        sha = hashlib.sha256
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT seq, time_ms FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            next_seq, last_time = (0, 0) if row is None else (row[0] + 1, row[1])
            time_ms = max(self._clock(), last_time)
            time_bytes = str(time_ms).encode()
            rows: list[tuple[int, int, str | None, str | None, int | None, int | None, bytes, bytes]] = []
            leaves: list[bytes] = []
            results: list[tuple[int, int]] = []
            seq = next_seq
            for request in batch:
                results.append((seq, time_ms))
                for item in request.items:
                    body = b"".join((item.head, str(seq).encode(), item.mid, time_bytes, item.tail))
                    leaf = sha(b"\x00" + body).digest()
                    rows.append(
                        (
                            seq,
                            time_ms,
                            item.patient_ref,
                            item.study_ref,
                            item.patient_key,
                            item.study_key,
                            body,
                            leaf,
                        )
                    )
                    leaves.append(leaf)
                    seq += 1
            conn.executemany(_INSERT_EVENT, rows)
            # Leaves another writer committed since we last looked, read while we hold the lock.
            with self._state_lock:
                behind = self._frontier.size != next_seq
            if behind:
                self._catch_up(conn, stop=next_seq)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        with self._state_lock:
            self._frontier.extend(leaves)
            self._commits += 1
            self._largest_commit = max(self._largest_commit, count)
        return results

    def _catch_up(self, conn: sqlite3.Connection, stop: int | None = None) -> None:
        """Extend the frontier with committed leaves it has not seen (up to ``stop``)."""
        with self._state_lock:
            start = self._frontier.size
            if stop is None:
                stop = conn.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM events").fetchone()[0]
            if stop < start:
                raise AuditLogCorrupt("the audit log has fewer events than it had before")
            pos = start
            while pos < stop:
                page_start = pos
                cur = conn.execute(
                    "SELECT seq, leaf FROM events WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (pos, min(stop, pos + 50 * _PAGE)),
                )
                for seq, leaf in cur:
                    if seq != pos:
                        raise AuditLogCorrupt(f"the audit log has a gap before seq {seq}")
                    self._frontier.append(leaf)
                    pos += 1
                if pos == page_start:
                    break
            if pos != stop:
                raise AuditLogCorrupt(f"the audit log has a gap at seq {pos}")

    # ---- reading -------------------------------------------------------------------------------
    def size(self) -> int:
        """Number of committed events (the next seq)."""
        row = self._reader().execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM events").fetchone()
        return int(row[0])

    def __len__(self) -> int:
        return self.size()

    def get(self, seq: int) -> AuditEvent:
        row = self._reader().execute("SELECT body FROM events WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise NotFound(f"no audit event with seq {seq}", code="unknown_event")
        return _event_from_body(row[0])

    def range(self, start: int, stop: int) -> list[AuditEvent]:
        """Events with ``start <= seq < stop`` (``stop`` past the end is clamped)."""
        self._check_range(start, stop)
        cur = self._reader().execute(
            "SELECT body FROM events WHERE seq >= ? AND seq < ? ORDER BY seq", (start, stop)
        )
        return [_event_from_body(body) for (body,) in cur]

    def iter_all(self) -> Iterator[AuditEvent]:
        """Every event in seq order, read in pages (bounded memory)."""
        pos = 0
        while True:
            page = self.range(pos, pos + _PAGE)
            yield from page
            if len(page) < _PAGE:
                return
            pos += _PAGE

    def leaf_hashes(self, start: int, stop: int) -> list[bytes]:
        """Leaf hashes of ``start <= seq < stop`` (``stop`` past the end is clamped)."""
        self._check_range(start, stop)
        cur = self._reader().execute(
            "SELECT leaf FROM events WHERE seq >= ? AND seq < ? ORDER BY seq", (start, stop)
        )
        return [leaf for (leaf,) in cur]

    def by_patient(self, patient_ref: str) -> list[AuditEvent]:
        """Events about ``patient_ref``, in seq order (``""`` matches nothing)."""
        cur = self._reader().execute(
            "SELECT body FROM events WHERE patient_key = ? AND patient_ref = ? ORDER BY seq",
            (_ref_key(patient_ref), patient_ref),
        )
        return [_event_from_body(body) for (body,) in cur]

    def by_study(self, study_ref: str) -> list[AuditEvent]:
        """Events about ``study_ref``, in seq order (``""`` matches nothing)."""
        cur = self._reader().execute(
            "SELECT body FROM events WHERE study_key = ? AND study_ref = ? ORDER BY seq",
            (_ref_key(study_ref), study_ref),
        )
        return [_event_from_body(body) for (body,) in cur]

    @staticmethod
    def _check_range(start: int, stop: int) -> None:
        if not 0 <= start <= stop:
            raise ValueError(f"bad seq range [{start}, {stop})")

    def _leaves_for(self, tree_size: int) -> list[bytes]:
        if tree_size < 0:
            raise ValueError("a tree size is not negative")
        leaves = self.leaf_hashes(0, tree_size)
        if len(leaves) != tree_size:
            raise ValueError(f"tree size {tree_size} exceeds the log size {len(leaves)}")
        return leaves

    # ---- Merkle tree -----------------------------------------------------------------------------
    def root(self, tree_size: int | None = None) -> bytes:
        """RFC 9162 root of the first ``tree_size`` events (default: the whole committed log).

        O(log n) for the current size, else O(tree_size) (reads the leaf hashes).
        """
        with self._state_lock:
            if tree_size is None or tree_size == self._frontier.size:
                return self._frontier.root()
        return merkle.root(self._leaves_for(tree_size))

    def tree_head(self) -> tuple[int, bytes]:
        """``(size, root)`` of the committed log, taken consistently."""
        with self._state_lock:
            return self._frontier.size, self._frontier.root()

    def inclusion_proof(self, seq: int, tree_size: int) -> list[bytes]:
        """Audit path of event ``seq`` in the tree of the first ``tree_size`` events."""
        if not 0 <= seq < tree_size:
            raise ValueError(f"seq {seq} is not in a tree of size {tree_size}")
        return merkle.inclusion_proof(self._leaves_for(tree_size), seq)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of ``old_size`` events to ``new_size``."""
        if not 0 <= old_size <= new_size:
            raise ValueError(f"bad tree sizes {old_size} -> {new_size}")
        return merkle.consistency_proof(self._leaves_for(new_size), old_size)

    # ---- integrity -----------------------------------------------------------------------------
    def _check_gaps(self) -> None:
        with self._aux_lock:
            count, lo, hi = self._aux.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM events").fetchone()
        if count and (lo != 0 or hi != count - 1):
            raise AuditLogCorrupt(f"the audit log has gaps: {count} events, seqs {lo}..{hi}")

    def check_integrity(self) -> int:
        """Re-check every row: gap-free seqs from 0, leaf = SHA-256(0x00||body), body canonical
        and matching its row (seq, time, refs), times monotone, and the tree over the stored leaves
        equal to the in-memory root. Returns the number of events; raises :class:`AuditLogCorrupt`.
        """
        head_size, head_root = self.tree_head()  # what this instance has committed to
        stored_head_root = merkle.EMPTY_ROOT
        conn = self._connect()
        try:
            conn.execute("PRAGMA query_only=ON")
            conn.execute("BEGIN")  # one snapshot for the whole scan
            expected = 0
            last_time = 0
            frontier = merkle.MerkleFrontier()
            cur = conn.execute(
                "SELECT seq, time_ms, patient_ref, study_ref, patient_key, study_key, body, leaf "
                "FROM events ORDER BY seq"
            )
            for seq, time_ms, patient_ref, study_ref, patient_key, study_key, body, leaf in cur:
                if seq != expected:
                    raise AuditLogCorrupt(f"the audit log has a gap: seq {seq} where {expected} was due")
                if not isinstance(body, bytes) or not isinstance(leaf, bytes):
                    raise AuditLogCorrupt(f"event {seq} is not stored as bytes")
                if hashlib.sha256(b"\x00" + body).digest() != leaf:
                    raise AuditLogCorrupt(f"event {seq}: stored leaf hash does not match its body")
                try:
                    event = _event_from_body(body)
                except (ValueError, TypeError) as exc:
                    raise AuditLogCorrupt(
                        f"event {seq}: body does not decode ({type(exc).__name__})"
                    ) from None
                if canonical_bytes(event) != body:
                    raise AuditLogCorrupt(f"event {seq}: body is not in canonical form")
                columns = (seq, time_ms, patient_ref, study_ref, patient_key, study_key)
                if columns != (
                    event.seq,
                    event.time_ms,
                    event.patient_ref or None,
                    event.study_ref or None,
                    _ref_key(event.patient_ref),
                    _ref_key(event.study_ref),
                ):
                    raise AuditLogCorrupt(f"event {seq}: row columns disagree with its body")
                if time_ms < last_time:
                    raise AuditLogCorrupt(f"event {seq}: time goes backwards")
                last_time = time_ms
                frontier.append(leaf)
                expected += 1
                if expected == head_size:
                    stored_head_root = frontier.root()
            conn.execute("COMMIT")
        finally:
            conn.close()
        if expected < head_size:
            raise AuditLogCorrupt(f"the audit log lost events: {expected} stored, {head_size} committed")
        if stored_head_root != head_root:
            # Body and leaf were both rewritten consistently, but not the tree we committed to.
            raise AuditLogCorrupt(f"the first {head_size} stored events no longer hash to the committed root")
        return expected

    # ---- anchors -------------------------------------------------------------------------------
    _ANCHOR_COLUMNS: Final = "idx, tree_size, root, kind, tx_hash, block_number, status, created_ms"

    @staticmethod
    def _anchor(row: tuple[Any, ...]) -> Anchor:
        return Anchor(*row)

    def _aux_write(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Cursor:
        if self._closed:
            raise StoreUnavailable("the audit log is closed")
        with self._aux_lock:
            self._aux.execute("BEGIN IMMEDIATE")
            try:
                cur = self._aux.execute(sql, params)
                self._aux.execute("COMMIT")
            except BaseException:
                if self._aux.in_transaction:
                    self._aux.execute("ROLLBACK")
                raise
            return cur

    def record_anchor(self, tree_size: int, root: bytes, kind: str, tx_hash: str) -> int:
        """Record a submitted (pending) anchor transaction; returns its ``idx``."""
        if kind not in ANCHOR_KINDS:
            raise InvalidInput(f"anchor kind must be one of {sorted(ANCHOR_KINDS)}")
        if not isinstance(root, bytes | bytearray) or len(root) != merkle.HASH_SIZE:
            raise InvalidInput("an anchor root is 32 bytes")
        if not isinstance(tx_hash, str) or not tx_hash:
            raise InvalidInput("an anchor needs its transaction hash")
        if type(tree_size) is not int or not 0 <= tree_size <= self.size():
            raise InvalidInput("an anchor's tree size must be within the log")
        cur = self._aux_write(
            "INSERT INTO anchors(tree_size, root, kind, tx_hash, block_number, status, created_ms) "
            "VALUES (?, ?, ?, ?, NULL, 'pending', ?)",
            (tree_size, bytes(root), kind, tx_hash, self._clock()),
        )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def confirm_anchor(self, idx: int, block_number: int) -> None:
        """Mark an anchor as mined in ``block_number`` (again, after a reorg, to move it)."""
        if type(block_number) is not int or block_number < 0:
            raise InvalidInput("a block number is a non-negative integer")
        cur = self._aux_write(
            "UPDATE anchors SET status = 'confirmed', block_number = ? WHERE idx = ?", (block_number, idx)
        )
        if cur.rowcount != 1:
            raise NotFound(f"no anchor {idx}", code="unknown_anchor")

    def drop_anchor(self, idx: int) -> None:
        """Forget a pending anchor whose transaction failed. Confirmed anchors are kept."""
        with self._aux_lock:
            row = self._aux.execute("SELECT status FROM anchors WHERE idx = ?", (idx,)).fetchone()
        if row is None:
            raise NotFound(f"no anchor {idx}", code="unknown_anchor")
        cur = self._aux_write("DELETE FROM anchors WHERE idx = ? AND status = 'pending'", (idx,))
        if cur.rowcount != 1:
            raise Conflict(f"anchor {idx} is confirmed and cannot be dropped")

    def anchors(self) -> list[Anchor]:
        cur = self._reader().execute(f"SELECT {self._ANCHOR_COLUMNS} FROM anchors ORDER BY idx")
        return [self._anchor(row) for row in cur]

    def get_anchor(self, idx: int) -> Anchor:
        row = (
            self._reader()
            .execute(f"SELECT {self._ANCHOR_COLUMNS} FROM anchors WHERE idx = ?", (idx,))
            .fetchone()
        )
        if row is None:
            raise NotFound(f"no anchor {idx}", code="unknown_anchor")
        return self._anchor(row)

    def last_confirmed_anchor(self, kind: str | None = None) -> Anchor | None:
        """The confirmed anchor covering the most events (largest tree size, then latest)."""
        where, params = ("AND kind = ?", (kind,)) if kind is not None else ("", ())
        row = (
            self._reader()
            .execute(
                f"SELECT {self._ANCHOR_COLUMNS} FROM anchors WHERE status = 'confirmed' {where} "
                "ORDER BY tree_size DESC, idx DESC LIMIT 1",
                params,
            )
            .fetchone()
        )
        return None if row is None else self._anchor(row)

    def pending_anchors(self) -> list[Anchor]:
        cur = self._reader().execute(
            f"SELECT {self._ANCHOR_COLUMNS} FROM anchors WHERE status = 'pending' ORDER BY idx"
        )
        return [self._anchor(row) for row in cur]

    # ---- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Finish every append already submitted, then close. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        self._writer_conn.close()
        with self._aux_lock:
            self._aux.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({str(self._path)!r}, closed={self._closed})"
