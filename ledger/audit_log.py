"""The gateway's durable, append-only audit event log (SQLite, WAL, ``synchronous=FULL``).

Writes go through one writer thread that does group commit: every caller of :meth:`AuditLog.append`,
:meth:`AuditLog.append_many` or :meth:`AuditLog.append_batch` enqueues its prepared drafts and
waits; the writer drains the queue, assigns gap-free sequence numbers and monotone times inside one
``BEGIN IMMEDIATE`` transaction for everything it drained, commits (one fsync for the whole batch)
and wakes the callers. A call returns only after its transaction has committed, so a returned event
survives a crash. Each call is atomic: its events are consecutive and in one transaction.

Hot path (see ``bench/anchoring.py``):

* The caller's thread validates each draft and encodes every field except ``seq`` and
  ``time_ms`` with a precompiled template (keys in canonical order, values spliced in raw when they
  need no JSON escape, else escaped by the json module's own C escaper), so the writer only formats
  ``head + seq + study_ref + time_ms + tail`` and hashes. ``_Prepared.body`` is checked against
  :func:`ledger.events.canonical_bytes` by the tests: the encoding is the one of ``ledger.events``.
* The writer inserts a whole batch with ONE SQL statement (``INSERT ... SELECT ... FROM
  json_each(?)``), so SQLite does the per-row work in C without the GIL, while callers encode the
  next drafts on the other core (a per-row ``executemany`` hands the GIL back and forth per row).
* The lookup keys are time-bucketed: ``patient_key = (seq >> 16) << 40 | h40(patient_ref)`` (h40:
  40 bits of BLAKE2b), so index inserts land in the newest part of the index instead of all over it
  (a commit dirties a few index pages, not the whole index). A lookup probes one key per bucket
  (``IN`` list) and re-checks the ref in the decoded body. The ``patient_ref``/``study_ref`` text
  columns are written NULL (they duplicated the body); rows of older files may still hold them.
* :meth:`AuditLog.append_batch` returns ``(first_seq, size, time_ms)`` without building
  :class:`~ledger.events.AuditEvent` objects.

The in-memory :class:`~ledger.merkle.MerkleFrontier` tracks the committed tree (extended a batch
at a time), so the root of the current log is O(log n); roots of older sizes and proofs read the
leaf hashes from the table (O(n) hashing). The log also defends against a second writer on the
same file (another process): the writer reads the last row inside its transaction instead of
trusting its counters.

Anchors (roots posted on chain by the anchorer) are kept in the ``anchors`` table of the same
database file.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple

from ledger import merkle
from ledger.errors import Conflict, InvalidInput, MedLedgerError, NotFound, StoreUnavailable
from ledger.events import ENCODING_VERSION, AuditEvent, EventDraft, canonical_bytes

__all__ = ["Anchor", "AppendedBatch", "AuditLog", "AuditLogCorrupt"]

SCHEMA_VERSION: Final = 2  # 2: time-bucketed lookup keys (1: plain 64-bit ref hashes)
ANCHOR_KINDS: Final = frozenset({"tree", "event"})
_MAX_BATCH_EVENTS: Final = 10_000  # stop draining the queue beyond this many events per commit
_PAGE: Final = 2_000  # rows per query when streaming
_PAGE_SIZE: Final = 16_384  # bytes per database page, for new files (~1 KB rows: fewer page splits)
_WRITER_CACHE_KIB: Final = 65_536  # the writer's page cache (keeps the hot index pages in memory)
_AUTOCHECKPOINT_PAGES: Final = 2_000  # WAL pages between checkpoints (32 MB with 16 KB pages)
_BUCKET_BITS: Final = 16  # events per lookup-key bucket: 2**16
_HASH_BITS: Final = 40  # bits of the ref hash in a lookup key
_HASH_MASK: Final = (1 << _HASH_BITS) - 1
_IN_CHUNK: Final = 500  # bucket keys per lookup query

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,
    time_ms     INTEGER NOT NULL,
    patient_ref TEXT,     -- NULL in new rows (the ref is in the body); older rows may hold it
    study_ref   TEXT,
    patient_key INTEGER,  -- _lookup_key(seq, patient_ref): a compact, time-bucketed index key
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


# One statement per batch: ?1 first seq, ?2 time_ms, ?3 the bodies back to back, ?4 the leaf hashes
# back to back, ?5 a JSON array with one [h40(patient_ref), h40(study_ref), body offset (1-based),
# body length] per event (null hashes for empty refs). Only numbers go through JSON: the ref text
# columns stay NULL (the refs are in the body; lookups re-check the decoded body), which saves
# SQLite ~130 bytes of row and two json_extract calls per event, and Python the ref escaping.
_INSERT_BATCH: Final = f"""
INSERT INTO events(seq, time_ms, patient_key, study_key, body, leaf)
SELECT ?1 + j.key, ?2,
       (((?1 + j.key) >> {_BUCKET_BITS}) << {_HASH_BITS}) | json_extract(j.value, '$[0]'),
       (((?1 + j.key) >> {_BUCKET_BITS}) << {_HASH_BITS}) | json_extract(j.value, '$[1]'),
       substr(?3, json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]')),
       substr(?4, 32 * j.key + 1, 32)
