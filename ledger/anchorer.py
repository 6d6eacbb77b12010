"""Group-committed anchoring of the audit log on-chain.

Requests only append to the durable log; this anchorer, in its own thread, commits what is
new: in ``tree`` mode (default) one RFC 9162 tree head (size, root) per batch — a batch
closes when `max_batch` events are pending or `max_delay` seconds have passed since the
first of them — and in ``event`` mode one transaction per event (its leaf hash).

Crash safety: the chain is the source of truth for what is anchored. On start (and after any
failure) `reconcile()` reads the contract's anchors, rewrites the local anchor table to match,
checks every on-chain root against the local log (a mismatch means the log was altered and
stops anchoring), and resumes from the chain's tree size. Since the contract only accepts a
growing tree (and in event mode exactly the next sequence number), no event is anchored twice
and, after a restart, every pending event is anchored.

Cost per batch in tree mode is O(log n) and independent of the batch size: the root comes from
the log's own in-memory frontier (:meth:`AuditLog.tree_head`), which the writer keeps current
batch by batch; leaf hashes are read back from the table only by `reconcile()` (to check the
chain's anchors) and when another process has written the same log file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ledger.audit_log import AuditLog
from ledger.chain import ChainClient, SentTx
from ledger.errors import ChainError
from ledger.merkle import MerkleFrontier

log = logging.getLogger("medledger.anchorer")

ANCHOR_TREE_GAS = 200_000
ANCHOR_EVENT_GAS = 200_000


@dataclass(frozen=True)
class ChainAnchor:
    index: int
    first_seq: int
    tree_size: int
    root: bytes
    timestamp: int
    block_number: int
    single: bool


def read_chain_anchors(chain: ChainClient, start: int = 0, page: int = 500) -> list[ChainAnchor]:
    """All anchors of the AccessLedger contract from index `start` on."""
    contract = chain.contract("AccessLedger")
    count = int(contract.functions.anchorCount().call())
    out: list[ChainAnchor] = []
    i = start
    while i < count:
        for j, a in enumerate(contract.functions.anchors(i, page).call()):
            out.append(
                ChainAnchor(i + j, int(a[0]), int(a[1]), bytes(a[2]), int(a[3]), int(a[4]), bool(a[5]))
            )
        i += page
    return out


class LogDiverged(ChainError):
    code = "log_diverged"


class Anchorer:
    def __init__(
        self,
        chain: ChainClient,
        audit: AuditLog,
        *,
        mode: str = "tree",
        max_batch: int = 100_000,
        max_delay: float = 0.5,
        on_anchor: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_anchor(tree_size, block_number)`` is called (in the anchoring thread) after each
        anchor is confirmed and recorded, e.g. for metrics; it must be quick and not raise."""
        if mode not in ("tree", "event"):
            raise ValueError("mode must be 'tree' or 'event'")
        self.chain = chain
        self.audit = audit
        self.mode = mode
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.on_anchor = on_anchor
        self._snapshot_at: float | None = None  # monotonic time of the last batch's snapshot
        self._frontier = MerkleFrontier()
        self._anchored = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.diverged = False

    @property
    def anchored_size(self) -> int:
        return self._anchored

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.reconcile()
        self._thread = threading.Thread(target=self._run, name="anchorer", daemon=True)
        self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=30)
        if flush and not self.diverged:
            self.anchor_pending()

    def notify(self) -> None:
        """Tell the anchorer new events exist (it also polls every `max_delay`)."""
        self._wake.set()

    def _run(self) -> None:
        first_pending_at: float | None = None
        poll = self.max_delay / 4
        timeout = poll
        while not self._stop.is_set():
            self._wake.wait(timeout)
            self._wake.clear()
            timeout = poll
            if self.diverged:
                continue
            pending = self.audit.size() - self._anchored
            if pending <= 0:
                first_pending_at = None
                self._snapshot_at = None  # everything pending from now on arrived after this check
                continue
            now = time.monotonic()
            if first_pending_at is None:
                # Events that arrived while the previous batch was on its way have waited since
                # its snapshot: count the delay from there, so no event waits max_delay twice.
                first_pending_at = self._snapshot_at if self._snapshot_at is not None else now
            if pending < self.max_batch and now - first_pending_at < self.max_delay:
                timeout = max(0.0, min(poll, first_pending_at + self.max_delay - now))
                continue
            try:
                self.anchor_pending()
                first_pending_at = None
                self.last_error = None
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("anchoring failed, will reconcile and retry: %s", self.last_error)
                first_pending_at = None
                self._snapshot_at = None
                time.sleep(min(self.max_delay, 1.0))
                try:
                    self.reconcile()
                except Exception as exc2:
                    log.warning("reconcile failed: %s", type(exc2).__name__)

    # ---- the work ----------------------------------------------------------------------
    def reconcile(self) -> None:
        """Make the local anchor table and position match the chain (the source of truth)."""
        with self._lock:
            chain_anchors = read_chain_anchors(self.chain)
            size = self.audit.size()
            tree_size = chain_anchors[-1].tree_size if chain_anchors else 0
            if tree_size > size:
                self.diverged = True
                raise LogDiverged(f"the chain anchors {tree_size} events but the local log holds {size}")
            self._frontier = MerkleFrontier()
            self._extend_frontier(tree_size, check=chain_anchors)
            for p in self.audit.pending_anchors():
                self.audit.drop_anchor(p.idx)
            known = {(a.tree_size, a.root) for a in self.audit.anchors()}
            self.audit.add_confirmed_anchors(
                [
                    (a.tree_size, a.root, "event" if a.single else "tree", f"chain:{a.index}", a.block_number)
                    for a in chain_anchors
                    if (a.tree_size, a.root) not in known
                ]
            )
            self._anchored = tree_size
            self.chain.reset_nonces()

    def _extend_frontier(self, upto: int, check: list[ChainAnchor] | None = None) -> None:
        by_size = {a.tree_size: a for a in check or []}
        start = self._frontier.size
        step = 50_000
        for lo in range(start, upto, step):
            leaves = self.audit.leaf_hashes(lo, min(upto, lo + step))
            for leaf in leaves:
                self._frontier.append(leaf)
                a = by_size.get(self._frontier.size)
                if a is None:
                    continue
                expected = leaf if a.single else self._frontier.root()
                if expected != a.root:
                    self.diverged = True
                    raise LogDiverged(
                        f"anchor {a.index} (tree size {a.tree_size}) does not match the local log"
                    )

    def anchor_pending(self) -> int:
        """Anchor every event not yet anchored; wait for the receipts. Returns the new tree size."""
        with self._lock:
            snapshot_at = time.monotonic()
            size = self.audit.size()
            if size <= self._anchored:
                return self._anchored
            if self.mode == "tree":
                head_size, root = self.audit.tree_head()  # O(log n): the writer's frontier
                if head_size > self._anchored:
                    size = head_size  # what the writer has committed and hashed so far
                else:  # only another process appended to the file: hash from the table
                    self._extend_frontier(size)
                    root = self._frontier.root()
                # The local record is written once the receipt is in (one short transaction, not a
                # pending row and then an update, each waiting for a write turn): the chain is the
                # source of truth, and reconcile() adopts any anchor the table lacks after a crash.
                sent = self.chain.send(
                    "AccessLedger", "anchorTree", size, root, gas=ANCHOR_TREE_GAS, preflight=False
                )
                block = int(self.chain.wait(sent)["blockNumber"])
                if self.on_anchor is not None:
                    self.on_anchor(size, block)
                self.audit.add_confirmed_anchors([(size, root, "tree", sent.tx_hash, block)])
            else:
                leaves = self.audit.leaf_hashes(self._anchored, size)
                sends: list[tuple[SentTx, bytes]] = []
                for offset, leaf in enumerate(leaves):  # pipelined: local nonces, no waiting
                    seq = self._anchored + offset
                    sent = self.chain.send(
                        "AccessLedger", "anchorEvent", seq, leaf, gas=ANCHOR_EVENT_GAS, preflight=False
                    )
                    sends.append((sent, leaf))
                mined: list[tuple[int, bytes, str, str, int]] = []
                try:
                    for offset, (sent, leaf) in enumerate(sends):
                        block = int(self.chain.wait(sent)["blockNumber"])
                        mined.append((self._anchored + offset + 1, leaf, "event", sent.tx_hash, block))
                        if self.on_anchor is not None:
                            self.on_anchor(self._anchored + offset + 1, block)
                finally:  # what did get mined is recorded even if a later receipt failed
                    self.audit.add_confirmed_anchors(mined)
                self._extend_frontier(size)
            self._anchored = size
            self._snapshot_at = snapshot_at
            return size