FROM json_each(?5) AS j ORDER BY j.key
"""

# Schema 1 -> 2: rebase the lookup keys (their low 40 bits are kept, the bucket goes on top).
_MIGRATE_1_TO_2: Final = (
    "DROP TRIGGER IF EXISTS events_no_update",
    f"UPDATE events SET "
    f"patient_key = ((seq >> {_BUCKET_BITS}) << {_HASH_BITS}) | (patient_key & {_HASH_MASK}), "
    f"study_key = ((seq >> {_BUCKET_BITS}) << {_HASH_BITS}) | (study_key & {_HASH_MASK})",
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
# The template below relies on this key order: the draft fields, then seq, study_ref, time_ms, v.
_SORTED_FIELDS: Final = tuple(sorted(_DRAFT_FIELDS))
assert _EVENT_KEYS[-4:] == ["seq", "study_ref", "time_ms", "v"] and _SORTED_FIELDS[-1] == "study_ref"
_HEAD_FIELDS: Final = _SORTED_FIELDS[:-1]  # everything before "seq"
_STR_HEAD: Final = tuple(name for name in _HEAD_FIELDS if _FIELD_TYPES[name] is str)
_get_fields: Final = operator.attrgetter(*_SORTED_FIELDS)  # one C call: the values in key order


def _head_parts(quoted: bool) -> list[str]:
    """The constant text between the head's values; ``quoted``: string values come raw."""
    parts, text = [], "{"
    for name in _HEAD_FIELDS:
        text += f'"{name}":'
        if _FIELD_TYPES[name] is str and quoted:
            text += '"'
        parts.append(text)
        text = '",' if _FIELD_TYPES[name] is str and quoted else ","
    parts.append(text + '"seq":')
    return parts


_RAW_PARTS: Final = _head_parts(quoted=True)
_ENC_PARTS: Final = _head_parts(quoted=False)
# A raw head + '"study_ref"' whose values need no escape has exactly this many bytes that json
# escapes inside strings ('"', '\\', 0x00-0x1f): the template's own quotes.
_RAW_QUOTES: Final = "".join(_RAW_PARTS).count('"') + 2
_ESCAPED: Final = b'"\\' + bytes(range(0x20))
_BODY_FORMAT: Final = b'%b%d,"study_ref":%b,"time_ms":%d,"v":' + str(ENCODING_VERSION).encode() + b"}"
_encode_str: Final = json.encoder.encode_basestring  # the C escaper json.dumps(ensure_ascii=False) uses


@functools.lru_cache(maxsize=1 << 16)
def _ref_hash(ref: str) -> int | None:
    """40 bits of BLAKE2b of a patient/study ref (None for ""): the low bits of its lookup key."""
    if not ref:
        return None
    return int.from_bytes(hashlib.blake2b(ref.encode("utf-8"), digest_size=8).digest(), "big") & _HASH_MASK


def _lookup_key(seq: int, ref: str) -> int | None:
    """The index key of a ref in event ``seq``: bucket ``seq >> 16`` above 40 bits of its hash.

    SQLite indexes an INTEGER about twice as fast as the 66-character text, and since the bucket
    grows with seq, new index entries go to the end of the index. Lookups re-check the text."""
    h = _ref_hash(ref)
    return None if h is None else ((seq >> _BUCKET_BITS) << _HASH_BITS) | h


def _plain(value: Any) -> Any:
    return str.__str__(value) if isinstance(value, str) and type(value) is not str else value


class _Prepared:
    """A validated draft with everything but ``seq`` and ``time_ms`` already encoded."""

    __slots__ = ("head", "meta", "study", "values")

    def __init__(self, values: tuple[Any, ...], head: bytes, study: bytes, meta: str) -> None:
        self.values = values  # the draft's values in sorted key order (_SORTED_FIELDS)
        self.head = head  # b'{"action":...,"request_id":...,"seq":'
        self.study = study  # b'"<study_ref>"', JSON-encoded
        self.meta = meta  # '[h40(patient_ref),h40(study_ref),' as JSON for _INSERT_BATCH

    def body(self, seq: int, time_ms: int) -> bytes:
        return _BODY_FORMAT % (self.head, seq, self.study, time_ms)

    def event(self, seq: int, time_ms: int) -> AuditEvent:
        return AuditEvent(
            seq=seq, time_ms=time_ms, **dict(zip(_SORTED_FIELDS, map(_plain, self.values), strict=True))
        )


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


@functools.lru_cache(maxsize=1 << 16)
def _meta(patient_ref: str, study_ref: str) -> str:
    """The row's part of the JSON argument of _INSERT_BATCH: '[h40,h40,' (null for "")."""
    ph, sh = _ref_hash(patient_ref), _ref_hash(study_ref)
    return f"[{'null' if ph is None else ph},{'null' if sh is None else sh},"


def _prepare(draft: EventDraft) -> _Prepared:
    if type(draft) is not EventDraft and not isinstance(draft, EventDraft):
        raise InvalidInput("an audit event draft must be an EventDraft")
    values = _get_fields(draft)
    (
        action,
        actor,
        actor_key,
        actor_role,
        break_glass,
        consent_id,
        consent_version,
        counterparty,
        justification_commitment,
        object_ref,
        outcome,
        patient_ref,
        purpose,
        reason,
        request_id,
        study_ref,
    ) = values
    if type(consent_version) is int and consent_version >= 0 and type(break_glass) is bool:
        p = _RAW_PARTS
        try:
            # str.join reads the raw text of str subclasses too (as json does) and refuses non-str.
            text = "".join(
                (p[0], action, p[1], actor, p[2], actor_key, p[3], actor_role, p[4],
                 "true" if break_glass else "false", p[5], consent_id, p[6], str(consent_version),
                 p[7], counterparty, p[8], justification_commitment, p[9], object_ref, p[10], outcome,
                 p[11], patient_ref, p[12], purpose, p[13], reason, p[14], request_id, p[15],
                 '"', study_ref, '"')
            )  # fmt: skip
            both = text.encode("utf-8")
        except (TypeError, UnicodeEncodeError):
            both = b""
        # One C pass: if no value holds a byte json escapes, the raw splice is what json.dumps writes.
        if both and len(both) - len(both.translate(None, _ESCAPED)) == _RAW_QUOTES:
            split = len(both) - 2 - (len(study_ref) if study_ref.isascii() else len(study_ref.encode()))
            return _Prepared(values, both[:split], both[split:], _meta(patient_ref, study_ref))
    return _prepare_escaped(values)


def _prepare_escaped(values: tuple[Any, ...]) -> _Prepared:
    """The general path: validate, then escape every string with json's own escaper."""
    named = dict(zip(_SORTED_FIELDS, values, strict=True))
    _validate(named)
    out: list[str] = []
    for part, name in zip(_ENC_PARTS, _HEAD_FIELDS, strict=False):  # one more part
        value = named[name]
        out.append(part)
        if _FIELD_TYPES[name] is str:
            out.append(_encode_str(value))
        else:
            out.append(("true" if value else "false") if type(value) is bool else str(value))
    out.append(_ENC_PARTS[-1])
    try:
        head = "".join(out).encode("utf-8")
        study = _encode_str(named["study_ref"]).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput("audit event fields must be valid Unicode text") from None
    return _Prepared(values, head, study, _meta(named["patient_ref"], named["study_ref"]))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event_from_body(body: bytes) -> AuditEvent:
    return AuditEvent.from_dict(json.loads(body))


def _extended(frontier: merkle.MerkleFrontier, leaves: Sequence[bytes]) -> merkle.MerkleFrontier:
    """``frontier`` with ``leaves`` appended, hashing whole aligned blocks level by level (list
    comprehensions over hashlib) instead of one leaf at a time; the result is identical to
    ``MerkleFrontier.extend``. ``frontier`` itself is not changed."""
    sha = hashlib.sha256
    size, stack = frontier.size, list(frontier.hashes)
    i, n = 0, len(leaves)
    while i < n:
        k = 1 << ((n - i).bit_length() - 1)  # the largest power of two that fits ...
        if size:
            k = min(k, size & -size)  # ... and keeps the new block aligned
        level = list(leaves[i : i + k])
        while len(level) > 1:  # the root of the perfect subtree of k leaves
            level = [sha(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=True)]
        h, t = level[0], size // k
        while t & 1:
            h = sha(b"\x01" + stack.pop() + h).digest()
            t >>= 1
        stack.append(h)
        size += k
        i += k
    return merkle.MerkleFrontier.from_state(size, stack)


class AppendedBatch(NamedTuple):
    """What :meth:`AuditLog.append_batch` returns: events ``first_seq .. first_seq + size - 1``
    were committed with log time ``time_ms``."""

    first_seq: int
    size: int
    time_ms: int

    @property
    def seqs(self) -> range:
        return range(self.first_seq, self.first_seq + self.size)


class _Request:
    __slots__ = ("future", "items")

    def __init__(self, items: list[_Prepared]) -> None:
        self.items = items
        self.future: Future[tuple[int, int]] = Future()  # (first seq, time_ms)


class _Encoded:
    """A drained batch of requests, encoded for the seqs and time the encoder predicted."""

    __slots__ = ("count", "items", "leaves", "next_seq", "params", "requests", "time_ms")

    def __init__(self, requests: list[_Request], next_seq: int, time_ms: int) -> None:
        self.requests = requests
        self.next_seq = next_seq
        self.time_ms = time_ms
        items = self.items = [item for request in requests for item in request.items]
        self.count = len(items)
        fmt = _BODY_FORMAT
        bodies = [
            fmt % (item.head, s, item.study, time_ms)
            for item, s in zip(items, range(next_seq, next_seq + len(items)), strict=True)
        ]
        sha = hashlib.sha256
        self.leaves = [sha(b"\x00" + body).digest() for body in bodies]
        lengths = list(map(len, bodies))
        meta = ",".join(
            [
                f"{item.meta}{end - n + 1},{n}]"
                for item, end, n in zip(items, itertools.accumulate(lengths), lengths, strict=True)
            ]
        )
        self.params = (next_seq, time_ms, b"".join(bodies), b"".join(self.leaves), f"[{meta}]")

    def results(self) -> list[tuple[int, int]]:
        out, seq = [], self.next_seq
        for request in self.requests:
            out.append((seq, self.time_ms))
            seq += len(request.items)
        return out


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
        # Write turns inside this process: the event writer starts no transaction while an anchor
        # write waits, so anchor bookkeeping is not starved by back-to-back event batches (SQLite's
        # busy handler only sleeps and retries). Another process is still handled by busy_timeout.
        self._turns = threading.Condition()
        self._aux_waiting = 0
        self._writing = False
        self._aux.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # takes effect on a new file only
        self._aux.execute("PRAGMA journal_mode=WAL")
        with self._aux_lock:
            self._aux.execute("BEGIN IMMEDIATE")
            try:
                version = self._aux.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise AuditLogCorrupt(f"unsupported audit log schema version {version}")
                if version == 1:
                    for statement in _MIGRATE_1_TO_2:
                        self._aux.execute(statement)
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
        self._writer_conn.execute(f"PRAGMA cache_size=-{_WRITER_CACHE_KIB}")
        self._writer_conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
        # Two-stage pipeline: the encoder drains the queue and formats + hashes batch k+1 (Python,
        # holds the GIL) while the writer inserts and commits batch k (SQLite, releases the GIL).
        last = self._aux.execute("SELECT seq, time_ms FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        self._predicted = (0, 0) if last is None else (last[0] + 1, last[1])  # encoder's (seq, time)
        self._resync: tuple[int, int] | None = None  # set by the writer when a prediction was wrong
        self._encoded: queue.Queue[_Encoded | object] = queue.Queue(maxsize=1)
        self._encoder = threading.Thread(target=self._encoder_loop, name="audit-log-encoder", daemon=True)
        self._writer = threading.Thread(target=self._writer_loop, name="audit-log-writer", daemon=True)
        self._encoder.start()
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

    def append_batch(self, drafts: Sequence[EventDraft]) -> AppendedBatch:
        """Like :meth:`append_many` (atomic, consecutive seqs, durable on return) but returns only
        ``(first_seq, size, time_ms)``: the fast path for bulk producers (no event objects)."""
        items = list(map(_prepare, drafts))
        if not items:
            return AppendedBatch(self.size(), 0, 0)
        first, time_ms = self._submit(items)
        return AppendedBatch(first, len(items), time_ms)

    def _submit(self, items: list[_Prepared]) -> tuple[int, int]:
        request = _Request(items)
        with self._close_lock:
            if self._closed:
                raise StoreUnavailable("the audit log is closed")
            self._queue.put(request)
        return request.future.result()

    def _encoder_loop(self) -> None:
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
            with self._state_lock:
                resync, self._resync = self._resync, None
            next_seq, last_time = resync or self._predicted
            try:
                encoded = _Encoded(batch, next_seq, max(self._clock(), last_time))
            except Exception as exc:
                self._fail(batch, exc)
                continue
            self._predicted = (next_seq + encoded.count, encoded.time_ms)
            self._encoded.put(encoded)
        self._encoded.put(_STOP)

    def _writer_loop(self) -> None:
        while True:
            encoded = self._encoded.get()
            if encoded is _STOP:
                return
            assert isinstance(encoded, _Encoded)
            try:
                results = self._commit_batch(encoded)
            except Exception as exc:  # every waiter of the batch must hear about it
                # The encoder's next prediction is now off by this batch; _commit_batch notices
                # (the last row is not where it expected) and re-encodes.
                self._fail(encoded.requests, exc)
                continue
            for request, result in zip(encoded.requests, results, strict=True):
                request.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Request], exc: Exception) -> None:
        for request in batch:
            error: Exception = exc
            if isinstance(exc, sqlite3.Error):
                error = StoreUnavailable(f"audit log write failed ({type(exc).__name__})")
                error.__cause__ = exc
            request.future.set_exception(error)

    def _commit_batch(self, encoded: _Encoded) -> list[tuple[int, int]]:
        with self._turns:
            while self._aux_waiting:
                self._turns.wait()
            self._writing = True
        try:
            return self._commit_batch_in_turn(encoded)
        finally:
            with self._turns:
                self._writing = False
                self._turns.notify_all()

    def _commit_batch_in_turn(self, encoded: _Encoded) -> list[tuple[int, int]]:
        conn = self._writer_conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT seq, time_ms FROM events ORDER BY seq DESC LIMIT 1").fetchone()
            next_seq, last_time = (0, 0) if row is None else (row[0] + 1, row[1])
            if next_seq != encoded.next_seq or last_time > encoded.time_ms:
                # Another writer (process) appended, or an earlier batch failed: re-encode for the
                # real position, and tell the encoder where the log really ends.
                encoded = _Encoded(encoded.requests, next_seq, max(self._clock(), last_time))
                with self._state_lock:
                    self._resync = (next_seq + encoded.count, encoded.time_ms)
            # One statement for the batch: SQLite runs it in C with the GIL released.
            cur = conn.execute(_INSERT_BATCH, encoded.params)
            if cur.rowcount != encoded.count:
                raise StoreUnavailable("audit log write inserted a wrong number of rows")
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
        frontier = _extended(self._frontier, encoded.leaves)  # only this thread changes the frontier
        with self._state_lock:
            self._frontier = frontier
            self._commits += 1
            self._largest_commit = max(self._largest_commit, encoded.count)
        return encoded.results()

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
        return self._by_ref("patient", patient_ref)

    def by_study(self, study_ref: str) -> list[AuditEvent]:
        """Events about ``study_ref``, in seq order (``""`` matches nothing)."""
        return self._by_ref("study", study_ref)

    def _by_ref(self, column: str, ref: str) -> list[AuditEvent]:
        if not isinstance(ref, str):
            raise InvalidInput(f"a {column} ref is a string")
        h = _ref_hash(ref)
        if h is None:
            return []
        conn = self._reader()
        conn.execute("BEGIN")  # one snapshot across the bucket queries
        try:
            size = conn.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM events").fetchone()[0]
            keys = [(bucket << _HASH_BITS) | h for bucket in range(((size - 1) >> _BUCKET_BITS) + 1)]
            out: list[AuditEvent] = []
            field = f"{column}_ref"
            for lo in range(0, len(keys), _IN_CHUNK):  # buckets ascend, so seqs do across chunks
                chunk = keys[lo : lo + _IN_CHUNK]
                cur = conn.execute(
                    f"SELECT body FROM events WHERE {column}_key IN ({','.join('?' * len(chunk))}) "
                    "ORDER BY seq",
                    chunk,
                )
                # The key holds 40 bits of the ref's hash: re-check the ref in the body itself.
                events = map(_event_from_body, (body for (body,) in cur))
                out.extend(event for event in events if getattr(event, field) == ref)
        finally:
            conn.execute("COMMIT")
        return out

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
                columns = (seq, time_ms, patient_key, study_key)
                if columns != (
                    event.seq,
                    event.time_ms,
                    _lookup_key(event.seq, event.patient_ref),
                    _lookup_key(event.seq, event.study_ref),
                ) or (  # ref columns: NULL, or (rows written before they were dropped) the body's ref
                    patient_ref not in (None, event.patient_ref or None)
                    or study_ref not in (None, event.study_ref or None)
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
        return self._aux_write_many(sql, [params])

    def _aux_write_many(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> sqlite3.Cursor:
        """Run ``sql`` for every row in one transaction (taking a write turn, see ``_turns``);
        returns the cursor of the last row."""
        if self._closed:
            raise StoreUnavailable("the audit log is closed")
        with self._turns:
            self._aux_waiting += 1
            try:
                while self._writing:
                    self._turns.wait()
            except BaseException:
                self._aux_waiting -= 1
                self._turns.notify_all()
                raise
        try:
            with self._aux_lock:
                self._aux.execute("BEGIN IMMEDIATE")
                try:
                    cur = self._aux.cursor()
                    for params in rows:
                        cur.execute(sql, params)
                    self._aux.execute("COMMIT")
                except BaseException:
                    if self._aux.in_transaction:
                        self._aux.execute("ROLLBACK")
                    raise
                return cur
        finally:
            with self._turns:
                self._aux_waiting -= 1
                self._turns.notify_all()

    def add_confirmed_anchors(self, anchors: Sequence[tuple[int, bytes, str, str, int]]) -> list[int]:
        """Record anchors already mined, ``(tree_size, root, kind, tx_hash, block_number)`` each,
        in one transaction; returns their ``idx``. ``tx_hash`` may be "" when unknown (an anchor
        re-read from the chain). The anchorer uses this after the receipt: the chain is the source
        of truth, so nothing is lost if the process dies before this call."""
        rows = []
        size = self.size()
        for tree_size, root, kind, tx_hash, block_number in anchors:
            if kind not in ANCHOR_KINDS:
                raise InvalidInput(f"anchor kind must be one of {sorted(ANCHOR_KINDS)}")
            if not isinstance(root, bytes | bytearray) or len(root) != merkle.HASH_SIZE:
                raise InvalidInput("an anchor root is 32 bytes")
            if not isinstance(tx_hash, str):
                raise InvalidInput("an anchor's transaction hash is a string")
            if type(tree_size) is not int or not 0 <= tree_size <= size:
                raise InvalidInput("an anchor's tree size must be within the log")
            if type(block_number) is not int or block_number < 0:
                raise InvalidInput("a block number is a non-negative integer")
            rows.append((tree_size, bytes(root), kind, tx_hash, block_number, self._clock()))
        if not rows:
            return []
        cur = self._aux_write_many(
            "INSERT INTO anchors(tree_size, root, kind, tx_hash, block_number, status, created_ms) "
            "VALUES (?, ?, ?, ?, ?, 'confirmed', ?)",
            rows,
        )
        assert cur.lastrowid is not None
        last = int(cur.lastrowid)
        return list(range(last - len(rows) + 1, last + 1))

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
        self._encoder.join()
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
